"""The contract's rule for WORKER_LOST (pure, no servers): retried, but a version whose attempts end in
WORKER_LOST ``CKPT_STAGE_WORKER_LOST_LIMIT`` times in a row (default 3) is quarantined WORKER_CRASH."""

from __future__ import annotations

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.domain import Finding, ReasonCode, Verdict
from ckpt_stage.errors import ConfigError
from ckpt_stage.pipeline import worker_lost_in_a_row
from ckpt_stage.policy import decide

LOST = Finding(ReasonCode.WORKER_LOST, "the worker was killed by SIGKILL from outside the stage",
               detail={"signal": "SIGKILL"})


def _runs(*reasons: str) -> list[dict]:
    """Recorded attempts, oldest first (attempt 1, 2, ...), shuffled the way search order may give them."""
    runs = [{"run_id": f"r{i}", "tags": {"ckpt_stage.attempt": str(i), "ckpt_stage.reasons": r}}
            for i, r in enumerate(reasons, start=1)]
    return runs[1::2] + runs[::2]


def test_the_default_limit_is_three_and_read_from_the_environment():
    assert Settings().worker_lost_limit == 3
    assert Settings.from_env({"CKPT_STAGE_WORKER_LOST_LIMIT": "5"}).worker_lost_limit == 5
    with pytest.raises(ConfigError, match="must not be negative"):
        Settings.from_env({"CKPT_STAGE_WORKER_LOST_LIMIT": "-1"})


def test_losses_below_the_limit_stay_retryable_errors():
    for runs in (_runs(), _runs("WORKER_LOST"), _runs("WORKER_LOST", "WORKER_LOST", "REGISTRY_UNAVAILABLE")):
        out = worker_lost_in_a_row([LOST], runs, 3)
        assert out == [LOST]
        assert decide(out).verdict is Verdict.ERROR


def test_the_limit_th_loss_in_a_row_is_a_worker_crash():
    out = worker_lost_in_a_row([LOST], _runs("SHAPE_MISMATCH", "WORKER_LOST", "WORKER_LOST"), 3)
    assert [f.code for f in out] == [ReasonCode.WORKER_CRASH]
    assert "3 attempts in a row" in out[0].message and "SIGKILL" in out[0].message
    assert "CKPT_STAGE_WORKER_LOST_LIMIT" in out[0].hint and "rerun" in out[0].hint
    assert out[0].detail == {"signal": "SIGKILL", "worker_lost_in_a_row": 3}
    assert decide(out).verdict is Verdict.QUARANTINE


def test_a_loss_mixed_with_other_codes_breaks_the_row_and_zero_turns_the_rule_off():
    assert worker_lost_in_a_row([LOST], _runs("WORKER_LOST", "REGISTRY_UNAVAILABLE,WORKER_LOST"), 2) == [LOST]
    assert worker_lost_in_a_row([LOST], _runs("WORKER_LOST", "WORKER_LOST", "WORKER_LOST"), 0) == [LOST]


def test_other_findings_are_kept():
    other = Finding(ReasonCode.STORAGE_UNAVAILABLE, "s3")
    out = worker_lost_in_a_row([other, LOST], _runs("WORKER_LOST"), 2)
    assert [f.code for f in out] == [ReasonCode.STORAGE_UNAVAILABLE, ReasonCode.WORKER_CRASH]
    assert worker_lost_in_a_row([other], _runs("WORKER_LOST", "WORKER_LOST"), 2) == [other]
