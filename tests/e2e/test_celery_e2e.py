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

from ckpt_stage import orchestrate
from ckpt_stage.dev import devstack
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


def _seconds(start: str, end: str) -> float:
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


def _status(ref: VersionRef) -> str | None:
    return MlflowClient().get_model_version(ref.name, ref.version).tags.get("ckpt_stage.status")


def _task_instance_of(cluster: AirflowCluster, ref: VersionRef) -> tuple[dict, dict]:
    """The task instance that made the version's verdict (named by its attempt's run) and the attempt's report."""
    tags = MlflowClient().get_model_version(ref.name, ref.version).tags
    run = MlflowClient().get_run(tags["ckpt_stage.run_id"])
    t = run.data.tags
    ti = cluster.get(f"/dags/{t['airflow.dag_id']}/dagRuns/{quote(t['airflow.run_id'], safe='')}/taskInstances/"
                     f"{t['airflow.task_id']}/{t['airflow.map_index']}")
    return ti, Registry(Settings.from_env()).report_of(run.info.run_id) or {}


def test_each_class_runs_on_its_own_queue_and_an_oversized_version_is_refused_unloaded(stack, stage_env, cluster,
                                                                                      tmp_path):
    name = f"celery-{uuid.uuid4().hex[:6]}"
    refs: dict[str, VersionRef] = {}
    for label, (n_in, n_out) in {"small": (4, 2), "large": (1024, 2048), "huge": (1024, 5120)}.items():
        tags = _linear(tmp_path / label, n_in, n_out)
        refs[label] = devstack.register_folder(stack.bucket, name, tmp_path / label, tags)

    # A run for exactly these versions. If the first scheduled sweep is still running it may validate them
    # first (one run at a time): either way the verdict's attempt names the task instance that made it.
    resp = cluster.api("POST", f"/dags/{DAG}/dagRuns", json={
        "logical_date": None, "conf": {"versions": [r.to_dict() for r in refs.values()]}})
    assert resp.status_code == 200, resp.text
    expected = {"small": "promoted", "large": "promoted", "huge": "quarantined"}
    cluster.wait("the three verdicts", lambda: {k: _status(r) for k, r in refs.items()} == expected,
                 timeout=180, interval=2)
    huge_tags = MlflowClient().get_model_version(refs["huge"].name, refs["huge"].version).tags
    assert huge_tags["ckpt_stage.reasons"].split(",") == ["RESOURCE_LIMIT"]

    # Which queue and which worker ran each version, from the task instance in Airflow's REST API.
    found = {label: _task_instance_of(cluster, r) for label, r in refs.items()}
    where = {label: (ti["task_id"], ti["queue"], ti["hostname"]) for label, (ti, _) in found.items()}
    assert where == {"small": ("validate_small", "ckpt-small", "ckpt-small-worker"),
                     "large": ("validate_large", "ckpt-large", "ckpt-large-worker"),
                     "huge": ("validate_large", "ckpt-large", "ckpt-large-worker")}, where
    # The tasks that load nothing ran on the small class's queue: no worker listens on `default`.
    run_id = found["small"][0]["dag_run_id"]
    tis = cluster.get(f"/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances", limit=100)["task_instances"]
    control = {ti["task_id"]: (ti["queue"], ti["hostname"]) for ti in tis if not ti["task_id"].startswith("validate_")}
    assert set(control) == {"discover", "plan", "batch_small", "batch_large"}, control
    assert set(control.values()) == {("ckpt-small", "ckpt-small-worker")}, control

    # Refused before loading: no worker was started for it, no memory used, no load timed.
    huge_report = found["huge"][1]
    assert huge_report["resources"]["peak_anon_bytes"] == 0, huge_report["resources"]
    assert "worker_start" not in huge_report["timings_s"] and not huge_report["timings_s"].get("load"), huge_report
    finding = next(r for r in huge_report["reasons"] if r["code"] == "RESOURCE_LIMIT")
    assert "largest worker class 'large'" in finding["message"], finding

    # Figures for the report: per-task fixed cost on Celery (the task instance's start → end against the
    # stage's own total) and the fork server's start inside the stage's timings.
    for label, (ti, report) in found.items():
        timings = report.get("timings_s", {})
        print(f"{label}: {report.get('resources', {}).get('estimated_bytes')} bytes estimated, queued→start "
              f"{_seconds(ti['queued_when'], ti['start_date']):.2f} s, task {ti['duration']:.2f} s, stage total "
              f"{timings.get('total')} s, fork server start {timings.get('worker_start')} s, "
              f"load {timings.get('load')} s, pid {ti.get('pid')}")
    # Under Airflow 3 the Celery worker's task runner forks a fresh process per task instance (a pid of its
    # own), and the stage's fork server is a child of that process: it ends with the task, so no fork
    # server outlives a task on a worker host and every load pays the fork server's start again.
    workers = {n: svc.proc.pid for n, svc in cluster.procs.items() if n.endswith("-worker")}
    assert {n: _forkservers_under(pid) for n, pid in workers.items()} == {n: [] for n in workers}
    assert found["large"][0]["pid"] != found["huge"][0]["pid"]


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
