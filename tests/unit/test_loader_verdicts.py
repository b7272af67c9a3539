"""Verdicts on weights the worker used to miss (real files, loaded by the worker's loader in-process):
a second copy of the weights in one version, pt2 tensors outside ``ep.state_dict``, and NaN/Inf in
what the smoke forward pass returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode as R
from ckpt_stage.policy import decide
from ckpt_stage.sandbox.job import LoadJob
from ckpt_stage.load.loader import load_and_check
from safetensors.torch import save_file

LINEAR = {"arch": "torch.nn:Linear", "arch_kwargs": {"in_features": 4, "out_features": 2}}


def _check(root: Path, files: list[str], **job):
    result = load_and_check(LoadJob(root=str(root), files=tuple((f, "unknown") for f in files), **job))
    decision = decide(result.findings, Settings())
    return result, decision, [f.to_dict() for f in result.findings]


def _sd(nan: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in torch.nn.Linear(4, 2).state_dict().items()}
    if nan:
        sd["weight"][1, 2] = float("nan")
        sd["bias"][0] = float("inf")
    return sd


def _nonfinite(result) -> list:
    return [f for f in result.findings if f.code is R.NONFINITE_WEIGHTS]


# -- (a) a second copy of the weights -------------------------------------------------------------


def test_second_file_with_the_same_keys_is_finite_checked(tmp_path):
    save_file(_sd(), str(tmp_path / "model.safetensors"))
    torch.save(_sd(nan=True), tmp_path / "pytorch_model.bin")
    result, decision, shown = _check(tmp_path, ["model.safetensors", "pytorch_model.bin"], **LINEAR)
    assert decision.verdict.value == "quarantine", shown
    bad = _nonfinite(result)
    assert bad and bad[0].file == "pytorch_model.bin", shown
    assert "weight" in bad[0].message and "NaN" in bad[0].message


def test_second_copy_inside_one_checkpoint_is_finite_checked(tmp_path):
    torch.save({"model": _sd(), "ema": _sd(nan=True), "epoch": 3}, tmp_path / "ckpt.pt")
    result, decision, shown = _check(tmp_path, ["ckpt.pt"], **LINEAR)
    assert decision.verdict.value == "quarantine", shown
    bad = _nonfinite(result)
    assert bad and "ema.weight" in bad[0].message and "ema.bias" in bad[0].message, shown


def test_finite_copies_still_pass(tmp_path):
    torch.save({"model": _sd(), "ema": _sd(), "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "c.pt")
    save_file(_sd(), str(tmp_path / "model.safetensors"))
    _, decision, shown = _check(tmp_path, ["c.pt", "model.safetensors"], **LINEAR)
    assert decision.verdict.value == "pass", shown


# -- (b) pt2 tensors outside ep.state_dict ---------------------------------------------------------


class _WithConstants(torch.nn.Module):
    def __init__(self, const: float = 0.5, buffer: float = 1.0):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.const = torch.tensor([const, 2.0])  # a plain attribute: a lifted tensor constant
        self.register_buffer("shift", torch.tensor([buffer, 0.0]), persistent=False)

    def forward(self, x):
        return self.lin(x) * self.const + self.shift


def _export(model: torch.nn.Module, path: Path, *, constants: bool = False) -> Path:
    torch.manual_seed(0)
    ep = torch.export.export(model.eval(), (torch.randn(3, 4),))
    if constants:  # the case these tests are about: tensors only in ep.constants
        assert set(ep.constants) - set(ep.state_dict) == {"const", "shift"}
    torch.export.save(ep, str(path))
    return path


@pytest.mark.parametrize("kw,name", [({"const": float("nan")}, "const"), ({"buffer": float("inf")}, "shift")])
def test_pt2_constants_and_non_persistent_buffers_are_finite_checked(tmp_path, kw, name):
    _export(_WithConstants(**kw), tmp_path / "m.pt2", constants=True)
    result, decision, shown = _check(tmp_path, ["m.pt2"])
    assert decision.verdict.value == "quarantine", shown
    bad = _nonfinite(result)
    assert bad and name in bad[0].message and bad[0].file == "m.pt2", shown


def test_pt2_with_finite_constants_passes(tmp_path):
    _export(_WithConstants(), tmp_path / "m.pt2", constants=True)
    _, decision, shown = _check(tmp_path, ["m.pt2"])
    assert decision.verdict.value == "pass", shown


# -- (c) the smoke output --------------------------------------------------------------------------


class _LogOfNegative(torch.nn.Module):
    """Finite weights, NaN output: log of values below zero on any example near 0."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x):
        return torch.log(self.lin(x) - 100.0)


def test_pt2_smoke_output_nan_fails_smoke(tmp_path):
    _export(_LogOfNegative(), tmp_path / "m.pt2")
    result, decision, shown = _check(tmp_path, ["m.pt2"])
    assert decision.verdict.value == "quarantine", shown
    smoke = [f for f in result.findings if f.code is R.SMOKE_INFERENCE_FAILED]
    assert smoke and "non-finite" in smoke[0].message and "output" in smoke[0].message, shown
    assert not _nonfinite(result), "the weights are finite; only the output is not"


def test_mlflow_smoke_output_nan_fails_smoke(tmp_path):
    import mlflow.pytorch

    d = tmp_path / "model"
    mlflow.pytorch.save_model(_LogOfNegative().eval(), str(d), input_example=np.zeros((2, 4), dtype=np.float32))
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    result, decision, shown = _check(d, files)
    assert decision.verdict.value == "quarantine", shown
    smoke = [f for f in result.findings if f.code is R.SMOKE_INFERENCE_FAILED]
    assert smoke and "non-finite" in smoke[0].message and "input example" in smoke[0].message, shown
