"""Shared by the pt2 end-to-end tests (``test_pt2_code``, ``test_redteam_inspect``; their benign sources are
the ``pt2_sources`` fixture of this folder's conftest): ``ckpt-stage inspect --json`` in-process with the real worker, and a canary path the worker could write."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner

from ckpt_stage.cli import main
from tests.conftest import ROOT


def inspect_json(path: Path, tmp_path: Path, monkeypatch) -> tuple[dict, int]:
    monkeypatch.setenv("CKPT_STAGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"], catch_exceptions=False)
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout), result.exit_code


def canary_path(tmp_path: Path) -> Path:
    d = tmp_path / "canary"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o777)  # a payload running as the worker's unprivileged user could write here
    return d / "ran"
