"""DashboardData and its cache over an in-memory registry: ordering, filters, pages, drift, stats, speed."""

from __future__ import annotations

import threading
import time

import pytest

from ckpt_stage.config import Settings
from ckpt_stage import drift
from ckpt_stage.dashboard.data import (
    DashboardData,
    TTLCache,
    human_age,
    human_bytes,
)
from ckpt_stage.domain import VersionRef
from tests.unit.dashboard_fakes import FakeRegistry, fake_run


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add("a", 1, "promoted", age_s=500)
    reg.add("a", 2, "quarantined", ["SHAPE_MISMATCH"], age_s=50)
    reg.add("a", 3, "error", ["STORAGE_UNAVAILABLE"], age_s=10)
    reg.add("b", 1, "quarantined", ["CORRUPT_ARCHIVE", "INTEGRITY_MISMATCH"], age_s=5)
    reg.add("b", 2)
    reg.add("b", 3, "validating")
    reg.add("b", 10, "pending")
    return reg


def test_rows_put_problems_first_newest_first_within_a_status():
    rows = DashboardData(Settings(), registry()).rows()
    assert [(r["model"], r["version"], r["status"]) for r in rows] == [
        ("b", "1", "quarantined"), ("a", "2", "quarantined"), ("a", "3", "error"), ("b", "3", "validating"),
        ("b", "10", "pending"), ("b", "2", None), ("a", "1", "promoted"),
    ]


def test_filters_and_counts():
    data = DashboardData(Settings(), registry())
    assert [r["version"] for r in data.rows(status="none")] == ["2"]
    assert [(r["model"], r["version"]) for r in data.rows(reason="INTEGRITY_MISMATCH")] == [("b", "1")]
    assert [r["version"] for r in data.rows(model="a", status="quarantined")] == ["2"]
    assert data.counts() == {"pending": 1, "validating": 1, "promoted": 1, "quarantined": 2, "error": 1, "skipped": 0,
                             "none": 1}
    assert data.counts(model="a")["quarantined"] == 1
    assert data.reason_counts() == {"CORRUPT_ARCHIVE": 1, "INTEGRITY_MISMATCH": 1, "SHAPE_MISMATCH": 1}
    assert data.models() == ["a", "b"]


def test_pages_are_clamped_and_disjoint():
    data = DashboardData(Settings(), registry())
    p1, p2, p3 = (data.page(page=n, page_size=3) for n in (1, 2, 3))
    assert (p1["total"], p1["pages"]) == (7, 3)
    seen = [(r["model"], r["version"]) for p in (p1, p2, p3) for r in p["items"]]
    assert len(seen) == len(set(seen)) == 7
    assert data.page(page=99, page_size=3)["page"] == 3
    assert data.page(page_size=10_000)["page_size"] == 500


def test_row_age_comes_from_the_verdict_time():
    row = DashboardData(Settings(), registry()).rows(model="a", status="error")[0]
    assert 9 <= row["age_s"] <= 30 and row["attempt"] == 1 and row["summary"]
    assert human_age(row["age_s"]).endswith("s") and human_age(7200) == "2h" and human_age(None) == "—"
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(12) == "12 B"


def test_lists_are_cached_briefly_then_refreshed_in_the_background():
    clock = Clock()
    reg = registry()
    data = DashboardData(Settings(), reg, ttl_s=5, stale_s=60, clock=clock)
    data.rows()
    data.page(page=2, page_size=2)
    data.counts()
    assert reg.list_calls == 1  # one listing serves the page, the tabs and the counts
    reg.add("c", 1, "quarantined", ["TIMEOUT"])
    clock.t += 10  # stale: served at once, refreshed behind the scenes
    assert "c" not in {r["model"] for r in data.rows()}
    deadline = time.monotonic() + 5
    while reg.list_calls < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert "c" in {r["model"] for r in data.rows()}
    clock.t += 1000  # too old to serve: loaded in the request
    reg.add("d", 1, "error", ["STORAGE_UNAVAILABLE"])
    assert "d" in {r["model"] for r in data.rows()}


