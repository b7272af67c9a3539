"""policy.decide from tables: findings in, verdict and reason codes out."""

from __future__ import annotations

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.domain import Finding, ReasonCode as R, Severity, Status, Verdict
from ckpt_stage.errors import ConfigError
from ckpt_stage.policy import NO_INPUT_EXAMPLE, OTHER_FLAVOR, decide, summarize


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
    text = summarize(d)
    assert len(text) <= 500 and text.endswith("…")
    assert "\n" not in text
    assert text.startswith("xxx")  # the cause first: tables already show model, version, status and codes
    assert summarize(decide([])) == "Loads safely and passed every check."


def test_summary_joins_message_and_hint_as_sentences():
    d = decide([Finding(R.PARTIAL_CHECKPOINT, "model.pt holds a state_dict but no architecture was declared to "
                        "load it into", "set the ckpt_stage.arch tag to a torch.nn class")])
    assert summarize(d) == ("model.pt holds a state_dict but no architecture was declared to load it into. "
                            "Fix: set the ckpt_stage.arch tag to a torch.nn class.")
    # A message that already ends a sentence gets no second full stop; whitespace is folded.
    d = decide([Finding(R.TIMEOUT, "loading ran past 300 s.", "  raise\nthe limit  "),
                Finding(R.NONFINITE_WEIGHTS, "NaN in fc.weight", "retrain")])
    assert summarize(d) == "loading ran past 300 s. Fix: raise the limit. (1 more reason.)"
    assert not summarize(d).startswith(("clf", "version"))
    assert summarize(decide([Finding(R.STORAGE_UNAVAILABLE, "S3 kept failing:", "")])) == "S3 kept failing."


def test_summary_is_cut_at_a_word_boundary():
    words = " ".join(f"word{i}" for i in range(200))
    text = summarize(decide([Finding(R.SHAPE_MISMATCH, words, "")]))
    assert len(text) <= 500 and text.endswith("…")
    assert text[:-1].split(" ")[-1] in words.split(" ")  # the last word is whole
    # One enormous token (a path) has no boundary to cut at: it is cut inside, still within the limit.
    assert len(summarize(decide([Finding(R.SHAPE_MISMATCH, "/" + "a" * 900, "")]))) == 500


def other_flavor_finding() -> Finding:
    return Finding(R.UNSUPPORTED_FORMAT, "sklearn flavor (served through mlflow.sklearn): ckpt-stage validates "
                   "PyTorch models (mlflow.pytorch), not sklearn models", "register PyTorch models here",
                   file="MLmodel", detail={"kind": OTHER_FLAVOR, "flavors": ["python_function", "sklearn"]})


def test_other_flavor_is_quarantined_by_default():
    d = decide([other_flavor_finding()])
    assert d.verdict is Verdict.QUARANTINE and d.codes == (R.UNSUPPORTED_FORMAT,)
    assert decide([other_flavor_finding()], Settings.from_env({})).verdict is Verdict.QUARANTINE


def test_other_flavor_is_skipped_when_the_operator_says_so():
    skip = Settings(other_flavors="skip")
    pickle = Finding(R.UNSAFE_PICKLE, "model.pkl imports sklearn.linear_model._logistic.LogisticRegression", "x")
    d = decide([other_flavor_finding(), pickle, Finding(None, "note", severity=Severity.INFO)], skip)
    assert d.verdict is Verdict.SKIP and d.codes == (R.UNSUPPORTED_FORMAT,)
    assert d.verdict.exit_code == 4 and Status.for_verdict(d.verdict) is Status.SKIPPED
    text = summarize(d)
    assert text.startswith("Not validated: sklearn flavor") and "CKPT_STAGE_OTHER_FLAVORS=skip" in text
    assert len(text) <= 500
    # Only the scan's whole-version fact skips: a plain UNSUPPORTED_FORMAT (a 7z file) is still a quarantine.
    assert decide([Finding(R.UNSUPPORTED_FORMAT, "a 7-Zip archive", "unpack it")], skip).verdict is Verdict.QUARANTINE
    assert decide([], skip).verdict is Verdict.PASS


def test_other_flavors_setting_is_checked():
    assert Settings.from_env({"CKPT_STAGE_OTHER_FLAVORS": " Skip "}).other_flavors == "skip"
    with pytest.raises(ConfigError, match="CKPT_STAGE_OTHER_FLAVORS.*quarantine, skip"):
        Settings.from_env({"CKPT_STAGE_OTHER_FLAVORS": "ignore"})
