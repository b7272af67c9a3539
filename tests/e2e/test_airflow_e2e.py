"""End to end with a real Airflow: MLflow webhook → receiver in the API server → asset event → validation;
the sweep catching what the webhook missed; a re-run through Airflow's REST API.

The MLflow server is this module's own (SQLite backend: webhooks need a SQL store), so the sweep sees only
the versions registered here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from mlflow import MlflowClient

from ckpt_stage import orchestrate
from ckpt_stage.dev import devstack, samples
from ckpt_stage.airflow_client import AirflowClient
from ckpt_stage.config import Settings
from ckpt_stage.domain import VersionRef
from ckpt_stage.registry import Registry
from tests.e2e.cluster import AirflowCluster, airflow_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SWEEP_S = 30
SECRET = "e2e-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[devstack.Stack]:
    with devstack.local_stack(tmp_path_factory.mktemp("e2e-stack"), backend="sqlite") as st:
        yield st


@pytest.fixture(scope="module")
def cluster(stack, tmp_path_factory) -> Iterator[AirflowCluster]:
    home = tmp_path_factory.mktemp("airflow-e2e")
    stage_env = {**stack.env, "CKPT_STAGE_CACHE_DIR": str(home / "cache"), "CKPT_STAGE_WEBHOOK_SECRET": SECRET,
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    with airflow_cluster(home, stage_env, sweep_interval_s=SWEEP_S) as c:
        yield c


@pytest.fixture(scope="module")
def receiver_url(cluster) -> str:
    return f"{cluster.url}/ckpt-stage-webhook/mlflow"


@pytest.fixture(scope="module")
def webhook_id(stack, cluster, receiver_url) -> Iterator[str]:
    """The MLflow webhook, registered with the stage's own command."""
    proc = subprocess.run(
        [sys.executable, "-m", "ckpt_stage.cli", "webhook", "register", "--url", receiver_url, "--json"],
        env={**cluster.env, "MLFLOW_TRACKING_URI": stack.mlflow.url}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    hook = json.loads(proc.stdout)
    assert hook["events"] == ["model_version.created"]
    yield hook["webhook_id"]
    MlflowClient(tracking_uri=stack.mlflow.url).delete_webhook(hook["webhook_id"])


def _register(stack, build_sample, builder, name: str) -> VersionRef:
    folder, tags = build_sample(builder)
    return devstack.register_folder(stack.bucket, name, folder, tags)


def _status(ref: VersionRef) -> str | None:
    return MlflowClient().get_model_version(ref.name, ref.version).tags.get("ckpt_stage.status")


def _asset_event_refs(cluster: AirflowCluster) -> set[tuple[str, str]]:
    assets = cluster.get("/assets", uri_prefix_pattern=orchestrate.REGISTRATIONS_ASSET_URI)["assets"]
    ids = [a["id"] for a in assets if a["uri"] == orchestrate.REGISTRATIONS_ASSET_URI]
    assert ids, f"asset {orchestrate.REGISTRATIONS_ASSET_URI} is not registered: {assets}"
    events = cluster.get("/assets/events", asset_id=ids[0], limit=100)["asset_events"]
    return {(e["extra"].get("name"), e["extra"].get("version")) for e in events}


def _runs_that_consumed(cluster: AirflowCluster, wanted: set[tuple[str, str]]) -> list[dict]:
    dag = orchestrate.VALIDATE_DAG_ID
    out = []
    for run in cluster.get(f"/dags/{dag}/dagRuns", run_type="asset_triggered", limit=100)["dag_runs"]:
        events = cluster.get(f"/dags/{dag}/dagRuns/{quote(run['dag_run_id'], safe='')}/upstreamAssetEvents")
        if wanted & {(e["extra"].get("name"), e["extra"].get("version")) for e in events["asset_events"]}:
            out.append(run)
    return out


def test_a_registered_version_is_validated_through_the_webhook(stack, stage_env, cluster, webhook_id, build_sample):
    name = f"e2e-hook-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    good = _register(stack, build_sample, samples.state_dict, name)
    bad = _register(stack, build_sample, samples.shape_mismatch, name)
    wanted = {(name, good.version), (name, bad.version)}

    # MLflow → receiver (inside Airflow's API server) → asset event, with the version in its extra.
    cluster.wait("the receiver's asset events", lambda: wanted <= _asset_event_refs(cluster), timeout=60)
    t_event = time.monotonic() - t0
    cluster.wait("both verdicts", lambda: (_status(good), _status(bad)) == ("promoted", "quarantined"),
                 timeout=240, interval=2)
    t_verdict = time.monotonic() - t0
    # An asset-triggered run consumed those events and finished.
    runs = cluster.wait("an asset-triggered run that consumed the events",
                        lambda: [r for r in _runs_that_consumed(cluster, wanted) if r["state"] == "success"],
                        timeout=120, interval=2)
    print(f"webhook → asset event {t_event:.1f} s, → verdicts {t_verdict:.1f} s; run {runs[0]['dag_run_id']}")
    tags = MlflowClient().get_model_version(bad.name, bad.version).tags
    assert "SHAPE_MISMATCH" in tags["ckpt_stage.reasons"].split(",")
    assert MlflowClient().get_model_version_by_alias(name, "validated").version == good.version


def test_a_version_the_webhook_missed_is_found_by_the_sweep(stack, stage_env, cluster, webhook_id, receiver_url,
                                                             build_sample):
    client = MlflowClient()
    # The receiver is "down": MLflow delivers to a closed port, retries 3 times, and drops the event.
    client.update_webhook(webhook_id, url=f"http://127.0.0.1:{devstack.free_port()}/mlflow")
    try:
        time.sleep(2)  # the test server's MLFLOW_WEBHOOK_CACHE_TTL is 1 s
        name = f"e2e-sweep-{uuid.uuid4().hex[:6]}"
        t0 = time.monotonic()
        ref = _register(stack, build_sample, samples.state_dict, name)
        cluster.wait("the sweep's verdict", lambda: _status(ref) == "promoted", timeout=SWEEP_S + 180, interval=2)
        print(f"sweep → verdict {time.monotonic() - t0:.1f} s (interval {SWEEP_S} s)")
        assert (name, ref.version) not in _asset_event_refs(cluster), "the webhook was supposed to miss it"
    finally:
        client.update_webhook(webhook_id, url=receiver_url)


def test_a_rerun_through_the_rest_api_makes_a_new_attempt(stack, stage_env, cluster, webhook_id, build_sample):
    name = f"e2e-rerun-{uuid.uuid4().hex[:6]}"
    ref = _register(stack, build_sample, samples.no_arch, name)
    cluster.wait("the first verdict", lambda: _status(ref) == "quarantined", timeout=SWEEP_S + 180, interval=2)
    cluster.wait("the validating run to finish", lambda: not cluster.get(
        f"/dags/{orchestrate.VALIDATE_DAG_ID}/dagRuns", state=["running", "queued"])["dag_runs"], timeout=120)
    before = int(MlflowClient().get_model_version(ref.name, ref.version).tags["ckpt_stage.attempt"])

    airflow = AirflowClient(Settings.from_env(cluster.env))
    run = airflow.trigger_dag(orchestrate.RERUN_DAG_ID, {"model": name, "versions": [ref.version]})
    done = cluster.wait("the re-run", lambda: (s := airflow.dag_run(orchestrate.RERUN_DAG_ID, run["dag_run_id"])
                                              )["state"] in ("success", "failed") and s, timeout=180, interval=2)
    assert done["state"] == "success", cluster.logs()
    tags = MlflowClient().get_model_version(ref.name, ref.version).tags
    assert tags["ckpt_stage.attempt"] == str(before + 1)
    assert tags["ckpt_stage.status"] == "quarantined"
    assert "PARTIAL_CHECKPOINT" in tags["ckpt_stage.reasons"].split(",")
    attempts = Registry(Settings.from_env()).attempts(ref)
    assert sorted(int(r["tags"]["ckpt_stage.attempt"]) for r in attempts) == list(range(1, before + 2))
