"""Fault tests: a seeded HTTP fault proxy on real sockets between the stage and the real S3 API server /
the real ``mlflow server``, and real process kills. Each test names the reliability row it covers."""

from __future__ import annotations

import time
from typing import Any

from tests.faults.proxy import FaultProxy, on

__all__ = ["FaultProxy", "on", "wait_until"]


def wait_until(predicate: Any, timeout: float, step: float = 0.2) -> Any:
    """``predicate()``'s first truthy value within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None
