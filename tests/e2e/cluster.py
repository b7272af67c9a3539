"""A real Airflow 3.3 for end-to-end tests: scheduler, DAG processor, API server and triggerer as separate
processes (each in its own process group, stopped as a group), LocalExecutor, a fresh PostgreSQL metadata
database, SimpleAuthManager with a user whose password the test writes, and the stage's plugin (the webhook
receiver) inside the API server. Every wait has a deadline; a failure carries the components' log tails.

With ``celery_queues`` it runs the CeleryExecutor instead: one ``airflow celery worker`` per queue (low
concurrency, each naming itself ``<queue>-worker`` as the task instances' hostname), Redis on
127.0.0.1:6379 as the broker (a key prefix of its own, deleted afterwards) and a second fresh PostgreSQL
database as Celery's result backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ckpt_stage import orchestrate
from ckpt_stage.dev import devstack
from ckpt_stage.config import Settings


@dataclass
class AirflowCluster:
    home: Path
    url: str
    env: dict[str, str]
    user: str
    password: str
    procs: dict[str, devstack.Service] = field(default_factory=dict)
    _token: str = ""

    # -- REST ----------------------------------------------------------------------------------
    def token(self) -> str:
        if not self._token:
            resp = httpx.post(f"{self.url}/auth/token", json={"username": self.user, "password": self.password},
                              timeout=10)
            resp.raise_for_status()
            self._token = resp.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}/api/v2{path}", timeout=15,
                             headers={"Authorization": f"Bearer {self.token()}"}, **kwargs)

    def get(self, path: str, **params: Any) -> Any:
        resp = self.api("GET", path, params=params)
        resp.raise_for_status()
        return resp.json()

    # -- diagnostics ---------------------------------------------------------------------------
    def logs(self, n: int = 2500) -> str:
        parts = []
        for name, svc in self.procs.items():
            state = "running" if svc.proc.poll() is None else f"exited {svc.proc.returncode}"
            parts.append(f"===== {name} ({state}) {svc.log_path} =====\n{svc.log_tail(n)}")
        task_logs = sorted((self.home / "logs").rglob("*.log"), key=lambda p: p.stat().st_mtime)[-4:]
        for path in task_logs:
            with contextlib.suppress(OSError):
                parts.append(f"===== task log {path.relative_to(self.home)} =====\n{path.read_text()[-n:]}")
        return "\n".join(parts)

    def wait(self, what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
        """Poll ``check`` until it returns something truthy; fail with every component's log tail."""
        deadline = time.monotonic() + timeout
        last_exc: BaseException | None = None
        while time.monotonic() < deadline:
            for name, svc in self.procs.items():
                if svc.proc.poll() is not None:
                    pytest.fail(f"Airflow {name} exited with {svc.proc.returncode} while waiting for {what}\n"
                                + self.logs())
            try:
                result = check()
            except (httpx.HTTPError, OSError) as exc:
                last_exc, result = exc, None
            if result:
                return result
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_exc!r})\n" + self.logs())

    def stop(self) -> None:
        # Signal every component first, then wait for each: stopping them one by one costs up to 10 s each.
        for svc in self.procs.values():
            if svc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(svc.proc.pid, signal.SIGTERM)
        for name in reversed(list(self.procs)):
            self.procs[name].stop()


