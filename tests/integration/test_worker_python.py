"""CKPT_STAGE_WORKER_PYTHON: the fork server runs under another interpreter (the serving environment),
and the report's ``runtime`` is that worker's, not the parent's."""

from __future__ import annotations

import json
import os
import platform
import stat
import sys
import tempfile

import pytest
import torch
from click.testing import CliRunner

from ckpt_stage.cli import main
from ckpt_stage.sandbox import runner


@pytest.fixture
def other_interpreter():
    """A "serving interpreter": this Python, started through a wrapper whose site customisation makes
    it report another version (the worker drops to nobody, so the folder must be world-readable)."""
    folder = tempfile.mkdtemp(prefix="ckpt-worker-python-")
    os.chmod(folder, 0o755)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as fh:
        fh.write("import platform\nplatform.python_version = lambda: '3.11.99'\n")
    wrapper = os.path.join(folder, "python")
    with open(wrapper, "w") as fh:
        fh.write(f'#!/bin/sh\nPYTHONPATH="{folder}${{PYTHONPATH:+:$PYTHONPATH}}" exec {sys.executable} "$@"\n')
    os.chmod(wrapper, 0o755)
    os.chmod(os.path.join(folder, "sitecustomize.py"), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    yield wrapper
    runner.shutdown()
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)


def test_report_runtime_is_the_workers(other_interpreter, tmp_path, monkeypatch):
    ckpt = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), ckpt)
    os.chmod(tmp_path, 0o755)
    monkeypatch.setenv("CKPT_STAGE_WORKER_PYTHON", other_interpreter)
    monkeypatch.setenv("CKPT_STAGE_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["inspect", str(ckpt), "--arch", "torch.nn:Linear", "--arch-kwargs",
                                       '{"in_features": 4, "out_features": 2}', "--json"])
    report = json.loads(result.stdout)
    assert report["verdict"] == "pass", report["reasons"]
    assert report["runtime"]["python"] == "3.11.99"
    assert platform.python_version() != "3.11.99"  # the parent is not what was reported
