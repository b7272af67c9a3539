"""Shared fixtures: real servers on loopback (an S3 API server and ``mlflow server``), one per session
and backend store. SQLite always; PostgreSQL too when 127.0.0.1:5432 answers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_stage.dev import devstack

ROOT = Path(__file__).resolve().parents[1]


def _backends() -> list[str]:
    wanted = os.environ.get("CKPT_STAGE_TEST_BACKENDS")
    if wanted:
        return [b for b in wanted.split(",") if b]
    return ["sqlite"] + (["postgresql"] if devstack.postgres_available() else [])


@pytest.fixture(scope="session", params=_backends())
def stack(request, tmp_path_factory) -> Iterator[devstack.Stack]:
    workdir = tmp_path_factory.mktemp(f"stack-{request.param}")
    with devstack.local_stack(workdir, backend=request.param) as st:
        yield st


@pytest.fixture
def stage_env(stack, monkeypatch, tmp_path) -> dict[str, str]:
    """The process environment pointed at the session's servers, with a private cache."""
    env = {**stack.env, "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="session")
def sample_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each sample of ckpt_stage.dev.samples built once per session (MLflow models take seconds)."""
    return {}


@pytest.fixture
def build_sample(sample_dirs, tmp_path_factory):

    def build(builder) -> tuple[Path, dict[str, str]]:
        key = builder.__name__
        if key not in sample_dirs:
            folder = tmp_path_factory.mktemp(key) / "model"
            tags = builder(folder)
            sample_dirs[key] = (folder, tags)
        return sample_dirs[key]

    return build


@pytest.fixture
def s3_proxy(stack, monkeypatch):
    """Every S3 request of the stage and of the MLflow client goes through a fault proxy on a real socket
    (``tests/faults/proxy.py``): it counts them (``.seen``) and injects what a test asks for."""
    from tests.faults import FaultProxy

    with FaultProxy(stack.s3.url) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.url)
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", p.url)
        yield p
