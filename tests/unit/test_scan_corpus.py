"""Layer 1 on its own: every static corpus case gets its verdict and codes from ``scan_version``
alone, without loading anything (the end-to-end run through ``ckpt-stage inspect`` comes later)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.policy import decide
from ckpt_stage.scan import scan_version
from tests.corpus.static_cases import CASES

SCANNER_CODES = {"UNSAFE_PICKLE", "CORRUPT_ARCHIVE", "NOT_A_CHECKPOINT", "UNSUPPORTED_FORMAT", "RESOURCE_LIMIT"}


def expand(paths: list[Path]) -> tuple[Path, list[str]]:
    """(root, relative paths) as the pipeline hands them: a directory's files, or loose files."""
    if len(paths) == 1 and paths[0].is_dir():
        root = paths[0]
        return root, sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return root, [str(p.relative_to(root)) for p in paths]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_static_case(case, tmp_path):
    work, canary = tmp_path / "work", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    built = case.build(work, canary)
    root, rels = expand(built.paths)
    settings = Settings.from_env(dict(built.env))
    result = scan_version(root, rels, settings)
    decision = decide(result.findings, settings)
    codes = {c.value for c in decision.codes}
    assert decision.verdict.value == case.verdict, [f.to_dict() for f in result.findings]
    if case.verdict == "pass":
        assert codes == set()
        assert any(f.value not in ("unknown", "mlflow-model") for f in result.formats.values())
        assert result.estimated_bytes > 0
    else:
        assert set(case.codes) <= SCANNER_CODES, "static cases must be decidable by the scanner"
        assert set(case.codes) <= codes, [f.to_dict() for f in result.findings]
        first = next(f for f in decision.reasons if f.code and f.code.value in case.codes)
        for text in case.message_contains:
            assert text in first.message or text in first.hint, first.to_dict()
        for f in decision.reasons:
            assert f.message and f.hint, f.to_dict()
            assert f.file is None or f.file in rels
    assert list(canary.iterdir()) == [], "a payload ran"
    assert set(result.formats) == set(rels)
