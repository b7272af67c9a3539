"""What the parent hands the isolated worker, and what comes back.

Both sides speak plain JSON-able dicts across the process boundary (``to_dict``/``from_dict``), so
the worker may run under another interpreter (``CKPT_STAGE_WORKER_PYTHON``) with another torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ckpt_stage.domain import Finding
from ckpt_stage.scan.reading import Reading


@dataclass(frozen=True)
class LoadJob:
    root: str
    """Local directory holding the version's files (the worker must treat it as read-only)."""
    files: tuple[tuple[str, str], ...]
    """(path relative to root, FileFormat value from the static scan) for every file."""
    readings: tuple[Reading, ...] | None = None
    """The static scan's reading of every file (``ckpt_stage.scan.reading``): the worker loads a file
    only as its reading says (format, member table, header) and refuses one whose size or sha256
    differs from it. The pipeline always sends them; None only for in-process callers (tests), for
    which the worker makes the readings itself with the scanner's own code."""
    arch: str | None = None
    """``package.module:Class`` for bare state_dicts; only honoured under ``arch_modules``."""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    arch_modules: tuple[str, ...] = ("torch.nn",)
    pickle_modules: tuple[str, ...] = ()
    allow_pickled_models: bool = True
    model_code: dict[str, list[str]] = field(default_factory=dict)
    """Code folders of the version (path relative to root → their top-level modules) that the scan
    found and the operator allowed (``CKPT_STAGE_ALLOW_MODEL_CODE``): the worker, and only the worker,
    puts them on ``sys.path`` and accepts those modules' classes in pickles."""
    require_input_example: bool = False
    timeout_s: float = 300.0
    cpu_s: float = 600.0
    memory_bytes: int = 4 * 2**30
    expected: dict[str, Any] = field(default_factory=dict)
    """What the parent's static scan read from the same bytes, for ``runner.cross_check``:
    ``{"tensors": {name: {"shape": [...], "dtype": "float32"}}}`` for a bare state_dict (optional)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadJob:
        data = dict(data)
        data["files"] = tuple(tuple(x) for x in data.get("files", ()))
        if data.get("readings") is not None:
            data["readings"] = tuple(Reading.from_dict(r) for r in data["readings"])
        data["arch_modules"] = tuple(data.get("arch_modules", ()))
        data["pickle_modules"] = tuple(data.get("pickle_modules", ()))
        data["model_code"] = {str(k): [str(m) for m in v] for k, v in (data.get("model_code") or {}).items()}
        return cls(**data)


@dataclass(frozen=True)
class LoadResult:
    findings: tuple[Finding, ...] = ()
    runtime: dict[str, str] = field(default_factory=dict)
    """Versions of the interpreter that loaded: python, torch, mlflow (when importable)."""
    recorded: dict[str, str] = field(default_factory=dict)
    """Versions the model recorded: python, torch, mlflow (what is known)."""
    timings_s: dict[str, float] = field(default_factory=dict)
    """``load`` and ``inference`` seconds."""
    peak_anon_bytes: int = 0
    isolation: dict[str, Any] = field(default_factory=dict)
    """Which isolation measures were in force (name → bool or detail)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Extra facts for the report: parameter count, layer names/shapes (for drift), key used, …"""

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": [f.to_dict() for f in self.findings],
            "runtime": dict(self.runtime),
            "recorded": dict(self.recorded),
            "timings_s": dict(self.timings_s),
            "peak_anon_bytes": int(self.peak_anon_bytes),
            "isolation": dict(self.isolation),
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadResult:
        return cls(
            findings=tuple(Finding.from_dict(f) for f in data.get("findings", ())),
            runtime=dict(data.get("runtime") or {}),
            recorded=dict(data.get("recorded") or {}),
            timings_s={k: float(v) for k, v in (data.get("timings_s") or {}).items()},
            peak_anon_bytes=int(data.get("peak_anon_bytes") or 0),
            isolation=dict(data.get("isolation") or {}),
            info=dict(data.get("info") or {}),
        )
