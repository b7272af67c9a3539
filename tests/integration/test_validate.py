"""End to end through the library and the CLI against a real MLflow server and a real S3 API server."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.domain import Verdict
from ckpt_stage.pipeline import validate_version
from ckpt_stage.registry import Registry

pytestmark = pytest.mark.integration


def _name(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:6]}"


def _register(stack, build_sample, builder, name=None):
    folder, tags = build_sample(builder)
    return devstack.register_folder(stack.bucket, name or _name(builder.__name__), folder, tags)


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_stage.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("builder", [samples.mlflow_pt2, samples.mlflow_pickle, samples.state_dict,
                                     samples.safetensors_file])
def test_good_versions_are_promoted(stack, stage_env, build_sample, builder):
    ref = _register(stack, build_sample, builder)
    outcome = validate_version(ref, settings=Settings.from_env())
    report = outcome.report
    assert report is not None
    assert report.verdict is Verdict.PASS, report.to_dict()
    client = MlflowClient()
    mv = client.get_model_version(ref.name, ref.version)
    assert mv.tags["ckpt_stage.status"] == "promoted"
    assert mv.tags["ckpt_stage.reasons"] == ""
    assert mv.tags["ckpt_stage.attempt"] == "1"
    assert mv.tags["ckpt_stage.run_id"] == outcome.run_id
    assert len(mv.tags["ckpt_stage.sha256"]) == 64
    assert "ckpt_stage.lease_owner" not in mv.tags
    assert client.get_model_version_by_alias(ref.name, "validated").version == ref.version
    recorded = Registry(Settings.from_env()).report_of(outcome.run_id)
    assert recorded == json.loads(json.dumps(report.to_dict()))
    run = client.get_run(outcome.run_id)
    assert run.info.experiment_id == client.get_experiment_by_name("ckpt-stage-validations").experiment_id
    assert run.data.metrics["timings_s.total"] > 0


@pytest.mark.parametrize(("builder", "code"), [
    (samples.shape_mismatch, "SHAPE_MISMATCH"),
    (samples.arch_mismatch, "ARCHITECTURE_MISMATCH"),
    (samples.truncated, "CORRUPT_ARCHIVE"),
    (samples.no_arch, "PARTIAL_CHECKPOINT"),
])
def test_bad_versions_are_quarantined_via_cli(stack, stage_env, build_sample, builder, code):
    ref = _register(stack, build_sample, builder)
    env = {**__import__("os").environ}
    proc = _cli("validate", "--model", ref.name, "--version", ref.version, "--json", env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["schema"] == "ckpt-stage/report/v1"
    assert report["verdict"] == "quarantine"
    assert code in [r["code"] for r in report["reasons"]], report["reasons"]
    assert report["model"] == {"name": ref.name, "version": ref.version}
    mv = MlflowClient().get_model_version(ref.name, ref.version)
    assert mv.tags["ckpt_stage.status"] == "quarantined"
    assert code in mv.tags["ckpt_stage.reasons"].split(",")
    assert mv.tags["ckpt_stage.summary"]


def test_alias_leaves_a_version_that_fails_a_rerun(stack, stage_env, build_sample):
    name = _name("alias")
    v1 = _register(stack, build_sample, samples.state_dict, name)
    v2 = _register(stack, build_sample, samples.state_dict, name)
    settings = Settings.from_env()
    assert validate_version(v1, settings=settings).report.verdict is Verdict.PASS
    assert validate_version(v2, settings=settings).report.verdict is Verdict.PASS
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "validated").version == v2.version
    # Someone declares a different architecture on v2: the re-run quarantines it and the alias falls back.
    client.set_model_version_tag(name, v2.version, "ckpt_stage.arch_kwargs", '{"in_features": 4, "out_features": 3}')
    out = validate_version(v2, settings=settings, force=True)
    assert out.report.verdict is Verdict.QUARANTINE
    assert out.report.attempt == 2
    assert client.get_model_version_by_alias(name, "validated").version == v1.version
    assert Registry(settings).get(v2).status.value == "quarantined"


def test_missing_files_quarantine_with_artifact_missing(stack, stage_env):
    name = _name("missing")
    client = MlflowClient()
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"s3://{stack.bucket}/nothing/here/{uuid.uuid4().hex}")
    out = validate_version(devstack_ref(name, mv.version), settings=Settings.from_env())
    assert out.report.verdict is Verdict.QUARANTINE
    assert [r.code.value for r in out.report.reasons] == ["ARTIFACT_MISSING"]


def test_missing_bucket_is_an_error_not_a_quarantine(stack, stage_env):
    name = _name("nobucket")
    client = MlflowClient()
    client.create_registered_model(name)
    mv = client.create_model_version(name, source="s3://no-such-bucket-ckpt/x")
    out = validate_version(devstack_ref(name, mv.version), settings=Settings.from_env())
    assert out.report.verdict is Verdict.ERROR
    assert [r.code.value for r in out.report.reasons] == ["STORAGE_MISCONFIGURED"]
    assert client.get_model_version(name, mv.version).tags["ckpt_stage.status"] == "error"


def devstack_ref(name, version):
    from ckpt_stage.domain import VersionRef

    return VersionRef(name, str(version))


def test_a_model_logged_and_registered_the_usual_way(stack, stage_env):
    """``log_model(registered_model_name=...)``: the version's source is ``models:/m-…`` and its files
    resolve to the logged model's S3 location through get_model_version_download_uri."""
    import mlflow
    import numpy as np
    import torch

    name = _name("logged")
    mlflow.set_experiment("ckpt-stage-test-logging")
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(torch.nn.Sequential(torch.nn.Linear(3, 2)), name="model",
                                        input_example=np.zeros((1, 3), dtype=np.float32),
                                        registered_model_name=name)
    mv = MlflowClient().get_model_version(name, "1")
    assert mv.source.startswith("models:/")
    out = validate_version(devstack_ref(name, "1"), settings=Settings.from_env())
    assert out.report.verdict is Verdict.PASS, out.report.to_dict()["reasons"]
    paths = {f.path for f in out.report.files}
    assert {"MLmodel", "data/model.pt2"} <= paths, paths
    assert info.model_id


