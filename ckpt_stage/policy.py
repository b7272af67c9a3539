"""``decide(findings, settings) -> Decision``: the verdict as a pure function of the findings.

Rules (docs/contract.md): any blocking model-caused finding quarantines, carrying only model codes;
otherwise any blocking infrastructure finding makes the verdict ``error`` (never a quarantine, so
the version stays eligible for the next sweep); otherwise the version passes. Warnings never block,
except those the policy turns into errors (``require_input_example``).
"""

from __future__ import annotations

from collections.abc import Iterable

from ckpt_stage.config import Settings
from ckpt_stage.domain import Cause, Decision, Finding, ReasonCode, Severity, Verdict

#: ``detail["kind"]`` of the warning a model without an input example gets.
NO_INPUT_EXAMPLE = "no_input_example"


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
    model = [f for f in blocking if f.code is not None and f.code.cause is Cause.MODEL]
    if model:
        return Decision(Verdict.QUARANTINE, tuple(model))
    if blocking:
        return Decision(Verdict.ERROR, tuple(blocking))
    return Decision(Verdict.PASS, ())


def summarize(decision: Decision, *, subject: str, limit: int = 500) -> str:
    """One human sentence for the ``ckpt_stage.summary`` tag (at most ``limit`` characters)."""
    if decision.verdict is Verdict.PASS:
        text = f"{subject} loads safely and passed every check."
    else:
        first = decision.reasons[0]
        codes = ", ".join(c.value for c in decision.codes)
        word = "quarantined" if decision.verdict is Verdict.QUARANTINE else "could not be validated"
        text = f"{subject} {word} ({codes}): {first.message}"
        if first.hint:
            text += f" Fix: {first.hint}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
