"""safetensors files whose header length starts with the byte 0x80 (pickle's PROTO opcode), and
files that are both safetensors and pickle (polyglots).

One safetensors file in 256 has a header length whose low byte is 0x80; when the next byte is 0..5
(headers of 128 + 256·k bytes for k ≤ 5: small models, shards of ``save_pretrained(max_shard_size=…)``)
its first two bytes read as ``PROTO k``. Such a file must be read as safetensors when its header checks
out. The reverse must not slip through: a file crafted to be a valid safetensors file *and* a pickle
that ``torch.load`` (which reads any non-zip file with ``pickle.load`` from offset 0) would run.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckpt_stage.config import Settings
from ckpt_stage.domain import FileFormat, ReasonCode as R, Verdict
from ckpt_stage.policy import decide
from ckpt_stage.sandbox.job import LoadJob
from ckpt_stage.load.loader import load_and_check
from ckpt_stage.scan import scan_version
from ckpt_stage.scan._common import Region
from ckpt_stage.scan.safetensors import MAX_HEADER
from ckpt_stage.scan.sniff import Kind, live_pickle, sniff


def header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def save_with_header_len(path: Path, target: int, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A real ``safetensors.torch.save_file`` output whose header is exactly ``target`` bytes, reached
    by padding ``__metadata__`` (the writer pads headers to 8 bytes, so targets are multiples of 8)."""
    tensors = tensors or {"layer.weight": torch.randn(3, 4), "layer.bias": torch.zeros(3)}
    for pad in range(0, target + 64):
        save_file(tensors, str(path), metadata={"format": "pt", "p": "x" * pad} if target > 128 else {"p": "x" * pad})
        n = header_len(path)
        if n == target:
            return path
        if n > target:
            break
    raise AssertionError(f"cannot reach header length {target}")


def kind_of(path: Path) -> Kind:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sniff(Region(fd, 0, os.fstat(fd).st_size, path.name))[0]
    finally:
        os.close(fd)


def in_process_load(root: Path, rels: list[str], settings: Settings):
    """The worker's load, in-process, with the parent scan's readings (as the pipeline sends them)."""
    scan = scan_version(root, rels, settings)
    job = LoadJob(root=str(root), files=tuple((r, scan.formats[r].value) for r in rels),
                  readings=tuple(scan.readings[r] for r in rels), arch="torch.nn:Linear",
                  arch_kwargs={"in_features": 4, "out_features": 3})
    return scan, load_and_check(job)


# -- the false positive: 0x80 low byte, every PROTO sibling -----------------------------------------

SIBLINGS = [0x80 + 256 * k for k in range(6)]  # 80 00, 80 01, 80 02 ... 80 05 on disk


@pytest.mark.parametrize("target", SIBLINGS, ids=[f"80-{k:02x}" for k in range(6)])
def test_header_length_starting_with_proto_byte_is_safetensors(tmp_path, target):
    tensors = {"w": torch.randn(3)} if target == 128 else {"weight": torch.randn(3, 4), "bias": torch.zeros(3)}
    path = save_with_header_len(tmp_path / "model.safetensors", target, tensors)
    raw = path.read_bytes()
    assert raw[0] == 0x80 and raw[1] == target >> 8  # really starts like a pickle
    assert kind_of(path) is Kind.SAFETENSORS
    scan = scan_version(tmp_path, ["model.safetensors"], Settings())
    assert scan.formats["model.safetensors"] is FileFormat.SAFETENSORS
    assert not [f for f in scan.findings if f.blocking], [f.to_dict() for f in scan.findings]
    reading = scan.readings["model.safetensors"]
    assert reading.header_len == target and reading.data_start == 8 + target


def test_proto_byte_shard_loads_and_passes(tmp_path):
    """The whole check (scan + worker with the scan's reading) passes a benign 0x80 0x02 shard."""
    lin = torch.nn.Linear(4, 3)
    save_with_header_len(tmp_path / "model.safetensors", 0x280, dict(lin.state_dict()))
    scan, result = in_process_load(tmp_path, ["model.safetensors"], Settings())
    decision = decide(list(scan.findings) + list(result.findings), Settings())
    assert decision.verdict is Verdict.PASS, [f.to_dict() for f in result.findings]


