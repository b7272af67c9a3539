"""Row 8 of the reliability table: a killed sweep. The lease is short and renewed while the attempt runs
(a heartbeat), so a live attempt keeps its version however long it takes, and a sweep killed for real
(SIGKILL to its process group: the sweep and its worker fork server) frees its versions within the lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from ckpt_stage.dev import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.domain import Status, Verdict
from ckpt_stage.pipeline import validate_version
from ckpt_stage.registry import LEASE_UNTIL, Registry, parse_iso
from tests.faults import FaultProxy, on, wait_until

pytestmark = pytest.mark.integration

LEASE_S = 4.0



def test_the_default_lease_frees_a_killed_sweeps_versions_within_a_minute():
    assert Settings().lease_s <= 60


def test_a_killed_sweep_frees_its_version_within_the_lease(stack, stage_env, build_sample, tmp_path):
    folder, tags = build_sample(samples.state_dict)
    ref = devstack.register_folder(stack.bucket, f"0kill-{uuid.uuid4().hex[:6]}", folder, tags)
    registry = Registry(Settings.from_env())
    with FaultProxy(stack.s3.url) as s3:
        # The version's download takes longer than two leases: only the heartbeat keeps the claim alive.
        s3.arm(("latency", 4 * LEASE_S), match=on("GET", "model.pt"))
        env = {**os.environ, "CKPT_STAGE_LEASE_S": str(LEASE_S), "AWS_ENDPOINT_URL_S3": s3.url,
               "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache")}
        proc = subprocess.Popen([sys.executable, "-m", "ckpt_stage.cli", "sweep", "--json"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            claimed = wait_until(lambda: registry.get(ref).status is Status.VALIDATING, 120)
            assert claimed, "the sweep never claimed the version"
            first = parse_iso(registry.get(ref).tags[LEASE_UNTIL])
            time.sleep(2 * LEASE_S)
            state = registry.get(ref)
            assert state.lease_active(), "the lease ran out while the attempt was alive"  # heartbeat
            assert parse_iso(state.tags[LEASE_UNTIL]) > first
            assert registry.claim(ref, "another-sweep") is None  # a live attempt keeps its version
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its fork server, for real
            killed_at = time.monotonic()
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        freed = wait_until(lambda: registry.get(ref).needs_validation(), 3 * LEASE_S, step=0.1)
        waited = time.monotonic() - killed_at
        print(f"killed sweep: version eligible again {waited:.1f} s after the kill (lease {LEASE_S:.0f} s)")
        assert freed and waited <= LEASE_S + 1.5
    out = validate_version(ref, settings=Settings.from_env())
    assert out.report.verdict is Verdict.PASS
