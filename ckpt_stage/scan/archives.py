"""Zip containers read from raw bytes: end of central directory, central directory, local headers,
data descriptors, CRCs. ``zipfile`` is not trusted here: it tolerates prepended data, reads names
from the central directory only, and never notices overlapping entries; loaders (torch's miniz,
Python's zipfile, scanners) disagree on exactly those points, which is what zip tricks exploit
(e.g. picklescan's CVE-2025-1944/CVE-2025-1945: name mismatch and flag bits hid pickles).

``read_zip`` never raises on hostile input; every problem becomes a ``ZipProblem`` with the code of
docs/contract.md (``CORRUPT_ARCHIVE`` or ``UNSUPPORTED_FORMAT``). The only exception it lets through is
the file's scan deadline (``budget.ScanDeadline``), ticked in every loop over entries and chunks.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode
from ckpt_stage.scan import budget
from ckpt_stage.scan._common import Region, human

EOCD_SIG = b"PK\x05\x06"
EOCD64_SIG = b"PK\x06\x06"
EOCD64_LOC_SIG = b"PK\x06\x07"
CD_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"
DESC_SIG = b"PK\x07\x08"

FLAG_ENCRYPTED = 0x0001
FLAG_DESCRIPTOR = 0x0008
FLAG_PATCHED = 0x0020
FLAG_STRONG_ENCRYPTION = 0x0040
FLAG_UTF8 = 0x0800
FLAG_MASKED_HEADERS = 0x2000

STORED, DEFLATED = 0, 8
#: Central directories of real checkpoints are a few MB at most (one ~100-byte record per entry).
MAX_CD_BYTES = 256 * 2**20
#: Entries that inflate to less than this are never called bombs, whatever their ratio.
MIN_BOMB_BYTES = 2**20
#: Bytes the CRC check may inflate per archive (deflate only appears in non-torch zips and
#: TorchScript sources; stored entries are checked whatever their size).
INFLATE_BUDGET = 512 * 2**20
U32 = 0xFFFFFFFF
U16 = 0xFFFF


@dataclass
class ZipEntry:
    name: str
    raw_name: bytes
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    header_offset: int
    data_offset: int = -1
    end_offset: int = -1
    """End of the entry's bytes, data descriptor included."""
    zip64: bool = False
    bomb: bool = False
    readable: bool = False
    """Local header checked and data within the file: safe to read ``[data_offset, +csize)``."""


@dataclass
class ZipProblem:
    code: ReasonCode
    kind: str
    message: str
    entry: str | None = None


@dataclass
class ZipArchive:
    size: int
    entries: list[ZipEntry] = field(default_factory=list)
    problems: list[ZipProblem] = field(default_factory=list)
    parsed: bool = False
    """The central directory was found and parsed (entries are meaningful)."""
    cd_offset: int = 0
    kinds: set[str] = field(default_factory=set)
    """Every kind of problem seen (the list itself keeps at most ~200 problems)."""

    def by_name(self) -> dict[str, ZipEntry]:
        return {e.name: e for e in self.entries}

    def problem(self, code: ReasonCode, kind: str, message: str, entry: str | None = None) -> None:
        new_kind = kind not in self.kinds
        self.kinds.add(kind)
        if len(self.problems) < 200 or new_kind:
            self.problems.append(ZipProblem(code, kind, message, entry))


def _find_eocd(region: Region, z: ZipArchive) -> int | None:
    size = region.size
    if size < 22:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "truncated",
                  f"{size} bytes is too short for a zip (no end-of-central-directory record)")
        return None
    tail_len = min(size, 22 + U16)
    tail = region.read(size - tail_len, tail_len)
    # torch's miniz takes the last signature with at least 22 bytes after it, Python's zipfile the last
    # signature: a signature inside the comment of the real end record (or in data appended after it)
    # gives them another central directory than the one a reader that checks the comment length finds.
    # Only the last signature, ending the file exactly with its comment, is one reading for all three.
    pos = tail.rfind(EOCD_SIG)
    if pos >= 0 and pos + 22 <= len(tail):
        (comment_len,) = struct.unpack_from("<H", tail, pos + 20)
        if pos + 22 + comment_len == len(tail):
            return size - tail_len + pos
    earlier = tail.rfind(EOCD_SIG, 0, max(pos, 0))
    while earlier >= 0:
        (comment_len,) = struct.unpack_from("<H", tail, earlier + 20) if earlier + 22 <= len(tail) else (-1,)
        if earlier + 22 + comment_len == len(tail):
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "eocd",
                      f"the archive's comment holds a second end-of-central-directory signature "
                      f"({len(tail) - pos:,} bytes before the end): torch's zip reader and Python's zipfile take "
                      "that one and read another central directory than the real end record names")
            return None
        earlier = tail.rfind(EOCD_SIG, 0, earlier)
    if pos >= 0:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "truncated",
                  "the end-of-central-directory record does not end the file (truncated comment "
                  "or data appended after the archive)")
    else:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "truncated",
                  "no end-of-central-directory record: the archive is truncated")
    return None


