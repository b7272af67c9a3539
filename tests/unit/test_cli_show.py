"""``ckpt-stage show``: the version document as terminal tables, or as JSON for scripts."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from rich.console import Console

from ckpt_stage.cli import show as cli_show
from ckpt_stage.cli import main

REPORT = {
    "schema": "ckpt-stage/report/v1", "verdict": "quarantine", "attempt": 2,
    "summary": "clf version 3 is quarantined: SHAPE_MISMATCH",
    "reasons": [{"code": "SHAPE_MISMATCH", "message": "weight is [3, 4]", "hint": "fix arch_kwargs", "file": "model.pt"}],
    "findings": [
        {"code": "SHAPE_MISMATCH", "message": "weight is [3, 4]", "hint": "fix arch_kwargs", "file": "model.pt",
         "severity": "error"},
        {"code": None, "message": "architecture changed since version 2", "hint": "", "severity": "info",
         "detail": {"kind": "drift"}},
    ],
    "files": [{"path": "model.pt", "format": "torch-zip", "size": 2048, "sha256": "ab" * 32}],
    "runtime": {"python": "3.11.9", "torch": "2.13.0"}, "recorded": {"torch": "2.12.1"},
    "timings_s": {"download": 0.5, "scan": 0.1, "load": 1.0, "inference": 0.2, "total": 1.8},
    "resources": {"peak_anon_bytes": 2**20, "estimated_bytes": 2**21, "limit_bytes": 2**32},
    "isolation": {"network_namespace": True, "seccomp": False},
}
DETAIL = {
    "model": "clf", "version": "3", "alias": "validated", "promoted_version": "2",
    "state": {"status": "quarantined", "reasons": ["SHAPE_MISMATCH"], "summary": REPORT["summary"], "attempt": 2,
              "validated_at": "2026-01-01T00:00:00Z", "age_s": 7200, "aliases": [], "tags": {}},
    "attempts": [
        {"attempt": 2, "run_id": "run2", "started_at": "2026-01-01T00:00:00Z", "verdict": "quarantine",
         "reasons": ["SHAPE_MISMATCH"], "summary": "", "metrics": {}, "report": REPORT, "links": {}},
        {"attempt": 1, "run_id": "run1", "started_at": "2025-12-31T00:00:00Z", "verdict": "error",
         "reasons": ["STORAGE_UNAVAILABLE"], "summary": "", "metrics": {"timings_s.total": 0.3}, "report": None,
         "links": {}},
    ],
    "drift": {"against": "2", "findings": [REPORT["findings"][1]], "added": [{"name": "extra", "shape": [1],
              "dtype": "float32"}], "removed": [], "changed": [{"name": "weight", "previous": {"shape": [2, 4]},
                                                                 "current": {"shape": [3, 4]}}],
              "weights": {"tensors": [{"name": "bias", "rel_l2": 0.125, "exact": True},
                                      {"name": "big", "rel_l2": 0.03, "exact": False}]}},
    "links": {"mlflow_version": "http://mlflow/#/models/clf/versions/3"},
}


def test_render_prints_state_attempts_report_and_drift():
    console = Console(record=True, width=200)
    cli_show.render(DETAIL, console=console)
    out = console.export_text()
    for text in ("clf v3", "quarantined", "@validated", "v2", "run2", "run1", "fix arch_kwargs", "torch-zip",
                 "2.0 KiB", "2.12.1", "2.13.0", "1.80 s", "isolation: seccomp", "extra", "weight",
                 "http://mlflow/#/models/clf/versions/3", "Architecture drift vs promoted v2", "Weight drift",
                 "12.50%", "≈3.00%"):
        assert text in out, text


class FakeData:
    def __init__(self, settings):
        pass

    def detail(self, model, version):
        return DETAIL if (model, version) == ("clf", "3") else None


@pytest.fixture
def fake_data(monkeypatch):
    import ckpt_stage.dashboard.data as data

    monkeypatch.setattr(data, "DashboardData", FakeData)


def test_json_is_the_api_document_alone_on_stdout(fake_data):
    result = CliRunner().invoke(main, ["show", "--model", "clf", "--version", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == DETAIL


def test_unknown_version_is_a_usage_error(fake_data):
    result = CliRunner().invoke(main, ["show", "--model", "clf", "--version", "9"])
    assert result.exit_code == 2 and "no version 9" in result.stderr


def test_tables_go_to_stdout(fake_data):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["show", "--model", "clf", "--version", "3",
                                                             "--attempts", "0"])
    assert result.exit_code == 0, result.output
    assert "SHAPE_MISMATCH" in result.stdout and "Attempts (newest first)" in result.stdout


LONG_HINT = ("set the ckpt_stage.arch tag to the class the weights belong to (package.module:Class) and "
             "ckpt_stage.arch_kwargs to its constructor arguments as a JSON object")


def test_render_stays_readable_at_80_columns():
    """A narrow terminal stacks the findings instead of squeezing message and hint into fragments."""
    import copy

    detail = copy.deepcopy(DETAIL)
    detail["attempts"][0]["report"]["findings"][0]["hint"] = LONG_HINT
    detail["attempts"][0]["run_id"] = "0123456789abcdef0123456789abcdef"
    detail["attempts"][0]["reasons"] = ["SHAPE_MISMATCH", "SMOKE_INFERENCE_FAILED"]
    console = Console(record=True, width=80)
    cli_show.render(detail, console=console)
    out = console.export_text()
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    words = set(out.split())
    # Every word of the hint, the codes and the run id are printed whole (rich folds words in a narrow column).
    for word in [*LONG_HINT.split(), "SMOKE_INFERENCE_FAILED", "STORAGE_UNAVAILABLE",
                 "0123456789abcdef0123456789abcdef"]:
        assert word.strip(",") in words or word in out, word
    assert " ".join(LONG_HINT.split()) in " ".join(out.split())


def test_show_at_80_columns_through_the_command(fake_data):
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["show", "--model", "clf", "--version", "3"])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "fix arch_kwargs" in result.stdout and "SHAPE_MISMATCH" in result.stdout


def test_skipped_and_alias_holder_are_said_in_words():
    import copy

    detail = copy.deepcopy(DETAIL)
    detail["state"].update(status="skipped", aliases=[], reasons=["UNSUPPORTED_FORMAT"])
    console = Console(record=True, width=100)
    cli_show.render(detail, console=console)
    out = " ".join(console.export_text().split())
    assert "skipped" in out and "not validated" in out and "CKPT_STAGE_OTHER_FLAVORS=skip" in out
    detail = copy.deepcopy(DETAIL)
    detail["version"], detail["state"]["aliases"], detail["state"]["holds_alias"] = "2", ["validated"], True
    console = Console(record=True, width=100)
    cli_show.render(detail, console=console)
    assert "holds @validated: deployments of clf get this version" in console.export_text()
