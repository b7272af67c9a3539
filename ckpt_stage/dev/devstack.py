"""A local stack for the demo and the tests: an S3 API server and an ``mlflow server`` on loopback.

Production runs against MinIO/AWS S3 and a shared MLflow (see ``infra/``); this module only starts
real servers on 127.0.0.1 with the settings docs/traps.md calls for: the MLflow server writes artifacts
straight to S3 (``--no-serve-artifacts --default-artifact-root s3://BUCKET/``) so versions resolve
to ``s3://`` locations, runs one worker with job execution off, and lives in its own process group
so stopping it stops all of its ~15 processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

S3_KEY_ID = "ckptstage"
S3_SECRET = "ckptstage-secret"
REGION = "us-east-1"
WEBHOOK_ENCRYPTION_KEY = "Y2twdC1zdGFnZS1kZW1vLWtleS0wMDAwMDAwMDAwMDA="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        """Stop the whole process group; never raises."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _bin(name: str) -> str:
    cand = Path(sys.executable).with_name(name)
    return str(cand) if cand.exists() else name


def _wait_http(svc: Service, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.proc.poll() is not None:
            raise RuntimeError(f"{svc.name} exited with {svc.proc.returncode}:\n{svc.log_tail()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(svc.url + path, timeout=2) as resp:
                if resp.status < 500:
                    return
        time.sleep(0.25)
    svc.stop()
    raise RuntimeError(f"{svc.name} did not answer on {svc.url}{path} within {timeout:.0f} s:\n{svc.log_tail()}")


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


def start_s3(workdir: Path, port: int | None = None) -> Service:
    """moto's standalone S3 API server over HTTP on loopback."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = workdir / f"s3-{port}.log"
    env = {**os.environ, **s3_env(f"http://127.0.0.1:{port}")}
    proc = subprocess.Popen(
        [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, start_new_session=True,
    )
    svc = Service("s3", f"http://127.0.0.1:{port}", proc, log_path)
    _wait_http(svc, "/moto-api/", 60)
    return svc


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY_ID,
                      aws_secret_access_key=S3_SECRET, region_name=REGION)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        s3.create_bucket(Bucket=bucket)


def start_mlflow(
    workdir: Path,
    *,
    backend_uri: str,
    s3_endpoint: str,
    bucket: str,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> Service:
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = workdir / f"mlflow-{port}.log"
    env = {
        **os.environ,
        **s3_env(s3_endpoint),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": WEBHOOK_ENCRYPTION_KEY,
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        **(extra_env or {}),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_uri, "--no-serve-artifacts",
         "--default-artifact-root", f"s3://{bucket}/"],
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, start_new_session=True, cwd=str(workdir),
    )
    svc = Service("mlflow", f"http://127.0.0.1:{port}", proc, log_path)
    _wait_http(svc, "/health", 120)
    return svc


# -- PostgreSQL (trust auth on this machine and in CI) ---------------------------------------------
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"


def postgres_available() -> bool:
    return port_open(PG_HOST, PG_PORT)


@contextlib.contextmanager
def temp_postgres_db(prefix: str = "ckpt_stage") -> Iterator[str]:
    """A database with a unique name, dropped afterwards. Yields its SQLAlchemy URI."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@dataclass
class Stack:
    """A running S3 + MLflow pair and the environment a client needs to use them."""

    s3: Service
    mlflow: Service
    bucket: str
    backend: str
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        self.mlflow.stop()
        self.s3.stop()


@contextlib.contextmanager
def local_stack(workdir: Path, *, backend: str = "sqlite", bucket: str = "mlflow") -> Iterator[Stack]:
    s3 = start_s3(workdir)
    try:
        create_bucket(s3.url, bucket)
        with contextlib.ExitStack() as stack:
            if backend == "postgresql":
                backend_uri = stack.enter_context(temp_postgres_db())
            else:
                backend_uri = f"sqlite:///{workdir / 'mlflow.db'}"
            ml = start_mlflow(workdir, backend_uri=backend_uri, s3_endpoint=s3.url, bucket=bucket)
            env = {**s3_env(s3.url), "MLFLOW_TRACKING_URI": ml.url}
            try:
                yield Stack(s3, ml, bucket, backend, env)
            finally:
                ml.stop()
    finally:
        s3.stop()


def register_folder(bucket: str, name: str, folder: Path, tags: dict[str, str] | None = None,
                    *, client=None, prefix: str | None = None):
    """Upload a folder to ``s3://bucket/prefix`` and register it as a new version of ``name``.

    Uses the environment's MLflow tracking URI and S3 endpoint. Returns the ``VersionRef``.
    """
    from mlflow import MlflowClient

    from ckpt_stage.config import Settings
    from ckpt_stage.domain import VersionRef
    from ckpt_stage.storage import S3Location, S3Storage

    client = client or MlflowClient()
    prefix = prefix or f"uploads/{name}/{uuid.uuid4().hex[:12]}"
    S3Storage(Settings()).upload_dir(folder, S3Location(bucket, prefix))
    with contextlib.suppress(Exception):
        client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"s3://{bucket}/{prefix}", tags=tags or {})
    return VersionRef(name, str(mv.version))


# -- Airflow on SQLite for dag.test() --------------------------------------------------------------
def dags_folder() -> Path:
    configured = os.environ.get("CKPT_STAGE_DAGS_FOLDER")
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "dags"


def airflow_env(airflow_home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **(base or os.environ),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder()),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "false",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
    }


def airflow_prepare(airflow_home: Path, env: dict[str, str]) -> None:
    """Create the metadata DB and serialize the DAGs (dag.test() needs them serialized)."""
    airflow_home.mkdir(parents=True, exist_ok=True)
    for args in (["db", "migrate"], ["dags", "reserialize"]):
        proc = subprocess.run([_bin("airflow"), *args], env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def airflow_dag_test(dag_id: str, env: dict[str, str], conf: dict | None = None,
                     timeout: float = 900) -> subprocess.CompletedProcess:
    """``airflow dags test`` (which runs ``dag.test()``): every task in this process, no scheduler."""
    import json

    args = [_bin("airflow"), "dags", "test", dag_id]
    if conf:
        args += ["--conf", json.dumps(conf)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
