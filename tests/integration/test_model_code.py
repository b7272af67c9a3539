"""Code carried by MLflow model versions, end to end through ``ckpt-stage inspect`` (static scan and the
isolated worker), and proof that each refused mechanism is real: stock ``mlflow.pyfunc.load_model`` on
the same hostile directory does run its payload (tests/corpus/model_code_cases.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from ckpt_stage.cli import main
from tests.conftest import ROOT
from tests.corpus.model_code_cases import CASES, LOAD_CASES, MECHANISMS, PKG

EXIT = {"pass": 0, "quarantine": 1, "error": 3}
BY_NAME = {c.name: c for c in CASES + LOAD_CASES}


def _build(case, tmp_path):
    work, canary = tmp_path / "work", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    os.chmod(tmp_path, 0o755)
    return case.build(work, canary), canary


def _inspect(built, tmp_path, monkeypatch) -> tuple[dict, int, str]:
    monkeypatch.setenv("CKPT_STAGE_CACHE_DIR", str(tmp_path / "cache"))
    for k, v in built.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = CliRunner().invoke(main, ["inspect", *map(str, built.paths), "--json"], catch_exceptions=False)
    assert result.stdout.strip(), f"no JSON on stdout; stderr:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout), result.exit_code, result.stderr


@pytest.mark.parametrize("case", CASES + LOAD_CASES, ids=lambda c: c.name)
def test_inspect(case, tmp_path, monkeypatch):
    built, canary = _build(case, tmp_path)
    report, exit_code, stderr = _inspect(built, tmp_path, monkeypatch)
    codes = [r["code"] for r in report["reasons"]]
    detail = f"{case.name}: {report['verdict']} {report['reasons']}\n{stderr[-2000:]}"
    assert report["verdict"] == case.verdict, detail
    assert exit_code == EXIT[case.verdict], detail
    if case.verdict == "pass":
        assert codes == [], detail
    for code in case.codes:
        assert code in codes, detail
    texts = [f"{r['message']} {r.get('hint') or ''}" for r in report["reasons"] if r["code"] in case.codes]
    for needle in case.message_contains:
        assert any(needle in t for t in texts), f"{needle!r} not in {texts}"
    assert list(canary.iterdir()) == [], f"a payload ran: {list(canary.iterdir())}"


def test_allowed_model_code_ran_in_the_worker_and_the_report_says_so(tmp_path, monkeypatch):
    built, _ = _build(BY_NAME["mc_code_paths_allowed"], tmp_path)
    report, exit_code, _ = _inspect(built, tmp_path, monkeypatch)
    assert report["verdict"] == "pass" and exit_code == 0
    ran = report["model_info"]["model_code_ran"]
    assert PKG in ran and f"{PKG}.net" in ran
    notes = [f for f in report["findings"] if f["severity"] == "info" and "own code ran" in f["message"]]
    assert notes and "CKPT_STAGE_ALLOW_MODEL_CODE" in notes[0]["message"]
    assert report["model_info"]["model_kind"] == "mlflow-pickle"
    assert not any(str(p).startswith(str(built.paths[0])) for p in sys.path)  # never in the parent


def test_console_script_exit_code(tmp_path):
    built, canary = _build(BY_NAME["mc_loader_in_code"], tmp_path)
    env = {**os.environ, "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ckpt_stage.cli", "inspect", str(built.paths[0]), "--json"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "UNSAFE_CODE" in [r["code"] for r in json.loads(proc.stdout)["reasons"]]
    assert list(canary.iterdir()) == []


_LOAD = textwrap.dedent("""
    import sys
    import numpy as np
    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model(sys.argv[1])
    model.predict(np.zeros((1, 4), dtype=np.float32))
""")


def _stock_load(model_dir, tmp_path) -> subprocess.CompletedProcess:
    cwd = tmp_path / "serving-host"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_STAGE_")}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", _LOAD, str(model_dir)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("name", MECHANISMS)
def test_mechanism_is_real(name, tmp_path):
    """What the gate refuses does run on a serving host: stock MLflow 3.17 runs each payload."""
    built, canary = _build(BY_NAME[name], tmp_path)
    proc = _stock_load(built.paths[0], tmp_path)
    assert list(canary.iterdir()), f"{name}: the payload did not run under mlflow.pyfunc.load_model:\n" \
                                   f"{proc.stderr[-3000:]}"


def test_auto_map_mechanism_is_real(tmp_path):
    pytest.importorskip("transformers")
    built, canary = _build(BY_NAME["mc_auto_map_bare"], tmp_path)
    code = "import sys, transformers; transformers.AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", code, str(built.paths[0])], cwd=tmp_path, capture_output=True, timeout=300)
    assert list(canary.iterdir())


def test_both_formats_serving_loads_model_pth(tmp_path):
    """Why the worker validates model.pth when data/ holds both: that is the one mlflow.pytorch serves
    (its NaN weights come out of predict), while the good model.pt2 beside it is never read."""
    built, _ = _build(BY_NAME["mc_both_pt2_and_pth"], tmp_path)
    code = _LOAD + "print('NAN' if np.isnan(np.asarray(model.predict(np.zeros((1, 4), dtype=np.float32)))).any() else 'OK')\n"
    cwd = tmp_path / "serving-host"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-c", code, str(built.paths[0])], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.strip().endswith("NAN"), proc.stderr[-3000:]


@pytest.mark.integration
def test_registered_code_paths_model_through_the_registry(stack, stage_env, tmp_path):
    """A code_paths model registered in a real MLflow server: quarantined with UNSAFE_CODE by default,
    promoted once the operator allows its package, with the tags read back from the registry."""
    import uuid

    from mlflow import MlflowClient

    from ckpt_stage.dev import devstack
    from ckpt_stage.config import Settings
    from ckpt_stage.domain import Verdict
    from ckpt_stage.pipeline import validate_version
    from tests.corpus.model_code_cases import copy

    folder = copy("code_paths", tmp_path)
    name = f"code-paths-{uuid.uuid4().hex[:6]}"
    first = devstack.register_folder(stack.bucket, name, folder)
    out = validate_version(first, settings=Settings.from_env())
    assert out.report is not None and out.report.verdict is Verdict.QUARANTINE
    tags = MlflowClient().get_model_version(name, first.version).tags
    assert tags["ckpt_stage.status"] == "quarantined" and tags["ckpt_stage.reasons"] == "UNSAFE_CODE", tags
    assert "CKPT_STAGE_ALLOW_MODEL_CODE" in out.report.to_dict()["reasons"][0]["hint"]

    second = devstack.register_folder(stack.bucket, name, folder)
    out = validate_version(second, settings=Settings.from_env({**stage_env, "CKPT_STAGE_ALLOW_MODEL_CODE": PKG}))
    assert out.report is not None and out.report.verdict is Verdict.PASS, out.report.to_dict()["reasons"]
    assert PKG in out.report.to_dict()["model_info"]["model_code_ran"]
    mv = MlflowClient().get_model_version(name, second.version)
    assert mv.tags["ckpt_stage.status"] == "promoted"
