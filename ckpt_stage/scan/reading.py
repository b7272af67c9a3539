"""The one reading of a file: what the scanner decided it is, which the isolated worker obeys.

A parser differential between a scanner and a loader is a bypass: picklescan's CVE-2025-1944 (a zip
member name that the scanner and torch read differently), CVE-2025-1945 (zip flag bits that stdlib
``zipfile`` rejects but torch ignores) and CVE-2025-10156 (a CRC error that stops the scanner but not
the loader) all came from two pieces of code deciding separately what a file holds. Here the scanner
decides once, in the parent, from raw bytes (``archives``, ``safetensors``, ``sniff``), and its
``Reading`` travels to the worker in the ``LoadJob``:

* ``format`` picks the loader (safetensors' reader, ``torch.load`` on a zip, ``torch.load`` on a
  legacy file, ``torch.export``): the worker never sniffs a file itself;
* ``size`` and ``sha256`` pin the bytes: the worker refuses a file that changed since the scan;
* for zip-family formats, ``prefix`` and ``members`` (name, data offset, sizes, method, CRC) are the
  table the scan checked; the worker compares torch's own reader against it before loading;
* for safetensors, ``header_len`` / ``data_start``; for ``*.index.json``, the shards it names.

Importable without torch (the parent has none); JSON-able (``to_dict`` / ``from_dict``) because the
worker may run under another interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

from ckpt_stage.domain import FileFormat
from ckpt_stage.scan._common import FileScan, Region
from ckpt_stage.scan.archives import ZipArchive, read_entry

#: Zip-family formats: loaded by torch's PyTorchStreamReader, whose record table must equal the scan's.
ZIP_FORMATS = frozenset({FileFormat.TORCH_ZIP, FileFormat.TORCH_EXPORT, FileFormat.TORCHSCRIPT})
#: ``*.index.json`` of sharded checkpoints are KBs to a few MB; a bigger one is not read.
MAX_INDEX_BYTES = 64 * 2**20
#: Records whose value torch compares against the file format version it supports.
VERSION_RECORDS = ("version", ".data/version")


@dataclass(frozen=True)
class Member:
    """One central-directory entry of a zip-family archive, as the scan read it."""

    name: str
    """Full name in the archive (``<prefix>/data.pkl``)."""
    data_offset: int
    """Absolute offset of the entry's data (after its local header)."""
    csize: int
    usize: int
    method: int
    crc: int


