"""MLflow faults injected on a real socket in front of the real MLflow server: the client's own retries
ride out a short outage; a long one surfaces as REGISTRY_UNAVAILABLE (transient) and loses nothing.
Rows 3, 4, 6 and 9 of the reliability table: a tag-write conflict is transient for the claim; an alias
move that failed is repaired by the next sweep; the client's retries are bounded; a lost answer to
``runs/create`` never leaves a second run."""

from __future__ import annotations

import time
import uuid

import pytest
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage import pipeline
from ckpt_stage.domain import ReasonCode, Verdict
from ckpt_stage.errors import RegistryUnavailable, is_retryable
from ckpt_stage.pipeline import validate_version
from ckpt_stage.registry import LEASE_OWNER, LEASE_UNTIL, STATUS, Registry
from tests.faults.proxy import FaultProxy, on

API = "/api/2.0/mlflow/"

pytestmark = pytest.mark.integration


@pytest.fixture
def registered(stack, stage_env, build_sample):
    folder, tags = build_sample(samples.state_dict)
    return devstack.register_folder(stack.bucket, f"regfault-{uuid.uuid4().hex[:6]}", folder, tags)


@pytest.fixture
def proxied_registry(stack, monkeypatch):
    with FaultProxy(stack.mlflow.url) as proxy:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        yield proxy, Registry(Settings.from_env(), tracking_uri=proxy.url)


def test_a_short_outage_is_ridden_out_by_the_client(registered, proxied_registry):
    proxy, registry = proxied_registry
    proxy.arm(503, 503)  # fewer than the client's retries
    out = validate_version(registered, settings=Settings.from_env(), registry=registry)
    assert out.report.verdict is Verdict.PASS
    assert proxy.faulted == 2


def test_a_long_outage_is_transient_and_the_version_stays_eligible(registered, proxied_registry):
    proxy, registry = proxied_registry
    proxy.arm(*([503] * 50))
    out = validate_version(registered, settings=Settings.from_env(), registry=registry)
    assert out.report.verdict is Verdict.ERROR and not out.recorded
    assert [r.code for r in out.report.reasons] == [ReasonCode.REGISTRY_UNAVAILABLE]
    assert is_retryable(RegistryUnavailable("x"))
    proxy.arm()
    assert registry.get(registered).needs_validation()  # nothing was recorded: the sweep will take it


# -- row 3: a tag-write conflict is transient for the claim ----------------------------------------------
UNIQUE_VIOLATION = ('{"error_code": "BAD_REQUEST", "message": "(psycopg2.errors.UniqueViolation) duplicate key '
                    'value violates unique constraint \\"model_version_tags_pk\\"\\nDETAIL:  Key (name, version, '
                    'key)=(m, 1, ckpt_stage.lease_owner) already exists."}')


def test_a_unique_violation_on_the_claims_first_tag_write_is_retried(registered, proxied_registry):
    """MLflow on PostgreSQL answers 400 when two first writes of one tag meet (its merge is read-then-insert);
    the client does not retry a 400. The claim writes again and the version gets its verdict."""
    proxy, registry = proxied_registry
    proxy.arm(("status", 400, UNIQUE_VIOLATION), ("status", 400, UNIQUE_VIOLATION),
              match=on("POST", "model-versions/set-tag"))
    out = validate_version(registered, settings=Settings.from_env(), registry=registry)
    assert proxy.by_kind["status"] == 2
    assert out.report.verdict is Verdict.PASS, out.report.summary
    assert out.report.attempt == 1
    state = registry.get(registered)
    assert state.tags[STATUS] == "promoted" and LEASE_OWNER not in state.tags


