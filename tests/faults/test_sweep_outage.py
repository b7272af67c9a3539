"""README "Guarantees", what MLflow being down does: the sweep cannot list, and ``sweep --json`` still
prints its one document (``{"results": [], "errors": 1, "error": {...}}``) with exit 3. No servers."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ckpt_stage.dev import devstack
from ckpt_stage.cli import main


def test_sweep_json_when_mlflow_cannot_be_reached(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{devstack.free_port()}")  # nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("CKPT_STAGE_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["sweep", "--json"])
    assert result.exit_code == 3, result.output
    doc = json.loads(result.stdout)
    assert doc["results"] == [] and doc["count"] == 0 and doc["errors"] == 1, doc
    assert doc["error"]["code"] == "REGISTRY_UNAVAILABLE" and doc["error"]["message"], doc
