"""A subset of the corpus registered in the real MLflow server, stored in the real S3 server and run
through ``validate``: the same verdicts and codes as ``inspect``, recorded as tags, no payload ran."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest
from mlflow import MlflowClient

from ckpt_stage.dev import devstack
from ckpt_stage.config import Settings
from ckpt_stage.pipeline import validate_version
from tests.corpus import all_cases

pytestmark = pytest.mark.integration

SUBSET = ("load-nan-weights", "static_reduce_os_system", "static_zip_bad_crc", "load-mlflow-torch-from-future",
          "load-dataparallel-prefix", "static_st_overlap", "load-state-dict-linear")
CASES = [c for c in all_cases() if c.name in SUBSET]


def test_subset_is_complete():
    assert {c.name for c in CASES} == set(SUBSET)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_validate_corpus_case(case, stack, stage_env, tmp_path):
    work, canary = tmp_path / "work", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    built = case.build(work, canary)
    assert not built.env, "cases needing extra settings are not in this subset"
    folder = tmp_path / "upload"
    if len(built.paths) == 1 and built.paths[0].is_dir():
        shutil.copytree(built.paths[0], folder)
    else:
        folder.mkdir()
        for p in built.paths:
            shutil.copy(p, folder / p.name)
    tags = {}
    if built.arch:
        tags["ckpt_stage.arch"] = built.arch
    if built.arch_kwargs is not None:
        tags["ckpt_stage.arch_kwargs"] = json.dumps(built.arch_kwargs)
    ref = devstack.register_folder(stack.bucket, f"corpus-{uuid.uuid4().hex[:6]}", folder, tags)
    report = validate_version(ref, settings=Settings.from_env()).report
    codes = [r.code.value for r in report.reasons]
    assert report.verdict.value == case.verdict, (case.name, report.to_dict()["reasons"])
    assert set(case.codes) <= set(codes)
    mv = MlflowClient().get_model_version(ref.name, ref.version)
    assert mv.tags["ckpt_stage.status"] == {"pass": "promoted", "quarantine": "quarantined"}[case.verdict]
    assert set(case.codes) <= set(mv.tags["ckpt_stage.reasons"].split(",")) - {""}
    assert list(canary.iterdir()) == []
