"""What the DAGs decide, without Airflow: discovery, re-run selection, sizing into classes, task outcomes."""

from __future__ import annotations

import datetime as dt

import pytest

from ckpt_stage import orchestrate
from ckpt_stage.config import MIN_SWEEP_INTERVAL_S, Settings, parse_worker_classes
from ckpt_stage.domain import Finding, ReasonCode, Report, Verdict, VersionRef
from ckpt_stage.errors import UsageError
from ckpt_stage.pipeline import Outcome
from ckpt_stage.registry import LEASE_OWNER, LEASE_UNTIL, STATUS, VersionState, iso


class FakeRegistry:
    def __init__(self, states: dict[VersionRef, dict[str, str]]):
        self.states = states

    def get(self, ref):
        if ref not in self.states:
            raise UsageError(f"no {ref}")
        return VersionState(ref, dict(self.states[ref]))

    def sweepable(self):
        return [VersionState(r, t) for r, t in self.states.items() if VersionState(r, t).needs_validation()]

    def iter_versions(self, *, model=None, status=None, reason=None):
        for ref, tags in self.states.items():
            st = VersionState(ref, tags)
            if (model is None or ref.name == model) and (status is None or tags.get(STATUS) == status) and (
                    reason is None or reason in st.reasons):
                yield st


def R(name, version):
    return VersionRef(name, str(version))


def test_sweep_interval_from_env():
    assert orchestrate.sweep_interval_s({}) == 300
    assert orchestrate.sweep_interval_s({"CKPT_STAGE_SWEEP_INTERVAL_S": "30"}) == 30
    assert orchestrate.sweep_interval_s({"CKPT_STAGE_SWEEP_INTERVAL_S": "0"}) == MIN_SWEEP_INTERVAL_S
    with pytest.raises(Exception, match="CKPT_STAGE_SWEEP_INTERVAL_S"):
        orchestrate.sweep_interval_s({"CKPT_STAGE_SWEEP_INTERVAL_S": "often"})


def test_refs_from_event_extras_drop_malformed_and_duplicates():
    extras = [{"name": "a", "version": "1"}, {"name": "a", "version": 1}, {"name": "b"}, None,
              {"name": "", "version": "2"}, {"name": "c", "version": "3", "delivery_id": "x"}]
    assert orchestrate.refs_from_extras(extras) == [R("a", 1), R("c", 3)]


