"""Registry contents for the dashboard tests, and a real HTTP server for the app.

Verdicts are written through ``Registry.record`` (the same code path and write order as a real
validation: attempt run with report.json, tags, status last, alias), with made-up reports, so the
dashboard tests do not depend on which verdict the worker reaches for a sample. The re-run path uses
real validations of a version whose files are missing (ARTIFACT_MISSING, decided before any worker).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_stage.dev import devstack
from ckpt_stage.config import Settings
from ckpt_stage.domain import (
    Decision,
    FileFormat,
    FileInfo,
    Finding,
    ReasonCode,
    Report,
    Severity,
    Verdict,
    VersionRef,
)
from ckpt_stage.pipeline import validate_version
from ckpt_stage.policy import OTHER_FLAVOR, summarize
from ckpt_stage.registry import Registry

LAYERS_V1 = {"weight": {"shape": [2, 4], "dtype": "float32"}, "bias": {"shape": [2], "dtype": "float32"}}
LAYERS_V2 = {"weight": {"shape": [3, 4], "dtype": "float32"}, "bias": {"shape": [3], "dtype": "float32"},
             "extra.scale": {"shape": [1], "dtype": "float32"}}


@dataclass
class Seeded:
    a: str
    """Model with v1 promoted, v2 quarantined (SHAPE_MISMATCH, 2 attempts, drift), v3 error."""
    b: str
    """Model with v1 UNSAFE_PICKLE, v2 CORRUPT_ARCHIVE+INTEGRITY_MISMATCH, v3 never validated, v4 files missing
    (really validated: ARTIFACT_MISSING)."""
    c: str = ""
    """Model with v1 promoted (holds the alias), v2 skipped (sklearn flavor, CKPT_STAGE_OTHER_FLAVORS=skip)."""
    env: dict[str, str] = field(default_factory=dict)


def _finding(code: ReasonCode, message: str, hint: str, file: str | None = "model.pt") -> Finding:
    return Finding(code, message, hint, file=file)


def record(registry: Registry, ref: VersionRef, verdict: Verdict, findings: list[Finding], *, attempt: int,
           layers: dict | None = None, total_s: float = 1.25, summary: str | None = None) -> str:
    decision = Decision(verdict, tuple(f for f in findings if f.blocking))
    report = Report(
        verdict=verdict, reasons=decision.reasons, model=ref,
        files=(FileInfo("model.pt", 4096, "ab" * 32, FileFormat.TORCH_ZIP),
               FileInfo("MLmodel", 321, "cd" * 32, FileFormat.UNKNOWN)),
        runtime={"python": "3.11.9", "torch": "2.13.0", "mlflow": "3.17.2"},
        recorded={"python": "3.11.9", "torch": "2.12.1"},
        timings_s={"download": 0.2, "scan": 0.05, "load": 0.6, "inference": 0.1, "total": total_s},
        resources={"peak_anon_bytes": 150 * 2**20, "estimated_bytes": 200 * 2**20, "limit_bytes": 4 * 2**30},
        attempt=attempt, findings=tuple(findings),
        summary=summary or f"{ref.name} version {ref.version}: {verdict.value}"
                + (f" ({', '.join(c.value for c in decision.codes)})" if decision.codes else ""),
        isolation={"network_namespace": True, "pid_namespace": True, "unprivileged_user": True,
                   "memory_cgroup": "4.0 GiB"},
        extra={"model_info": {"parameters": sum(1 for _ in (layers or {})), "layers": layers}} if layers else {},
    )
    return registry.record(report, decision, digest="0" * 64)


def _version(client, name: str, bucket: str) -> VersionRef:
    with contextlib.suppress(Exception):
        client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"s3://{bucket}/dashboard-tests/{uuid.uuid4().hex}")
    return VersionRef(name, str(mv.version))


def seed(stack: devstack.Stack) -> Seeded:
    """Create both models; the process environment must already point at ``stack``."""
    from mlflow import MlflowClient

    uid = uuid.uuid4().hex[:6]
    out = Seeded(a=f"dash-clf-{uid}", b=f"dash-det-{uid}", c=f"dash-mix-{uid}")
    settings = Settings.from_env()
    registry = Registry(settings)
    client = MlflowClient()
    a = [_version(client, out.a, stack.bucket) for _ in range(3)]
    b = [_version(client, out.b, stack.bucket) for _ in range(4)]

    record(registry, a[0], Verdict.PASS, [], attempt=1, layers=LAYERS_V1)
    record(registry, a[1], Verdict.ERROR, [_finding(ReasonCode.STORAGE_UNAVAILABLE, "S3 kept failing after 5 attempts",
                                                    "the version stays eligible for the next sweep", None)],
           attempt=1)
    drift = Finding(None, "architecture changed since version 1: 2 reshaped, 1 added", "check the checkpoint",
                    severity=Severity.INFO,
                    detail={"kind": "drift", "previous_version": a[0].version, "added": ["extra.scale"],
                            "removed": [], "reshaped": [{"name": "weight", "previous": [2, 4], "current": [3, 4]}]})
    record(registry, a[1], Verdict.QUARANTINE, [
        _finding(ReasonCode.SHAPE_MISMATCH, "weight has shape [3, 4]; torch.nn:Linear(4, 2) expects [2, 4]",
                 "re-export from the declared architecture or fix ckpt_stage.arch_kwargs"),
        Finding(ReasonCode.LIBRARY_VERSION_MISMATCH, "saved with torch 2.12.1", "minor versions load fine",
                severity=Severity.WARNING),
        drift,
    ], attempt=2, layers=LAYERS_V2, total_s=2.5)
    record(registry, a[2], Verdict.ERROR, [_finding(ReasonCode.STORAGE_UNAVAILABLE, "S3 answered 503 five times",
                                                    "retry later", None)], attempt=1)
    record(registry, b[0], Verdict.QUARANTINE, [_finding(ReasonCode.UNSAFE_PICKLE, "data.pkl calls os.system",
                                                         "save a state_dict or use safetensors", "data.pkl")],
           attempt=1)
    record(registry, b[1], Verdict.QUARANTINE, [
        _finding(ReasonCode.CORRUPT_ARCHIVE, "bad CRC-32 for data/0", "upload the file again"),
        _finding(ReasonCode.INTEGRITY_MISMATCH, "size differs from the registry's record", "upload the file again"),
    ], attempt=1)
    c = [_version(client, out.c, stack.bucket) for _ in range(2)]
    record(registry, c[0], Verdict.PASS, [], attempt=1, layers=LAYERS_V1)
    other = Finding(ReasonCode.UNSUPPORTED_FORMAT, "sklearn flavor (served through mlflow.sklearn): ckpt-stage "
                    "validates PyTorch models (mlflow.pytorch), not sklearn models", "register PyTorch models here",
                    file="MLmodel", detail={"kind": OTHER_FLAVOR, "flavors": ["python_function", "sklearn"]})
    record(registry, c[1], Verdict.SKIP, [other], attempt=1, summary=summarize(Decision(Verdict.SKIP, (other,))))
    # b[2] stays without a verdict; b[3] gets a real one: its location holds no files.
    validate_version(b[3], settings=settings, registry=registry)
    out.env = dict(os.environ)
    return out


_SEEDED: dict[str, Seeded] = {}


def seed_once(stack: devstack.Stack) -> Seeded:
    """``seed`` once per stack and session: the API and browser modules share the same versions."""
    if stack.mlflow.url not in _SEEDED:
        _SEEDED[stack.mlflow.url] = seed(stack)
    return _SEEDED[stack.mlflow.url]


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """The app on a free loopback port, served by uvicorn in a thread; yields its base URL."""
    import uvicorn

    port = devstack.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dashboard-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the dashboard server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def stack_env(stack: devstack.Stack, cache_dir: Path) -> Iterator[dict[str, str]]:
    """Point this process at ``stack`` for a whole module (``stage_env`` is per test)."""
    import pytest

    env = {**stack.env, "CKPT_STAGE_CACHE_DIR": str(cache_dir), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("CKPT_STAGE_DASHBOARD_TOKEN", "CKPT_STAGE_AIRFLOW_URL", "CKPT_STAGE_MLFLOW_UI_URL"):
            mp.delenv(k, raising=False)
        yield env
