"""Both DAGs with ``dag.test()`` (``airflow dags test``) against real MLflow and S3 servers.

Airflow runs on a SQLite metadata DB in a temporary AIRFLOW_HOME; the tasks run in the ``airflow dags
test`` process and talk to the module's own MLflow and S3 servers.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ckpt_stage import orchestrate
from ckpt_stage.dev import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.domain import VersionRef
from ckpt_stage.registry import Registry

pytestmark = pytest.mark.integration

# Two worker classes that split the samples: a bare state_dict (~1 KiB) is "tiny", an MLflow model
# folder (tens of KiB) is "big". A version is planned with its S3 bytes plus the scanner's 64 MiB working
# allowance (orchestrate.planned_memory), so "tiny" is 64 MiB + 8 KiB. Real deployments use GiB budgets.
WORKER_CLASSES = f"tiny={64 * 2**20 + 8 * 2**10},big=4GiB"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[devstack.Stack]:
    """A registry of this module's own: a sweep validates every version without a verdict, and other
    modules leave such versions behind on purpose (``error`` ones, for instance)."""
    with devstack.local_stack(tmp_path_factory.mktemp("dag-stack"), backend="sqlite") as st:
        yield st


@pytest.fixture(scope="module")
def airflow(stack, tmp_path_factory) -> dict[str, str]:
    """A prepared Airflow home (SQLite, DAGs serialized, pools created) and the environment to use it."""
    home = tmp_path_factory.mktemp("airflow-home")
    base = {**os.environ, **stack.env, "CKPT_STAGE_CACHE_DIR": str(home / "cache"),
            "CKPT_STAGE_WORKER_CLASSES": WORKER_CLASSES,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    env = devstack.airflow_env(home, base)
    devstack.airflow_prepare(home, env)
    pools = home / "pools.json"
    pools.write_text(json.dumps(orchestrate.pool_definitions(Settings.from_env(env))))
    proc = subprocess.run([devstack._bin("airflow"), "pools", "import", str(pools)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return env


def _register(stack, build_sample, builder, name: str) -> VersionRef:
    folder, tags = build_sample(builder)
    return devstack.register_folder(stack.bucket, name, folder, tags)


def _dag_test(dag_id: str, env: dict[str, str], conf: dict | None = None) -> subprocess.CompletedProcess:
    proc = devstack.airflow_dag_test(dag_id, env, conf, timeout=600)
    return proc


def _task_instances(env: dict[str, str], dag_id: str) -> list[tuple[str, str | None, str]]:
    db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT task_id, rendered_map_index, state FROM task_instance WHERE dag_id = ?",
                            (dag_id,)).fetchall()


def _tags(ref: VersionRef) -> dict[str, str]:
    return dict(MlflowClient().get_model_version(ref.name, ref.version).tags)


def test_validate_dag_sweeps_sizes_and_records_verdicts(stack, stage_env, airflow, build_sample):
    name = f"dag-{uuid.uuid4().hex[:6]}"
    good = _register(stack, build_sample, samples.state_dict, name)
    bad = _register(stack, build_sample, samples.shape_mismatch, name)
    big = _register(stack, build_sample, samples.mlflow_pt2, f"{name}-pt2")
    MlflowClient().set_model_version_tag(big.name, big.version, "ckpt_stage.status", "pending")

    proc = _dag_test(orchestrate.VALIDATE_DAG_ID, airflow)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log

    assert _tags(good)["ckpt_stage.status"] == "promoted", log
    assert _tags(good)["ckpt_stage.attempt"] == "1"
    bad_tags = _tags(bad)
    assert bad_tags["ckpt_stage.status"] == "quarantined", log
    assert "SHAPE_MISMATCH" in bad_tags["ckpt_stage.reasons"].split(",")
    assert _tags(big)["ckpt_stage.status"] == "promoted", log
    assert MlflowClient().get_model_version_by_alias(name, "validated").version == good.version
    # The attempt names the task instance that ran it (the dashboard links to that task's log).
    run_tags = MlflowClient().get_run(_tags(good)["ckpt_stage.run_id"]).data.tags
    assert run_tags["airflow.dag_id"] == orchestrate.VALIDATE_DAG_ID
    assert run_tags["airflow.task_id"] == "validate_tiny"
    assert run_tags["airflow.run_id"] and run_tags["airflow.map_index"].isdigit()

    # Each version had its own mapped task instance, in the task of its worker class.
    tis = _task_instances(airflow, orchestrate.VALIDATE_DAG_ID)
    by_task = {(task, label): state for task, label, state in tis}
    assert by_task[("validate_tiny", f"{name} v{good.version}")] == "success"
    assert by_task[("validate_tiny", f"{name} v{bad.version}")] == "success"
    assert by_task[("validate_big", f"{big.name} v{big.version}")] == "success"

    # A second sweep finds nothing left to do, and the conf path for named versions skips decided ones.
    proc = _dag_test(orchestrate.VALIDATE_DAG_ID, airflow, {"versions": [good.to_dict()]})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert _tags(good)["ckpt_stage.attempt"] == "1"


def test_rerun_dag_makes_a_new_attempt_and_keeps_history(stack, stage_env, airflow, build_sample):
    name = f"rerun-{uuid.uuid4().hex[:6]}"
    ref = _register(stack, build_sample, samples.no_arch, name)
    settings = Settings.from_env()
    from ckpt_stage.pipeline import validate_version

    first = validate_version(ref, settings=settings)
    assert first.report is not None and first.report.verdict.value == "quarantine"

    proc = _dag_test(orchestrate.RERUN_DAG_ID, airflow,
                     {"status": "quarantined", "reason": "PARTIAL_CHECKPOINT", "model": name})
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    tags = _tags(ref)
    assert tags["ckpt_stage.attempt"] == "2", log
    assert tags["ckpt_stage.status"] == "quarantined"
    assert tags["ckpt_stage.run_id"] != first.run_id
    runs = Registry(settings).attempts(ref)
    assert sorted(r["tags"]["ckpt_stage.attempt"] for r in runs) == ["1", "2"]
    assert first.run_id in {r["run_id"] for r in runs}


def test_rerun_dag_refuses_a_form_it_cannot_act_on(airflow):
    # JSON schema (Param) refuses a version that is not a number before any task runs ...
    proc = _dag_test(orchestrate.RERUN_DAG_ID, airflow, {"model": "m", "versions": ["latest"]})
    assert proc.returncode != 0
    assert "latest" in proc.stdout + proc.stderr
    # ... and the select task refuses what the schema cannot express (versions without a model).
    proc = _dag_test(orchestrate.RERUN_DAG_ID, airflow, {"versions": ["3"]})
    assert proc.returncode != 0
    assert "versions need a model name" in proc.stdout + proc.stderr


def test_pool_definitions_cover_every_worker_class():
    settings = Settings.from_env({"CKPT_STAGE_WORKER_CLASSES": WORKER_CLASSES})
    pools = orchestrate.pool_definitions(settings)
    assert set(pools) == {"ckpt_stage_tiny", "ckpt_stage_big"}
    assert pools["ckpt_stage_big"]["slots"] == 1
    shipped = json.loads((Path(__file__).resolve().parents[2] / "infra" / "airflow" / "pools.json").read_text())
    # The pools shipped for `airflow pools import` match the default worker classes.
    assert {k: v["slots"] for k, v in shipped.items()} == {
        k: v["slots"] for k, v in orchestrate.pool_definitions(Settings()).items()}


def test_a_misconfigured_version_fails_its_task_without_retries(stack, stage_env, airflow):
    """STORAGE_MISCONFIGURED is the stage's setup, not the model: recorded as ``error``, task failed, no retry."""
    name = f"dag-nobucket-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    client.create_registered_model(name)
    mv = client.create_model_version(name, source="s3://no-such-bucket-ckpt-dag/x")
    ref = VersionRef(name, str(mv.version))
    try:
        proc = _dag_test(orchestrate.VALIDATE_DAG_ID, airflow, {"versions": [ref.to_dict()]})
        assert proc.returncode != 0, proc.stdout[-3000:]
        tags = _tags(ref)
        assert tags["ckpt_stage.status"] == "error"
        assert tags["ckpt_stage.reasons"] == "STORAGE_MISCONFIGURED"
        db = airflow["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT state, try_number, max_tries FROM task_instance WHERE dag_id = ? AND "
                                "rendered_map_index = ?", (orchestrate.VALIDATE_DAG_ID, f"{name} v{ref.version}"))
            assert [(state, tries) for state, tries, _ in rows.fetchall()] == [("failed", 1)]
    finally:
        # An ``error`` version stays sweepable by design; leave none behind for the module's other sweeps.
        client.delete_registered_model(name)
