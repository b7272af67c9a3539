"""Every generated corpus case through ``ckpt-stage inspect --json``: the verdict, the reason codes, a
message that names the concrete problem, and for hostile cases: no payload ran, the parent survived."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.corpus import all_cases

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_inspect_corpus_case(case, tmp_path):
    work, canary = tmp_path / "work", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    built = case.build(work, canary)
    args = [sys.executable, "-m", "ckpt_stage.cli", "inspect", *map(str, built.paths), "--json"]
    if built.arch:
        args += ["--arch", built.arch]
    if built.arch_kwargs is not None:
        args += ["--arch-kwargs", json.dumps(built.arch_kwargs)]
    env = {**os.environ, "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache"), **built.env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), built.env.get("PYTHONPATH", "")]))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.stdout.strip(), f"no JSON on stdout; stderr:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    codes = [r["code"] for r in report["reasons"]]
    detail = f"{case.name}: verdict={report['verdict']} reasons={report['reasons']}\nstderr:\n{proc.stderr[-2000:]}"
    assert report["verdict"] == case.verdict, detail
    assert proc.returncode == {"pass": 0, "quarantine": 1, "error": 3}[case.verdict], detail
    if case.verdict == "pass":
        assert codes == [], detail
    for code in case.codes:
        assert code in codes, detail
    if case.message_contains:
        texts = [r["message"] + " " + (r.get("hint") or "") for r in report["reasons"] if r["code"] in case.codes] \
            or [r["message"] + " " + (r.get("hint") or "") for r in report["reasons"]]
        for needle in case.message_contains:
            assert any(needle in t for t in texts), f"{needle!r} not named in {texts}"
    assert list(canary.iterdir()) == [], f"a payload ran: {list(canary.iterdir())}"
