"""The isolated worker killed from outside: the worker process mid-load (SIGKILL, not the stage's own
limits) is WORKER_LOST, an infrastructure code (``error``, never a quarantine, eligible again); the fork
server killed between two versions of one sweep is restarted and the next version gets its verdict; a
model whose own code kills its worker every time is not retried forever (``CKPT_STAGE_WORKER_LOST_LIMIT``
losses in a row quarantine it as WORKER_CRASH)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import pytest
import torch

from ckpt_stage.dev import devstack
from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode, Status, Verdict
from ckpt_stage.pipeline import run_many, validate_version
from ckpt_stage.registry import Registry
from ckpt_stage.sandbox import runner
from tests.faults import archs, one_backend

pytestmark = pytest.mark.integration

ARCHS = "tests.faults.archs"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker-faults") / "model"
    folder.mkdir()
    torch.save(archs.state_dict(), folder / "model.pt")
    return folder


@pytest.fixture
def register(stack, stage_env, weights, monkeypatch):
    one_backend(stack)  # the subject is the worker, not the registry's store
    monkeypatch.setenv("CKPT_STAGE_ARCH_MODULES", ARCHS)

    def reg(arch: str, name: str | None = None, **kwargs):
        tags = {"ckpt_stage.arch": f"{ARCHS}:{arch}", "ckpt_stage.arch_kwargs": json.dumps(kwargs)}
        return devstack.register_folder(stack.bucket, name or f"wkfault-{uuid.uuid4().hex[:6]}", weights, tags)

    return reg


def _codes(out) -> list[str]:
    return [r.code.value for r in out.report.reasons]


def test_a_worker_killed_from_outside_is_worker_lost_and_eligible_again(register):
    ref = register("Small", seconds=60)
    settings = Settings.from_env()
    registry = Registry(settings)
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("out", validate_version(ref, settings=settings)))
    t.start()
    pid = None
    deadline = time.monotonic() + 120
    while pid is None and time.monotonic() < deadline and t.is_alive():
        pid = next((w["worker_pid"] for w in runner.active_workers() if w["worker_pid"]), None)
        time.sleep(0.05)
    assert pid, "the worker never started"
    time.sleep(0.3)  # inside the architecture's constructor
    os.kill(pid, signal.SIGKILL)  # an operator or the host, not the stage's limits
    t.join(60)
    assert not t.is_alive()
    out = got["out"]
    assert out.report.verdict is Verdict.ERROR and out.recorded, out.report.to_dict()
    assert _codes(out) == ["WORKER_LOST"] and "SIGKILL" in out.report.reasons[0].message
    state = registry.get(ref)
    assert state.status is Status.ERROR and state.reasons == ("WORKER_LOST",)
    assert state.needs_validation()  # never quarantined: the next sweep takes it again
    assert registry.alias_version(ref.name) is None

    registry.client.set_model_version_tag(ref.name, ref.version, "ckpt_stage.arch_kwargs", "{}")
    again = validate_version(ref, settings=settings)
    assert again.report.verdict is Verdict.PASS and again.report.attempt == 2


def test_a_killed_fork_server_is_restarted_for_the_next_version_of_the_sweep(register):
    name = f"wkfork-{uuid.uuid4().hex[:6]}"
    refs = [register("Small", name=name), register("Small", name=name)]
    settings = Settings.from_env()
    killed: list[int] = []

    def kill_the_fork_server(ref, outcome) -> None:
        if not killed:
            pids = runner.fork_server_pids()
            assert pids, "no fork server after the first version"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)

    outcomes = run_many(refs, settings=settings, registry=Registry(settings), on_result=kill_the_fork_server)
    assert killed
    assert [o.report.verdict for o in outcomes] == [Verdict.PASS, Verdict.PASS], [o.report.to_dict() for o in outcomes]
    assert not set(runner.fork_server_pids()) & set(killed)  # a new one served the second version


def test_a_model_that_kills_its_worker_every_time_is_quarantined_after_the_limit(register):
    ref = register("SelfKill")
    settings = Settings.from_env().replace(worker_lost_limit=2)
    registry = Registry(settings)
    first = validate_version(ref, settings=settings)
    assert first.report.verdict is Verdict.ERROR and _codes(first) == ["WORKER_LOST"]  # retried, as any loss
    assert registry.get(ref).needs_validation()
    second = validate_version(ref, settings=settings)
    assert second.report.verdict is Verdict.QUARANTINE, second.report.to_dict()
    assert _codes(second) == [ReasonCode.WORKER_CRASH.value]
    assert "2 attempts in a row" in second.report.reasons[0].message
    state = registry.get(ref)
    assert state.status is Status.QUARANTINED and state.reasons == ("WORKER_CRASH",)
    assert not state.needs_validation()  # not retried forever
