"""Non-finite detection works piece by piece: a NaN or Inf in any piece of a large tensor is found and
counted, and a healthy tensor passes."""

from __future__ import annotations

import torch

from ckpt_stage.domain import ReasonCode
from ckpt_stage.load import checks


def test_values_in_the_last_piece_are_found_and_counted(monkeypatch):
    monkeypatch.setattr(checks, "FINITE_CHUNK", 10)
    t = torch.zeros(7, 5)
    t[6, 4] = float("nan")
    t[0, 0] = float("inf")
    t[3, 2] = float("-inf")
    finding = checks.nonfinite({"w": t, "ok": torch.ones(33)}, file="m.pt")
    assert finding is not None and finding.code is ReasonCode.NONFINITE_WEIGHTS
    assert finding.detail["tensors"] == [{"key": "w", "nan": 1, "inf": 2, "numel": 35}]
    assert "w (1 NaN, 2 Inf of 35)" in finding.message


def test_healthy_and_non_contiguous_tensors_pass(monkeypatch):
    monkeypatch.setattr(checks, "FINITE_CHUNK", 4)
    t = torch.arange(30, dtype=torch.float32).reshape(5, 6).t()  # non-contiguous view
    assert checks.nonfinite({"w": t, "h": torch.ones(9, dtype=torch.float16)}, file=None) is None
