"""MLflow faults injected on a real socket in front of the real MLflow server: the client's own retries
ride out a short outage; a long one surfaces as REGISTRY_UNAVAILABLE (transient) and loses nothing."""

from __future__ import annotations

import uuid

import pytest

from ckpt_stage import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.domain import Verdict
from ckpt_stage.errors import RegistryUnavailable, TransientError
from ckpt_stage.pipeline import validate_version
from ckpt_stage.registry import Registry
from tests.faults.proxy import FaultProxy

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
    with pytest.raises(RegistryUnavailable) as err:
        validate_version(registered, settings=Settings.from_env(), registry=registry)
    assert isinstance(err.value, TransientError)
    proxy.arm()
    assert registry.get(registered).needs_validation()  # nothing was recorded: the sweep will take it
