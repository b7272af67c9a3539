"""A real Airflow 3.3 for end-to-end tests: scheduler, DAG processor, API server and triggerer as separate
processes (each in its own process group, stopped as a group), LocalExecutor, a fresh PostgreSQL metadata
database, SimpleAuthManager with a user whose password the test writes, and the stage's plugin (the webhook
receiver) inside the API server. Every wait has a deadline; a failure carries the components' log tails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ckpt_stage import devstack, orchestrate
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
        for name in reversed(list(self.procs)):
            self.procs[name].stop()


def _airflow(args: list[str], env: dict[str, str], timeout: float = 300) -> None:
    proc = subprocess.run([devstack._bin("airflow"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _start(name: str, args: list[str], env: dict[str, str], home: Path, url: str) -> devstack.Service:
    log_path = home / f"{name}.log"
    proc = subprocess.Popen([devstack._bin("airflow"), *args], env=env, stdout=log_path.open("ab"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=str(home))
    return devstack.Service(name, url, proc, log_path)


@contextlib.contextmanager
def airflow_cluster(home: Path, stage_env: dict[str, str], *, sweep_interval_s: float) -> Iterator[AirflowCluster]:
    if not devstack.postgres_available():
        pytest.skip("the e2e test needs PostgreSQL on 127.0.0.1:5432 for Airflow's metadata DB")
    from cryptography.fernet import Fernet

    home.mkdir(parents=True, exist_ok=True)
    port = devstack.free_port()
    url = f"http://127.0.0.1:{port}"
    user, password = "admin", secrets.token_urlsafe(12)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({user: password}))
    with devstack.temp_postgres_db("ckpt_airflow") as db_uri:
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
            for name in ("scheduler", "triggerer"):
                cluster.procs[name] = _start(name, [name], env, home, url)
            cluster.wait("both DAGs parsed and unpaused", lambda: all(
                cluster.api("GET", f"/dags/{d}").status_code == 200 and not cluster.get(f"/dags/{d}")["is_paused"]
                for d in (orchestrate.VALIDATE_DAG_ID, orchestrate.RERUN_DAG_ID)), timeout=120)
            cluster.wait("the scheduler and triggerer heartbeats", lambda: all(
                (cluster.get("/monitor/health").get(c) or {}).get("status") == "healthy"
                for c in ("scheduler", "triggerer", "dag_processor")), timeout=60)
            yield cluster
        finally:
            cluster.stop()