def _zip64_extra(extra: bytes, need: list[str]) -> dict[str, int] | None:
    """Values of the zip64 extended-information field (0x0001), in the order the spec fixes."""
    i = 0
    while i + 4 <= len(extra):
        hid, hlen = struct.unpack_from("<HH", extra, i)
        body = extra[i + 4:i + 4 + hlen]
        if hid == 0x0001:
            out: dict[str, int] = {}
            j = 0
            for key in need:
                width = 4 if key == "disk" else 8
                if j + width > len(body):
                    return None
                out[key] = int.from_bytes(body[j:j + width], "little")
                j += width
            return out
        i += 4 + hlen
    return None if need else {}


def _bad_name(name: str) -> str | None:
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith(("/", "\\")):
        return "is an absolute path"
    if "\\" in name:
        return "contains a backslash"
    if len(name) >= 2 and name[1] == ":":
        return "starts with a drive letter"
    if any(part == ".." for part in name.split("/")):
        return "climbs out of the archive with '..'"
    return None


def read_zip(region: Region, settings: Settings, *, check_crc: bool = True) -> ZipArchive:  # noqa: C901
    """Parse and verify the zip in ``region``. Problems are collected, never raised."""
    z = ZipArchive(size=region.size)
    eocd = _find_eocd(region, z)
    if eocd is None:
        return z
    rec = region.read(eocd, 22)
    (_, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, _clen) = struct.unpack("<4sHHHHIIH", rec)
    cd_end = eocd
    saturated = U16 in (disk, cd_disk, n_disk, n_total) or U32 in (cd_size, cd_offset)
    loc = region.read(eocd - 20, 20) if eocd >= 20 else b""
    if len(loc) == 20 and loc[:4] == EOCD64_LOC_SIG:
        # torch (miniz) always writes the zip64 end records, sizes permitting or not.
        (_, _, rec64_off, _) = struct.unpack("<4sIQI", loc)
        rec64 = region.read(rec64_off, 56) if rec64_off + 56 <= eocd - 20 else b""
        if len(rec64) != 56 or rec64[:4] != EOCD64_SIG:
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "truncated",
                      "the zip64 end-of-central-directory record is missing or damaged")
            return z
        values64 = struct.unpack("<4sQHHIIQQQQ", rec64)[4:]
        (_rec_size,) = struct.unpack_from("<Q", rec64, 4)
        if not saturated and values64 != (disk, cd_disk, n_disk, n_total, cd_size, cd_offset):
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "cd",
                      "the zip64 and classic end-of-central-directory records disagree")
            return z
        (disk, cd_disk, n_disk, n_total, cd_size, cd_offset) = values64
        cd_end = rec64_off
        if rec64_off + 12 + _rec_size != eocd - 20:
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "offsets",
                      "unexplained bytes between the zip64 end record and its locator")
            return z
    elif saturated:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "truncated",
                  "the end record needs zip64 values but the zip64 locator is missing")
        return z
    if disk != 0 or cd_disk != 0 or n_disk != n_total:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "multidisk", "multi-disk (split) archive")
        return z
    if n_total > settings.max_archive_entries:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "entries",
                  f"{n_total:,} entries exceed the limit of {settings.max_archive_entries:,} "
                  "(CKPT_STAGE_MAX_ARCHIVE_ENTRIES)")
        return z
    if cd_offset + cd_size > cd_end:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "truncated",
                  f"the central directory ({cd_size:,} bytes at offset {cd_offset:,}) runs past the end "
                  "of the archive: truncated")
        return z
    if cd_offset + cd_size != cd_end:
        # zipfile silently tolerates this ("concat" offset); torch's miniz does not: the two then
        # read different bytes for the same entry.
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "offsets",
                  f"{cd_end - cd_offset - cd_size:,} unexplained bytes between the central directory and "
                  "its end record (prepended or injected data)")
        return z
    if cd_size > MAX_CD_BYTES:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "entries", f"central directory of {human(cd_size)} is implausibly large")
        return z
    z.cd_offset = cd_offset
    cd = region.read(cd_offset, cd_size)
    i = 0
    names: dict[str, int] = {}
    folded: dict[bytes, str] = {}
    while i < len(cd):
        if not len(z.entries) % 1024:
            budget.tick()
        if cd[i:i + 4] != CD_SIG or i + 46 > len(cd):
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "cd", f"damaged central directory at offset {cd_offset + i:,}")
            return z
        (_, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk_start, _, _,
         lho) = struct.unpack_from("<4sHHHHHHIIIHHHHHII", cd, i)
        raw_name = cd[i + 46:i + 46 + nlen]
        extra = cd[i + 46 + nlen:i + 46 + nlen + elen]
        if i + 46 + nlen + elen + clen > len(cd):
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "cd", "central directory record runs past its end")
            return z
        i += 46 + nlen + elen + clen
        need = [k for k, v in (("usize", usize), ("csize", csize), ("offset", lho)) if v == U32]
        if disk_start == U16:
            need.append("disk")
        zip64 = bool(need)
        if need:
            vals = _zip64_extra(extra, need)
            if vals is None:
                z.problem(ReasonCode.CORRUPT_ARCHIVE, "cd", f"entry {raw_name[:200]!r} lacks its zip64 sizes")
                return z
            usize = vals.get("usize", usize)
            csize = vals.get("csize", csize)
            lho = vals.get("offset", lho)
        try:
            name = raw_name.decode("utf-8") if flags & FLAG_UTF8 else raw_name.decode("cp437")
        except UnicodeDecodeError:
            name = raw_name.decode("utf-8", "replace")
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "name", f"entry name {raw_name[:200]!r} is not valid UTF-8", name)
        entry = ZipEntry(name, raw_name, flags, method, crc, csize, usize, lho, zip64=zip64)
        z.entries.append(entry)
        if name in names:
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "duplicate",
                      f"two entries are named {name!r}: readers disagree on which one counts", name)
        elif raw_name.lower() in folded:
            # miniz (torch's reader) looks records up ignoring ASCII case: which of the two it returns
            # depends on the directory's order, not on the name the scan read.
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "duplicate",
                      f"entries {folded[raw_name.lower()]!r} and {name!r} differ only in letter case: torch's zip "
                      "reader finds records case-insensitively, so readers disagree on which one counts", name)
        names[name] = len(z.entries) - 1
        folded.setdefault(raw_name.lower(), name)
        if len(z.entries) > n_total:
            break
    if len(z.entries) != n_total:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "cd",
                  f"the end record announces {n_total:,} entries but the central directory holds "
                  f"{len(z.entries):,}")
    z.parsed = True
    for n, e in enumerate(z.entries):
        if not n % 1024:
            budget.tick()
        _check_entry(region, z, e, settings)
    _check_layout(z)
    # Overlapping entries can make thousands of records point at the same gigabytes: verifying
    # each would multiply the work, and the archive is already refused, so stop here.
    if check_crc and "overlap" not in z.kinds:
        inflate_left = [INFLATE_BUDGET]
        for e in z.entries:
            if e.readable and not e.bomb:
                _check_crc(region, z, e, inflate_left)
    return z


