"""Parameter drift against the version that holds the alias, through the real pipeline, MLflow and S3."""

from __future__ import annotations

import uuid

import pytest
import torch
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.dashboard.data import DashboardData
from ckpt_stage.domain import Verdict
from ckpt_stage.pipeline import validate_version
from tests.faults import one_backend

pytestmark = pytest.mark.integration


def _save(folder, state) -> dict[str, str]:
    folder.mkdir(parents=True)
    torch.save(state, folder / "model.pt")
    return dict(samples.LINEAR_TAGS)


def _weights(report) -> dict:
    found = [f for f in report.findings if f.detail.get("kind") == "weight_drift" and f.code is None]
    assert len(found) == 1, [f.message for f in report.findings]
    return found[0]


def test_retrained_and_identical_versions_are_compared_with_the_alias_holder(stack, stage_env, tmp_path, monkeypatch):
    one_backend(stack)  # about the weights in two reports, not the backend store
    name = f"drift-{uuid.uuid4().hex[:6]}"
    torch.manual_seed(0)
    v1 = torch.nn.Linear(4, 2).state_dict()
    v2 = {"weight": v1["weight"] * 1.1, "bias": v1["bias"] + 0.5}
    settings = Settings.from_env()

    def register(folder_name, state):
        return devstack.register_folder(stack.bucket, name, tmp_path / folder_name,
                                        _save(tmp_path / folder_name, state))

    first = validate_version(register("v1", v1), settings=settings).report
    assert first.verdict is Verdict.PASS
    assert not [f for f in first.findings if f.detail.get("kind") == "weight_drift"]  # nothing to compare with

    second = validate_version(register("v2", v2), settings=settings).report
    assert second.verdict is Verdict.PASS
    moved = _weights(second)
    assert moved.message.startswith("weights changed since version 1: 2 of 2 tensors moved")
    got = {t["name"]: t for t in moved.detail["tensors"]}
    for key in ("weight", "bias"):  # tensors this small are compared exactly, from the reports alone
        want = float(torch.linalg.vector_norm(v2[key] - v1[key]) / torch.linalg.vector_norm(v1[key]))
        assert got[key]["exact"] is True
        assert got[key]["rel_l2"] == pytest.approx(want, rel=1e-5)

    ref3 = register("v3", {k: v.clone() for k, v in v2.items()})
    third = validate_version(ref3, settings=settings).report
    same = _weights(third)
    assert same.message.startswith("same weights as version 2")
    assert same.detail["identical"] is True

    # The dashboard and `show` read the same findings back from report.json.
    view = DashboardData(settings).detail(name, ref3.version)["drift"]
    assert view["against"] is None  # v3 holds the alias now; its report still says what it was compared with
    assert view["weights"]["identical"] is True and view["weights"]["previous_version"] == "2"

    # With a threshold, weights that moved further than it are held back.
    gated = settings.replace(drift_max_change=0.5)
    ref4 = register("v4", {k: v * 3 for k, v in v2.items()})
    fourth = validate_version(ref4, settings=gated).report
    assert fourth.verdict is Verdict.QUARANTINE
    assert [r.code.value for r in fourth.reasons] == ["PARAMETER_DRIFT"]
    tags = MlflowClient().get_model_version(name, ref4.version).tags
    assert tags["ckpt_stage.status"] == "quarantined"
    assert tags["ckpt_stage.reasons"] == "PARAMETER_DRIFT"
    assert "moved more than 50%" in tags["ckpt_stage.summary"]
    assert MlflowClient().get_model_version_by_alias(name, "validated").version == ref3.version
