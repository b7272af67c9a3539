"""Row 1 of the reliability table: S3 failing while an attempt's ``report.json`` is uploaded (MLflow's
artifact repository writes it to S3). Nothing escapes as a crash: the sweep prints its JSON, the version
ends in ``error`` with STORAGE_UNAVAILABLE (S3's failure, not MLflow's), the attempt's run is finished
(FAILED, never left RUNNING), and the next attempt has a new number."""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.cli import main
from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode, Verdict
from ckpt_stage.pipeline import validate_version
from ckpt_stage.registry import LEASE_OWNER, STATUS, Registry
from tests.faults.proxy import FaultProxy, on

pytestmark = pytest.mark.integration


@pytest.fixture
def artifact_proxy(stack, stage_env, monkeypatch):
    """A proxy in front of S3 for MLflow's artifact uploads only; the stage's downloads go straight to S3
    (``AWS_ENDPOINT_URL_S3`` wins for the stage, ``MLFLOW_S3_ENDPOINT_URL`` is MLflow's)."""
    with FaultProxy(stack.s3.url, seed=1) as proxy:
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.mark.parametrize("kind", ["reset", "reset_after", 503])
def test_s3_failing_while_report_json_uploads_never_crashes_the_sweep(stack, stage_env, build_sample, artifact_proxy,
                                                                       kind):
    folder, tags = build_sample(samples.state_dict)
    ref = devstack.register_folder(stack.bucket, f"0report-{uuid.uuid4().hex[:6]}", folder, tags)
    artifact_proxy.arm(*[kind] * 500, match=on("PUT"))

    result = CliRunner().invoke(main, ["sweep", "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    doc = json.loads(result.stdout)  # the sweep always prints its one JSON document
    assert result.exit_code == 3
    row = next(r for r in doc["results"] if r.get("model") == ref.name)
    assert row["verdict"] == "error"
    assert row["reasons"] == [ReasonCode.STORAGE_UNAVAILABLE.value]  # S3 failed, not MLflow
    assert row["attempt"] == 1

    registry = Registry(Settings.from_env())
    state = registry.get(ref)
    assert state.tags[STATUS] == "error" and LEASE_OWNER not in state.tags
    assert state.needs_validation()
    runs = registry.attempts(ref)
    assert [MlflowClient().get_run(r["run_id"]).info.status for r in runs] == ["FAILED"]  # never RUNNING

    artifact_proxy.calm()
    out = validate_version(ref, settings=Settings.from_env())
    assert out.report.verdict is Verdict.PASS
    assert out.report.attempt == 2  # attempt 1 has a run: its number is not used again
    runs = registry.attempts(ref)
    assert sorted(MlflowClient().get_run(r["run_id"]).info.status for r in runs) == ["FAILED", "FINISHED"]
    assert registry.report_of(out.run_id)["attempt"] == 2
    assert registry.get(ref).tags["ckpt_stage.run_id"] == out.run_id


def test_validate_labels_an_upload_failure_as_storage(stack, stage_env, build_sample, artifact_proxy):
    """S3 refusing the upload inside MLflow's artifact call is STORAGE_UNAVAILABLE, never "cannot reach MLflow"."""
    folder, tags = build_sample(samples.state_dict)
    ref = devstack.register_folder(stack.bucket, f"stall-{uuid.uuid4().hex[:6]}", folder, tags)
    artifact_proxy.arm(*[503] * 50, match=on("PUT"))
    result = CliRunner().invoke(main, ["validate", "--model", ref.name, "--version", ref.version, "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == 3
    assert [r["code"] for r in doc["reasons"]] == ["STORAGE_UNAVAILABLE"]
