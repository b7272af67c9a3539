"""Value types shared by every layer: frozen, I/O-free, picklable.

The string values of the enums are part of the external contract (``docs/contract.md``):
reason codes, verdicts, statuses and file formats are written into reports and MLflow tags.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

REPORT_SCHEMA = "ckpt-stage/report/v1"


class Cause(enum.StrEnum):
    MODEL = "model"
    INFRASTRUCTURE = "infrastructure"


class ReasonCode(enum.StrEnum):
    ARTIFACT_MISSING = "ARTIFACT_MISSING"
    INTEGRITY_MISMATCH = "INTEGRITY_MISMATCH"
    NOT_A_CHECKPOINT = "NOT_A_CHECKPOINT"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    CORRUPT_ARCHIVE = "CORRUPT_ARCHIVE"
    UNSAFE_PICKLE = "UNSAFE_PICKLE"
    UNSAFE_CODE = "UNSAFE_CODE"
    LIBRARY_VERSION_MISMATCH = "LIBRARY_VERSION_MISMATCH"
    PARTIAL_CHECKPOINT = "PARTIAL_CHECKPOINT"
    ARCHITECTURE_MISMATCH = "ARCHITECTURE_MISMATCH"
    SHAPE_MISMATCH = "SHAPE_MISMATCH"
    DTYPE_MISMATCH = "DTYPE_MISMATCH"
    NONFINITE_WEIGHTS = "NONFINITE_WEIGHTS"
    PARAMETER_DRIFT = "PARAMETER_DRIFT"
    SMOKE_INFERENCE_FAILED = "SMOKE_INFERENCE_FAILED"
    RESOURCE_LIMIT = "RESOURCE_LIMIT"
    TIMEOUT = "TIMEOUT"
    WORKER_CRASH = "WORKER_CRASH"
    WORKER_LOST = "WORKER_LOST"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    STORAGE_MISCONFIGURED = "STORAGE_MISCONFIGURED"
    REGISTRY_UNAVAILABLE = "REGISTRY_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"

    @property
    def cause(self) -> Cause:
        return Cause.INFRASTRUCTURE if self in _INFRA_CODES else Cause.MODEL


_INFRA_CODES = frozenset(
    {
        ReasonCode.WORKER_LOST,
        ReasonCode.STORAGE_UNAVAILABLE,
        ReasonCode.STORAGE_MISCONFIGURED,
        ReasonCode.REGISTRY_UNAVAILABLE,
        ReasonCode.INTERNAL_ERROR,
    }
)


class Severity(enum.StrEnum):
    """``error`` findings decide the verdict; ``warning`` and ``info`` are reported only."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Verdict(enum.StrEnum):
    PASS = "pass"
    QUARANTINE = "quarantine"
    ERROR = "error"
    SKIP = "skip"
    """Not validated: a flavor the stage does not validate, left alone by operator choice
    (``CKPT_STAGE_OTHER_FLAVORS=skip``). Never promoted, never a problem, re-runnable."""

    @property
    def exit_code(self) -> int:
        # A skipped version was not validated: a script that deploys on 0 must not take it as a pass.
        return {Verdict.PASS: 0, Verdict.QUARANTINE: 1, Verdict.ERROR: 3, Verdict.SKIP: 4}[self]


class Status(enum.StrEnum):
    """Value of the ``ckpt_stage.status`` tag."""

    PENDING = "pending"
    VALIDATING = "validating"
    PROMOTED = "promoted"
    QUARANTINED = "quarantined"
    ERROR = "error"
    SKIPPED = "skipped"

    @classmethod
    def for_verdict(cls, verdict: Verdict) -> Status:
        return {Verdict.PASS: cls.PROMOTED, Verdict.QUARANTINE: cls.QUARANTINED, Verdict.ERROR: cls.ERROR,
                Verdict.SKIP: cls.SKIPPED}[verdict]


