"""One error taxonomy: transient errors are retried, permanent ones never are.

Every error carries a contract reason code and survives pickling across the worker/process
boundary (``__reduce__`` rebuilds it from its fields rather than from ``args``).
"""

from __future__ import annotations

from typing import Any

from ckpt_stage.domain import ReasonCode


class CkptStageError(Exception):
    code: ReasonCode = ReasonCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ReasonCode | None = None, hint: str = "", **fields: Any):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.hint = hint
        self.fields = fields

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.code, self.hint, self.fields))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[CkptStageError], message: str, code: ReasonCode, hint: str, fields: dict[str, Any]):
    return cls(message, code=code, hint=hint, **fields)


class TransientError(CkptStageError):
    """Worth retrying: the same call may succeed later (5xx, throttling, resets, timeouts)."""


class PermanentError(CkptStageError):
    """Retrying cannot help: bad configuration, missing objects, bad input."""


class StorageUnavailable(TransientError):
    code = ReasonCode.STORAGE_UNAVAILABLE


class StorageMisconfigured(PermanentError):
    code = ReasonCode.STORAGE_MISCONFIGURED


class ArtifactMissing(PermanentError):
    code = ReasonCode.ARTIFACT_MISSING


class IntegrityMismatch(PermanentError):
    code = ReasonCode.INTEGRITY_MISMATCH


class RegistryUnavailable(TransientError):
    code = ReasonCode.REGISTRY_UNAVAILABLE


class RegistryConflict(RegistryUnavailable):
    """Two writers raced on one row (MLflow on PostgreSQL answers 400 "duplicate key value violates unique
    constraint" when two first writes of the same tag meet). The same write succeeds a moment later."""


class RegistryError(PermanentError):
    """The registry answered, but not as expected (unknown model or version, bad tags)."""

    code = ReasonCode.REGISTRY_UNAVAILABLE


class ConfigError(PermanentError):
    """A setting is missing or malformed; the message names the setting."""

    code = ReasonCode.INTERNAL_ERROR


class UsageError(PermanentError):
    """The caller asked for something that does not exist or makes no sense."""


class ObjectChanged(StorageUnavailable):
    """An object changed (or vanished) between listing and download: the listing is stale, so the whole
    version is listed and downloaded again; never a verdict on a mix of old and new bytes. Retrying the
    same request cannot help (it asks for the listed ETag or VersionId), only a fresh listing can."""


def is_retryable(exc: BaseException) -> bool:
    """The one retryability decision: storage, registry, the pipeline and the DAG glue all ask this.

    Only the stage's ``TransientError`` is retried; anything else (a ``PermanentError``, or an exception
    that was never classified, which is a bug) is not. Adapters classify library exceptions into the
    taxonomy at their edge (``storage.classify``, ``registry.translate``) before anyone asks.
    """
    return isinstance(exc, TransientError)
