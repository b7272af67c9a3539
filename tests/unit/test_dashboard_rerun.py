"""Re-runs from the dashboard: request validation, Airflow's DAG when configured, in-process otherwise."""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner

from ckpt_stage import orchestrate
from ckpt_stage.cli import main
from ckpt_stage.config import Settings
from ckpt_stage.dashboard.data import DashboardData
from ckpt_stage.dashboard.rerun import Rerunner, RerunError, RerunRequest
from ckpt_stage.domain import VersionRef
from ckpt_stage.errors import UsageError
from ckpt_stage.orchestrate import MAX_RERUN
from tests.unit.dashboard_fakes import FakeRegistry


@pytest.mark.parametrize(("body", "conf"), [
    ({"model": "m", "versions": ["3", 4, "3"]}, {"model": "m", "versions": ["3", "4"]}),
    ({"model": "m", "versions": "7"}, {"model": "m", "versions": ["7"]}),
    ({"status": "quarantined"}, {"status": "quarantined", "reason": None, "model": None}),
    ({"status": "promoted", "reason": "LIBRARY_VERSION_MISMATCH", "model": "m"},
     {"status": "promoted", "reason": "LIBRARY_VERSION_MISMATCH", "model": "m"}),
])
def test_request_becomes_the_rerun_dag_conf(body, conf):
    assert RerunRequest.parse(body).conf() == conf


@pytest.mark.parametrize("body", [
    None, {}, {"versions": ["1"]}, {"model": "", "versions": ["1"]}, {"model": "m", "versions": [None]},
    {"status": "pending"}, {"status": "quarantined", "reason": "nope"}, {"model": "m", "versions": ["1"], "reason": "TIMEOUT"},
])
def test_bad_requests_are_refused(body):
    with pytest.raises(RerunError) as err:
        RerunRequest.parse(body)
    assert err.value.status == 422


class FakeAirflow:
    instances: list = []

    def __init__(self, settings, fail: bool = False):
        self.settings, self.calls, self.fail = settings, [], fail
        FakeAirflow.instances.append(self)

    def configured(self) -> bool:
        return bool(self.settings.airflow_url and self.settings.airflow_token)

    def trigger_dag(self, dag_id, conf):
        if self.fail:
            raise RuntimeError("Airflow answered 503")
        self.calls.append((dag_id, conf))
        return {"dag_run_id": "manual__2026-01-01T00:00:00+00:00", "state": "queued"}

    def close(self):
        pass


def rerunner(settings, reg=None, **kw):
    reg = reg or FakeRegistry()
    return Rerunner(settings, DashboardData(settings, reg), **kw)


def test_airflow_configured_triggers_the_rerun_dag():
    settings = Settings(airflow_url="http://af:8080", airflow_token="t")
    r = rerunner(settings, airflow_client=FakeAirflow)
    assert r.mode == "airflow"
    out = r.submit(RerunRequest.parse({"status": "quarantined", "reason": "SHAPE_MISMATCH"}), "ann")
    assert FakeAirflow.instances[-1].calls == [
        ("ckpt_stage_rerun", {"status": "quarantined", "reason": "SHAPE_MISMATCH", "model": None})]
    assert out["mode"] == "airflow" and out["dag_run_id"].startswith("manual__")
    assert out["link"] == "http://af:8080/dags/ckpt_stage_rerun/runs/manual__2026-01-01T00:00:00+00:00"


def test_airflow_failure_is_reported_not_swallowed():
    settings = Settings(airflow_url="http://af:8080", airflow_token="t")
    r = rerunner(settings, airflow_client=lambda s: FakeAirflow(s, fail=True))
    with pytest.raises(RerunError) as err:
        r.submit(RerunRequest.parse({"model": "m", "versions": ["1"]}), "ann")
    assert err.value.status == 502 and "503" in err.value.detail


def test_without_airflow_credentials_it_runs_in_process():
    assert rerunner(Settings(airflow_url="http://af:8080"), airflow_client=FakeAirflow).mode == "in-process"
    assert rerunner(Settings()).mode == "in-process"


def test_in_process_runs_in_the_background_and_does_not_queue_twice():
    release, started = threading.Event(), threading.Event()
    seen = []

    def validate(ref, **kwargs):
        seen.append((ref, kwargs["force"]))
        started.set()
        release.wait(5)
        return type("O", (), {"report": None, "run_id": None, "skipped": ""})()

    reg = FakeRegistry()
    reg.add("m", 1, "quarantined", ["TIMEOUT"])
    reg.add("m", 2, "quarantined", ["SHAPE_MISMATCH"])
    reg.add("n", 1, "quarantined", ["TIMEOUT"])
    r = rerunner(Settings(), reg, validate=validate)
    first = r.submit(RerunRequest.parse({"status": "quarantined", "reason": "TIMEOUT"}), "ann")
    assert {(v["name"], v["version"]) for v in first["versions"]} == {("m", "1"), ("n", "1")}
    assert started.wait(5)
    again = r.submit(RerunRequest.parse({"model": "m", "versions": ["1"]}), "bob")
    assert "already re-running" in again["message"]
    release.set()
    for _ in range(200):
        job = r.job(first["job_id"])
        if job["state"] == "done":
            break
        threading.Event().wait(0.02)
    assert job["state"] == "done" and job["done"] == 2
    assert all(force for _, force in seen) and len(seen) == 2
    assert {str(ref) for ref, _ in seen} == {"m/1", "n/1"}
    assert r.job("nope") is None
    r.shutdown()


def test_a_failing_version_does_not_stop_the_batch():
    def validate(ref, **kwargs):
        if ref == VersionRef("m", "1"):
            raise RuntimeError("boom")
        return type("O", (), {"report": None, "run_id": "r", "skipped": ""})()

    r = rerunner(Settings(), validate=validate)
    out = r.submit(RerunRequest.parse({"model": "m", "versions": ["1", "2"]}), "ann")
    for _ in range(200):
        job = r.job(out["job_id"])
        if job["state"] == "done":
            break
        threading.Event().wait(0.02)
    assert [x.get("error") for x in job["results"]] == ["RuntimeError: boom", None]


@pytest.mark.parametrize(("params", "status"), [
    ({"model": "m", "versions": ["latest"]}, 422),
    ({"model": "m", "versions": [str(v) for v in range(1, MAX_RERUN + 2)]}, 413),
])
def test_one_selection_rule_for_the_dag_form_the_dashboard_and_the_cli(params, status):
    """The DAG form, the dashboard and the CLI refuse the same selections (one ``RerunSelection.parse``)."""
    with pytest.raises(UsageError):
        orchestrate.rerun_selection(params)
    with pytest.raises(RerunError) as err:
        RerunRequest.parse(params)
    assert err.value.status == status
    if len(params["versions"]) == 1:
        result = CliRunner().invoke(main, ["rerun", "--model", "m", "--version", params["versions"][0]])
        assert result.exit_code == 2 and "model versions are numbers" in result.stderr


def test_a_status_selection_over_the_limit_is_refused_in_process():
    reg = FakeRegistry()
    for v in range(1, 5):
        reg.add("m", v, "quarantined", ["TIMEOUT"])
    sel = RerunRequest.parse({"status": "quarantined"})
    assert [r.version for r in sel.matching(reg)] == ["1", "2", "3", "4"]
    with pytest.raises(UsageError, match="narrow it"):
        sel.matching(reg, limit=3)
