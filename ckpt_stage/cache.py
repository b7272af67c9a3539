"""A content-addressed cache of downloaded S3 objects, shared by every task of one host.

A re-run of an unchanged version (``rerun --status promoted`` after a runtime upgrade, a re-run after an
infrastructure error, a sweep that retries) should cost the load, not the transfer. The cache keeps each
object's bytes once, under their sha256, and an index from the S3 object's identity to that digest:

    <cache_dir>/objects/blobs/ab/abcdef…        read-only bytes, named by their sha256
    <cache_dir>/objects/index/<id>              the sha256 of the object <id> stands for

``<id>`` is the sha256 of bucket, key, VersionId, ETag and size as the listing gave them: an object that
was overwritten has another ETag (or VersionId) and is a miss, so the cache can never serve bytes other
than the ones listed. A hit is verified before use: the blob is hashed again and must equal the digest
the download computed (a blob damaged or tampered with on disk is dropped and downloaded again). Blobs
reach a version's folder as hard links (same filesystem as ``<cache_dir>/versions``; a copy elsewhere),
so a download costs no second copy on disk and a hit costs no copy at all.

Size-limited (``CKPT_STAGE_CACHE_MAX_BYTES``, 0 turns the cache off): after each store, the least
recently used blobs go until the total fits. Safe under concurrent tasks on one host: every file is
written under a temporary name and renamed into place, eviction holds an exclusive ``flock``, and a blob
evicted while a task uses it stays readable through that task's hard link.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from ckpt_stage.scan.reading import sha256_of

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")


def _is_digest(text: str) -> bool:
    return len(text) == 64 and set(text) <= _HEX


class ObjectCache:
    """``lookup`` before a download, ``store`` after one; both never raise (a cache problem is a miss)."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max(0, int(max_bytes))
        self.blobs = self.root / "blobs"
        self.index = self.root / "index"

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @staticmethod
    def identity(bucket: str, key: str, size: int, etag: str, version_id: str | None) -> str | None:
        """The index name of one listed object; None when the listing gives nothing that pins its bytes."""
        if not (etag or version_id):
            return None
        raw = "\0".join((bucket, key, version_id or "", etag, str(int(size))))
        return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()

    def _blob(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def lookup(self, ident: str | None, size: int, target: Path) -> str | None:
        """Place the cached bytes of object ``ident`` at ``target`` (a hard link) and return their sha256;
        None on a miss. The blob is hashed again first: only bytes equal to what was downloaded are used."""
        if not self.enabled or ident is None:
            return None
        entry = self.index / ident
        try:
            sha = entry.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        blob = self._blob(sha) if _is_digest(sha) else None
        try:
            if blob is None or blob.stat().st_size != size or sha256_of(blob) != sha:
                log.warning("cache entry %s does not match its blob; dropping it", ident)
                entry.unlink(missing_ok=True)
                if blob is not None:
                    blob.unlink(missing_ok=True)
                return None
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            self._place(blob, target)
            os.utime(entry)  # last use, for eviction
        except OSError as exc:  # evicted meanwhile, a full disk, …: download instead
            log.debug("cache lookup of %s failed: %s", ident, exc)
            return None
        return sha

    @staticmethod
    def _place(src: Path, dst: Path) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem: a copy, read-only like the blob
            tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                with open(src, "rb") as fi, open(tmp, "wb") as fo:
                    while chunk := fi.read(8 * 2**20):
                        fo.write(chunk)
                os.chmod(tmp, 0o444)
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)

    def store(self, ident: str | None, path: Path, sha256: str) -> None:
        """Keep the downloaded file ``path`` (verified, read-only, ``sha256``) as object ``ident``."""
        if not self.enabled or ident is None or not _is_digest(sha256):
            return
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                return
            blob = self._blob(sha256)
            if not blob.exists():
                blob.parent.mkdir(parents=True, exist_ok=True)
                tmp = blob.with_name(f".{sha256}.{uuid.uuid4().hex[:8]}.tmp")
                self._place(path, tmp)
                os.replace(tmp, blob)
            self.index.mkdir(parents=True, exist_ok=True)
            tmp_entry = self.index / f".{ident}.{uuid.uuid4().hex[:8]}.tmp"
            tmp_entry.write_text(sha256, encoding="ascii")
            os.replace(tmp_entry, self.index / ident)
            self.evict()
        except OSError as exc:
            log.debug("caching %s failed: %s", path, exc)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def evict(self) -> int:
        """Drop the least recently used entries (and blobs no entry names) until the blobs fit
        ``max_bytes``; returns the bytes freed."""
        freed = 0
        with self._locked():
            entries: list[tuple[float, Path, str]] = []
            for e in self.index.glob("*") if self.index.is_dir() else ():
                if e.name.startswith("."):
                    continue
                try:
                    entries.append((e.stat().st_mtime, e, e.read_text(encoding="ascii").strip()))
                except (OSError, UnicodeDecodeError):
                    continue
            last_use: dict[str, float] = {}
            for mtime, _, sha in entries:
                last_use[sha] = max(mtime, last_use.get(sha, 0.0))
            blobs: dict[str, tuple[int, Path]] = {}
            for b in self.blobs.glob("*/*") if self.blobs.is_dir() else ():
                if b.name.startswith("."):
                    continue
                with contextlib.suppress(OSError):
                    blobs[b.name] = (b.stat().st_size, b)
            total = sum(size for size, _ in blobs.values())
            for sha, (size, b) in sorted(blobs.items(), key=lambda kv: last_use.get(kv[0], 0.0)):
                if total <= self.max_bytes and sha in last_use:
                    break
                with contextlib.suppress(OSError):
                    b.unlink()
                    total -= size
                    freed += size
                for _, e, s in entries:
                    if s == sha:
                        e.unlink(missing_ok=True)
        return freed