def test_drift_against_the_promoted_version_is_reported(stack, stage_env, tmp_path):
    """v2 reshapes the layers of the promoted v1: it still passes, with an informational drift finding."""
    import torch

    name = _name("drift")
    folders = {}
    for out in (2, 3):
        folder = tmp_path / f"out{out}"
        folder.mkdir()
        torch.save(torch.nn.Linear(4, out).state_dict(), folder / "model.pt")
        folders[out] = folder
    tags = {"ckpt_stage.arch": "torch.nn:Linear"}
    v1 = devstack.register_folder(stack.bucket, name, folders[2],
                                  {**tags, "ckpt_stage.arch_kwargs": '{"in_features": 4, "out_features": 2}'})
    v2 = devstack.register_folder(stack.bucket, name, folders[3],
                                  {**tags, "ckpt_stage.arch_kwargs": '{"in_features": 4, "out_features": 3}'})
    settings = Settings.from_env()
    assert validate_version(v1, settings=settings).report.verdict is Verdict.PASS
    report = validate_version(v2, settings=settings).report
    assert report.verdict is Verdict.PASS
    drift = [f for f in report.findings if f.detail.get("kind") == "drift"]
    assert len(drift) == 1, [f.to_dict() for f in report.findings]
    assert drift[0].code is None and drift[0].severity.value == "info"
    assert drift[0].detail["previous_version"] == v1.version
    assert drift[0].detail["param_count"] == {"previous": 10, "current": 15, "delta": 5}
    assert "weight [2, 4]→[3, 4]" in drift[0].message