# -- row 9: a lost answer to runs/create -----------------------------------------------------------------
def test_a_lost_answer_to_runs_create_leaves_one_finished_run(registered, proxied_registry):
    """The server creates the run, the answer is lost, MLflow's client retries the POST and creates a second
    one. The attempt's run is found by its attempt id; the duplicate is deleted; the kept one is finished."""
    proxy, registry = proxied_registry
    proxy.arm("reset_after", match=on("POST", "runs/create"))
    out = validate_version(registered, settings=Settings.from_env(), registry=registry)
    assert proxy.by_kind["reset_after"] == 1
    assert out.report.verdict is Verdict.PASS
    runs = registry.attempts(registered)
    assert len(runs) == 1, runs
    run = MlflowClient().get_run(runs[0]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_id == out.run_id
    assert registry.report_of(out.run_id)["attempt"] == 1


# -- row 4: an alias move that failed is repaired --------------------------------------------------------
def test_a_failed_alias_move_is_repaired_by_the_next_sweep(registered, proxied_registry):
    proxy, registry = proxied_registry
    settings = Settings.from_env()
    proxy.arm(*[503] * 30, match=on("POST", "registered-models/alias"))
    out = validate_version(registered, settings=settings, registry=registry)
    assert out.report.verdict is Verdict.PASS
    state = registry.get(registered)
    assert state.tags[STATUS] == "promoted"
    assert registry.alias_version(registered.name) is None  # the move failed
    assert LEASE_OWNER in state.tags  # the marker the repair looks for
    proxy.calm()
    pipeline.sweep(settings=settings, registry=registry)
    assert registry.alias_version(registered.name) == registered.version
    state = registry.get(registered)
    assert LEASE_OWNER not in state.tags and LEASE_UNTIL not in state.tags


def test_an_alias_on_a_version_that_is_not_promoted_is_moved_by_the_sweep(stack, stage_env, build_sample):
    folder, tags = build_sample(samples.state_dict)
    name = f"alias-{uuid.uuid4().hex[:6]}"
    good = devstack.register_folder(stack.bucket, name, folder, tags)
    bad = devstack.register_folder(stack.bucket, name, folder, tags)
    settings = Settings.from_env()
    # Real verdicts (the promoted-version re-check reads their manifests), then what a lost race once
    # left: the alias on a version whose status is no longer promoted.
    assert validate_version(good, settings=settings).report.verdict is Verdict.PASS
    assert validate_version(bad, settings=settings).report.verdict is Verdict.PASS
    client = MlflowClient()
    client.set_model_version_tag(name, bad.version, STATUS, "quarantined")
    assert Registry(settings).alias_version(name) == bad.version
    pipeline.sweep(settings=settings)
    assert Registry(settings).alias_version(name) == good.version


# -- row 6: MLflow's own client retries are bounded ------------------------------------------------------
def test_a_down_mlflow_costs_seconds_per_call_not_minutes(registered, proxied_registry, monkeypatch):
    """Without the operator's settings, the stage gives MLflow's client its defaults (3 retries, backoff
    factor 1, 30 s timeout) instead of MLflow's own (7 retries, factor 2: about four minutes per call)."""
    proxy, _ = proxied_registry
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    registry = Registry(Settings.from_env(), tracking_uri=proxy.url)
    proxy.arm(*[503] * 50)
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailable):
        registry.get(registered)
    took = time.monotonic() - t0
    print(f"MLflow answering 503: one call gave up after {took:.1f} s, {proxy.faulted} requests")
    assert proxy.faulted == 4  # the call and three retries
    assert took < 15


def test_real_simultaneous_first_tag_writes_are_transient_conflicts(stack, stage_env, build_sample):
    """The real thing, on PostgreSQL: two first writes of one tag at once. Whatever the backend answers is
    either success or a transient conflict (never a permanent RegistryError), and two claims racing on
    fresh versions never escape as errors."""
    import threading

    from ckpt_stage.errors import RegistryConflict

    if stack.backend != "postgresql":
        pytest.skip("the unique-violation race is PostgreSQL's (SQLite serialises writers)")
    folder, tags = build_sample(samples.state_dict)
    name = f"race-{uuid.uuid4().hex[:6]}"
    refs = [devstack.register_folder(stack.bucket, name, folder, tags) for _ in range(3)]
    conflicts, others = [], []
    for ref in refs:
        for round_ in range(10):
            barrier = threading.Barrier(2)
            registry = [Registry(Settings.from_env()) for _ in range(2)]

            def write(reg, i, ref=ref, round_=round_, barrier=barrier):
                barrier.wait()
                try:
                    reg._set_tags(ref, {f"race.{round_}": str(i)})
                except RegistryConflict as exc:
                    conflicts.append(exc)
                except Exception as exc:  # noqa: BLE001
                    others.append(exc)

            threads = [threading.Thread(target=write, args=(registry[i], i)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    print(f"PostgreSQL: {len(conflicts)} unique-violation conflicts in 30 simultaneous first writes")
    assert not others, others
    # And claims that race: each either wins or gives way; none raises.
    results, errors = [], []
    for ref in refs:
        barrier = threading.Barrier(2)

        def claim(owner, ref=ref, barrier=barrier):
            barrier.wait()
            try:
                results.append(Registry(Settings.from_env()).claim(ref, owner))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=claim, args=(f"owner-{i}",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
