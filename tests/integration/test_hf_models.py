"""Hugging Face folders and sharded checkpoints through the real, sandboxed worker (``ckpt-stage inspect
--json``: private root, seccomp, no network; transformers imported inside it), and through a real MLflow
server + S3 API server with the stock MLflow client, reading the tags back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from ckpt_stage.dev import devstack  # noqa: E402
from ckpt_stage.cli import main  # noqa: E402
from ckpt_stage.config import Settings  # noqa: E402
from ckpt_stage.domain import Verdict, VersionRef  # noqa: E402
from ckpt_stage.pipeline import validate_version  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.corpus import hf_cases as hf  # noqa: E402

EXIT = {"pass": 0, "quarantine": 1, "error": 3}

CASES = [
    (hf.gpt2_folder, "pass", []),
    (hf.bert_folder, "pass", []),
    (hf.gpt2_sharded, "pass", []),
    (hf.gpt2_bin_sharded, "pass", []),
    (hf.mlflow_transformers_dir, "pass", []),
    (hf.missing_shard, "quarantine", ["ARTIFACT_MISSING"]),
    (hf.index_wrong_shard, "quarantine", ["CORRUPT_ARCHIVE"]),
    (hf.index_duplicate_key, "quarantine", ["CORRUPT_ARCHIVE"]),
    (hf.bin_index_wrong_shard, "quarantine", ["CORRUPT_ARCHIVE"]),
    (hf.config_shape_mismatch, "quarantine", ["SHAPE_MISMATCH"]),
    (hf.config_foreign_architecture, "quarantine", ["PARTIAL_CHECKPOINT"]),
    (hf.sharded_without_config, "quarantine", ["PARTIAL_CHECKPOINT"]),
]


def _env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CKPT_STAGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def _folder(tmp_path, builder):
    d = tmp_path / "work"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    return builder(d)


@pytest.mark.parametrize(("builder", "verdict", "codes"), CASES, ids=[c[0].__name__ for c in CASES])
def test_inspect_hf_folder(tmp_path, monkeypatch, builder, verdict, codes):
    _env(tmp_path, monkeypatch)
    folder = _folder(tmp_path, builder)
    result = CliRunner().invoke(main, ["inspect", str(folder), "--json"], catch_exceptions=False)
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout)
    detail = f"{report['reasons']}\n{result.stderr[-2000:]}"
    assert report["verdict"] == verdict, detail
    assert result.exit_code == EXIT[verdict], detail
    assert sorted({r["code"] for r in report["reasons"]}) == codes, detail
    assert all(r["hint"] for r in report["reasons"])
    assert report["isolation"]["seccomp"] and report["isolation"]["private_root"]
    if verdict == "pass":
        assert report["runtime"]["transformers"]
        assert report["model_info"]["arch"].startswith("transformers.")


def test_auto_map_never_runs_in_the_sandboxed_stage(tmp_path, monkeypatch):
    _env(tmp_path, monkeypatch)
    canary = tmp_path / "canary"
    canary.mkdir()
    folder = _folder(tmp_path, hf.auto_map_factory(canary / "ran"))
    result = CliRunner().invoke(main, ["inspect", str(folder), "--json"], catch_exceptions=False)
    report = json.loads(result.stdout)
    assert report["verdict"] == "quarantine" and {r["code"] for r in report["reasons"]} == {"UNSAFE_CODE"}
    assert any("auto_map" in r["message"] for r in report["reasons"])
    assert list(canary.iterdir()) == []


def test_console_script_on_a_sharded_folder(tmp_path):
    folder = _folder(tmp_path, hf.gpt2_sharded)
    env = {**os.environ, "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    exe = os.path.join(os.path.dirname(sys.executable), "ckpt-stage")
    proc = subprocess.run([exe, "inspect", str(folder), "--json"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["verdict"] == "pass", (report["reasons"], proc.stderr[-2000:])


# -- through the registry ---------------------------------------------------------------------------


@pytest.mark.integration
def test_registered_hf_folders_get_their_verdict_in_the_tags(stack, stage_env, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()
    settings = Settings.from_env()
    name = f"hf-{uuid.uuid4().hex[:6]}"
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = hf.gpt2_sharded(tmp_path / "good")
    bad = hf.index_wrong_shard(tmp_path / "bad")
    v1 = devstack.register_folder(stack.bucket, name, good)
    v2 = devstack.register_folder(stack.bucket, name, bad)
    out1 = validate_version(v1, settings=settings)
    assert out1.report.verdict is Verdict.PASS, out1.report.to_dict()["reasons"]
    tags = client.get_model_version(name, v1.version).tags
    assert tags["ckpt_stage.status"] == "promoted" and tags["ckpt_stage.reasons"] == ""
    assert client.get_model_version_by_alias(name, "validated").version == v1.version
    out2 = validate_version(v2, settings=settings)
    assert out2.report.verdict is Verdict.QUARANTINE
    tags = client.get_model_version(name, v2.version).tags
    assert tags["ckpt_stage.status"] == "quarantined" and tags["ckpt_stage.reasons"] == "CORRUPT_ARCHIVE"
    assert "model.safetensors.index.json" in tags["ckpt_stage.summary"]


@pytest.mark.integration
def test_mlflow_transformers_log_model_is_promoted(stack, stage_env):
    """``mlflow.transformers.log_model(registered_model_name=...)`` with the stock client, offline."""
    import mlflow
    from mlflow import MlflowClient

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = f"hf-logged-{uuid.uuid4().hex[:6]}"
    mlflow.set_experiment("ckpt-stage-test-logging")
    with mlflow.start_run():
        mlflow.transformers.log_model({"model": hf.gpt2_model(), "tokenizer": hf.tiny_tokenizer()}, name="model",
                                      task="text-generation", registered_model_name=name,
                                      pip_requirements=["torch==2.13.0", "transformers"])
    out = validate_version(VersionRef(name, "1"), settings=Settings.from_env())
    assert out.report.verdict is Verdict.PASS, out.report.to_dict()["reasons"]
    paths = {f.path for f in out.report.files}
    assert {"MLmodel", "model/config.json", "model/model.safetensors"} <= paths, paths
    assert out.report.recorded["transformers"] == out.report.runtime["transformers"]
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["ckpt_stage.status"] == "promoted"


@pytest.fixture
def interpreter_without_transformers():
    """A serving interpreter that cannot import transformers: this Python through a wrapper whose site
    customisation refuses the import (the worker drops to nobody: the folder must be world-readable)."""
    import stat
    import tempfile

    from ckpt_stage.sandbox import runner

    folder = tempfile.mkdtemp(prefix="ckpt-worker-nohf-")
    os.chmod(folder, 0o755)
    site = os.path.join(folder, "sitecustomize.py")
    with open(site, "w") as fh:
        fh.write("import sys\n"
                 "class _NoTransformers:\n"
                 "    def find_spec(self, name, path=None, target=None):\n"
                 "        if name == 'transformers' or name.startswith('transformers.'):\n"
                 "            raise ModuleNotFoundError(\"No module named 'transformers'\", name=name)\n"
                 "        return None\n"
                 "sys.meta_path.insert(0, _NoTransformers())\n")
    wrapper = os.path.join(folder, "python")
    with open(wrapper, "w") as fh:
        fh.write(f'#!/bin/sh\nPYTHONPATH="{folder}${{PYTHONPATH:+:$PYTHONPATH}}" exec {sys.executable} "$@"\n')
    os.chmod(wrapper, 0o755)
    os.chmod(site, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    yield wrapper
    runner.shutdown()
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)


def test_a_serving_runtime_without_transformers_is_named(interpreter_without_transformers, tmp_path, monkeypatch):
    _env(tmp_path, monkeypatch)
    monkeypatch.setenv("CKPT_STAGE_WORKER_PYTHON", interpreter_without_transformers)
    folder = _folder(tmp_path, hf.gpt2_folder)
    result = CliRunner().invoke(main, ["inspect", str(folder), "--json"], catch_exceptions=False)
    report = json.loads(result.stdout)
    assert report["verdict"] == "quarantine", (report["reasons"], result.stderr[-2000:])
    (reason,) = report["reasons"]
    assert reason["code"] == "LIBRARY_VERSION_MISMATCH" and "needs transformers" in reason["message"]
    assert "CKPT_STAGE_WORKER_PYTHON" in reason["hint"]
    assert "transformers" not in report["runtime"]
