"""Allowed test architectures (``CKPT_STAGE_ARCH_MODULES=tests.faults.archs``) for the worker faults: a
plain state_dict of ``fc.weight``/``fc.bias`` (``state_dict()``); the behaviour sits in the constructor,
which the loader runs for every bare state_dict."""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn


class Small(nn.Module):
    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        if seconds:
            time.sleep(seconds)  # long enough for the test to kill the worker from outside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class SelfKill(Small):
    """Its own code kills the worker with SIGKILL, every time: the kernel does not tell the parent who sent
    it, so one such death reads as WORKER_LOST, like an operator's kill."""

    def __init__(self) -> None:
        super().__init__()
        os.kill(os.getpid(), signal.SIGKILL)


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Small().state_dict()
