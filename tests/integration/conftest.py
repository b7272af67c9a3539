"""Fixtures of the integration tests in this folder (servers come from ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.corpus import pt2_code as P


@pytest.fixture(scope="module")
def pt2_sources(tmp_path_factory) -> tuple[Path, Path]:
    """(a bare benign .pt2, a benign MLflow pt2 model directory of the same program)."""
    import mlflow.pytorch
    import numpy as np

    base = tmp_path_factory.mktemp("pt2-sources")
    src = P.benign(base / "src.pt2")
    model = base / "mlflow-model"
    mlflow.pytorch.save_model(P.Net().eval(), str(model), input_example=np.zeros((3, 4), dtype=np.float32))
    return src, model