def test_discover_takes_undecided_event_versions_then_the_sweep():
    future = iso(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))
    past = iso(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    reg = FakeRegistry({
        R("m", 1): {STATUS: "promoted"},
        R("m", 2): {},
        R("m", 3): {STATUS: "error"},
        R("m", 4): {STATUS: "validating", LEASE_UNTIL: future},
        R("m", 5): {STATUS: "validating", LEASE_UNTIL: past},
        R("n", 1): {STATUS: "pending"},
    })
    events = [R("m", 1), R("n", 1), R("gone", 1), R("m", 4)]
    assert orchestrate.discover(reg, events) == [R("n", 1), R("m", 2), R("m", 3), R("m", 5)]
    assert orchestrate.discover(reg, [], limit=2) == [R("m", 2), R("m", 3)]


@pytest.mark.parametrize(("params", "message"), [
    ({}, "give a model and versions, or a status"),
    ({"versions": ["1"]}, "versions need a model name"),
    ({"model": "m", "versions": ["1"], "status": "error"}, "not both"),
    ({"status": "validating"}, "status must be one of"),
    ({"status": "quarantined", "reason": "NOPE"}, "not a reason code"),
    ({"model": "m", "reason": "SHAPE_MISMATCH"}, "give a model and versions, or a status"),
    ({"model": "m", "versions": ["latest"]}, "model versions are numbers"),
])
def test_rerun_form_rules(params, message):
    with pytest.raises(UsageError, match=message):
        orchestrate.rerun_selection(params)


def test_rerun_selection_by_versions_and_by_status():
    reg = FakeRegistry({
        R("m", 1): {STATUS: "quarantined", "ckpt_stage.reasons": "SHAPE_MISMATCH"},
        R("m", 2): {STATUS: "quarantined", "ckpt_stage.reasons": "UNSAFE_PICKLE"},
        R("m", 10): {STATUS: "error", "ckpt_stage.reasons": "STORAGE_UNAVAILABLE"},
        R("n", 1): {STATUS: "quarantined", "ckpt_stage.reasons": "SHAPE_MISMATCH"},
    })
    assert orchestrate.select_for_rerun(reg, {"model": "m", "versions": ["2", 2, "1"]}) == [R("m", 2), R("m", 1)]
    with pytest.raises(UsageError):
        orchestrate.select_for_rerun(reg, {"model": "m", "versions": ["7"]})
    assert orchestrate.select_for_rerun(reg, {"status": "quarantined", "reason": "SHAPE_MISMATCH"}) == [
        R("m", 1), R("n", 1)]
    assert orchestrate.select_for_rerun(reg, {"status": "quarantined", "model": "m", "reason": None,
                                              "versions": []}) == [R("m", 1), R("m", 2)]
    with pytest.raises(UsageError, match="narrow it"):
        orchestrate.select_for_rerun(reg, {"status": "quarantined"}, limit=2)


def test_plan_routes_by_planned_memory_and_parks_unknown_or_huge_in_the_largest_class():
    from ckpt_stage.scan.estimate import OVERHEAD_BYTES

    settings = Settings(worker_classes=parse_worker_classes("s=65MiB,m=1GiB,l=4GiB:big_pool:q-large"))
    sizes = {R("a", 1): 10, R("a", 2): 2 * 2**20, R("a", 3): None, R("a", 4): 10 * 2**30, R("a", 5): 2**30 - OVERHEAD_BYTES}
    planned = orchestrate.plan(list(sizes), settings, sizes.__getitem__)
    assert {(p["version"], p["worker_class"], p["queue"]) for p in planned} == {
        ("1", "s", "ckpt-s"), ("2", "m", "ckpt-m"), ("3", "l", "q-large"), ("4", "l", "q-large"), ("5", "m", "ckpt-m")}
    assert orchestrate.in_class(planned, "m") == [
        {"name": "a", "version": "2", "s3_bytes": 2 * 2**20, "estimated_bytes": 2 * 2**20 + OVERHEAD_BYTES,
         "worker_class": "m", "queue": "ckpt-m", "over_budget": False},
        {"name": "a", "version": "5", "s3_bytes": 2**30 - OVERHEAD_BYTES, "estimated_bytes": 2**30,
         "worker_class": "m", "queue": "ckpt-m", "over_budget": False}]
    # Too big for every class: the largest class's queue, flagged; the scan there refuses it unloaded.
    assert [p["over_budget"] for p in planned] == [False, False, False, True, False]
    assert orchestrate.in_class(planned, "x") == []
    assert orchestrate.plan([], settings, sizes.__getitem__) == []


def test_plan_hands_each_versions_listing_to_its_validation(monkeypatch):
    """The plan task lists each version once: the listing goes with the planned item (as JSON, for the
    XCom) to the mapped validation, which passes it to the pipeline instead of listing again."""
    import json
    import time

    from ckpt_stage.storage import Listing, RemoteFile

    files = (RemoteFile("p/model.pt", "model.pt", 1000, "e1", "v1"), RemoteFile("p/MLmodel", "MLmodel", 20))
    listing = Listing("s3://b/p", files, time.time())
    many = Listing("s3://b/q", tuple(RemoteFile(f"q/{i}", str(i), 1) for i in range(Listing.MAX_FILES + 1)),
                   time.time())
    planned = orchestrate.plan([R("m", 1), R("m", 2), R("m", 3)], Settings(),
                               {R("m", 1): listing, R("m", 2): many, R("m", 3): None}.__getitem__)
    assert [p["s3_bytes"] for p in planned] == [1020, Listing.MAX_FILES + 1, None]
    assert "listing" not in planned[1] and "listing" not in planned[2]  # too long for an XCom; unknown
    item = json.loads(json.dumps(planned[0]))
    seen = []

    def fake_validate(ref, **kwargs):
        seen.append(kwargs.get("listing"))
        return _outcome(Verdict.PASS)

    monkeypatch.setattr("ckpt_stage.pipeline.validate_version", fake_validate)
    reg = FakeRegistry({R("m", 1): {}})
    orchestrate.validation_task(item, force=False, settings=Settings(), registry=reg)
    orchestrate.validation_task({"name": "m", "version": "1"}, force=False, settings=Settings(), registry=reg)
    assert seen == [listing, None]


def test_planned_memory_is_never_below_the_scanners_estimate(tmp_path):
    """The class a version is routed to (by S3 bytes) must hold what the worker's scan will estimate, or a
    load would run on a queue whose hosts were sized for less than its cgroup limit."""
    import torch

    from ckpt_stage.scan import scan_version
    from ckpt_stage.scan.estimate import OVERHEAD_BYTES

    torch.save({"w": torch.zeros(256, 1024), "b": torch.zeros(7)}, tmp_path / "sd.pt")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(300, 1000)}, str(tmp_path / "w.safetensors"))
    settings = Settings()
    for rel in ("sd.pt", "w.safetensors"):
        scan = scan_version(tmp_path, [rel], settings)
        assert scan.estimated_bytes > OVERHEAD_BYTES
        assert orchestrate.planned_memory((tmp_path / rel).stat().st_size) >= scan.estimated_bytes, rel


def test_a_class_task_loads_with_at_least_its_own_budget():
    """A version on the large queue whose scan estimate fits the small class still gets the large budget
    (the host has it), and the RESOURCE_LIMIT threshold (the largest class) does not move."""
    settings = Settings(worker_classes=parse_worker_classes("s=1GiB,m=4GiB,l=16GiB"))
    small_est = 100 * 2**20
    assert settings.class_for(small_est).name == "s"
    for name, expect in (("s", "s"), ("m", "m"), ("l", "l")):
        cs = orchestrate.class_settings(settings, name)
        assert cs.class_for(small_est).name == expect
        assert cs.largest_class == settings.largest_class
    assert orchestrate.class_settings(settings, "m").class_for(5 * 2**30).name == "l"
    assert orchestrate.class_settings(settings, "gone") == settings  # parsed with other classes: unchanged


