"""Attacks on the scanner's reading of a file (tests/corpus/redteam_cases.py), each proved on the
stock loader first (a subprocess in a temp dir creates the canary), then refused by the scanner
alone and by the worker's own reader alone, with no canary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode
from ckpt_stage.scan import scan_version
from tests.corpus import pt2_code as P
from tests.corpus import redteam_cases as R

S = Settings()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return P.benign(tmp_path_factory.mktemp("redteam-pt2") / "src.pt2")


def _codes(findings) -> set[ReasonCode]:
    return {f.code for f in findings if f.code}


@pytest.mark.parametrize("case", [c for c in R.HIDDEN_PROGRAMS if c.record == "model.txt1"], ids=lambda c: c.name)
def test_torch_runs_a_program_record_not_named_json(case, src, tmp_path):
    """The mechanism is real: torch.export.load deserializes models/model.txt1 as program 'model'
    (``model.JSON`` beside the benign record is read as the benign one: miniz finds records
    case-insensitively; alone it is read too)."""
    canary = tmp_path / "canary"
    path = case.build(src, tmp_path / "m.pt2", canary)
    subprocess.run([sys.executable, "-c", P.TORCH_RUN, str(path)], capture_output=True, timeout=300,
                   cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert canary.exists(), "torch no longer reads every record under models/; the case may be retired"


@pytest.mark.parametrize("case", R.HIDDEN_PROGRAMS, ids=lambda c: c.name)
def test_scanner_reads_every_program_record(case, src, tmp_path):
    canary = tmp_path / "canary"
    case.build(src, tmp_path / "m.pt2", canary)
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert ReasonCode.UNSAFE_CODE in _codes(result.findings), [f.message for f in result.findings]
    assert any(case.record in f.message for f in result.findings)
    assert not canary.exists()


@pytest.mark.parametrize("case", R.HIDDEN_PROGRAMS, ids=lambda c: c.name)
def test_worker_reads_every_program_record(case, src, tmp_path):
    from ckpt_stage.sandbox.job import LoadJob
    from ckpt_stage.load.loader import load_and_check

    canary = tmp_path / "canary"
    case.build(src, tmp_path / "m.pt2", canary)
    result = load_and_check(LoadJob(root=str(tmp_path), files=(("m.pt2", "unknown"),)))
    # model.JSON beside model.json is also caught earlier, by the worker's comparison of torch's
    # case-insensitive zip reader with the scan (CORRUPT_ARCHIVE): refused before torch loads it.
    got = _codes(result.findings)
    assert ReasonCode.UNSAFE_CODE in got or (case.record == "model.JSON" and case.keep_benign
                                             and ReasonCode.CORRUPT_ARCHIVE in got), [f.to_dict() for f in result.findings]
    assert not canary.exists()


def test_program_record_names():
    from ckpt_stage.scan import pt2 as grammar

    for ok in ("models/model.json", "models/my-model.v2.json"):
        assert grammar.is_program_record(ok) and grammar.program_record_problem(ok) is None
    for odd in ("models/model.JSON", "models/model.txt1", "models/model_json", "models/sub/model.json",
                "models/.json", "models/model"):
        assert grammar.is_program_record(odd) and grammar.program_record_problem(odd) is not None
    assert not grammar.is_program_record("data/weights/model_weights_config.json")


# -- MLmodel YAML that explodes in the parent ---------------------------------------------------------


def test_yaml_alias_bomb_is_tiny_text_and_huge_value(tmp_path):
    """The mechanism: PyYAML loads it instantly, sharing one list 10^9 times over (what any repr of
    the field would expand); three levels show the growth: 10 × 10 × 10 leaves from 4 short lines."""
    import yaml

    path = R.yaml_bomb_mlmodel(tmp_path, "code", levels=3)
    doc = yaml.safe_load(path.read_text())
    assert repr(doc["flavors"]["python_function"]["code"]).count("aaaaaaaa") == 1000
    big = R.yaml_bomb_mlmodel(tmp_path / "big", "code")
    assert big.stat().st_size < 2048
    assert yaml.safe_load(big.read_text())["x9"][0][0][0][0][0][0][0][0][0][0] == "aaaaaaaa"


@pytest.mark.parametrize("field", R.YAML_BOMB_FIELDS)
def test_scanner_refuses_a_yaml_alias_bomb_quickly(field, tmp_path):
    import time

    R.yaml_bomb_mlmodel(tmp_path, field)
    t = time.monotonic()
    result = scan_version(tmp_path, ["MLmodel"], S)
    assert time.monotonic() - t < 5
    assert ReasonCode.CORRUPT_ARCHIVE in _codes(result.findings), [f.message for f in result.findings]
    assert any("alias bomb" in f.message for f in result.findings)


@pytest.mark.parametrize("build", [R.deep_mlmodel, R.recursive_mlmodel], ids=["deep", "recursive"])
def test_scanner_refuses_unreadable_yaml_without_crashing(build, tmp_path):
    build(tmp_path)
    result = scan_version(tmp_path, ["MLmodel"], S)
    assert ReasonCode.CORRUPT_ARCHIVE in _codes(result.findings), [f.message for f in result.findings]


@pytest.mark.parametrize("build", [lambda d: R.yaml_bomb_mlmodel(d, "code"), R.deep_mlmodel, R.recursive_mlmodel],
                         ids=["bomb", "deep", "recursive"])
def test_worker_reader_refuses_the_same_yaml(build, tmp_path):
    from ckpt_stage.load import mlflow_model

    build(tmp_path)
    with pytest.raises(mlflow_model.ModelDirError, match="MLmodel is not used"):
        mlflow_model.read(str(tmp_path), "MLmodel")


def test_yaml_with_a_shared_value_mlflow_could_write_still_reads():
    from ckpt_stage.scan.mlflow_dir import load_yaml

    doc = load_yaml("a: &s [1, 2]\nb: *s\nflavors: {pytorch: {model_data: data}}\n")
    assert doc["b"] == [1, 2]


# -- a .pt2 that torch.load reads as another checkpoint -----------------------------------------------


def test_torch_load_reads_a_pt2_with_data_pkl_as_a_state_dict(src, tmp_path):
    """The mechanism: both loaders accept the same bytes, and they get different models."""
    import torch

    path = R.pt2_with_data_pkl(src, tmp_path / "m.pt2")
    sd = torch.load(path, weights_only=True)
    assert torch.isnan(sd["l1.weight"]).all()
    assert type(torch.export.load(path)).__name__ == "ExportedProgram"


@pytest.mark.parametrize("record", ["data.pkl", "DATA.PKL", "constants.pkl"])
def test_scanner_refuses_a_pt2_with_two_meanings(record, src, tmp_path):
    R.pt2_with_data_pkl(src, tmp_path / "m.pt2", record=record)
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert ReasonCode.CORRUPT_ARCHIVE in _codes(result.findings), [f.message for f in result.findings]
    assert any("two meanings" in f.message for f in result.findings)


# -- pt2: a record listed raw by one FQN and pickled by another ------------------------------------------


def test_torch_unpickles_a_record_also_listed_raw(src, tmp_path):
    """The mechanism: plain torch.export.load runs the torch.save payload of the use_pickle entry."""
    canary = tmp_path / "canary"
    path = R.pt2_raw_and_pickled(src, tmp_path / "m.pt2", canary)
    subprocess.run([sys.executable, "-c", P.TORCH_RUN, str(path)], capture_output=True, timeout=300,
                   cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert canary.exists()


def test_scanner_scans_a_record_also_listed_raw(src, tmp_path):
    canary = tmp_path / "canary"
    R.pt2_raw_and_pickled(src, tmp_path / "m.pt2", canary)
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert ReasonCode.UNSAFE_PICKLE in _codes(result.findings), [f.message for f in result.findings]
    assert any("weight_99" in f.message and "posix.system" in f.message for f in result.findings)
    assert not canary.exists()


def test_worker_refuses_a_record_also_listed_raw(src, tmp_path):
    from ckpt_stage.sandbox.job import LoadJob
    from ckpt_stage.load.loader import load_and_check

    canary = tmp_path / "canary"
    R.pt2_raw_and_pickled(src, tmp_path / "m.pt2", canary)
    result = load_and_check(LoadJob(root=str(tmp_path), files=(("m.pt2", "unknown"),)))
    assert ReasonCode.UNSAFE_PICKLE in _codes(result.findings), [f.to_dict() for f in result.findings]
    assert not canary.exists()
