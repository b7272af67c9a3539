"""policy.decide from tables: findings in, verdict and reason codes out."""

from __future__ import annotations

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.domain import Finding, ReasonCode as R, Severity, Verdict
from ckpt_stage.policy import NO_INPUT_EXAMPLE, decide, summarize


def f(code, severity=Severity.ERROR, **detail):
    return Finding(code, f"{code} happened" if code else "note", "do something", severity=severity, detail=detail)


CASES = [
    ("nothing", [], Verdict.PASS, ()),
    ("warnings only", [f(R.LIBRARY_VERSION_MISMATCH, Severity.WARNING), f(None, Severity.INFO)], Verdict.PASS, ()),
    ("one model code", [f(R.SHAPE_MISMATCH)], Verdict.QUARANTINE, (R.SHAPE_MISMATCH,)),
    ("two model codes keep order", [f(R.UNSAFE_PICKLE), f(R.CORRUPT_ARCHIVE)], Verdict.QUARANTINE,
     (R.UNSAFE_PICKLE, R.CORRUPT_ARCHIVE)),
    ("infra only is error", [f(R.STORAGE_UNAVAILABLE)], Verdict.ERROR, (R.STORAGE_UNAVAILABLE,)),
    ("worker lost is infrastructure", [f(R.WORKER_LOST)], Verdict.ERROR, (R.WORKER_LOST,)),
    ("model beats infra, quarantine carries model codes only",
     [f(R.INTERNAL_ERROR), f(R.NONFINITE_WEIGHTS)], Verdict.QUARANTINE, (R.NONFINITE_WEIGHTS,)),
    ("duplicate codes listed once", [f(R.ARCHITECTURE_MISMATCH), f(R.ARCHITECTURE_MISMATCH)], Verdict.QUARANTINE,
     (R.ARCHITECTURE_MISMATCH,)),
    ("a warning with a model code does not block", [f(R.DTYPE_MISMATCH, Severity.WARNING)], Verdict.PASS, ()),
    ("crash, timeout, limit are model codes", [f(R.WORKER_CRASH), f(R.TIMEOUT), f(R.RESOURCE_LIMIT)],
     Verdict.QUARANTINE, (R.WORKER_CRASH, R.TIMEOUT, R.RESOURCE_LIMIT)),
    ("no input example: pass with a warning by default",
     [f(None, Severity.WARNING, kind=NO_INPUT_EXAMPLE)], Verdict.PASS, ()),
]


@pytest.mark.parametrize(("name", "findings", "verdict", "codes"), CASES, ids=[c[0] for c in CASES])
def test_decide(name, findings, verdict, codes):
    decision = decide(findings, Settings())
    assert decision.verdict is verdict
    assert decision.codes == codes


def test_require_input_example_escalates_the_warning():
    decision = decide([f(None, Severity.WARNING, kind=NO_INPUT_EXAMPLE)], Settings(require_input_example=True))
    assert decision.verdict is Verdict.QUARANTINE
    assert decision.codes == (R.SMOKE_INFERENCE_FAILED,)


def test_every_code_has_a_cause():
    infra = {c for c in R if c.cause.value == "infrastructure"}
    assert infra == {R.WORKER_LOST, R.STORAGE_UNAVAILABLE, R.STORAGE_MISCONFIGURED, R.REGISTRY_UNAVAILABLE,
                     R.INTERNAL_ERROR}


def test_summary_is_one_sentence_within_500_characters():
    d = decide([Finding(R.SHAPE_MISMATCH, "x" * 2000, "fix it")])
    text = summarize(d, subject="clf version 3")
    assert len(text) <= 500
    assert "\n" not in text
    assert text.startswith("clf version 3 quarantined (SHAPE_MISMATCH)")
    assert summarize(decide([]), subject="clf version 3") == "clf version 3 loads safely and passed every check."
