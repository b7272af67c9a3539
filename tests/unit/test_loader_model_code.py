"""The worker's side of CKPT_STAGE_ALLOW_MODEL_CODE, in-process: the version's own code folder goes on
sys.path for the load only, its classes are accepted in the pickle, and the result says what ran."""

from __future__ import annotations

import sys
from pathlib import Path

from ckpt_stage.domain import ReasonCode
from ckpt_stage.sandbox.job import LoadJob
from ckpt_stage.load.loader import load_and_check
from tests.corpus.model_code_cases import PKG, copy


def _job(d: Path, **extra) -> LoadJob:
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    return LoadJob(root=str(d), files=tuple((f, "unknown") for f in files), **extra)


def test_allowed_code_folder_is_importable_for_the_load_only(tmp_path):
    d = copy("code_paths", tmp_path)
    path_before = list(sys.path)
    result = load_and_check(_job(d, model_code={"code": [PKG]}))
    assert [f for f in result.findings if f.blocking] == [], [f.to_dict() for f in result.findings]
    assert result.info["model_code_ran"] == [PKG, f"{PKG}.net"]
    assert result.info["model_kind"] == "mlflow-pickle"
    assert any(f.severity.value == "info" and "own code ran" in f.message for f in result.findings)
    assert sys.path == path_before and PKG not in sys.modules
    assert not list(d.rglob("__pycache__"))  # nothing written into the version's folder


def test_without_the_folder_the_allowed_package_cannot_be_found(tmp_path):
    """What CKPT_STAGE_PICKLE_MODULES alone gave: the class is allowed by name but not importable."""
    d = copy("code_paths", tmp_path)
    result = load_and_check(_job(d, pickle_modules=(PKG,)))
    found = [f for f in result.findings if f.code is ReasonCode.UNSAFE_PICKLE]
    assert found and "No module named" in found[0].message


def test_code_folder_outside_the_root_is_ignored(tmp_path):
    d = copy("code_paths", tmp_path)
    result = load_and_check(_job(d, model_code={"../elsewhere": [PKG]}))
    assert ReasonCode.UNSAFE_PICKLE in {f.code for f in result.findings}
    assert "model_code_ran" not in result.info


def test_job_round_trip():
    job = LoadJob(root="/r", files=(("a", "unknown"),), model_code={"code": ["mypkg"]})
    assert LoadJob.from_dict(job.to_dict()) == job
