"""``ckpt-stage sweep`` picks every version without a verdict, including versions registered before the
stage existed (no tags at all) and versions whose lease expired, and skips decided ones."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.cli import main
from ckpt_stage.registry import LEASE_OWNER, LEASE_UNTIL, STATUS, iso

pytestmark = pytest.mark.integration


def test_sweep_validates_what_needs_it_and_reports_json(stack, stage_env, build_sample):
    client = MlflowClient()
    folder, tags = build_sample(samples.state_dict)
    bad_folder, bad_tags = build_sample(samples.shape_mismatch)
    name = f"sweep-{uuid.uuid4().hex[:6]}"
    untagged = devstack.register_folder(stack.bucket, name, folder, tags)  # "before the stage existed"
    expired = devstack.register_folder(stack.bucket, name, bad_folder, bad_tags)
    past = iso(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    client.set_model_version_tag(name, expired.version, LEASE_OWNER, "crashed-worker")
    client.set_model_version_tag(name, expired.version, LEASE_UNTIL, past)
    client.set_model_version_tag(name, expired.version, STATUS, "validating")
    held = devstack.register_folder(stack.bucket, name, folder, tags)
    future = iso(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))
    client.set_model_version_tag(name, held.version, LEASE_OWNER, "busy-worker")
    client.set_model_version_tag(name, held.version, LEASE_UNTIL, future)
    client.set_model_version_tag(name, held.version, STATUS, "validating")

    result = CliRunner().invoke(main, ["sweep", "--json"])
    doc = json.loads(result.stdout)
    mine = {r["version"]: r for r in doc["results"] if r.get("model") == name}
    assert mine[untagged.version]["verdict"] == "pass"
    assert mine[expired.version]["verdict"] == "quarantine"
    assert mine[expired.version]["reasons"] == ["SHAPE_MISMATCH"]
    assert held.version not in mine  # someone else holds a live lease
    assert result.exit_code == (3 if doc["errors"] else 0)
    assert client.get_model_version(name, held.version).tags[STATUS] == "validating"
    # A second sweep finds nothing of this model left to do.
    again = json.loads(CliRunner().invoke(main, ["sweep", "--json"]).stdout)
    assert not [r for r in again["results"] if r.get("model") == name]