def _check_entry(region: Region, z: ZipArchive, e: ZipEntry, settings: Settings) -> None:  # noqa: C901
    why = _bad_name(e.name)
    if why:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "traversal", f"entry name {e.name!r} {why} (path traversal)", e.name)
    if e.flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION | FLAG_MASKED_HEADERS) or e.method == 99:
        z.problem(ReasonCode.UNSUPPORTED_FORMAT, "encrypted",
                  f"entry {e.name!r} is encrypted (flags 0x{e.flags:04x}, method {e.method})", e.name)
        return
    if e.flags & FLAG_PATCHED:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "flags",
                  f"entry {e.name!r} sets flag 0x0020 (compressed patched data), which no checkpoint writer "
                  "uses", e.name)
    if e.method not in (STORED, DEFLATED):
        z.problem(ReasonCode.UNSUPPORTED_FORMAT, "method",
                  f"entry {e.name!r} uses compression method {e.method}", e.name)
    if e.method == STORED and e.csize != e.usize:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "sizes",
                  f"stored entry {e.name!r} declares {e.usize:,} bytes but occupies {e.csize:,}", e.name)
    if e.method == DEFLATED:
        ratio = e.usize / max(e.csize, 1)
        # Tiny entries compress absurdly well (5 KB of one byte → 22 bytes) and harm nobody.
        if ratio > settings.max_compression_ratio and e.usize > MIN_BOMB_BYTES:
            e.bomb = True
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "bomb",
                      f"entry {e.name!r} expands {e.csize:,} bytes to {e.usize:,} (ratio {ratio:,.0f} > "
                      f"{settings.max_compression_ratio:g}, CKPT_STAGE_MAX_COMPRESSION_RATIO): compression bomb",
                      e.name)
    if e.header_offset + 30 > z.cd_offset:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "truncated",
                  f"entry {e.name!r} starts at offset {e.header_offset:,}, past the entries' area", e.name)
        return
    lh = region.read(e.header_offset, 30)
    if len(lh) < 30 or lh[:4] != LOCAL_SIG:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "local",
                  f"no local header where the central directory puts {e.name!r} (offset {e.header_offset:,})",
                  e.name)
        return
    (_, _, lflags, lmethod, _, _, lcrc, lcsize, lusize, lnlen, lelen) = struct.unpack("<4sHHHHHIIIHH", lh)
    lname = region.read(e.header_offset + 30, lnlen)
    lextra = region.read(e.header_offset + 30 + lnlen, lelen)
    if lname != e.raw_name:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "name_mismatch",
                  f"central directory names the entry {e.name!r} but its local header says "
                  f"{lname[:200].decode('utf-8', 'replace')!r}", e.name)
    if lflags != e.flags or lmethod != e.method:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "flags",
                  f"entry {e.name!r}: local header flags/method 0x{lflags:04x}/{lmethod} differ from the "
                  f"central directory's 0x{e.flags:04x}/{e.method}", e.name)
    if lflags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION):
        z.problem(ReasonCode.UNSUPPORTED_FORMAT, "encrypted", f"entry {e.name!r} is encrypted (local header)", e.name)
        return
    e.data_offset = e.header_offset + 30 + lnlen + lelen
    if not lflags & FLAG_DESCRIPTOR:
        if lcsize == U32 or lusize == U32:
            vals = _zip64_extra(lextra, ["usize", "csize"])
            if vals:
                lusize, lcsize = vals["usize"], vals["csize"]
        if (lcrc, lcsize, lusize) != (e.crc, e.csize, e.usize):
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "sizes",
                      f"entry {e.name!r}: local header says crc 0x{lcrc:08x}, {lcsize:,}/{lusize:,} bytes; the "
                      f"central directory says 0x{e.crc:08x}, {e.csize:,}/{e.usize:,}", e.name)
    data_end = e.data_offset + e.csize
    if data_end > z.cd_offset:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "truncated",
                  f"entry {e.name!r} declares {e.csize:,} bytes at offset {e.data_offset:,}, past the end of "
                  "the entries' area (truncated or lying sizes)", e.name)
        return
    e.end_offset = data_end
    if lflags & FLAG_DESCRIPTOR:
        e.end_offset = _check_descriptor(region, z, e, data_end)
    e.readable = True


