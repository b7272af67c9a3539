"""End to end: a torch.export archive whose graph JSON carries Python (tests/corpus/pt2_code.py), as a
bare ``.pt2`` file and inside an MLflow model directory, through ``ckpt-stage inspect``: quarantined
``UNSAFE_CODE``, no canary, the parent alive. The benign originals pass through the same path
(worker load and forward pass included)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.corpus import pt2_code as P
from tests.integration.pt2_inspect import canary_path, inspect_json




def test_benign_pt2_file_and_mlflow_dir_pass(pt2_sources, tmp_path, monkeypatch):
    src, model = pt2_sources
    for path in (src, model):
        report, code = inspect_json(path, tmp_path, monkeypatch)
        assert (report["verdict"], code) == ("pass", 0), report["reasons"]


@pytest.mark.parametrize("payload", P.PAYLOADS, ids=lambda p: p.name)
def test_inspect_pt2_file_quarantines(payload, pt2_sources, tmp_path, monkeypatch):
    canary = canary_path(tmp_path)
    path = payload.build(pt2_sources[0], tmp_path / "model.pt2", canary)
    report, code = inspect_json(path, tmp_path, monkeypatch)
    assert (report["verdict"], code) == ("quarantine", 1), report["reasons"]
    assert {r["code"] for r in report["reasons"]} == {"UNSAFE_CODE"}, report["reasons"]
    assert any(payload.field in r["message"] for r in report["reasons"]), report["reasons"]
    assert not canary.exists()


@pytest.mark.parametrize("payload", P.PAYLOADS, ids=lambda p: p.name)
def test_inspect_mlflow_dir_quarantines(payload, pt2_sources, tmp_path, monkeypatch):
    canary = canary_path(tmp_path)
    model = tmp_path / "mlflow-model"
    shutil.copytree(pt2_sources[1], model)
    target = model / "data" / "model.pt2"
    payload.build(target, tmp_path / "evil.pt2", canary).replace(target)
    report, code = inspect_json(model, tmp_path, monkeypatch)
    assert (report["verdict"], code) == ("quarantine", 1), report["reasons"]
    assert "UNSAFE_CODE" in {r["code"] for r in report["reasons"]}, report["reasons"]
    assert all(r["file"] == "data/model.pt2" for r in report["reasons"] if r["code"] == "UNSAFE_CODE")
    assert not canary.exists()


def test_console_script_on_a_hostile_pt2(pt2_sources, tmp_path):
    """The real ``ckpt-stage`` process: one JSON document on stdout, exit status 1, no canary."""
    canary = canary_path(tmp_path)
    path = P.PAYLOADS[0].build(pt2_sources[0], tmp_path / "model.pt2", canary)
    env = {**os.environ, "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    exe = os.path.join(os.path.dirname(sys.executable), "ckpt-stage")
    proc = subprocess.run([exe, "inspect", str(path), "--json"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["verdict"] == "quarantine"
    assert [r["code"] for r in report["reasons"]] == ["UNSAFE_CODE"]
    assert not canary.exists()


@pytest.mark.parametrize("payload", [p for p in P.PAYLOADS if p.runs], ids=lambda p: p.name)
def test_serving_host_would_run_it(payload, pt2_sources, tmp_path):
    """Why the gate matters: the same MLflow directory, loaded the way a serving host does
    (``mlflow.pyfunc.load_model(...).predict``), runs the payload."""
    canary = tmp_path / "ran"
    model = tmp_path / "mlflow-model"
    shutil.copytree(pt2_sources[1], model)
    target = model / "data" / "model.pt2"
    payload.build(target, tmp_path / "evil.pt2", canary).replace(target)
    code = ("import sys, numpy as np, mlflow.pyfunc\n"
            "mlflow.pyfunc.load_model(sys.argv[1]).predict(np.zeros((3, 4), dtype=np.float32))\n")
    subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, timeout=600, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": ""})
    assert canary.exists(), f"mlflow.pyfunc no longer runs the {payload.name} payload"
