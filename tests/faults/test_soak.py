"""Soak: versions registered while faults are injected at 20 % on every S3 and MLflow request the stage
makes, two concurrent sweeps, round after round, until every version is decided. At the end every
invariant holds, and the figures print as one JSON document.

Small by default so it runs in CI (``CKPT_STAGE_SOAK_VERSIONS``, default 8; the issue's full size is 300):
    CKPT_STAGE_TEST_BACKENDS=postgresql CKPT_STAGE_SOAK_VERSIONS=300 pytest -m soak tests/faults/test_soak.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.domain import Status
from ckpt_stage.registry import ATTEMPT_ID, LEASE_OWNER, LEASE_UNTIL, Registry, parse_iso
from tests.faults.proxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.soak]

RATE = 0.2
S3_KINDS = ("reset", "reset_after", 503, 500, "truncate_fixlen", "truncate", ("latency", 0.3))
MLFLOW_KINDS = ("reset", "reset_after", 503, ("latency", 0.3))
INFRA = {"STORAGE_UNAVAILABLE", "REGISTRY_UNAVAILABLE", "WORKER_LOST"}


def test_soak_every_invariant_holds_under_20_percent_faults(stack, stage_env, build_sample, tmp_path):
    n = int(os.environ.get("CKPT_STAGE_SOAK_VERSIONS", "8"))
    max_rounds = int(os.environ.get("CKPT_STAGE_SOAK_ROUNDS", "8"))
    good, good_tags = build_sample(samples.state_dict)
    bad, bad_tags = build_sample(samples.shape_mismatch)
    models = [f"soak{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    client = MlflowClient()  # registration goes straight to the servers: the faults are the stage's
    registered: dict[tuple[str, str], bool] = {}  # (model, version) -> is a good version
    created_ms: dict[tuple[str, str], int] = {}
    t0 = time.monotonic()

    def register() -> None:
        for i in range(n):
            model = models[i % len(models)]
            is_good = i % 4 != 3
            ref = devstack.register_folder(stack.bucket, model, *(good, good_tags) if is_good else (bad, bad_tags),
                                           client=client)
            registered[(ref.name, ref.version)] = is_good
            created_ms[(ref.name, ref.version)] = int(client.get_model_version(ref.name, ref.version)
                                                      .creation_timestamp)
            time.sleep(0.2)

    with FaultProxy(stack.s3.url, seed=11) as s3, FaultProxy(stack.mlflow.url, seed=12) as ml:
        s3.chaos(RATE, S3_KINDS)
        ml.chaos(RATE, MLFLOW_KINDS)
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": s3.url, "MLFLOW_S3_ENDPOINT_URL": s3.url,
               "MLFLOW_TRACKING_URI": ml.url, "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache"),
               "CKPT_STAGE_S3_DEADLINE_S": "30"}
        for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
            env.pop(var, None)  # the stage's own defaults for MLflow's client, as in production
        registrar = threading.Thread(target=register)
        registrar.start()
        rounds, exits, verdict_rows = 0, [], 0
        while rounds < max_rounds:
            rounds += 1
            procs = [subprocess.Popen([sys.executable, "-m", "ckpt_stage.cli", "sweep", "--json"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                     for _ in range(2)]
            for p in procs:
                out, _ = p.communicate(timeout=max(900, 20 * n))  # a large soak's second round is long
                exits.append(p.returncode)
                doc = json.loads(out)  # every sweep prints its JSON, whatever failed
                verdict_rows += sum(1 for r in doc["results"] if r.get("model") in models)
            if registrar.is_alive():
                continue
            states = [Registry(Settings.from_env()).get(_ref(k)) for k in registered]
            if all(s.status in (Status.PROMOTED, Status.QUARANTINED) for s in states):
                break
        registrar.join()
        figures_s3, figures_ml = s3.figures(), ml.figures()

    # -- invariants (read straight from the servers, no faults) --------------------------------------------
    registry = Registry(Settings.from_env())
    verdicts: dict[str, int] = {}
    max_to_verdict = 0.0
    duplicate_attempts = 0
    for key, is_good in registered.items():
        state = registry.get(_ref(key))
        status = state.status.value if state.status else "none"
        verdicts[status] = verdicts.get(status, 0) + 1
        assert state.status in (Status.PROMOTED, Status.QUARANTINED, Status.ERROR), (key, state.tags)
        if state.status is Status.ERROR:
            assert set(state.reasons) <= INFRA, (key, state.tags)
            continue
        assert state.status is (Status.PROMOTED if is_good else Status.QUARANTINED), (key, state.tags)
        assert LEASE_OWNER not in state.tags and LEASE_UNTIL not in state.tags, (key, state.tags)
        runs = registry.attempts(_ref(key))
        by_attempt: dict[str, list] = {}
        for r in runs:
            by_attempt.setdefault(r["tags"].get(ATTEMPT_ID, r["run_id"]), []).append(r)
            assert client.get_run(r["run_id"]).info.status in ("FINISHED", "FAILED"), (key, r)  # never RUNNING
        assert all(len(v) == 1 for v in by_attempt.values()), (key, runs)  # one run per attempt
        numbers = [r["tags"].get("ckpt_stage.attempt") for r in runs]
        assert len(numbers) == len(set(numbers)), (key, runs)  # an attempt number is never reused
        duplicate_attempts += max(0, sum(1 for r in runs if r["tags"].get("ckpt_stage.verdict") != "error") - 1)
        report = registry.report_of(state.tags["ckpt_stage.run_id"])
        assert report is not None and report["attempt"] == state.attempt, key
        at = parse_iso(state.tags["ckpt_stage.validated_at"])
        assert at is not None
        max_to_verdict = max(max_to_verdict, at.timestamp() - created_ms[key] / 1000)
    for model in models:
        promoted = [int(v) for (m, v), _ in registered.items()
                    if m == model and registry.get(_ref((m, v))).status is Status.PROMOTED]
        assert registry.alias_version(model) == (str(max(promoted)) if promoted else None), model

    figures = {
        "versions": len(registered), "rounds": rounds, "sweeps": len(exits), "sweep_exit_codes": sorted(set(exits)),
        "fault_rate": RATE, "s3": figures_s3, "mlflow": figures_ml, "verdicts": verdicts,
        "verdict_rows": verdict_rows, "decided_twice": duplicate_attempts,
        "max_time_to_verdict_s": round(max_to_verdict, 1), "wall_s": round(time.monotonic() - t0, 1),
    }
    print("SOAK " + json.dumps(figures))
    assert figures_s3["faulted"] > 0 and figures_ml["faulted"] > 0


def _ref(key: tuple[str, str]):
    from ckpt_stage.domain import VersionRef

    return VersionRef(*key)