@dataclass(frozen=True)
class Reading:
    path: str
    """Relative to the version root."""
    format: str
    """``FileFormat`` value: decides which loader the worker uses."""
    size: int
    container: str = ""
    """What the first bytes look like (``sniff.Kind`` value: zip, pickle, safetensors, text...), also
    for a file the scan could not identify as a format (``format`` unknown)."""
    sha256: str = ""
    """Hex digest of the bytes that were scanned; "" when the scan had none (the worker then cannot
    compare, which only happens for in-process readings the worker makes itself)."""
    prefix: str | None = None
    """Archive folder torch reads (the first central-directory entry's folder)."""
    members: tuple[Member, ...] = ()
    version_records: dict[str, int] = field(default_factory=dict)
    """``version`` / ``.data/version`` records (relative name → value) of a zip-family archive."""
    header_len: int | None = None
    """safetensors: the 8-byte little-endian header length."""
    data_start: int | None = None
    """safetensors: offset of the data section (8 + header_len)."""
    shards: tuple[str, ...] | None = None
    """``*.index.json``: the shard files its ``weight_map`` names (relative to the version root)."""
    weight_map: tuple[tuple[str, str], ...] | None = None
    """``*.index.json``: its ``weight_map`` as (tensor, shard relative to the version root) pairs, in file
    order and with repeated tensor names kept (a JSON object may name a key twice; ``json.loads`` would
    keep only the last), so the worker checks the index the scan read against the shards it loads."""
    stamp: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(inode, size, mtime_ns, ctime_ns) when the scan opened the file: the parent compares it after
    hashing, so the digest and the scan are known to have seen the same bytes (a write always moves
    ctime, which no unprivileged process can set back)."""

    @property
    def fmt(self) -> FileFormat:
        try:
            return FileFormat(self.format)
        except ValueError:
            return FileFormat.UNKNOWN

    def records(self) -> dict[str, Member]:
        """Members under ``prefix``, by the record name torch uses (``data.pkl``, ``data/0``...)."""
        if self.prefix is None:
            return {}
        head = self.prefix + "/"
        return {m.name[len(head):]: m for m in self.members if m.name.startswith(head) and not m.name.endswith("/")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reading:
        data = dict(data)
        data["members"] = tuple(m if isinstance(m, Member) else Member(**m) for m in data.get("members", ()))
        data["version_records"] = {str(k): int(v) for k, v in (data.get("version_records") or {}).items()}
        if data.get("shards") is not None:
            data["shards"] = tuple(data["shards"])
        if data.get("weight_map") is not None:
            data["weight_map"] = tuple((str(t), str(f)) for t, f in data["weight_map"])
        data["stamp"] = tuple(data.get("stamp") or (0, 0, 0, 0))
        return cls(**data)


def stamp_of(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def reading_of(region: Region, rel: str, fmt: FileFormat, fs: FileScan, st: os.stat_result) -> Reading:
    """The reading of one scanned file, from what the format checks left in ``fs``."""
    members: tuple[Member, ...] = ()
    versions: dict[str, int] = {}
    prefix = None
    z: ZipArchive | None = fs.zip
    if z is not None and z.parsed:
        prefix = fs.zip_prefix
        members = tuple(Member(e.name, e.data_offset, e.csize, e.usize, e.method, e.crc) for e in z.entries)
        by_name = z.by_name()
        for rec in VERSION_RECORDS:
            e = by_name.get(f"{prefix}/{rec}")
            raw = read_entry(region, e, 64) if e is not None else None
            if raw is not None and raw.strip().isdigit():
                versions[rec] = int(raw.strip())
    header_len = fs.st_header_len if fmt is FileFormat.SAFETENSORS else None
    pairs = _index_pairs(region, rel)
    return Reading(
        path=rel, format=fmt.value, size=region.size, container=fs.container, prefix=prefix, members=members, version_records=versions,
        header_len=header_len, data_start=8 + header_len if header_len is not None else None,
        shards=None if pairs is None else tuple(sorted({f for _, f in pairs})), weight_map=pairs,
        stamp=stamp_of(st),
    )


class _PairsDict(dict):  # type: ignore[type-arg]
    """A decoded JSON object that keeps its (key, value) pairs as written, repeated keys included."""

    pairs: list[tuple[str, Any]]


def _keep_pairs(items: list[tuple[str, Any]]) -> _PairsDict:
    obj = _PairsDict(items)
    obj.pairs = items
    return obj


def _index_pairs(region: Region, rel: str) -> tuple[tuple[str, str], ...] | None:
    """The ``weight_map`` of a Hugging Face ``*.index.json`` as (tensor, shard) pairs, shards relative to
    the version root (None: not an index)."""
    if not rel.endswith(".index.json") or region.size > MAX_INDEX_BYTES:
        return None
    try:
        doc = json.loads(region.read(0, region.size).decode("utf-8"), object_pairs_hook=_keep_pairs)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, _PairsDict):
        return None
    base = posixpath.dirname(rel)
    return tuple((str(k), posixpath.normpath(posixpath.join(base, str(v)))) for k, v in wm.pairs)


def sha256_of(path: str | os.PathLike[str], chunk: int = 8 * 2**20) -> str:
    """Hex sha256 of a file, streamed through one reused buffer (hashlib releases the GIL)."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def changed(reading: Reading, path: str | os.PathLike[str], *, digest: bool = True) -> str | None:
    """Why the file at ``path`` is not the one the scan read (None when it is): size, then sha256."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        return f"it cannot be opened any more ({exc.strerror or exc})"
    if size != reading.size:
        return f"it is {size:,} bytes now, {reading.size:,} when it was scanned"
    if digest and reading.sha256:
        now = sha256_of(path)
        if now != reading.sha256:
            return f"its sha256 is {now[:16]}… now, {reading.sha256[:16]}… when it was scanned"
    return None