def test_concurrent_misses_share_one_load():
    cache = TTLCache(5, 60)
    calls = []
    gate = threading.Event()

    def load():
        calls.append(1)
        gate.wait(2)
        return 42

    threads = [threading.Thread(target=lambda: cache.get("k", load)) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.get("k", load) == 42


def test_thousands_of_versions_page_quickly():
    reg = FakeRegistry()
    for i in range(5000):
        reg.add(f"m{i % 50}", i, ["promoted", "quarantined", "error"][i % 3],
                ["SHAPE_MISMATCH"] if i % 3 == 1 else [], age_s=i)
    data = DashboardData(Settings(), reg)
    data.rows()
    started = time.perf_counter()
    for n in range(1, 51):
        listing = data.page(page=n, page_size=100)
        data.counts()
    assert time.perf_counter() - started < 1.0
    assert listing["total"] == 5000 and reg.list_calls == 1


def test_detail_has_attempts_reports_and_drift_against_the_promoted_version():
    reg = registry()
    ref = VersionRef("a", "2")
    reg.alias["a"] = "1"
    reg.states[VersionRef("a", "1")].tags["ckpt_stage.run_id"] = "p1"
    reg.reports_by_run["p1"] = {"model_info": {"layers": {"w": {"shape": [2, 4], "dtype": "float32"},
                                                           "gone": {"shape": [1], "dtype": "float32"}}}}
    reg.attempt_runs[ref] = [
        {"run_id": "r2", "start_time": 2_000, "tags": {"ckpt_stage.attempt": "2", "ckpt_stage.verdict": "quarantine",
                                                       "ckpt_stage.reasons": "SHAPE_MISMATCH"}, "metrics": {}},
        {"run_id": "r1", "start_time": 1_000, "tags": {"ckpt_stage.attempt": "1", "ckpt_stage.verdict": "error"},
         "metrics": {}},
    ]
    reg.reports_by_run["r2"] = {"verdict": "quarantine", "findings": [
        {"code": None, "severity": "info", "message": "architecture changed", "detail": {"kind": "drift"}},
        {"code": "SHAPE_MISMATCH", "severity": "error", "message": "w", "hint": "h"}],
        "model_info": {"layers": {"w": {"shape": [3, 4], "dtype": "float32"}, "new": {"shape": [3], "dtype": "float16"}}}}
    settings = Settings(mlflow_ui_url="http://mlflow.example/", airflow_url="http://airflow.example")
    d = DashboardData(settings, reg).detail("a", "2")
    assert [a["attempt"] for a in d["attempts"]] == [2, 1]
    assert d["attempts"][0]["report"]["verdict"] == "quarantine" and d["attempts"][1]["report"] is None
    assert d["drift"]["against"] == "1"
    assert [x["name"] for x in d["drift"]["added"]] == ["new"]
    assert [x["name"] for x in d["drift"]["removed"]] == ["gone"]
    assert d["drift"]["changed"] == [{"name": "w", "previous": {"shape": [2, 4], "dtype": "float32"},
                                      "current": {"shape": [3, 4], "dtype": "float32"}}]
    assert [f["message"] for f in d["drift"]["findings"]] == ["architecture changed"]
    assert d["links"]["mlflow_version"] == "http://mlflow.example/#/models/a/versions/2"
    assert d["attempts"][0]["links"]["mlflow_run"] == "http://mlflow.example/#/experiments/7/runs/r2"
    assert d["links"]["airflow"] == "http://airflow.example/dags/ckpt_stage_validate"
    assert DashboardData(settings, reg).detail("a", "99") is None


def test_airflow_log_link_needs_the_task_that_ran_the_attempt():
    data = DashboardData(Settings(airflow_url="http://af:8080/"), FakeRegistry())
    tags = {"airflow.dag_id": "ckpt_stage_validate", "airflow.run_id": "manual__1", "airflow.task_id": "validate_small",
            "airflow.map_index": "3", "airflow.try_number": "2"}
    assert data.airflow_log_url(tags, None) == \
        "http://af:8080/dags/ckpt_stage_validate/runs/manual__1/tasks/validate_small/mapped/3?try_number=2"
    assert data.airflow_log_url({}, {"airflow": {"dag_id": "d", "run_id": "r", "task_id": "t", "map_index": -1}}) == \
        "http://af:8080/dags/d/runs/r/tasks/t"
    assert data.airflow_log_url({}, None) is None
    assert DashboardData(Settings(), FakeRegistry()).airflow_log_url(tags, None) is None


def test_drift_view_uses_the_one_layer_diff_and_finding_filter():
    assert drift.diff_layers(None, None) == {"added": [], "removed": [], "changed": []}
    d = drift.diff_layers({"x": {"shape": [1], "dtype": "float32"}}, {"x": {"shape": [1], "dtype": "bfloat16"}})
    assert d["changed"] == [{"name": "x", "previous": {"shape": [1], "dtype": "float32"},
                             "current": {"shape": [1], "dtype": "bfloat16"}}]
    assert drift.findings_of({"findings": [{"detail": {"kind": "drift"}}, {"detail": {"kind": "weight_drift"}},
                                           {"detail": {"traceback": "x"}}, {}]}) == \
        [{"detail": {"kind": "drift"}}, {"detail": {"kind": "weight_drift"}}]


def test_reason_stats_count_versions_per_day_and_skip_repeats():
    reg = FakeRegistry()
    reg.client.runs = [
        fake_run("a", 1, "quarantine", ["SHAPE_MISMATCH"]),
        fake_run("a", 1, "quarantine", ["SHAPE_MISMATCH"]),  # a re-run the same day counts once
        fake_run("b", 1, "quarantine", ["SHAPE_MISMATCH", "NONFINITE_WEIGHTS"], days_ago=2),
        fake_run("c", 1, "pass", []),
    ]
    stats = DashboardData(Settings(), reg).reason_stats(days=7)
    assert len(stats["buckets"]) == 7
    assert stats["series"]["SHAPE_MISMATCH"][-1] == 1 and stats["series"]["SHAPE_MISMATCH"][-3] == 1
    assert stats["totals"] == {"SHAPE_MISMATCH": 2, "NONFINITE_WEIGHTS": 1}
    assert list(stats["series"]) == ["SHAPE_MISMATCH", "NONFINITE_WEIGHTS"]  # contract order


def test_no_experiment_yet_means_no_runs():
    reg = FakeRegistry()
    reg.client.experiment = None
    data = DashboardData(Settings(), reg)
    assert data.run_stats() == {"durations": [], "bytes": 0.0, "verdicts": {}}
    assert data.reason_stats(days=3)["series"] == {}


@pytest.mark.parametrize("status", ["promoted", "quarantined", "error", "validating", "pending", None])
def test_every_status_sorts(status):
    reg = FakeRegistry()
    reg.add("m", 1, status)
    assert DashboardData(Settings(), reg).rows()[0]["status"] == status


def test_lists_mark_the_version_that_holds_the_alias():
    """search_model_versions returns aliases=[] for every version (MLflow 3.17's SQL store): the list takes
    them from the registered models instead, and the row that holds the configured alias says so."""
    reg = FakeRegistry()
    reg.add("m", 1, "promoted")
    reg.add("m", 2, "promoted")
    reg.add("m", 3, "skipped", ["UNSUPPORTED_FORMAT"])
    reg.alias["m"] = "2"
    data = DashboardData(Settings(), reg)
    rows = {r["version"]: r for r in data.rows(model="m")}
    assert rows["2"]["holds_alias"] and rows["2"]["aliases"] == ["validated"]
    assert not rows["1"]["holds_alias"] and rows["1"]["aliases"] == [] and not rows["3"]["holds_alias"]
    assert data.detail("m", "2")["state"]["holds_alias"] and not data.detail("m", "1")["state"]["holds_alias"]
    assert data.counts(model="m")["skipped"] == 1


def test_an_mlflow_outage_reaches_the_dashboard_as_registry_unavailable(monkeypatch):
    """The dashboard reads MLflow only through the registry adapter, so a down server is the stage's
    REGISTRY_UNAVAILABLE (shown as such), never a raw client exception."""
    import socket

    from ckpt_stage.errors import RegistryUnavailable
    from ckpt_stage.registry import Registry

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    reg = Registry(Settings(), tracking_uri=f"http://127.0.0.1:{port}")
    for read in (reg.alias_holders, reg.find_experiment_id, lambda: list(reg.iter_runs(verdict="quarantine"))):
        with pytest.raises(RegistryUnavailable):
            read()
    data = DashboardData(Settings(), reg)
    assert data.mlflow_base() == f"http://127.0.0.1:{port}"
    with pytest.raises(RegistryUnavailable):  # the app answers it with its 503 "MLflow is not answering"
        data.run_stats()
