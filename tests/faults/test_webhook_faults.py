"""Webhooks delivered twice or late, through the real receiver, the DAG run's ``discover`` and the mapped
task's ``validation_task`` against the real servers: one verdict, one attempt. (Never delivered: the sweep
finds the version, ``tests/e2e/test_airflow_e2e.py::test_a_version_the_webhook_missed_is_found_by_the_sweep``,
with the receiver down for real and MLflow dropping the event after its retries.)"""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient

from ckpt_stage import orchestrate
from ckpt_stage.dev import devstack, samples
from ckpt_stage.airflow_client import AirflowClient
from ckpt_stage.config import Settings
from ckpt_stage.dashboard.webhook import create_webhook_app
from ckpt_stage.domain import Status
from ckpt_stage.registry import Registry
from tests.unit.test_webhook import SECRET, FakeAirflow, _headers, _payload

pytestmark = pytest.mark.integration


def _receiver(airflow: FakeAirflow) -> TestClient:
    """One receiver process (its own delivery log), as one Airflow API server runs it."""
    settings = Settings(webhook_secret=SECRET, airflow_url="http://airflow.test", airflow_token="t")
    client = AirflowClient(settings, transport=httpx.MockTransport(airflow))
    return TestClient(create_webhook_app(settings, client=client))


def test_a_version_delivered_twice_and_late_gets_one_verdict(stack, stage_env, build_sample):
    folder, tags = build_sample(samples.state_dict)
    ref = devstack.register_folder(stack.bucket, f"hook-{uuid.uuid4().hex[:6]}", folder, tags)
    airflow = FakeAirflow()
    first, second = _receiver(airflow), _receiver(airflow)
    body = _payload(name=ref.name, version=ref.version)
    headers = _headers(body)
    assert first.post("/mlflow", content=body, headers=headers).status_code == 202
    assert first.post("/mlflow", content=body, headers=headers).json()["status"] == "duplicate"  # MLflow's retry
    assert first.post("/mlflow", content=body, headers=_headers(body)).json()["status"] == "duplicate"  # 2nd webhook
    # Another receiver process has not seen it: its event gets through, and Airflow starts a second DAG run.
    assert second.post("/mlflow", content=body, headers=_headers(body)).status_code == 202
    assert len(airflow.events) == 2

    registry = Registry(Settings.from_env())
    # Both runs discover the version while it is still pending, then their mapped tasks run at once.
    for event in airflow.events:
        assert ref in orchestrate.discover(registry, orchestrate.refs_from_extras([event["extra"]]))
    results: list[dict] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        out = orchestrate.validation_task(ref.to_dict(), force=False, settings=Settings.from_env(),
                                           owner=f"airflow:run{i}/validate_small/0")
        with lock:
            results.append(out)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted("verdict" in r for r in results) == [False, True], results  # one verdict, one skip
    assert next(r for r in results if "verdict" in r)["verdict"] == "pass"
    assert len(registry.attempts(ref)) == 1
    decided = registry.get(ref).tags
    assert decided["ckpt_stage.status"] == Status.PROMOTED.value

    # A late delivery (a third receiver, long after): its DAG run finds the version decided.
    late = _receiver(airflow)
    assert late.post("/mlflow", content=body, headers=_headers(body)).status_code == 202
    assert ref not in orchestrate.discover(registry, orchestrate.refs_from_extras([airflow.events[-1]["extra"]]))
    assert "skipped" in orchestrate.validation_task(ref.to_dict(), force=False, settings=Settings.from_env(),
                                                       owner="airflow:late/validate_small/0")
    assert registry.get(ref).tags == decided
    assert len(registry.attempts(ref)) == 1
