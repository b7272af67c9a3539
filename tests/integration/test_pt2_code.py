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
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckpt_stage.cli import main
from tests.conftest import ROOT
from tests.corpus import pt2_code as P


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """(a bare benign .pt2, a benign MLflow pt2 model directory of the same program)."""
    import mlflow.pytorch
    import numpy as np

    base = tmp_path_factory.mktemp("pt2-sources")
    src = P.benign(base / "src.pt2")
    model = base / "mlflow-model"
    mlflow.pytorch.save_model(P.Net().eval(), str(model), input_example=np.zeros((3, 4), dtype=np.float32))
    return src, model


def _inspect(path: Path, tmp_path: Path, monkeypatch) -> tuple[dict, int]:
    monkeypatch.setenv("CKPT_STAGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"], catch_exceptions=False)
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout), result.exit_code


def _canary(tmp_path: Path) -> Path:
    d = tmp_path / "canary"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o777)  # a payload running as the worker's unprivileged user could write here
    return d / "ran"


def test_benign_pt2_file_and_mlflow_dir_pass(sources, tmp_path, monkeypatch):
    src, model = sources
    for path in (src, model):
        report, code = _inspect(path, tmp_path, monkeypatch)
        assert (report["verdict"], code) == ("pass", 0), report["reasons"]


@pytest.mark.parametrize("payload", P.PAYLOADS, ids=lambda p: p.name)
def test_inspect_pt2_file_quarantines(payload, sources, tmp_path, monkeypatch):
    canary = _canary(tmp_path)
    path = payload.build(sources[0], tmp_path / "model.pt2", canary)
    report, code = _inspect(path, tmp_path, monkeypatch)
    assert (report["verdict"], code) == ("quarantine", 1), report["reasons"]
    assert {r["code"] for r in report["reasons"]} == {"UNSAFE_CODE"}, report["reasons"]
    assert any(payload.field in r["message"] for r in report["reasons"]), report["reasons"]
    assert not canary.exists()


@pytest.mark.parametrize("payload", P.PAYLOADS, ids=lambda p: p.name)
def test_inspect_mlflow_dir_quarantines(payload, sources, tmp_path, monkeypatch):
    canary = _canary(tmp_path)
    model = tmp_path / "mlflow-model"
    shutil.copytree(sources[1], model)
    target = model / "data" / "model.pt2"
    payload.build(target, tmp_path / "evil.pt2", canary).replace(target)
    report, code = _inspect(model, tmp_path, monkeypatch)
    assert (report["verdict"], code) == ("quarantine", 1), report["reasons"]
    assert "UNSAFE_CODE" in {r["code"] for r in report["reasons"]}, report["reasons"]
    assert all(r["file"] == "data/model.pt2" for r in report["reasons"] if r["code"] == "UNSAFE_CODE")
    assert not canary.exists()


def test_console_script_on_a_hostile_pt2(sources, tmp_path):
    """The real ``ckpt-stage`` process: one JSON document on stdout, exit status 1, no canary."""
    canary = _canary(tmp_path)
    path = P.PAYLOADS[0].build(sources[0], tmp_path / "model.pt2", canary)
    env = {**os.environ, "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    exe = os.path.join(os.path.dirname(sys.executable), "ckpt-stage")
    proc = subprocess.run([exe, "inspect", str(path), "--json"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["verdict"] == "quarantine"
    assert [r["code"] for r in report["reasons"]] == ["UNSAFE_CODE"]
    assert not canary.exists()


@pytest.mark.parametrize("payload", [p for p in P.PAYLOADS if p.runs], ids=lambda p: p.name)
def test_serving_host_would_run_it(payload, sources, tmp_path):
    """Why the gate matters: the same MLflow directory, loaded the way a serving host does
    (``mlflow.pyfunc.load_model(...).predict``), runs the payload."""
    canary = tmp_path / "ran"
    model = tmp_path / "mlflow-model"
    shutil.copytree(sources[1], model)
    target = model / "data" / "model.pt2"
    payload.build(target, tmp_path / "evil.pt2", canary).replace(target)
    code = ("import sys, numpy as np, mlflow.pyfunc\n"
            "mlflow.pyfunc.load_model(sys.argv[1]).predict(np.zeros((3, 4), dtype=np.float32))\n")
    subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, timeout=600, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": ""})
    assert canary.exists(), f"mlflow.pyfunc no longer runs the {payload.name} payload"
