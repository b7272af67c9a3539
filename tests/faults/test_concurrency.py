"""Row 2 of the reliability table: two sweeps at once. A claim that loses changes nothing: it re-reads the
version's verdict and lease before writing, writes only when the version still needs a verdict, and a
version decided by the other sweep is never validated again; the alias ends on the highest promoted
version of every model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.domain import Verdict
from ckpt_stage.pipeline import validate_version
from ckpt_stage.registry import LEASE_OWNER, LEASE_UNTIL, STATUS, Registry

pytestmark = pytest.mark.integration


def test_a_late_claim_on_a_decided_version_writes_nothing(stack, stage_env, build_sample):
    """The other sweep listed the version while it was pending and comes to it after it was decided."""
    folder, tags = build_sample(samples.state_dict)
    ref = devstack.register_folder(stack.bucket, f"late-{uuid.uuid4().hex[:6]}", folder, tags)
    settings = Settings.from_env()
    assert validate_version(ref, settings=settings).report.verdict is Verdict.PASS
    registry = Registry(settings)
    before = registry.get(ref).tags
    assert registry.claim(ref, "late-sweep") is None
    assert registry.get(ref).tags == before  # no lease, no "validating" over the verdict
    assert validate_version(ref, settings=settings, owner="late-sweep").report is None
    assert len(registry.attempts(ref)) == 1


def test_a_claim_that_finds_another_live_lease_writes_nothing(stack, stage_env, build_sample):
    folder, tags = build_sample(samples.state_dict)
    ref = devstack.register_folder(stack.bucket, f"held-{uuid.uuid4().hex[:6]}", folder, tags)
    registry = Registry(Settings.from_env())
    assert registry.claim(ref, "first") is not None
    before = registry.get(ref).tags
    assert registry.claim(ref, "second") is None
    assert registry.get(ref).tags == before


def test_two_concurrent_sweeps_decide_each_version_once(stack, stage_env, build_sample, tmp_path):
    good, good_tags = build_sample(samples.state_dict)
    bad, bad_tags = build_sample(samples.shape_mismatch)
    name = f"0twice-{uuid.uuid4().hex[:6]}"  # sorts first: both sweeps reach these versions first
    refs = [devstack.register_folder(stack.bucket, name, *(good, good_tags) if i % 3 else (bad, bad_tags))
            for i in range(6)]
    expected = {r.version: ("quarantined" if i % 3 == 0 else "promoted") for i, r in enumerate(refs)}
    env = {**os.environ, "CKPT_STAGE_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "ckpt_stage.cli", "sweep", "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    docs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode in (0, 3), err[-3000:]
        print(err[-6000:], file=sys.stderr)
        docs.append(json.loads(out))

    client = MlflowClient()
    registry = Registry(Settings.from_env())
    validated = [r["version"] for d in docs for r in d["results"] if r.get("model") == name]
    assert sorted(validated, key=int) == sorted(expected, key=int), docs  # each version once, by one sweep
    for ref in refs:
        state = registry.get(ref)
        assert state.tags[STATUS] == expected[ref.version], (ref, state.tags)
        assert LEASE_OWNER not in state.tags and LEASE_UNTIL not in state.tags
        runs = registry.attempts(ref)
        assert len(runs) == 1, (ref, runs)
        assert client.get_run(runs[0]["run_id"]).info.status == "FINISHED"
    promoted = max(int(v) for v, s in expected.items() if s == "promoted")
    assert registry.alias_version(name) == str(promoted)
