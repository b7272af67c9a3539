"""The MLflow tag schema: every version-tag and run-tag name the stage writes, and ``VersionState`` read from them.

MLflow is the system of record (docs/contract.md "What is recorded in MLflow"); these names are part of
the contract: extend, never rename. Every other module spells a tag through these constants.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from ckpt_stage.domain import Status, VersionRef

TAG = "ckpt_stage."

# -- model-version tags --------------------------------------------------------------------------
STATUS = TAG + "status"
REASONS = TAG + "reasons"
SUMMARY = TAG + "summary"
ATTEMPT = TAG + "attempt"
VALIDATED_AT = TAG + "validated_at"
RUN_ID = TAG + "run_id"
SHA256 = TAG + "sha256"
MANIFEST_SHA256 = TAG + "manifest_sha256"
LEASE_OWNER = TAG + "lease_owner"
LEASE_UNTIL = TAG + "lease_until"
ARCH = TAG + "arch"  # set by the model's owner: the architecture to build for a bare state dict
ARCH_KWARGS = TAG + "arch_kwargs"

# -- run tags (one MLflow run per attempt) --------------------------------------------------------
RUN_MODEL = TAG + "model"
RUN_VERSION = TAG + "version"
VERDICT = TAG + "verdict"
ATTEMPT_ID = TAG + "attempt_id"  # which attempt made the run (idempotent run creation)
# A run also carries ATTEMPT, REASONS and SUMMARY under the same names as the version's tags.


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime) -> str:
    """A timestamp as the tags hold it (``…Z``, seconds)."""
    return t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def iso_ms(ms: int | float | None) -> str | None:
    """An MLflow timestamp (milliseconds since the epoch) as ``iso`` writes it; None for none."""
    return iso(dt.datetime.fromtimestamp(ms / 1000, dt.UTC)) if ms else None


def parse_iso(text: str) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class VersionState:
    """A registered version as the stage sees it."""

    ref: VersionRef
    tags: dict[str, str] = field(default_factory=dict)
    source: str = ""
    run_id: str | None = None
    created_ms: int = 0
    aliases: tuple[str, ...] = ()

    @property
    def status(self) -> Status | None:
        raw = self.tags.get(STATUS)
        try:
            return Status(raw) if raw else None
        except ValueError:
            return None

    @property
    def attempt(self) -> int:
        try:
            return int(self.tags.get(ATTEMPT, "0") or 0)
        except ValueError:
            return 0

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(r for r in self.tags.get(REASONS, "").split(",") if r)

    @property
    def summary(self) -> str:
        return self.tags.get(SUMMARY, "")

    @property
    def lease_until(self) -> dt.datetime | None:
        return parse_iso(self.tags.get(LEASE_UNTIL, ""))

    def lease_active(self, at: dt.datetime | None = None) -> bool:
        until = self.lease_until
        return self.status is Status.VALIDATING and until is not None and until > (at or now_utc())

    def needs_validation(self, at: dt.datetime | None = None) -> bool:
        """What ``sweep`` picks: no status, pending, error, or validating with an expired lease."""
        status = self.status
        if status in (None, Status.PENDING, Status.ERROR):
            return True
        return status is Status.VALIDATING and not self.lease_active(at)