def _check_descriptor(region: Region, z: ZipArchive, e: ZipEntry, at: int) -> int:
    raw = region.read(at, 24)
    body, sig = (raw[4:], 4) if raw[:4] == DESC_SIG else (raw, 0)
    for width in (4, 8):
        fmt = "<III" if width == 4 else "<IQQ"
        need = struct.calcsize(fmt)
        if len(body) >= need:
            crc, csize, usize = struct.unpack_from(fmt, body)
            if (crc, csize, usize) == (e.crc, e.csize, e.usize):
                return at + sig + need
    z.problem(ReasonCode.CORRUPT_ARCHIVE, "sizes",
              f"entry {e.name!r}: the data descriptor after its data disagrees with the central directory",
              e.name)
    return at + sig + 12


def _check_layout(z: ZipArchive) -> None:
    spans = sorted((e.header_offset, e.end_offset, e.name) for e in z.entries if e.readable)
    for (_s1, e1, n1), (s2, _e2, n2) in zip(spans, spans[1:], strict=False):
        if s2 < e1:
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "overlap",
                      f"entries {n1!r} and {n2!r} overlap (bytes {s2:,}..{e1:,}): one file's data is read "
                      "as another's", n2)
    if spans and spans[-1][1] > z.cd_offset:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "overlap", f"entry {spans[-1][2]!r} overlaps the central directory")