def test_sharded_small_model_with_proto_byte_shard(tmp_path):
    """Shards with an index, as ``save_pretrained(max_shard_size=...)`` writes them; one shard's header
    length starts with 0x80 0x03."""
    lin = torch.nn.Linear(4, 3)
    save_with_header_len(tmp_path / "model-00001-of-00002.safetensors", 0x380, {"weight": lin.weight.detach()})
    save_file({"bias": lin.bias.detach()}, str(tmp_path / "model-00002-of-00002.safetensors"),
              metadata={"format": "pt"})
    index = {"metadata": {"total_size": 60},
             "weight_map": {"weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    rels = sorted(p.name for p in tmp_path.iterdir())
    scan, result = in_process_load(tmp_path, rels, Settings())
    assert scan.readings["model.safetensors.index.json"].shards == (
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    decision = decide(list(scan.findings) + list(result.findings), Settings())
    assert decision.verdict is Verdict.PASS, [f.to_dict() for f in list(scan.findings) + list(result.findings)]


def test_truncated_proto_byte_safetensors_is_reported_as_safetensors(tmp_path):
    path = save_with_header_len(tmp_path / "model.safetensors", 0x280)
    path.write_bytes(path.read_bytes()[:-10])
    scan = scan_version(tmp_path, ["model.safetensors"], Settings())
    assert scan.formats["model.safetensors"] is FileFormat.SAFETENSORS
    (f,) = [f for f in scan.findings if f.blocking]
    assert f.code is R.CORRUPT_ARCHIVE and "safetensors header" in f.message


@pytest.mark.parametrize("proto", [2, 3, 4, 5])
def test_real_pickles_still_sniff_as_pickles(tmp_path, proto):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=proto, _use_new_zipfile_serialization=False)
    assert kind_of(path) is Kind.PICKLE
    p2 = tmp_path / "plain.pkl"
    p2.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=proto))
    assert kind_of(p2) is Kind.PICKLE


def test_one_header_limit():
    from ckpt_stage.load import loader

    assert MAX_HEADER == 100_000_000  # safetensors' Rust MAX_HEADER_SIZE
    assert loader.MAX_HEADER is MAX_HEADER  # the worker uses the scanner's constant, not its own


# -- polyglots: safetensors and pickle at once -------------------------------------------------------

META_OPEN = b'{"__metadata__":{"p":"'


def polyglot(path: Path, pickle_tail: bytes) -> Path:
    """A file that ``safe_open`` reads as one U8 tensor and ``pickle.load`` reads as a stream that ends
    with ``pickle_tail``, placed in the data section.

    Header length N = 0x58 + 256·25 = 6488: byte 0 is ``X`` (BINUNICODE) with length 25 (bytes 1..4),
    which swallows the zero length bytes and the JSON up to the metadata string; inside it, 50 blocks
    ``C~`` (SHORT_BINBYTES of 126 bytes) and a last ``C`` + 64 walk over the rest of the header, so the
    pickle continues at the data section, where anything goes."""
    n = 0x58 + 256 * 25
    k = 50
    tail_len = 89 + 255 * 25 - 128 * k  # 64
    body = (b"C~" + b"a" * 126) * k + b"C" + bytes([tail_len])
    tail = b'"},"w":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}' % (len(pickle_tail), len(pickle_tail))
    tail += b" " * (tail_len - len(tail))
    header = META_OPEN + body + tail
    assert len(header) == n and len(META_OPEN) == 25 - 3
    path.write_bytes(struct.pack("<Q", n) + header + pickle_tail)
    return path


def system_call(cmd: str) -> bytes:
    c = cmd.encode()
    return (b"\x8c\x02os\x8c\x06system\x93" + b"\x8c" + bytes([len(c)]) + c + b"\x85R.")


@pytest.fixture
def canary(tmp_path):
    return tmp_path / "canary"


def test_hostile_polyglot_is_both_formats_for_real(tmp_path, canary):
    """The test file is genuine: safetensors reads it, and a pickle load runs its payload."""
    path = polyglot(tmp_path / "model.safetensors", system_call(f"touch {canary}"))
    with safe_open(str(path), framework="pt") as fh:
        assert list(fh.keys()) == ["w"]
    code = f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert canary.exists()  # what torch.load(weights_only=False) on a serving host would do


def test_hostile_polyglot_is_refused_and_never_loaded(tmp_path, canary):
    path = polyglot(tmp_path / "model.safetensors", system_call(f"touch {canary}"))
    assert kind_of(path) is Kind.SAFETENSORS  # what the first bytes look like...
    scan, result = in_process_load(tmp_path, [path.name], Settings())
    codes = {f.code for f in scan.findings if f.blocking}
    assert {R.CORRUPT_ARCHIVE, R.UNSAFE_PICKLE} <= codes, [f.to_dict() for f in scan.findings]
    assert any("safetensors file and also a pickle" in f.message for f in scan.findings)
    assert any("os.system" in f.message or "posix.system" in f.message for f in scan.findings)
    # ...but the reading says pickle: the worker obeys it and never hands the file to a loader.
    assert scan.readings[path.name].fmt is FileFormat.PICKLE
    assert not canary.exists()
    assert decide(list(scan.findings) + list(result.findings), Settings()).verdict is Verdict.QUARANTINE


