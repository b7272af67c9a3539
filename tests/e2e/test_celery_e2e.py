"""End to end on the CeleryExecutor: each worker class's versions run on that class's queue.

A real scheduler, DAG processor, API server and triggerer on a fresh PostgreSQL metadata DB, two Celery
workers (``--queues ckpt-small`` and ``--queues ckpt-large``, concurrency 1), Redis on 127.0.0.1:6379 as the
broker and another fresh PostgreSQL database as Celery's result backend (``tests/e2e/cluster.py``).

Worker classes are tiny here (small=66MiB, large=80MiB; a version is planned with its S3 bytes plus the
scanner's 64 MiB working allowance) so that small files land on different queues: a 1 KiB state_dict on
``ckpt-small``, an 8 MiB one on ``ckpt-large``, and a 20 MiB one above every budget, refused with
RESOURCE_LIMIT on ``ckpt-large`` before it is loaded. Which worker ran a task instance is read back from the
REST API (its ``queue`` and ``hostname``: each worker names itself).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow import MlflowClient

from ckpt_stage import devstack, orchestrate
from ckpt_stage.config import Settings
from ckpt_stage.domain import VersionRef
from ckpt_stage.registry import Registry
from tests.e2e.cluster import AirflowCluster, airflow_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

WORKER_CLASSES = "small=66MiB,large=80MiB"
QUEUES = ("ckpt-small", "ckpt-large")
DAG = orchestrate.VALIDATE_DAG_ID


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[devstack.Stack]:
    with devstack.local_stack(tmp_path_factory.mktemp("celery-stack"), backend="sqlite") as st:
        yield st


@pytest.fixture(scope="module")
def cluster(stack, tmp_path_factory) -> Iterator[AirflowCluster]:
    home = tmp_path_factory.mktemp("airflow-celery")
    stage_env = {**stack.env, "CKPT_STAGE_CACHE_DIR": str(home / "cache"), "CKPT_STAGE_WORKER_CLASSES": WORKER_CLASSES,
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    # The sweep is not under test: one hour, so the only runs are the first scheduled one and the test's.
    with airflow_cluster(home, stage_env, sweep_interval_s=3600, celery_queues=QUEUES) as c:
        yield c


def _linear(folder: Path, in_features: int, out_features: int) -> dict[str, str]:
    """A bare nn.Linear state_dict of about ``4 * in * out`` bytes, its architecture in the version's tags."""
    import torch

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(in_features, out_features).state_dict(), folder / "model.pt")
    return {"ckpt_stage.arch": "torch.nn:Linear",
            "ckpt_stage.arch_kwargs": json.dumps({"in_features": in_features, "out_features": out_features})}


def _tis(cluster: AirflowCluster, run_id: str) -> list[dict]:
    return cluster.get(f"/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances", limit=100)["task_instances"]


def _seconds(start: str, end: str) -> float:
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