#: Statuses a re-run may select (CLI ``rerun --status``, the dashboard, the re-run DAG): ``promoted``
#: re-checks live versions after a runtime upgrade, ``skipped`` validates after the operator changed
#: ``CKPT_STAGE_OTHER_FLAVORS``.
RERUNNABLE_STATUSES = (Status.QUARANTINED.value, Status.ERROR.value, Status.PROMOTED.value, Status.SKIPPED.value)


class FileFormat(enum.StrEnum):
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    SAFETENSORS = "safetensors"
    TORCH_EXPORT = "torch-export"
    TORCHSCRIPT = "torchscript"
    PICKLE = "pickle"
    MLFLOW_MODEL = "mlflow-model"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class FileInfo:
    """One file of a version, ``path`` relative to the version root (POSIX separators)."""

    path: str
    size: int
    sha256: str
    format: FileFormat = FileFormat.UNKNOWN
    key: str | None = None
    """Where the bytes came from, for files of a registered version (``validate``): the S3 object key,
    its ETag and VersionId (None when the bucket is not versioned). Together with ``size`` and ``sha256``
    this is the manifest that ``verify`` and the promoted-version re-check compare against."""
    etag: str | None = None
    version_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "format": self.format.value, "size": self.size,
                               "sha256": self.sha256}
        if self.key is not None:
            out.update(key=self.key, etag=self.etag, version_id=self.version_id)
        return out


@dataclass(frozen=True)
class Finding:
    """One observation of a check. ``code`` is None for purely informational findings."""

    code: ReasonCode | None
    message: str
    hint: str = ""
    file: str | None = None
    severity: Severity = Severity.ERROR
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def blocking(self) -> bool:
        return self.severity is Severity.ERROR and self.code is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "code": self.code.value if self.code else None,
            "message": self.message,
            "hint": self.hint,
            "file": self.file,
            "severity": self.severity.value,
        }
        if self.detail:
            out["detail"] = self.detail
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        code = data.get("code")
        return cls(
            code=ReasonCode(code) if code else None,
            message=str(data.get("message", "")),
            hint=str(data.get("hint", "") or ""),
            file=data.get("file"),
            severity=Severity(data.get("severity", "error")),
            detail=dict(data.get("detail") or {}),
        )


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reasons: tuple[Finding, ...]

    @property
    def codes(self) -> tuple[ReasonCode, ...]:
        seen: dict[ReasonCode, None] = {}
        for f in self.reasons:
            if f.code is not None:
                seen.setdefault(f.code, None)
        return tuple(seen)


@dataclass(frozen=True)
class Report:
    verdict: Verdict
    reasons: tuple[Finding, ...]
    model: VersionRef | None
    files: tuple[FileInfo, ...]
    runtime: dict[str, str]
    recorded: dict[str, str]
    timings_s: dict[str, float]
    resources: dict[str, int]
    attempt: int = 1
    findings: tuple[Finding, ...] = ()
    summary: str = ""
    isolation: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Report:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        timings = {k: round(float(self.timings_s.get(k, 0.0)), 4) for k in TIMING_KEYS}
        timings.update({k: round(float(v), 4) for k, v in self.timings_s.items() if k not in timings})
        resources = {k: int(self.resources.get(k, 0)) for k in RESOURCE_KEYS}
        resources.update({k: v for k, v in self.resources.items() if k not in resources})
        out: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "verdict": self.verdict.value,
            "reasons": [f.to_dict() for f in self.reasons],
            "model": self.model.to_dict() if self.model else None,
            "files": [f.to_dict() for f in self.files],
            "runtime": dict(self.runtime),
            "recorded": dict(self.recorded),
            "timings_s": timings,
            "resources": resources,
            "attempt": self.attempt,
            "summary": self.summary,
            "findings": [f.to_dict() for f in self.findings],
            "isolation": dict(self.isolation),
        }
        out.update(self.extra)
        return out


TIMING_KEYS = ("download", "scan", "load", "inference", "total")
RESOURCE_KEYS = ("peak_anon_bytes", "estimated_bytes", "limit_bytes")
