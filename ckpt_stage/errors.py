"""Every error of the stage, in one place; transient errors are retried, permanent ones never are.

The taxonomy (``CkptStageError`` → ``TransientError`` | ``PermanentError``): every such error carries a
contract reason code and survives pickling across the worker/process boundary (``__reduce__`` rebuilds
it from its fields rather than from ``args``). ``is_retryable`` is the one answer to "retry?".

Below the taxonomy are the errors that never leave the code that catches them: the worker's (raised by
``load/`` and turned into a finding by ``load/loader.py``), the sandbox's, the DAG glue's and the
dashboard's. Each docstring names the reason code it becomes. This module imports nothing heavy: the
worker imports it.
"""

from __future__ import annotations

from typing import Any

from ckpt_stage.domain import Finding, ReasonCode


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


class RerunTooLarge(UsageError):
    """A re-run selection matches more versions than one re-run takes (``orchestrate.MAX_RERUN``); narrow it
    by model or reason. No reason code: nothing is recorded. The dashboard answers 413."""


class ObjectChanged(StorageUnavailable):
    """An object changed (or vanished) between listing and download: the listing is stale, so the whole
    version is listed and downloaded again; never a verdict on a mix of old and new bytes. Retrying the
    same request cannot help (it asks for the listed ETag or VersionId), only a fresh listing can."""


class ManifestUnavailable(CkptStageError):
    """The version has no readable manifest (no run, no report.json, or a report without files). Reason code:
    ``REGISTRY_UNAVAILABLE``. Raised by ``integrity.py``."""

    code = ReasonCode.REGISTRY_UNAVAILABLE


class AirflowUnavailable(TransientError):
    """Airflow's API server could not be reached or answered 5xx (transient; the webhook receiver answers
    503 so MLflow redelivers). Reason code: ``INTERNAL_ERROR``. Raised by ``airflow_client.py``."""


class AirflowAuthError(PermanentError):
    """Airflow refused the configured credentials (401) or their permissions (403); the message names the
    settings to fix. Reason code: ``INTERNAL_ERROR``. Raised by ``airflow_client.py``."""


class AirflowRequestError(PermanentError):
    """Airflow answered, but refused the request (unknown DAG, invalid conf, ...). Reason code:
    ``INTERNAL_ERROR``. Raised by ``airflow_client.py``."""

    def __init__(self, message: str, *, status_code: int = 0, **kwargs: Any):
        super().__init__(message, status_code=status_code, **kwargs)
        self.status_code = status_code


class AssetNotFound(TransientError):
    """The asset is not registered yet (its DAG has not been parsed); worth retrying later. Reason code:
    ``INTERNAL_ERROR``. Raised by ``airflow_client.py``."""

def is_retryable(exc: BaseException) -> bool:
    """The one retryability decision: storage, registry, the pipeline and the DAG glue all ask this.

    Only the stage's ``TransientError`` is retried; anything else (a ``PermanentError``, or an exception
    that was never classified, which is a bug) is not. Adapters classify library exceptions into the
    taxonomy at their edge (``storage.classify_s3_error``, ``registry.translate``) before anyone asks.
    """
    return isinstance(exc, TransientError)


TRANSIENT_CODES = frozenset({ReasonCode.STORAGE_UNAVAILABLE, ReasonCode.REGISTRY_UNAVAILABLE, ReasonCode.WORKER_LOST})
"""Reason codes where another try may succeed: those of the ``TransientError`` classes, and a lost worker.
The others (``STORAGE_MISCONFIGURED``, ``INTERNAL_ERROR``, every model problem) need a person first."""

RETRYABLE_DETAIL = "retryable"
"""A finding made from an error whose class disagrees with its code's default (``RegistryError`` carries
``REGISTRY_UNAVAILABLE`` but is permanent) records the class's answer under this ``detail`` key."""


def retry_detail(exc: BaseException, code: ReasonCode | None) -> dict[str, Any]:
    """What a finding made from ``exc`` must carry so that ``is_retryable_finding`` answers as
    ``is_retryable(exc)`` does: nothing when the code already says it."""
    retryable = is_retryable(exc)
    return {} if retryable == (code in TRANSIENT_CODES) else {RETRYABLE_DETAIL: retryable}


def is_retryable_finding(finding: Finding) -> bool:
    """Retryability of a recorded ``error`` finding: the error class's answer when it was recorded
    (``retry_detail``), else its reason code's (``TRANSIENT_CODES``)."""
    recorded = finding.detail.get(RETRYABLE_DETAIL)
    if isinstance(recorded, bool):
        return recorded
    return finding.code in TRANSIENT_CODES


# -- inside the worker (load/): each becomes a finding of the loader -----------------------------


class ArchError(Exception):
    """The declared architecture (``ckpt_stage.arch`` tag, ``--arch``) cannot be built: malformed, not
    importable under the allowed modules, not an ``nn.Module`` or refusing its kwargs.
    Reason code: ``PARTIAL_CHECKPOINT``. Raised by ``load/checks.py``."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message = message
        self.hint = hint


class ModelDirError(Exception):
    """The directory is not a usable MLflow model. Reason code: ``CORRUPT_ARCHIVE``; ``missing`` marks
    absent files (``ARTIFACT_MISSING``); while feeding the input example, ``SMOKE_INFERENCE_FAILED``.
    Raised by ``load/mlflow_model.py``."""

    def __init__(self, message: str, hint: str = "", *, missing: bool = False, file: str | None = None):
        super().__init__(message)
        self.message, self.hint, self.missing, self.file = message, hint, missing, file


class ExampleError(Exception):
    """An MLflow model's input example cannot be turned into tensors. Reason code:
    ``SMOKE_INFERENCE_FAILED``. Raised by ``load/mlflow_model.py``."""


class HfError(Exception):
    """A Hugging Face folder cannot be built on the meta device; carries its own reason code
    (``PARTIAL_CHECKPOINT``, ``UNSAFE_CODE``, ...). Raised by ``load/hf.py``."""

    def __init__(self, code: ReasonCode, message: str, hint: str, **detail: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.detail = detail


# -- the sandbox's parent side --------------------------------------------------------------------


class ServerGone(Exception):
    """The fork server is dead or died while taking a job (the caller restarts it once; a second loss is
    ``WORKER_LOST``). Raised by ``sandbox/forkserver.py``."""


class ServerStartError(Exception):
    """The fork server did not come up; the message carries its log tail. Reason code:
    ``INTERNAL_ERROR`` (the worker interpreter cannot import torch or ckpt_stage). Raised by
    ``sandbox/forkserver.py``."""


# -- the DAG glue and the dashboard ---------------------------------------------------------------


class ValidationFailed(Exception):
    """The task must fail. ``retry``: Airflow should try again (infrastructure: every reason code is
    retryable, see ``is_retryable_code``); else it needs a person (``INTERNAL_ERROR``,
    ``STORAGE_MISCONFIGURED``, ...). Raised by ``orchestrate.task_result``; the verdict is already recorded."""

    def __init__(self, message: str, *, retry: bool):
        super().__init__(message)
        self.retry = retry


class RerunError(Exception):
    """A re-run request was refused; ``status`` is the HTTP status the dashboard answers (400 for a bad
    selection, 404 for nothing matching, 503 when Airflow is unreachable). No reason code: nothing is
    recorded. Raised by ``dashboard/rerun.py``."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail

