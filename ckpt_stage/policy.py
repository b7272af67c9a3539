"""``decide(findings, settings) -> Decision``: the verdict as a pure function of the findings.

Rules (docs/contract.md): any blocking model-caused finding quarantines, carrying only model codes;
otherwise any blocking infrastructure finding makes the verdict ``error`` (never a quarantine, so
the version stays eligible for the next sweep); otherwise the version passes. Warnings never block,
except those the policy turns into errors (``require_input_example``).

A version of a flavor the stage does not validate (the scan marks that finding ``detail["kind"] ==
OTHER_FLAVOR``) is quarantined like any model problem by default; with ``CKPT_STAGE_OTHER_FLAVORS=skip``
its verdict is ``skip`` instead, whatever else was found: the gate leaves it alone (status ``skipped``,
never promoted, not a problem), and the other findings stay in the report as information.
"""

from __future__ import annotations

from collections.abc import Iterable

from ckpt_stage.config import Settings
from ckpt_stage.domain import Cause, Decision, Finding, ReasonCode, Severity, Verdict

#: ``detail["kind"]`` of the warning a model without an input example gets.
NO_INPUT_EXAMPLE = "no_input_example"
#: ``detail["kind"]`` of the finding that says the whole version is of a flavor the stage does not validate.
OTHER_FLAVOR = "other_flavor"
OTHER_FLAVORS_SETTING = "CKPT_STAGE_OTHER_FLAVORS"
SUMMARY_LIMIT = 500


def _escalate(finding: Finding, settings: Settings) -> Finding:
    if (
        settings.require_input_example
        and finding.severity is Severity.WARNING
        and finding.detail.get("kind") == NO_INPUT_EXAMPLE
    ):
        return Finding(
            code=ReasonCode.SMOKE_INFERENCE_FAILED,
            message=finding.message,
            hint=finding.hint or "log the model with input_example=... so the stage can run a forward pass",
            file=finding.file,
            severity=Severity.ERROR,
            detail=finding.detail,
        )
    return finding


def decide(findings: Iterable[Finding], settings: Settings | None = None) -> Decision:
    settings = settings or Settings()
    effective = [_escalate(f, settings) for f in findings]
    blocking = [f for f in effective if f.blocking]
    if settings.other_flavors == "skip":
        other = [f for f in blocking if f.detail.get("kind") == OTHER_FLAVOR]
        if other:
            return Decision(Verdict.SKIP, tuple(other))
    model = [f for f in blocking if f.code is not None and f.code.cause is Cause.MODEL]
    if model:
        return Decision(Verdict.QUARANTINE, tuple(model))
    if blocking:
        return Decision(Verdict.ERROR, tuple(blocking))
    return Decision(Verdict.PASS, ())


def summarize(decision: Decision, *, limit: int = SUMMARY_LIMIT) -> str:
    """One human sentence for the ``ckpt_stage.summary`` tag (at most ``limit`` characters).

    It leads with the cause (every table around it already shows the model, version, status and codes),
    then says what to do; cut at a word boundary when too long.
    """
    if decision.verdict is Verdict.PASS:
        return "Loads safely and passed every check."
    first = decision.reasons[0] if decision.reasons else None
    if first is None:
        text = "Could not be validated."
    elif decision.verdict is Verdict.SKIP:
        text = (f"Not validated: {_sentence(first.message)} Left alone by {OTHER_FLAVORS_SETTING}=skip: "
                "never promoted; re-run it after changing the setting.")
    else:
        text = _sentence(first.message)
        if first.hint:
            text += f" Fix: {_sentence(first.hint)}"
        more = len(decision.codes) - 1
        if more > 0:
            text += f" ({more} more reason{'s' if more > 1 else ''}.)"
    return shorten(text, limit)


def _sentence(text: str) -> str:
    """``text`` with its whitespace folded and a full stop at the end unless it already has one."""
    text = " ".join(text.split()).rstrip(" ,;:")
    return text if not text or text[-1] in ".!?…" else text + "."


def shorten(text: str, limit: int = SUMMARY_LIMIT) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    head, sep, _ = cut.rpartition(" ")
    if sep and len(head) >= limit // 2:  # a single huge token (a path) is cut inside it instead
        cut = head
    return cut.rstrip(" ,;:.") + "…"
