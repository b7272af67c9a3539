"""The DAG files parse, and have the shape the stage relies on (schedule, asset, pools, retries, params).

Parsed in a subprocess with its own AIRFLOW_HOME: Airflow reads its configuration once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ckpt_stage import orchestrate
from ckpt_stage.dev import devstack

PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
out = {"errors": {k: v[-2000:] for k, v in bag.import_errors.items()}, "dags": {}}
for dag in bag.dags.values():
    tt = dag.timetable
    out["dags"][dag.dag_id] = {
        "timetable": type(tt).__name__,
        "inner": type(getattr(tt, "timetable", None)).__name__,
        "delta_s": tt.timetable.delta.total_seconds() if getattr(tt, "timetable", None) else None,
        "assets": [a.uri for a in tt.asset_condition.objects] if getattr(tt, "asset_condition", None) else [],
        "max_active_runs": dag.max_active_runs,
        "params": {k: dag.params.get_param(k).schema for k in dag.params},
        "tasks": {t.task_id: {"pool": t.pool, "queue": t.queue, "retries": t.retries,
                              "backoff": t.retry_exponential_backoff,
                              "timeout_s": t.execution_timeout.total_seconds() if t.execution_timeout else None,
                              "downstream": sorted(t.downstream_task_ids)} for t in dag.tasks},
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def dags(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow-parse")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
           "AIRFLOW__CORE__DAGS_FOLDER": str(devstack.dags_folder()),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
           "CKPT_STAGE_WORKER_CLASSES": "small=2GiB,large=8GiB:big_pool:highmem",
           "CKPT_STAGE_SWEEP_INTERVAL_S": "120", "CKPT_STAGE_LEASE_S": "600"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(devstack.dags_folder())], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    return out["dags"]


def test_validate_dag_runs_on_the_asset_or_the_sweep_interval(dags):
    dag = dags[orchestrate.VALIDATE_DAG_ID]
    assert dag["timetable"] == "AssetOrTimeSchedule"
    assert dag["inner"] == "DeltaTriggerTimetable"
    assert dag["delta_s"] == 120
    assert dag["assets"] == [orchestrate.REGISTRATIONS_ASSET_URI]
    assert dag["max_active_runs"] == 1


@pytest.mark.parametrize(("dag_id", "first", "verb"), [
    (orchestrate.VALIDATE_DAG_ID, "discover", "validate"), (orchestrate.RERUN_DAG_ID, "select", "rerun")])
def test_one_mapped_task_per_worker_class_with_its_pool_and_queue(dags, dag_id, first, verb):
    tasks = dags[dag_id]["tasks"]
    assert set(tasks) == {first, "plan", "batch_small", "batch_large", f"{verb}_small", f"{verb}_large"}
    assert tasks[first]["downstream"] == ["plan"]
    assert tasks["plan"]["downstream"] == ["batch_large", "batch_small"]
    small, large = tasks[f"{verb}_small"], tasks[f"{verb}_large"]
    # A class without a named queue gets ckpt-<class> (Celery workers listen on exactly these).
    assert (small["pool"], small["queue"]) == ("ckpt_stage_small", "ckpt-small")
    assert (large["pool"], large["queue"]) == ("big_pool", "highmem")
    # Tasks that load nothing run on the smallest class's queue: no worker needs Airflow's `default` queue.
    assert {tasks[t]["queue"] for t in (first, "plan", "batch_small", "batch_large")} == {"ckpt-small"}
    for t in (small, large):
        assert t["retries"] == 3 and t["backoff"] == 2.0
        # The attempt renews its lease (heartbeat), so the limit is its own budget, not the lease:
        # worker timeout + two S3 deadlines + 300 s for recording.
        assert t["timeout_s"] == 300 + 2 * 120 + 300


def test_rerun_form_is_json_schema(dags):
    params = dags[orchestrate.RERUN_DAG_ID]["params"]
    assert set(params) == {"model", "versions", "status", "reason"}
    assert params["versions"]["type"] == "array"
    assert params["versions"]["items"]["pattern"] == "^[0-9]+$"
    assert set(params["status"]["enum"]) == {None, "quarantined", "error", "promoted", "skipped"}
    assert "SHAPE_MISMATCH" in params["reason"]["enum"]


def test_recheck_dag_runs_on_the_sweep_interval(dags):
    dag = dags["ckpt_stage_recheck"]
    assert dag["timetable"] == "DeltaTriggerTimetable"
    assert dag["max_active_runs"] == 1
    assert set(dag["tasks"]) == {"recheck"}
    assert dag["tasks"]["recheck"]["retries"] == 2