def test_each_class_runs_on_its_own_queue_and_an_oversized_version_is_refused_unloaded(stack, stage_env, cluster,
                                                                                      tmp_path):
    # The first scheduled sweep (nothing to do yet) must be out of the way: one run at a time.
    cluster.wait("the first sweep to finish", lambda: not cluster.get(
        f"/dags/{DAG}/dagRuns", state=["running", "queued"])["dag_runs"], timeout=120, interval=2)

    name = f"celery-{uuid.uuid4().hex[:6]}"
    refs: dict[str, VersionRef] = {}
    for label, (n_in, n_out) in {"small": (4, 2), "large": (1024, 2048), "huge": (1024, 5120)}.items():
        tags = _linear(tmp_path / label, n_in, n_out)
        refs[label] = devstack.register_folder(stack.bucket, name, tmp_path / label, tags)

    resp = cluster.api("POST", f"/dags/{DAG}/dagRuns", json={
        "logical_date": None, "conf": {"versions": [r.to_dict() for r in refs.values()]}})
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["dag_run_id"]
    run = cluster.wait("the validate run", lambda: (r := cluster.get(f"/dags/{DAG}/dagRuns/{quote(run_id, safe='')}"))
                       ["state"] in ("success", "failed") and r, timeout=180, interval=2)
    assert run["state"] == "success", cluster.logs()

    client = MlflowClient()
    tags = {label: client.get_model_version(r.name, r.version).tags for label, r in refs.items()}
    assert tags["small"]["ckpt_stage.status"] == "promoted", tags["small"]
    assert tags["large"]["ckpt_stage.status"] == "promoted", tags["large"]
    assert tags["huge"]["ckpt_stage.status"] == "quarantined", tags["huge"]
    assert tags["huge"]["ckpt_stage.reasons"].split(",") == ["RESOURCE_LIMIT"]

    # Which queue and which worker ran each version (the mapped instance's rendered name is "<model> v<n>").
    tis = _tis(cluster, run_id)
    by_version = {ti["rendered_map_index"]: ti for ti in tis if ti["task_id"].startswith("validate_")}
    where = {label: (by_version[f"{name} v{r.version}"]["task_id"], by_version[f"{name} v{r.version}"]["queue"],
                     by_version[f"{name} v{r.version}"]["hostname"]) for label, r in refs.items()}
    assert where == {"small": ("validate_small", "ckpt-small", "ckpt-small-worker"),
                     "large": ("validate_large", "ckpt-large", "ckpt-large-worker"),
                     "huge": ("validate_large", "ckpt-large", "ckpt-large-worker")}, where
    # The tasks that load nothing ran on the small class's queue: no worker listens on `default`.
    control = {ti["task_id"]: (ti["queue"], ti["hostname"]) for ti in tis if not ti["task_id"].startswith("validate_")}
    assert set(control.values()) == {("ckpt-small", "ckpt-small-worker")}, control

    # Refused before loading: no worker was started for it, no memory used, no load timed.
    registry = Registry(Settings.from_env())
    huge_report = registry.report_of(registry.attempts(refs["huge"])[0]["run_id"])
    assert huge_report is not None
    assert huge_report["resources"]["peak_anon_bytes"] == 0, huge_report["resources"]
    assert "worker_start" not in huge_report["timings_s"] and not huge_report["timings_s"].get("load"), huge_report
    finding = next(r for r in huge_report["reasons"] if r["code"] == "RESOURCE_LIMIT")
    assert "largest worker class 'large'" in finding["message"], finding

    # Figures for the report: per-task fixed cost on Celery (queued → start → end of the task instance) and
    # whether the fork server was warm (the worker's own start time inside the stage's timings).
    for label, r in refs.items():
        ti = by_version[f"{name} v{r.version}"]
        report = registry.report_of(registry.attempts(r)[0]["run_id"]) or {}
        timings = report.get("timings_s", {})
        print(f"{label}: {report.get('resources', {}).get('estimated_bytes')} bytes estimated, queued→start {_seconds(ti['queued_when'], ti['start_date']):.2f} s, "
              f"task {ti['duration']:.2f} s, stage total {timings.get('total')} s, "
              f"fork server start {timings.get('worker_start')} s, load {timings.get('load')} s, pid {ti.get('pid')}")
    # Under Airflow 3 the Celery worker's task runner forks a fresh process per task instance (a pid of its
    # own above), and the stage's fork server is a child of that process: it ends with the task, so no fork
    # server outlives a task on a worker host and every load pays the fork server's start again.
    workers = {n: svc.proc.pid for n, svc in cluster.procs.items() if n.endswith("-worker")}
    assert {n: _forkservers_under(pid) for n, pid in workers.items()} == {n: [] for n in workers}
    pids = {by_version[f"{name} v{r.version}"]["pid"] for r in (refs["large"], refs["huge"])}
    assert len(pids) == 2, pids


def _forkservers_under(root: int) -> list[int]:
    """Pids of ckpt-stage fork servers among ``root``'s descendants (read from /proc)."""
    parent, cmd = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == root:
                return True
        return False

    return [p for p, c in cmd.items() if "forkserver" in c and descends(p)]