def test_inert_pickle_reading_is_still_safetensors(tmp_path):
    """A second reading that does nothing (no global; torch.load stops at "invalid magic number") is no
    reason to refuse: real files can parse that way by chance (see the next test)."""
    path = polyglot(tmp_path / "weights.safetensors", b"K\x07.")
    assert pickle.loads(path.read_bytes()) == 7
    scan = scan_version(tmp_path, [path.name], Settings())
    assert scan.formats[path.name] is FileFormat.SAFETENSORS
    assert not [f for f in scan.findings if f.blocking], [f.to_dict() for f in scan.findings]


def test_real_file_whose_bytes_happen_to_parse_as_a_pickle(tmp_path):
    """save_file output with a header length of 0x58 + 256·L (byte 0 is BINUNICODE, length L) and a '.'
    of a dotted key at offset 5 + L: pickle.loads returns a string. A benign file: it must pass."""
    path = tmp_path / "model.safetensors"
    target = 0x58 + 256 * 8  # BINUNICODE of 8 bytes: the pickle lands at offset 13
    for m in range(4096):  # the first key "aaa.weight" has its '.' at offset 8 + len('{"aaa') = 13
        save_file({"aaa.weight": torch.randn(3, 4), "z" * m: torch.zeros(3)}, str(path))
        if header_len(path) == target:
            break
    else:
        pytest.fail("no such file found")
    raw = path.read_bytes()
    assert raw[0] == ord("X") and raw[13] == ord(".")
    assert isinstance(pickle.loads(raw), str)
    scan = scan_version(tmp_path, [path.name], Settings())
    assert scan.formats[path.name] is FileFormat.SAFETENSORS
    assert not [f for f in scan.findings if f.blocking], [f.to_dict() for f in scan.findings]


def test_polyglot_starting_like_a_legacy_torch_file_is_refused(tmp_path):
    """The first stream ends with torch's legacy magic number: torch.load would go on reading pickles
    from the file (protocol, sys_info, then the object), so the second meaning is live."""
    magic = 0x1950A86A20F9469CFC6C
    path = polyglot(tmp_path / "weights.safetensors", b"\x8a\x0a" + magic.to_bytes(10, "little") + b".")
    assert pickle.loads(path.read_bytes()) == magic
    scan = scan_version(tmp_path, [path.name], Settings())
    ambiguous = [f for f in scan.findings if f.code is R.CORRUPT_ARCHIVE and "also a pickle" in f.message]
    assert ambiguous and "legacy torch" in ambiguous[0].message, [f.to_dict() for f in scan.findings]
    assert scan.readings[path.name].fmt is not FileFormat.SAFETENSORS


def test_polyglot_through_inspect(tmp_path, canary, monkeypatch):
    """End to end through the sandboxed worker (``inspect``): quarantined, the payload never runs."""
    from ckpt_stage.pipeline import inspect_paths

    monkeypatch.setenv("CKPT_STAGE_CACHE_DIR", str(tmp_path / "cache"))
    path = polyglot(tmp_path / "model.safetensors", system_call(f"touch {canary}"))
    report = inspect_paths([path], settings=Settings.from_env())
    assert report.verdict is Verdict.QUARANTINE
    assert R.UNSAFE_PICKLE in {f.code for f in report.reasons}
    assert not canary.exists()


def test_proto_byte_shard_through_inspect(tmp_path, monkeypatch):
    from ckpt_stage.pipeline import inspect_paths

    monkeypatch.setenv("CKPT_STAGE_CACHE_DIR", str(tmp_path / "cache"))
    lin = torch.nn.Linear(4, 3)
    path = save_with_header_len(tmp_path / "model.safetensors", 0x480, dict(lin.state_dict()))
    report = inspect_paths([path], arch="torch.nn:Linear", arch_kwargs={"in_features": 4, "out_features": 3},
                           settings=Settings.from_env())
    assert report.verdict is Verdict.PASS, report.to_dict()
    assert report.files[0].format is FileFormat.SAFETENSORS


def test_no_false_positive_over_every_header_length(tmp_path):
    """Every header length below 8 KiB (every low byte with every second byte up to 0x1f: not every
    writer pads headers to 8 bytes) and every 8-aligned one up to 65 KiB (second bytes up to 0x104),
    with dotted keys as real state_dicts have: each is read as safetensors, never as a live pickle."""
    path = tmp_path / "m.safetensors"
    entry = b'"layer.0.weight":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"__metadata__":{"format":"pt"}'
    refused = []
    settings = Settings()
    with open(path, "w+b") as fh:
        for n in [*range(len(entry) + 2, 8192), *range(8192, 2**16 + 1024, 8)]:
            header = (b"{" + entry + b"}").ljust(n, b" ")
            fh.seek(0)
            fh.truncate()
            fh.write(struct.pack("<Q", n) + header + b"\x01\x02\x03\x04")
            fh.flush()
            region = Region(fh.fileno(), 0, 8 + n + 4, "m")
            if sniff(region)[0] is not Kind.SAFETENSORS or live_pickle(region, settings) is not None:
                refused.append(n)
    assert refused == []