def test_the_control_tasks_queue_is_the_smallest_classes():
    assert orchestrate.control_queue(Settings()) == "ckpt-small"
    settings = Settings(worker_classes=parse_worker_classes("xl=64GiB:p:gpu,tiny=1GiB:p2:cpu"))
    assert orchestrate.control_queue(settings) == "cpu"


def test_pool_definitions_follow_worker_classes():
    settings = Settings(worker_classes=parse_worker_classes("s=2GiB,l=8GiB:big_pool:gpu"))
    assert {k: v["slots"] for k, v in orchestrate.pool_definitions(settings).items()} == {
        "ckpt_stage_s": 4, "big_pool": 1}
    assert {k: v["slots"] for k, v in orchestrate.pool_definitions(settings, host_memory_bytes=20 * 2**30)
            .items()} == {"ckpt_stage_s": 10, "big_pool": 2}


def _outcome(verdict: Verdict, *codes: ReasonCode) -> Outcome:
    reasons = tuple(Finding(c, c.value) for c in codes)
    report = Report(verdict, reasons, R("m", 1), (), {}, {}, {}, {}, attempt=2, summary="s")
    return Outcome(report, run_id="r1")


def test_judge_model_verdicts_succeed():
    assert orchestrate.task_result(_outcome(Verdict.PASS)) == {
        "name": "m", "version": "1", "verdict": "pass", "reasons": [], "attempt": 2, "run_id": "r1", "summary": "s"}
    assert orchestrate.task_result(_outcome(Verdict.QUARANTINE, ReasonCode.SHAPE_MISMATCH))["reasons"] == ["SHAPE_MISMATCH"]
    assert orchestrate.task_result(Outcome(None, skipped="lease held")) == {"skipped": "lease held"}


@pytest.mark.parametrize(("codes", "retry"), [
    ((ReasonCode.STORAGE_UNAVAILABLE,), True),
    ((ReasonCode.REGISTRY_UNAVAILABLE, ReasonCode.WORKER_LOST), True),
    ((ReasonCode.STORAGE_MISCONFIGURED,), False),
    ((ReasonCode.INTERNAL_ERROR,), False),
    ((ReasonCode.STORAGE_UNAVAILABLE, ReasonCode.INTERNAL_ERROR), False),
])
def test_judge_errors_fail_the_task_retrying_only_transient_ones(codes, retry):
    with pytest.raises(orchestrate.ValidationFailed) as info:
        orchestrate.task_result(_outcome(Verdict.ERROR, *codes))
    assert info.value.retry is retry
    if ReasonCode.INTERNAL_ERROR in codes:
        assert "bug" in str(info.value)


def test_validate_one_skips_decided_versions_unless_forced(monkeypatch):
    reg = FakeRegistry({R("m", 1): {STATUS: "promoted"}, R("m", 2): {}})
    calls = []

    def fake_validate(ref, **kwargs):
        calls.append((ref, kwargs["force"]))
        return _outcome(Verdict.PASS)

    monkeypatch.setattr("ckpt_stage.pipeline.validate_version", fake_validate)
    assert orchestrate.validation_task({"name": "m", "version": "1"}, force=False, settings=Settings(),
                                    registry=reg)["skipped"] == "already promoted"
    assert "no longer registered" in orchestrate.validation_task({"name": "x", "version": "1"}, force=False,
                                                              settings=Settings(), registry=reg)["skipped"]
    assert orchestrate.validation_task({"name": "m", "version": "2"}, force=False, settings=Settings(),
                                    registry=reg)["verdict"] == "pass"
    orchestrate.validation_task({"name": "m", "version": "1"}, force=True, settings=Settings(), registry=reg)
    assert calls == [(R("m", 2), False), (R("m", 1), True)]


def test_a_retry_takes_over_the_lease_its_own_failed_try_left(monkeypatch):
    future = iso(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))
    reg = FakeRegistry({R("m", 1): {STATUS: "validating", LEASE_UNTIL: future, LEASE_OWNER: "airflow:d/r/t/0"}})
    owners = []

    def fake_validate(ref, **kwargs):
        owners.append(kwargs["owner"])
        return _outcome(Verdict.PASS)

    monkeypatch.setattr("ckpt_stage.pipeline.validate_version", fake_validate)
    other = orchestrate.validation_task({"name": "m", "version": "1"}, force=False, settings=Settings(), registry=reg,
                                     owner="airflow:d/r2/t/0")
    assert other["skipped"] == "already validating"
    mine = orchestrate.validation_task({"name": "m", "version": "1"}, force=False, settings=Settings(), registry=reg,
                                    owner="airflow:d/r/t/0")
    assert mine["verdict"] == "pass" and owners == ["airflow:d/r/t/0"]


def test_task_owner_is_stable_per_task_instance():
    class TI:
        dag_id, run_id, task_id, map_index = "ckpt_stage_validate", "scheduled__x", "validate_small", 3

    assert orchestrate.task_owner({"ti": TI()}) == "airflow:ckpt_stage_validate/scheduled__x/validate_small/3"