def gaps(z: ZipArchive) -> list[tuple[int, int]]:
    """Byte ranges of the entries' area that no entry accounts for (hidden data)."""
    out: list[tuple[int, int]] = []
    if not z.parsed or not all(e.readable for e in z.entries):
        return out  # an unreadable entry is already a problem; its extent is unknown
    pos = 0
    for s, e in sorted((e.header_offset, e.end_offset) for e in z.entries):
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
    if pos < z.cd_offset:
        out.append((pos, z.cd_offset))
    return out


def _check_crc(region: Region, z: ZipArchive, e: ZipEntry, inflate_left: list[int]) -> None:
    crc = 0
    if e.method == STORED:
        for chunk in region.chunks(e.data_offset, e.csize):
            crc = zlib.crc32(chunk, crc)
            budget.tick()
        size = e.csize
    elif e.method == DEFLATED:
        if e.usize + 1 > inflate_left[0]:
            return  # not verified: over the inflate budget (see INFLATE_BUDGET)
        inflate_left[0] -= e.usize + 1
        got = inflate(region, e, limit=e.usize + 1)
        if got is None:
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "deflate", f"entry {e.name!r}: deflate data is damaged", e.name)
            return
        size, crc, _ = got
        if size != e.usize:
            z.problem(ReasonCode.CORRUPT_ARCHIVE, "sizes",
                      f"entry {e.name!r} inflates to {'more than ' if size > e.usize else ''}{size:,} bytes, not "
                      f"the declared {e.usize:,}", e.name)
            return
    else:
        return
    if crc != e.crc:
        z.problem(ReasonCode.CORRUPT_ARCHIVE, "crc",
                  f"entry {e.name!r}: CRC32 of its {size:,} bytes is 0x{crc:08x}, the archive records "
                  f"0x{e.crc:08x}", e.name)


def inflate(region: Region, e: ZipEntry, *, limit: int, keep: bool = False) -> tuple[int, int, bytes] | None:
    """Inflate an entry in chunks, stopping once past ``limit`` output bytes.

    Returns (size, crc32, data if ``keep``) or None when the deflate stream is damaged. Output is
    never held beyond ``limit`` bytes, so a bomb costs at most ``limit`` of memory."""
    d = zlib.decompressobj(-15)
    size = crc = 0
    out: list[bytes] = []
    try:
        pending = b""
        for chunk in region.chunks(e.data_offset, e.csize, chunk=2**20):
            pending = bytes(chunk)
            budget.tick()
            while pending and size < limit:
                data = d.decompress(pending, max(1, limit - size))
                size += len(data)
                crc = zlib.crc32(data, crc)
                if keep:
                    out.append(data)
                pending = d.unconsumed_tail
                if not data and not pending:
                    break
            if size >= limit:
                return size, crc, b"".join(out)
        if size < limit:
            tail = d.flush()
            tail = tail[: max(0, limit - size) + 1]
            size += len(tail)
            crc = zlib.crc32(tail, crc)
            if keep:
                out.append(tail)
    except zlib.error:
        return None
    return size, crc, b"".join(out)


def read_entry(region: Region, e: ZipEntry, limit: int) -> bytes | None:
    """The bytes of a readable entry (stored or deflated) if they are at most ``limit`` bytes."""
    if not e.readable or e.usize > limit:
        return None
    if e.method == STORED:
        return region.read(e.data_offset, e.csize)
    if e.method == DEFLATED:
        got = inflate(region, e, limit=e.usize + 1, keep=True)
        if got is None or got[0] != e.usize:
            return None
        return got[2]
    return None
