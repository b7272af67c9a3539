"""Every generated corpus case through ``ckpt-stage inspect --json``: the verdict, the reason codes, a
message that names the concrete problem, and for hostile cases: no payload ran, the parent survived.

The command runs in this process (click's runner) so that all cases share one fork server, as they
would in a long-lived Airflow worker; a few representative cases also run as a separate
``ckpt-stage`` process to prove the console script, its stdout discipline and its exit codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ckpt_stage.cli import main
from tests.conftest import ROOT
from tests.corpus import all_cases

CASES = all_cases()
EXIT = {"pass": 0, "quarantine": 1, "error": 3}
SUBPROCESS_CASES = {"static_benign_state_dict", "static_reduce_os_system", "load-shape-mismatch"}


def _args(built) -> list[str]:
    args = ["inspect", *map(str, built.paths), "--json"]
    if built.arch:
        args += ["--arch", built.arch]
    if built.arch_kwargs is not None:
        args += ["--arch-kwargs", json.dumps(built.arch_kwargs)]
    return args


def _check(case, report: dict, exit_code: int, stderr: str, canary) -> None:
    codes = [r["code"] for r in report["reasons"]]
    detail = f"{case.name}: verdict={report['verdict']} reasons={report['reasons']}\nstderr:\n{stderr[-2000:]}"
    assert report["verdict"] == case.verdict, detail
    assert exit_code == EXIT[case.verdict], detail
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


def _build(case, tmp_path):
    work, canary = tmp_path / "work", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    os.chmod(tmp_path, 0o755)
    return case.build(work, canary), canary


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_inspect_corpus_case(case, tmp_path, monkeypatch):
    built, canary = _build(case, tmp_path)
    monkeypatch.setenv("CKPT_STAGE_CACHE_DIR", str(tmp_path / "cache"))
    for k, v in built.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), built.env.get("PYTHONPATH", "")])))
    result = CliRunner().invoke(main, _args(built), catch_exceptions=False)
    stdout = result.stdout
    assert stdout.strip(), f"no JSON on stdout; stderr:\n{result.stderr[-3000:]}"
    _check(case, json.loads(stdout), result.exit_code, result.stderr, canary)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in SUBPROCESS_CASES],
                         ids=lambda c: c.name)
def test_inspect_console_script(case, tmp_path):
    built, canary = _build(case, tmp_path)
    env = {**os.environ, "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache"), **built.env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), built.env.get("PYTHONPATH", "")]))
    exe = os.path.join(os.path.dirname(sys.executable), "ckpt-stage")
    proc = subprocess.run([exe, *_args(built)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    report = json.loads(proc.stdout)  # exactly one JSON document, nothing else on stdout
    _check(case, report, proc.returncode, proc.stderr, canary)


def test_subprocess_cases_exist():
    assert SUBPROCESS_CASES <= {c.name for c in CASES}
