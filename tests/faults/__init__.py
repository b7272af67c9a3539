"""Fault tests: a seeded HTTP fault proxy on real sockets between the stage and the real S3 API server /
the real ``mlflow server``, and real process kills. Each test names the reliability row it covers."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from tests.faults.proxy import FaultProxy, on

__all__ = ["FaultProxy", "on", "one_backend", "wait_until"]


def wait_until(predicate: Any, timeout: float, step: float = 0.2) -> Any:
    """``predicate()``'s first truthy value within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def one_backend(stack: Any) -> None:
    """Skip all but the session's first MLflow backend: for a test whose subject is not the backend store
    (the worker, a dedicated server of its own), once is enough and CI's time is short."""
    wanted = [b for b in os.environ.get("CKPT_STAGE_TEST_BACKENDS", "sqlite").split(",") if b]
    if stack.backend != (wanted[0] if wanted else "sqlite"):
        pytest.skip("not about the backend store: runs on the first backend only")
