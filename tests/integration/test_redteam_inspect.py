"""End to end through ``ckpt-stage inspect`` (real scanner, real isolated worker): the attacks of
tests/corpus/redteam_cases.py are quarantined with the right code, no canary appears, and the parent
returns (a YAML alias bomb used to hang it). The benign originals still pass on the same path."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.integration.pt2_inspect import canary_path, inspect_json
from tests.corpus import redteam_cases as R




def test_benign_sources_pass(pt2_sources, tmp_path, monkeypatch):
    for path in pt2_sources:
        report, code = inspect_json(path, tmp_path, monkeypatch)
        assert (report["verdict"], code) == ("pass", 0), report["reasons"]


HIDDEN = [c for c in R.HIDDEN_PROGRAMS if c.record in ("model.txt1", "model.JSON")]


@pytest.mark.parametrize("case", HIDDEN, ids=lambda c: c.name)
def test_program_record_not_named_json_is_quarantined(case, pt2_sources, tmp_path, monkeypatch):
    canary = canary_path(tmp_path)
    path = case.build(pt2_sources[0], tmp_path / "model.pt2", canary)
    report, code = inspect_json(path, tmp_path, monkeypatch)
    assert (report["verdict"], code) == ("quarantine", 1), report["reasons"]
    codes = {r["code"] for r in report["reasons"]}
    # A record beside one that differs only in case is also CORRUPT_ARCHIVE (torch's reader folds case).
    assert "UNSAFE_CODE" in codes and codes <= {"UNSAFE_CODE", "CORRUPT_ARCHIVE"}, report["reasons"]
    assert any(f"models/{case.record}" in r["message"] for r in report["reasons"]), report["reasons"]
    assert not canary.exists()


@pytest.mark.parametrize("case", [c for c in HIDDEN if c.record == "model.txt1"], ids=lambda c: c.name)
def test_program_record_not_named_json_in_an_mlflow_dir(case, pt2_sources, tmp_path, monkeypatch):
    canary = canary_path(tmp_path)
    model = tmp_path / "mlflow-model"
    shutil.copytree(pt2_sources[1], model)
    target = model / "data" / "model.pt2"
    case.build(target, tmp_path / "evil.pt2", canary).replace(target)
    report, code = inspect_json(model, tmp_path, monkeypatch)
    assert (report["verdict"], code) == ("quarantine", 1), report["reasons"]
    assert "UNSAFE_CODE" in {r["code"] for r in report["reasons"]}, report["reasons"]
    assert not canary.exists()


def _bomb_into(mlmodel: Path, field: str) -> None:
    """The real MLmodel, with ten levels of aliases and one python_function field pointing at them."""
    text = mlmodel.read_text()
    anchors = ["x0: &x0 [" + ", ".join(["aaaaaaaa"] * 10) + "]"]
    anchors += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]" for i in range(1, 10)]
    line = "    loader_module: mlflow.pytorch\n"
    assert line in text, text
    if field == "loader_module":
        text = text.replace(line, "    loader_module: *x9\n")
    else:
        text = "\n".join(line_ for line_ in text.splitlines() if not line_.startswith(f"    {field}:")) + "\n"
        text = text.replace(line, f"{line}    {field}: *x9\n")
    mlmodel.write_text("\n".join(anchors) + "\n" + text)


@pytest.mark.parametrize("field", R.YAML_BOMB_FIELDS)
def test_mlmodel_alias_bomb_returns_quickly(field, pt2_sources, tmp_path, monkeypatch):
    model = tmp_path / "mlflow-model"
    shutil.copytree(pt2_sources[1], model)
    _bomb_into(model / "MLmodel", field)
    t = time.monotonic()
    report, code = inspect_json(model, tmp_path, monkeypatch)
    assert time.monotonic() - t < 120
    assert (report["verdict"], code) == ("quarantine", 1), report["reasons"]
    assert "CORRUPT_ARCHIVE" in {r["code"] for r in report["reasons"]}, report["reasons"]
    assert any("alias bomb" in r["message"] for r in report["reasons"]), report["reasons"]


def test_record_listed_raw_and_pickled_is_quarantined(pt2_sources, tmp_path, monkeypatch):
    canary = canary_path(tmp_path)
    path = R.pt2_raw_and_pickled(pt2_sources[0], tmp_path / "model.pt2", canary)
    report, code = inspect_json(path, tmp_path, monkeypatch)
    assert (report["verdict"], code) == ("quarantine", 1), report["reasons"]
    assert "UNSAFE_PICKLE" in {r["code"] for r in report["reasons"]}, report["reasons"]
    assert not canary.exists()