def _airflow(args: list[str], env: dict[str, str], timeout: float = 300) -> None:
    proc = subprocess.run([devstack._bin("airflow"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REPO_ROOT = Path(__file__).resolve().parents[2]


def _redis_keys(db: int, prefix: str, *, delete: bool = False) -> int:
    """Count (and optionally delete) the broker's keys under ``prefix``, with redis-py (Celery's own client)."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if delete and keys:
        client.delete(*keys)
    client.close()
    return len(keys)


def _start(name: str, args: list[str], env: dict[str, str], home: Path, url: str) -> devstack.Service:
    log_path = home / f"{name}.log"
    proc = subprocess.Popen([devstack._bin("airflow"), *args], env=env, stdout=log_path.open("ab"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=str(home))
    return devstack.Service(name, url, proc, log_path)


@contextlib.contextmanager
def airflow_cluster(home: Path, stage_env: dict[str, str], *, sweep_interval_s: float,
                    celery_queues: Sequence[str] = (), worker_concurrency: int = 1) -> Iterator[AirflowCluster]:
    if not devstack.postgres_available():
        pytest.skip("the e2e test needs PostgreSQL on 127.0.0.1:5432 for Airflow's metadata DB")
    if celery_queues and not devstack.port_open(REDIS_HOST, REDIS_PORT):
        pytest.skip(f"the CeleryExecutor e2e test needs Redis on {REDIS_HOST}:{REDIS_PORT} as its broker")
    from cryptography.fernet import Fernet

    home.mkdir(parents=True, exist_ok=True)
    port = devstack.free_port()
    url = f"http://127.0.0.1:{port}"
    user, password = "admin", secrets.token_urlsafe(12)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({user: password}))
    redis_db, redis_prefix = 0, f"ckpt-e2e-{uuid.uuid4().hex[:10]}:"
    with contextlib.ExitStack() as resources:
        db_uri = resources.enter_context(devstack.temp_postgres_db("ckpt_airflow"))
        env = {
            **os.environ,
            **stage_env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(devstack.dags_folder()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "false",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "false",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{user}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            # Every component must share these: the scheduler signs task JWTs that the API server checks.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),  # PyJWT warns below 64 bytes
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            # SQLAlchemy 2.1 made psycopg 3 the driver of a bare postgresql://; psycopg2 is what is installed.
            # Airflow derives its async URL (postgresql+asyncpg://) from this one: asyncpg must be installed.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_uri.replace("postgresql://", "postgresql+psycopg2://", 1),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            # The stage inside Airflow: the receiver posts asset events back through the REST API.
            "CKPT_STAGE_AIRFLOW_URL": url,
            "CKPT_STAGE_AIRFLOW_USER": user,
            "CKPT_STAGE_AIRFLOW_PASSWORD": password,
            "CKPT_STAGE_SWEEP_INTERVAL_S": str(sweep_interval_s),
        }
        env.pop("AIRFLOW__CORE__SQL_ALCHEMY_CONN", None)
        if celery_queues:
            results_uri = resources.enter_context(devstack.temp_postgres_db("ckpt_celery"))
            resources.callback(_redis_keys, redis_db, redis_prefix, delete=True)
            env.update({
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
                # Other users of this Redis never see (or clash with) this cluster's queues; cleanup by prefix.
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": redis_prefix,
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "3600",
                # Celery's database backend goes through SQLAlchemy: the same psycopg2 driver as the metadata DB.
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + results_uri,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(worker_concurrency),
                "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
                # Workers report a hostname of their own (tests/e2e/hostname.py).
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.e2e.hostname.worker_hostname",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
            })
        _airflow(["db", "migrate"], env)
        pools = home / "pools.json"
        pools.write_text(json.dumps(orchestrate.pool_definitions(Settings.from_env(env))))
        _airflow(["pools", "import", str(pools)], env)
        cluster = AirflowCluster(home, url, env, user, password)
        try:
            # The API server first (with the DAG processor, which needs only the DB): the scheduler's task
            # processes talk to it through the execution API and would spend their first minute retrying.
            cluster.procs["api-server"] = _start("api-server", ["api-server", "--port", str(port), "--host",
                                                                "127.0.0.1"], env, home, url)
            cluster.procs["dag-processor"] = _start("dag-processor", ["dag-processor"], env, home, url)
            cluster.wait("the API server", lambda: httpx.get(f"{url}/api/v2/monitor/health", timeout=3)
                         .status_code == 200, timeout=120, interval=0.5)
            # The Celery run needs no triggerer (nothing defers); one process less on a small machine.
            components = ("scheduler",) if celery_queues else ("scheduler", "triggerer")
            for name in components:
                cluster.procs[name] = _start(name, [name], env, home, url)
            for queue in celery_queues:
                # --skip-serve-logs: two workers on one host would both bind the log server's port; the API
                # server reads the task logs from the shared AIRFLOW_HOME.
                name = f"{queue}-worker"
                cluster.procs[name] = _start(
                    name, ["celery", "worker", "--queues", queue, "--concurrency", str(worker_concurrency),
                           "--celery-hostname", f"{name}@%h", "--skip-serve-logs"],
                    {**env, "CKPT_E2E_HOSTNAME": name}, home, url)
            cluster.wait("both DAGs parsed and unpaused", lambda: all(
                cluster.api("GET", f"/dags/{d}").status_code == 200 and not cluster.get(f"/dags/{d}")["is_paused"]
                for d in (orchestrate.VALIDATE_DAG_ID, orchestrate.RERUN_DAG_ID)), timeout=120)
            cluster.wait("the scheduler and triggerer heartbeats", lambda: all(
                (cluster.get("/monitor/health").get(c.replace("-", "_")) or {}).get("status") == "healthy"
                for c in (*components, "dag-processor")), timeout=60)
            if celery_queues:
                cluster.wait("the Celery workers", lambda: all(
                    f"{q}-worker@" in (home / f"{q}-worker.log").read_text(errors="replace")
                    and "ready." in (home / f"{q}-worker.log").read_text(errors="replace")
                    for q in celery_queues), timeout=120)
            yield cluster
        finally:
            cluster.stop()
