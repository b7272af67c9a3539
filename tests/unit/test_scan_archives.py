"""Zip structure from raw bytes: each forged field is a row."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode
from ckpt_stage.scan._common import Region
from ckpt_stage.scan.archives import gaps, inflate, read_entry, read_zip
from tests.corpus.static_cases import Z, craft_zip, patch_zip

S = Settings()
C, U = ReasonCode.CORRUPT_ARCHIVE, ReasonCode.UNSUPPORTED_FORMAT


@pytest.fixture
def region(tmp_path):
    fds = []

    def make(data: bytes) -> Region:
        path = tmp_path / f"z{len(fds)}.zip"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        fds.append(fd)
        return Region(fd, 0, len(data), path.name)

    yield make
    for fd in fds:
        os.close(fd)


def kinds(z) -> set[tuple[ReasonCode, str]]:
    return {(p.code, p.kind) for p in z.problems}


GOOD = [Z("a/data.pkl", b"\x80\x02N."), Z("a/version", b"3\n")]
_deflated = zlib.compressobj(9, zlib.DEFLATED, -15)
BIG = b"x" * (2 * 2**20)
PACKED = _deflated.compress(BIG) + _deflated.flush()

ROWS = [
    ("clean", GOOD, set()),
    ("encrypted", [Z("a/data.pkl", b"x", flags=1)], {(U, "encrypted")}),
    ("strong_encryption", [Z("a/data.pkl", b"x", flags=0x40)], {(U, "encrypted")}),
    ("aes_method", [Z("a/data.pkl", b"x", method=99)], {(U, "encrypted")}),
    ("patched", [Z("a/data.pkl", b"x", flags=0x20)], {(C, "flags")}),
    ("bzip2_method", [Z("a/data.pkl", b"x", method=12)], {(U, "method")}),
    ("name_mismatch", [Z("a/data.pkl", b"x", local_name="a/data.pkX")], {(C, "name_mismatch")}),
    ("crc", [Z("a/data.pkl", b"x", crc=123)], {(C, "crc")}),
    ("stored_size_lie", [Z("a/data.pkl", b"x", usize=5)], {(C, "sizes")}),
    ("traversal", [Z("../evil", b"x")], {(C, "traversal")}),
    ("absolute", [Z("/etc/passwd", b"x")], {(C, "traversal")}),
    ("backslash", [Z("a\\..\\evil", b"x")], {(C, "traversal")}),
    ("drive", [Z("C:/evil", b"x")], {(C, "traversal")}),
    ("duplicate", [Z("a/x", b"1"), Z("a/x", b"2")], {(C, "duplicate")}),
    ("cd_points_into_data", [Z("a/x", b"1" * 100), Z("a/y", b"2", cd_offset=10, in_local=False)], {(C, "local")}),
    ("cd_points_nowhere", [Z("a/x", b"1", cd_offset=10_000)], {(C, "truncated")}),
    ("bomb", [Z("a/x", BIG, method=8, payload=PACKED)], {(C, "bomb")}),
    ("deflate_ok", [Z("a/x", BIG, method=8, payload=PACKED)], set()),
    ("deflate_size_lie", [Z("a/x", b"x" * 100, method=8, payload=PACKED, crc=zlib.crc32(b"x" * 100))], {(C, "sizes")}),
    ("deflate_damaged", [Z("a/x", b"x" * 1000, method=8, payload=b"\xff" * 20)], {(C, "deflate")}),
]


@pytest.mark.parametrize(("entries", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_forged_fields(region, entries, expected):
    settings = Settings(max_compression_ratio=100.0 if expected == {(C, "bomb")} else 10_000.0)
    z = read_zip(region(craft_zip(entries)), settings)
    assert z.parsed
    assert kinds(z) == expected, z.problems


def test_overlapping_entries(region):
    hidden = Z("a/hidden.pkl", b"\x80\x02N.")
    hidden_bytes = craft_zip([hidden])[: 30 + len(hidden.name) + len(hidden.data)]
    entries = [Z("a/carrier", b"pad" + hidden_bytes + b"pad"), Z("a/version", b"3\n")]
    at = craft_zip(entries).find(hidden_bytes)
    entries.append(Z("a/hidden.pkl", hidden.data, cd_offset=at, in_local=False))
    z = read_zip(region(craft_zip(entries)), S)
    assert kinds(z) == {(C, "overlap")}
    assert "'a/carrier' and 'a/hidden.pkl' overlap" in z.problems[0].message


def test_entry_count_limit(region):
    z = read_zip(region(craft_zip([Z(f"a/{i}", b"") for i in range(30)])), Settings(max_archive_entries=10))
    assert kinds(z) == {(C, "entries")} and not z.parsed


@pytest.mark.parametrize(
    ("mutate", "kind"),
    [
        (lambda d: d[: len(d) - 30], "truncated"),
        (lambda d: d[:10], "truncated"),
        (lambda d: d + b"trailing", "truncated"),
        (lambda d: b"junk" + d, "offsets"),
        (lambda d: d[:-2] + b"\x05\x00", "truncated"),  # comment length lies
    ],
    ids=["cut_tail", "tiny", "appended", "prepended", "comment_lie"],
)
def test_end_records(region, mutate, kind):
    z = read_zip(region(mutate(craft_zip(GOOD))), S)
    assert kind in {p.kind for p in z.problems}, z.problems


def test_cd_count_mismatch(region):
    data = bytearray(craft_zip(GOOD))
    struct.pack_into("<HH", data, len(data) - 14, 3, 3)
    assert "cd" in {p.kind for p in read_zip(region(bytes(data)), S).problems}


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_real_torch_archive_is_clean(region):
    import torch

    data = _torch_bytes({"w": torch.zeros(3, 3), "b": torch.ones(2)})
    z = read_zip(region(data), S)
    assert z.parsed and z.problems == [] and gaps(z) == []
    # torch writes data descriptors (flag 0x08) and the zip64 end records
    assert all(e.flags & 0x08 for e in z.entries)
    assert data.rfind(b"PK\x06\x06") > 0


def test_real_torch_archive_patched_fields(region):
    data = _torch_bytes({"w": __import__("torch").zeros(3)})
    name = next(n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith("data.pkl"))
    z = read_zip(region(patch_zip(data, name, local_flags=0x0800)), S)
    assert (C, "flags") in kinds(z)


def craft_zip64(payload: bytes, name: str = "a/data.pkl") -> bytes:
    """A zip whose sizes and offsets live only in zip64 fields (as torch writes for >4 GiB)."""
    raw = name.encode()
    extra_local = struct.pack("<HHQQ", 1, 16, len(payload), len(payload))
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, 0, 0x21, zlib.crc32(payload), 0xFFFFFFFF,
                        0xFFFFFFFF, len(raw), len(extra_local)) + raw + extra_local + payload
    extra_cd = struct.pack("<HHQQQ", 1, 24, len(payload), len(payload), 0)
    cd = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 0, 0, 0x21, zlib.crc32(payload),
                     0xFFFFFFFF, 0xFFFFFFFF, len(raw), len(extra_cd), 0, 0, 0, 0, 0xFFFFFFFF) + raw + extra_cd
    cd_off = len(local)
    rec64_off = cd_off + len(cd)
    rec64 = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 1, 1, len(cd), cd_off)
    loc = struct.pack("<4sIQI", b"PK\x06\x07", 0, rec64_off, 1)
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return local + cd + rec64 + loc + eocd


def test_zip64_fields(region):
    z = read_zip(region(craft_zip64(b"\x80\x02N.")), S)
    assert z.parsed and z.problems == []
    e = z.entries[0]
    assert e.zip64 and (e.csize, e.usize) == (4, 4)
    assert read_entry(region(craft_zip64(b"\x80\x02N.")), read_zip(region(craft_zip64(b"\x80\x02N.")), S).entries[0],
                      100) == b"\x80\x02N."


def test_python_zipfile_archives(region):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/x.txt", "hello " * 100)
        with zf.open("a/big", "w", force_zip64=True) as fh:
            fh.write(b"y" * 5000)
    z = read_zip(region(buf.getvalue()), S)
    assert z.parsed and z.problems == []
    assert read_entry(region(buf.getvalue()), z.by_name()["a/x.txt"], 10_000) == b"hello " * 100


def test_inflate_stops_at_limit(region):
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = co.compress(b"\x00" * (8 * 2**20)) + co.flush()
    data = craft_zip([Z("a/x", b"", method=8, payload=packed, usize=8 * 2**20, crc=0)])
    r = region(data)
    z = read_zip(r, Settings(max_compression_ratio=1e9), check_crc=False)
    size, _crc, kept = inflate(r, z.entries[0], limit=1000, keep=True)
    assert 1000 <= size < 2**20 and len(kept) == size


def test_crc_streams_large_entries(region, tmp_path):
    big = os.urandom(3 * 2**20) * 4  # 12 MiB: more than one read chunk
    z = read_zip(region(craft_zip([Z("a/big", big)])), S)
    assert z.problems == []
    z = read_zip(region(craft_zip([Z("a/big", big, crc=zlib.crc32(big) ^ 1)])), S)
    assert {p.kind for p in z.problems} == {"crc"}
