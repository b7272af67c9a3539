"""The MLflow server killed (SIGKILL to its whole process group) and restarted on the same port and
backend store while a sweep runs: every version ends with its right verdict or ``error`` /
REGISTRY_UNAVAILABLE (or a lease that runs out) and stays eligible; nothing is half-recorded; a second
sweep after the restart decides the rest. The server is this test's own (the session's shared one is
never killed), on SQLite, so it runs once whatever backends the session tests."""

from __future__ import annotations

import json
import os
import signal
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
from ckpt_stage.pipeline import sweep
from ckpt_stage.registry import ATTEMPT_ID, LEASE_OWNER, LEASE_UNTIL, RUN_ID, Registry
from tests.faults import FaultProxy, on, one_backend, wait_until

pytestmark = pytest.mark.integration

LEASE_S = 4.0



def _validating(registry: Registry, ref) -> bool:
    try:
        return registry.get(ref).status is Status.VALIDATING
    except Exception:  # noqa: BLE001 - the server is still coming up
        return False


def test_mlflow_killed_and_restarted_mid_sweep(stack, stage_env, build_sample, tmp_path, monkeypatch):
    one_backend(stack)  # the MLflow server here is this test's own
    workdir = tmp_path / "mlflow"
    backend_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    port = devstack.free_port()
    start = dict(backend_uri=backend_uri, s3_endpoint=stack.s3.url, bucket=stack.bucket, port=port)
    ml = devstack.start_mlflow(workdir, **start)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", ml.url)
        client = MlflowClient(ml.url)
        good, good_tags = build_sample(samples.state_dict)
        bad, bad_tags = build_sample(samples.shape_mismatch)
        name = f"mlkill-{uuid.uuid4().hex[:6]}"
        kinds = ["promoted", "quarantined", "promoted"]
        refs = [devstack.register_folder(stack.bucket, name, *(good, good_tags) if k == "promoted" else (bad, bad_tags),
                                         client=client) for k in kinds]
        expected = {r.version: k for r, k in zip(refs, kinds, strict=True)}
        registry = Registry(Settings.from_env(), tracking_uri=ml.url)

        with FaultProxy(stack.s3.url) as s3:
            s3.chaos(1.0, (("latency", 0.5),), match=on("GET", "model.pt"))  # each attempt lasts a while
            env = {**os.environ, "MLFLOW_TRACKING_URI": ml.url, "AWS_ENDPOINT_URL_S3": s3.url,
                   "CKPT_STAGE_LEASE_S": str(LEASE_S), "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache")}
            # stage_env's quick client retries (2, no backoff): the outage outlasts them in seconds, not tens
            proc = subprocess.Popen([sys.executable, "-m", "ckpt_stage.cli", "sweep", "--json"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            log: list[str] = []

            def read_stderr() -> None:
                for line in proc.stderr:
                    log.append(line)

            reader = threading.Thread(target=read_stderr, daemon=True)
            reader.start()
            try:
                assert wait_until(lambda: _validating(registry, refs[0]), 120), "the sweep never claimed a version"
                os.killpg(ml.proc.pid, signal.SIGKILL)  # the server and its workers, for real
                ml.proc.wait(timeout=10)
                killed_at = time.monotonic()
                # Down until the attempt in flight has failed to record its verdict (past the client's retries).
                assert wait_until(lambda: any("recording the verdict of" in line for line in log), 120), log[-20:]
                ml = devstack.start_mlflow(workdir, **start)  # same port, same backend store
                print(f"MLflow down for {time.monotonic() - killed_at:.1f} s")
                out = proc.stdout.read()
                proc.wait(timeout=300)
                reader.join(10)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
        assert proc.returncode in (0, 3), "".join(log[-40:])
        doc = json.loads(out)  # the sweep printed its JSON through the outage
        rows = [r for r in doc["results"] if r.get("model") == name]
        print("first sweep:", [(r["version"], r["verdict"], r["reasons"]) for r in rows])
        assert rows[0]["version"] == refs[0].version and rows[0]["verdict"] == "error", rows  # the one in flight
        for row in rows:
            if row["verdict"] == "error":
                assert row["reasons"] == ["REGISTRY_UNAVAILABLE"], row
            else:
                assert {"pass": "promoted", "quarantine": "quarantined"}[row["verdict"]] == expected[row["version"]]

        # Nothing half-recorded: each version is decided right (with its run and report), or eligible.
        time.sleep(LEASE_S + 0.5)  # a lease left by the attempt cut off from MLflow runs out
        undecided = 0
        for ref in refs:
            state = registry.get(ref)
            if state.status in (Status.PROMOTED, Status.QUARANTINED):
                assert state.status.value == expected[ref.version], state.tags
                report = registry.report_of(state.tags[RUN_ID])
                assert report is not None and report["attempt"] == state.attempt
            else:
                undecided += 1
                assert state.needs_validation(), state.tags
                assert state.status is not Status.VALIDATING or not state.lease_active()
        print(f"after the first sweep: {undecided} of {len(refs)} versions left for the next sweep")
        assert undecided >= 1

        outcomes = sweep(settings=Settings.from_env(), registry=registry)  # after the restart
        assert all(o.report is not None for o in outcomes)
        for ref in refs:
            state = registry.get(ref)
            assert state.status is not None and state.status.value == expected[ref.version], (ref, state.tags)
            assert LEASE_OWNER not in state.tags and LEASE_UNTIL not in state.tags, state.tags
            runs = registry.attempts(ref)
            ids = [r["tags"].get(ATTEMPT_ID) for r in runs]
            assert len(ids) == len(set(ids)), runs  # one run per attempt
            numbers = [r["tags"].get("ckpt_stage.attempt") for r in runs]
            assert len(numbers) == len(set(numbers)), runs  # an attempt number is never reused
            statuses = {r["run_id"]: client.get_run(r["run_id"]).info.status for r in runs}
            assert "RUNNING" not in statuses.values(), statuses
        assert registry.alias_version(name) == str(max(int(r.version) for r, k in zip(refs, kinds, strict=True)
                                                       if k == "promoted"))
    finally:
        ml.stop()
