"""One answer to "retry?": the error taxonomy decides, for storage, the registry and the Airflow task alike.

Each row is one error as the stage raises it: whether it is retried where it is raised
(``errors.is_retryable``, what tenacity asks in storage), and whether the Airflow task of a version that
ended in that error is retried (``orchestrate.task_result`` on the finding ``pipeline`` records from it).
"""

from __future__ import annotations

import pytest

from ckpt_stage import orchestrate
from ckpt_stage.domain import Finding, ReasonCode, Report, Verdict, VersionRef
from ckpt_stage.errors import (
    TRANSIENT_CODES,
    ArtifactMissing,
    CkptStageError,
    ConfigError,
    IntegrityMismatch,
    ManifestUnavailable,
    ObjectChanged,
    RegistryConflict,
    RegistryError,
    RegistryUnavailable,
    StorageMisconfigured,
    StorageUnavailable,
    UsageError,
    is_retryable,
    is_retryable_finding,
)
from ckpt_stage.pipeline import Outcome, _finding_from_error, _unrecorded


@pytest.mark.parametrize(("error", "retried"), [
    (StorageUnavailable("S3 answered 503"), True),
    (ObjectChanged("model.pt changed after the listing"), True),
    (RegistryUnavailable("MLflow kept failing"), True),
    (RegistryConflict("a concurrent write to the same row"), True),
    # A permanent MLflow error carries REGISTRY_UNAVAILABLE (the contract's code) but is never retried.
    (RegistryError("MLflow refused the tag"), False),
    (ManifestUnavailable("no report.json"), False),
    (StorageMisconfigured("AccessDenied"), False),
    (ArtifactMissing("no such key"), False),
    (IntegrityMismatch("sha256 differs"), False),
    (ConfigError("CKPT_STAGE_WORKER_CLASSES is malformed"), False),
    (UsageError("no such version"), False),
    (CkptStageError("a bug", code=ReasonCode.INTERNAL_ERROR), False),
    (RuntimeError("never classified: a bug"), False),
])
def test_one_answer_for_an_error_where_it_is_raised_and_for_its_task(error, retried):
    assert is_retryable(error) is retried
    if not isinstance(error, CkptStageError):
        return
    ref = VersionRef("m", "1")
    for finding in (_finding_from_error(error), _unrecorded(ref, error, attempt=1, what="recording").report.reasons[0]):
        assert is_retryable_finding(finding) is retried
        report = Report(Verdict.ERROR, (finding,), ref, (), {}, {}, {}, {}, attempt=1, summary="s")
        with pytest.raises(orchestrate.ValidationFailed) as info:
            orchestrate.task_result(Outcome(report, run_id="r1"))
        assert info.value.retry is retried


@pytest.mark.parametrize(("code", "retried"), [
    *((code, True) for code in (ReasonCode.STORAGE_UNAVAILABLE, ReasonCode.REGISTRY_UNAVAILABLE,
                                 ReasonCode.WORKER_LOST)),
    *((code, False) for code in ReasonCode if code not in TRANSIENT_CODES),
])
def test_a_finding_without_an_error_class_is_judged_by_its_code(code, retried):
    assert is_retryable_finding(Finding(code, "m")) is retried
