"""Exit statuses and the one-JSON-document rule when the registry cannot be used."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ckpt_stage.dev import devstack
from ckpt_stage.cli import main


def test_unreachable_registry_gives_an_error_report_and_exit_3(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{devstack.free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = CliRunner().invoke(main, ["validate", "--model", "clf", "--version", "3", "--json"])
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "error"
    assert [r["code"] for r in report["reasons"]] == ["REGISTRY_UNAVAILABLE"]
    assert report["model"] == {"name": "clf", "version": "3"}


def test_unknown_version_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'r.db'}")
    result = CliRunner().invoke(main, ["validate", "--model", "nope", "--version", "1", "--json"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "Model Version (name=nope, version=1) not found" in result.stderr


def test_rerun_needs_a_selection():
    result = CliRunner().invoke(main, ["rerun"])
    assert result.exit_code == 2
    assert "give either --model NAME --version N" in result.stderr


def test_inspect_missing_path_names_it(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "gone.pt"), "--json"])
    assert result.exit_code == 2
    assert f"no such file or directory: {tmp_path / 'gone.pt'}" in result.stderr
