"""Versions the stage does not validate, and how people register what it does, against the real servers.

- An sklearn model (what ``mlflow.sklearn.save_model`` writes, skops by default in MLflow 3.17) is
  quarantined with ``UNSUPPORTED_FORMAT`` by default, and with ``CKPT_STAGE_OTHER_FLAVORS=skip`` it is
  ``skipped``: never holds the alias, not picked up by the next sweep, listed by ``ls``, re-runnable.
- A bare checkpoint file: MLflow 3's ``register_model("runs:/RUN/model.pt")`` refuses it; a version made
  with ``create_model_version(source=<the artifact's s3:// location>)`` validates.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.cli import main
from ckpt_stage.registry import STATUS

pytestmark = pytest.mark.integration


def sklearn_folder(tmp: Path) -> Path:
    sklearn = pytest.importorskip("sklearn.linear_model")  # in the venv, not a dependency of the stage
    import mlflow.sklearn
    import numpy as np

    folder = tmp / "sk-model"
    model = sklearn.LogisticRegression().fit(np.array([[0.0], [1.0]]), [0, 1])
    mlflow.sklearn.save_model(model, str(folder), pip_requirements=["scikit-learn"])
    assert (folder / "model.skops").exists()  # MLflow 3.17's default serialization
    return folder


def run_cli(args: list[str]) -> dict | list:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code in (0, 1, 4), result.output
    return json.loads(result.stdout)


def test_other_flavor_is_quarantined_or_skipped_as_the_operator_chooses(stack, stage_env, build_sample,
                                                                        tmp_path, monkeypatch):
    client = MlflowClient()
    name = f"flavors-{uuid.uuid4().hex[:6]}"
    torch_folder, torch_tags = build_sample(samples.state_dict)
    good = devstack.register_folder(stack.bucket, name, torch_folder, torch_tags)
    sk = sklearn_folder(tmp_path)
    v_default = devstack.register_folder(stack.bucket, name, sk)

    # Default: quarantined, the flavor named, the setting in the hint.
    first = run_cli(["sweep"])
    mine = {r["version"]: r for r in first["results"] if r.get("model") == name}
    assert mine[good.version]["verdict"] == "pass"
    assert mine[v_default.version]["verdict"] == "quarantine"
    assert mine[v_default.version]["reasons"] == ["UNSUPPORTED_FORMAT"]
    tags = client.get_model_version(name, v_default.version).tags
    assert tags[STATUS] == "quarantined" and tags["ckpt_stage.summary"].startswith("sklearn flavor")
    assert "CKPT_STAGE_OTHER_FLAVORS=skip" in tags["ckpt_stage.summary"]
    assert client.get_model_version_by_alias(name, "validated").version == good.version

    # The operator leaves other flavors alone: a new sklearn version is skipped.
    monkeypatch.setenv("CKPT_STAGE_OTHER_FLAVORS", "skip")
    v_skip = devstack.register_folder(stack.bucket, name, sk)
    second = run_cli(["sweep"])
    mine = {r["version"]: r for r in second["results"] if r.get("model") == name}
    assert set(mine) == {v_skip.version}  # the decided versions are not swept again
    assert mine[v_skip.version]["verdict"] == "skip" and second["errors"] == 0
    mv = client.get_model_version(name, v_skip.version)
    assert mv.tags[STATUS] == "skipped" and mv.tags["ckpt_stage.reasons"] == "UNSUPPORTED_FORMAT"
    assert mv.tags["ckpt_stage.summary"].startswith("Not validated: sklearn flavor")
    assert client.get_model_version_by_alias(name, "validated").version == good.version  # never the alias
    # The report says which libraries the model recorded, though nothing was loaded.
    from ckpt_stage.config import Settings
    from ckpt_stage.registry import Registry

    report = Registry(Settings.from_env()).report_of(mv.tags["ckpt_stage.run_id"])
    assert report["verdict"] == "skip" and report["recorded"]["python"].startswith("3.")
    assert report["recorded"]["mlflow"].startswith("3.17")

    # Not picked up again, but listed, and re-runnable (here: the old quarantined one, now skipped too).
    assert not [r for r in run_cli(["sweep"])["results"] if r.get("model") == name]
    listed = {r["version"]: r["status"] for r in run_cli(["ls", "--model", name])}
    assert listed == {good.version: "promoted", v_default.version: "quarantined", v_skip.version: "skipped"}
    assert {r["version"] for r in run_cli(["ls", "--status", "skipped", "--model", name])} == {v_skip.version}
    rerun = run_cli(["rerun", "--model", name, "--version", v_default.version])
    assert rerun["results"][0]["verdict"] == "skip" and rerun["results"][0]["attempt"] == 2
    assert client.get_model_version(name, v_default.version).tags[STATUS] == "skipped"

    # Back to the default: re-running the skipped versions quarantines them.
    monkeypatch.setenv("CKPT_STAGE_OTHER_FLAVORS", "quarantine")
    back = run_cli(["rerun", "--status", "skipped", "--model", name])
    assert {r["version"]: r["verdict"] for r in back["results"]} == {v_default.version: "quarantine",
                                                                     v_skip.version: "quarantine"}
    # Without --json the same command prints its table on stdout.
    monkeypatch.setenv("COLUMNS", "100")
    # (``rerun``: ``validate`` leaves an already decided version alone and points at ``rerun``.)
    table = CliRunner().invoke(main, ["rerun", "--model", name, "--version", v_skip.version])
    assert table.exit_code == 0 and "UNSUPPORTED_FORMAT" in table.stdout and "quarantined" in table.stdout


def test_a_bare_file_registers_with_create_model_version_on_its_s3_location(stack, stage_env, build_sample):
    import mlflow
    from mlflow.exceptions import MlflowException

    folder, tags = build_sample(samples.state_dict)
    name = f"bare-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(folder / "model.pt"), artifact_path="weights")
    # MLflow 3: a runs:/ URI must name a logged model, not a plain artifact file.
    with pytest.raises(MlflowException, match="Unable to find a logged_model"):
        mlflow.register_model(f"runs:/{run.info.run_id}/weights/model.pt", name)
    artifact_uri = client.get_run(run.info.run_id).info.artifact_uri
    assert artifact_uri.startswith("s3://")
    with contextlib.suppress(MlflowException):  # the failed register_model may have created it already
        client.create_registered_model(name)
    for source in (f"{artifact_uri}/weights/", f"{artifact_uri}/weights/model.pt"):  # the folder, or the file
        mv = client.create_model_version(name, source=source, run_id=run.info.run_id, tags=tags)
        doc = run_cli(["validate", "--model", name, "--version", str(mv.version)])
        assert doc["verdict"] == "pass", doc["reasons"]
        assert [f["path"] for f in doc["files"]] == ["model.pt"]
    assert client.get_model_version_by_alias(name, "validated").version == "2"
