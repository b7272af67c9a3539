"""Format by content: the first bytes decide, never the name."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zipfile

import pytest

from ckpt_stage.scan._common import Region
from ckpt_stage.scan.sniff import Kind, claims_checkpoint, extension, sniff


@pytest.fixture
def kind_of(tmp_path):
    def run(data: bytes) -> Kind:
        path = tmp_path / "f"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            return sniff(Region(fd, 0, len(data), "f"))[0]
        finally:
            os.close(fd)

    return run


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/b", "x")
    return buf.getvalue()


ROWS = [
    ("empty", b"", Kind.EMPTY),
    ("zip", _zip(), Kind.ZIP),
    ("pickle2", pickle.dumps({"a": 1}, protocol=2), Kind.PICKLE),
    ("pickle5", pickle.dumps({"a": 1}, protocol=5), Kind.PICKLE),
    ("pickle0", pickle.dumps({"a": 1}, protocol=0), Kind.PICKLE_TEXT),
    ("pickle1", pickle.dumps([1], protocol=1), Kind.PICKLE_TEXT),
    ("safetensors", struct.pack("<Q", 2) + b"{}", Kind.SAFETENSORS),
    ("7z", b"7z\xbc\xaf\x27\x1c\x00\x04", Kind.SEVEN_ZIP),
    ("gzip", gzip.compress(b"x"), Kind.COMPRESSED),
    ("png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, Kind.IMAGE),
    ("elf", b"\x7fELF\x02\x01\x01" + b"\x00" * 20, Kind.NATIVE),
    ("npy", b"\x93NUMPY\x01\x00", Kind.OTHER_MODEL),
    ("tar", b"x" * 257 + b"ustar\x0000" + b"\x00" * 300, Kind.TAR),
    ("json", b'{"inputs": [[1, 2]]}', Kind.TEXT),
    ("json_brace_at_8", b'{"data":{"x": 1}}', Kind.TEXT),
    ("yaml", b"flavors:\n  pytorch: {}\n", Kind.TEXT),
    ("utf8_text", "été\n".encode(), Kind.TEXT),
    ("binary", b"\x01\x02\x00\xff" * 10, Kind.BINARY),
]


@pytest.mark.parametrize(("data", "kind"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_sniff(kind_of, data, kind):
    assert kind_of(data) is kind


@pytest.mark.parametrize(
    ("path", "mlflow_dir", "claims"),
    [
        ("model.pt", False, True),
        ("data/model.pth", True, True),
        ("weights.safetensors", True, True),
        ("ckpt.pth.tar", False, True),
        ("MLmodel", True, False),
        ("conda.yaml", True, False),
        ("input_example.json", True, False),
        ("data/pickle_module_info.txt", True, False),
        ("registered_model_meta", True, False),
        ("artifacts/plot.png", True, False),
        ("weights", False, True),
    ],
)
def test_claims_checkpoint(path, mlflow_dir, claims):
    assert claims_checkpoint(path, mlflow_dir=mlflow_dir) is claims


def test_extension():
    assert extension("a/B.PTH.TAR") == ".pth.tar" and extension("x.pt") == ".pt" and extension("MLmodel") == ""
