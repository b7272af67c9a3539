"""Hidden pickles and scanner-confusion siblings (tests/corpus/pickle_cases.py), decided by the static
scan alone: verdict, codes, a message naming the payload, and no canary."""

from __future__ import annotations

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.policy import decide
from ckpt_stage.scan import scan_version
from tests.corpus.pickle_cases import CASES
from tests.unit.test_scan_corpus import expand


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pickle_case(case, tmp_path):
    work, canary = tmp_path / "work", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    built = case.build(work, canary)
    root, rels = expand(built.paths)
    settings = Settings.from_env(dict(built.env))
    result = scan_version(root, rels, settings)
    decision = decide(result.findings, settings)
    shown = [f.to_dict() for f in result.findings]
    assert decision.verdict.value == case.verdict, shown
    codes = {c.value for c in decision.codes}
    if case.verdict == "pass":
        assert codes == set(), shown
    else:
        assert set(case.codes) <= codes, shown
        unsafe = [f for f in decision.reasons if f.code and f.code.value == "UNSAFE_PICKLE"]
        assert any(all(t in f.message for t in case.message_contains) for f in unsafe), shown
        for f in decision.reasons:
            assert f.message and f.hint, f.to_dict()
    assert list(canary.iterdir()) == [], "a payload ran"
