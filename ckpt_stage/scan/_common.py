"""Shared pieces of the scanner: bounded byte windows over a file, finding helpers, units."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ckpt_stage.config import format_size
from ckpt_stage.domain import Finding, ReasonCode

CHUNK = 8 * 2**20


class Region:
    """A window ``[base, base + size)`` of an open file. Reads never leave the window, so sizes
    declared by the file itself can never make the scanner read (or allocate) more than it holds."""

    def __init__(self, fd: int, base: int, size: int, label: str):
        self.fd, self.base, self.size, self.label = fd, base, max(0, size), label

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer at the end of the window)."""
        if offset < 0 or offset >= self.size or n <= 0:
            return b""
        n = min(n, self.size - offset)
        parts = []
        pos = self.base + offset
        while n > 0:
            chunk = os.pread(self.fd, min(n, CHUNK * 4), pos)
            if not chunk:
                break
            parts.append(chunk)
            pos += len(chunk)
            n -= len(chunk)
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def chunks(self, offset: int, n: int, chunk: int = CHUNK) -> Iterator[memoryview]:
        """Stream ``n`` bytes at ``offset`` through one reused buffer (for CRCs of huge entries)."""
        if offset < 0 or n <= 0:
            return
        n = min(n, self.size - offset)
        buf = bytearray(min(chunk, max(n, 1)))
        view = memoryview(buf)
        pos = self.base + offset
        while n > 0:
            want = min(n, len(buf))
            got = os.preadv(self.fd, [view[:want]], pos)
            if got <= 0:
                return
            yield view[:got]
            pos += got
            n -= got

    def sub(self, offset: int, n: int, label: str) -> Region:
        offset = max(0, min(offset, self.size))
        return Region(self.fd, self.base + offset, min(n, self.size - offset), label)


human = format_size  # the scanner's messages use the stage's one size format


# Hints: what the model owner should do. Kept here so wording stays consistent across checks.
HINT_RESAVE = ("re-save the checkpoint with a current torch (torch.save(model.state_dict(), path)) or as "
               "safetensors, upload it again and register a new version")
HINT_CORRUPT = ("the file is damaged or was altered after saving: re-upload the original checkpoint, or "
                + HINT_RESAVE)
HINT_NOT_CKPT = ("register the model checkpoint itself (a torch.save .pt/.pth file, safetensors, or an "
                 "MLflow pytorch model directory), not this file")


@dataclass
class FileScan:
    """What the checks learned about one file (or one archive entry scanned as a file)."""

    path: str
    """Path relative to the version root (the Finding's ``file``)."""
    findings: list[Finding] = field(default_factory=list)
    storage_bytes: int = 0
    """Tensor storage bytes from metadata (the memory a load needs)."""
    has_metadata: bool = False
    """True when ``storage_bytes`` came from tensor metadata rather than the file size."""
    max_findings: int = 25
    pickle_bytes_scanned: int = 0
    """Pickle bytes scanned in this file so far (bounded per file, see formats.scan budget)."""
    nested_scans: int = 0
    seen: set[tuple[int, int]] = field(default_factory=set)
    """(absolute offset, size) of byte ranges already scanned, so forged duplicates cost nothing."""
    # Facts of the top-level container for the file's ``reading.Reading`` (what the worker obeys).
    container: str = ""
    """``sniff.Kind`` value of the file's first bytes (what kind of container it starts like)."""
    zip: Any = None
    """The file's own ``archives.ZipArchive`` (never a nested one's)."""
    zip_prefix: str | None = None
    st_header_len: int | None = None
    """safetensors header length, when the header checked out."""
    reading: Any = None
    """The ``reading.Reading`` made from all of the above once the file is scanned."""

    def add(self, code: ReasonCode, message: str, hint: str, *, where: str = "", **detail: Any) -> None:
        if len(self.findings) >= self.max_findings:
            return
        text = f"{where}: {message}" if where else message
        self.findings.append(Finding(code=code, message=text, hint=hint, file=self.path, detail=detail))
        if len(self.findings) == self.max_findings:
            self.findings.append(
                Finding(code=code, message=f"{self.path}: further problems not listed (stopped at "
                        f"{self.max_findings})", hint=hint, file=self.path)
            )

    def codes(self) -> set[ReasonCode]:
        return {f.code for f in self.findings if f.code is not None}
