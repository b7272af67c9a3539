"""What an MLflow model's environment files would install on a serving host (ckpt_stage.scan.envspec):
every entry that fetches or builds code from outside the package index is UNSAFE_CODE, on real
``mlflow.pytorch.save_model`` folders edited by hand (tests/corpus/serving_env_cases.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.scan import scan_version
from ckpt_stage.scan.envspec import _logical_lines
from tests.corpus.serving_env_cases import CASES


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case, tmp_path):
    work, canary = tmp_path / "work", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    d = case.build(work, canary).paths[0]
    result = scan_version(d, _files(d), Settings.from_env({}))
    blocking = [f for f in result.findings if f.blocking]
    detail = [f.to_dict() for f in blocking]
    if case.verdict == "pass":
        assert blocking == [], detail
        return
    assert {f.code.value for f in blocking} == set(case.codes), detail
    texts = [f"{f.message} {f.hint}" for f in blocking]
    for needle in case.message_contains:
        assert any(needle in t for t in texts), (needle, texts)
    # what is wrong + what to do: the serving install is named, and the hint says how to list dependencies
    assert all("serving host" in f.message and "pip_requirements" in f.hint for f in blocking), detail
    assert list(canary.iterdir()) == []


def test_requirements_lines_are_read_as_pip_reads_them():
    text = "a==1 # note\n#only a comment\nb \\\n  >=2\n\nhttps://x#egg=c\n"
    assert list(_logical_lines(text)) == [(1, "a==1"), (3, "b   >=2"), (6, "https://x#egg=c")]


@pytest.mark.parametrize(("name", "trusted", "blocked"), [
    ("env_req_extra_index", "https://evil.example/simple", False),
    ("env_req_extra_index", "https://evil.example", False),  # an index below a trusted prefix
    ("env_req_extra_index", "https://evil.example/sim", True),  # a prefix of a path segment is not trusted
    ("env_req_extra_index", "https://evil.example.attacker.net", True),
    ("env_conda_channel_url", "https://evil.example/conda", False),
    ("env_req_extra_index", "", True),
])
def test_an_operator_trusts_its_own_package_indexes(tmp_path, name, trusted, blocked):
    """CKPT_STAGE_ALLOW_PACKAGE_INDEXES: a private index or conda channel the operator runs is not code the
    version brings; every other index still is, and the refusal names the setting."""
    case = next(c for c in CASES if c.name == name)
    work, canary = tmp_path / "work", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    d = case.build(work, canary).paths[0]
    settings = Settings.from_env({"CKPT_STAGE_ALLOW_PACKAGE_INDEXES": trusted})
    blocking = [f for f in scan_version(d, _files(d), settings).findings if f.blocking]
    assert bool(blocking) is blocked, [f.message for f in blocking]
    if blocked:
        assert all("CKPT_STAGE_ALLOW_PACKAGE_INDEXES" in f.message for f in blocking)
