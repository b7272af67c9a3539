"""Sample model versions for the demo and the tests: small, generated on demand, good and bad.

Each builder writes files into a folder and returns the version tags the registration needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_stage.registry.tags import ARCH, ARCH_KWARGS


@dataclass(frozen=True)
class Sample:
    name: str
    description: str
    build: Callable[[Path], dict[str, str]]
    expect_verdict: str
    expect_codes: tuple[str, ...] = field(default_factory=tuple)


def _net():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _example():
    import numpy as np

    return np.zeros((1, 4), dtype=np.float32)


def mlflow_pt2(folder: Path) -> dict[str, str]:
    """An MLflow pytorch model in MLflow 3.17's default ``pt2`` (torch.export) serialization."""
    import mlflow.pytorch

    mlflow.pytorch.save_model(_net(), str(folder), input_example=_example())
    return {}


def mlflow_pickle(folder: Path) -> dict[str, str]:
    """An MLflow pytorch model in the ``pickle`` serialization (a whole pickled torch.nn module)."""
    import mlflow.pytorch

    mlflow.pytorch.save_model(_net(), str(folder), serialization_format="pickle", input_example=_example())
    return {}


LINEAR_TAGS = {ARCH: "torch.nn:Linear",
               ARCH_KWARGS: json.dumps({"in_features": 4, "out_features": 2})}


def state_dict(folder: Path) -> dict[str, str]:
    """A bare state_dict (torch zip format) with its architecture declared in version tags."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(4, 2).state_dict(), folder / "model.pt")
    return dict(LINEAR_TAGS)


def safetensors_file(folder: Path) -> dict[str, str]:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file(torch.nn.Linear(4, 2).state_dict(), str(folder / "model.safetensors"))
    return dict(LINEAR_TAGS)


def shape_mismatch(folder: Path) -> dict[str, str]:
    """Weights of a Linear(4, 3) registered as a Linear(4, 2)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torch.nn.Linear(4, 3).state_dict(), folder / "model.pt")
    return dict(LINEAR_TAGS)


def arch_mismatch(folder: Path) -> dict[str, str]:
    """A state_dict whose parameter names do not belong to the declared architecture."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"encoder.weight": torch.zeros(2, 4), "head.bias": torch.zeros(2)}, folder / "model.pt")
    return dict(LINEAR_TAGS)


def truncated(folder: Path) -> dict[str, str]:
    """A state_dict whose upload stopped half way."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    torch.save(torch.nn.Linear(64, 64).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return dict(LINEAR_TAGS)


def no_arch(folder: Path) -> dict[str, str]:
    """A bare state_dict registered without ``ckpt_stage.arch``."""
    state_dict(folder)
    return {}


DEMO_SAMPLES: tuple[Sample, ...] = (
    Sample("demo-good-pt2", "MLflow model, pt2 serialization, input example", mlflow_pt2, "pass"),
    Sample("demo-good-state-dict", "bare state_dict with ckpt_stage.arch tags", state_dict, "pass"),
    Sample("demo-good-safetensors", "safetensors weights with ckpt_stage.arch tags", safetensors_file, "pass"),
    Sample("demo-shape-mismatch", "Linear(4, 3) weights registered as Linear(4, 2)", shape_mismatch, "quarantine",
           ("SHAPE_MISMATCH",)),
    Sample("demo-truncated", "state_dict cut in half during upload", truncated, "quarantine",
           ("CORRUPT_ARCHIVE",)),
    Sample("demo-no-arch", "bare state_dict without an architecture", no_arch, "quarantine",
           ("PARTIAL_CHECKPOINT",)),
)
