"""safetensors header rules: one row per kind of header abuse."""

from __future__ import annotations

import json
import os
import struct

import pytest

from ckpt_stage.scan._common import Region
from ckpt_stage.scan.safetensors import check_safetensors, looks_like_safetensors

T = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}
Z32 = b"\x00" * 32


def st(header, data: bytes = Z32, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.fixture
def check(tmp_path):
    def run(data: bytes):
        path = tmp_path / "x.safetensors"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            return check_safetensors(Region(fd, 0, len(data), "x"))
        finally:
            os.close(fd)

    return run


ROWS = [
    ("ok", st({"w": T}), None),
    ("ok_metadata", st({"__metadata__": {"format": "pt"}, "w": T}), None),
    ("ok_empty_tensor", st({"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}, "w": T}), None),
    ("ok_padded_header", st(json.dumps({"w": T}).encode() + b"    "), None),
    ("ok_f4_packed", st({"w": {"dtype": "F4", "shape": [64], "data_offsets": [0, 32]}}), None),
    ("ok_no_tensors", st({}, b""), None),
    ("too_short", b"\x01\x00", "too short"),
    ("header_over_100mb", st({"w": T}, length=100_000_001), "100 MB"),
    ("header_past_eof", st({"w": T}, length=4096), "past the end of the file"),
    ("not_json", st(b"{nope"), "not valid JSON"),
    ("not_utf8", st(b'{"\xff": 1}'), "not valid JSON"),
    ("list", st([T]), "not an object"),
    ("deep_json", st(b"[" * 100_000 + b"]" * 100_000), "JSON"),
    ("duplicate_key", st(b'{"w": ' + json.dumps(T).encode() + b', "w": ' + json.dumps(T).encode() + b"}"),
     "duplicate key"),
    ("entry_not_object", st({"w": [1, 2]}), "not an object"),
    ("extra_field", st({"w": {**T, "evil": 1}}), "unexpected field"),
    ("unknown_dtype", st({"w": {**T, "dtype": "Q8"}}), "unknown dtype"),
    ("shape_negative", st({"w": {**T, "shape": [-1, 8]}}), "non-negative"),
    ("shape_float", st({"w": {**T, "shape": [2.0, 4]}}), "non-negative"),
    ("shape_bool", st({"w": {**T, "shape": [True, 8]}}), "non-negative"),
    ("offsets_short", st({"w": {**T, "data_offsets": [0]}}), "not [begin, end]"),
    ("offsets_reversed", st({"w": {**T, "shape": [0], "data_offsets": [32, 0]}}), "before begin"),
    ("numel_mismatch", st({"w": {**T, "shape": [3, 4]}}), "data_offsets span"),
    ("sub_byte_misaligned", st({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}), "whole bytes"),
    ("out_of_range", st({"w": {**T, "data_offsets": [32, 64]}}), "past the data section"),
    ("huge_shape", st({"w": {"dtype": "F64", "shape": [2**40, 2**40], "data_offsets": [0, 2**83]}}),
     "past the data section"),
    ("overlap", st({"a": T, "b": {**T, "data_offsets": [16, 48]}}, b"\x00" * 48), "overlaps"),
    ("gap", st({"a": T, "b": {**T, "data_offsets": [40, 72]}}, b"\x00" * 72), "gap"),
    ("trailing", st({"w": T}, Z32 + b"x"), "after the last tensor"),
    ("metadata_not_str", st({"__metadata__": {"a": 1}, "w": T}), "__metadata__"),
]


@pytest.mark.parametrize(("data", "problem"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_header(check, data, problem):
    info = check(data)
    if problem is None:
        assert info.problems == []
    else:
        assert any(problem in p for p in info.problems), info.problems


def test_real_file_from_safetensors(check, tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "real.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16), "c": torch.zeros(2, dtype=torch.int64)},
              str(path), metadata={"k": "v"})
    info = check(path.read_bytes())
    assert info.problems == [] and info.data_bytes == 3 * 5 * 4 + 7 * 2 + 2 * 8
    assert info.tensors["a"] == ("F32", [3, 5]) and info.metadata == {"k": "v"}


@pytest.mark.parametrize(
    ("head", "expected"),
    [(st({"w": T}), True), (b"{" * 9, False), (b"\x08\x00\x00\x00\x00\x00\x00\x00[", False), (b"short", False)],
)
def test_sniff(head, expected):
    assert looks_like_safetensors(head) is expected
