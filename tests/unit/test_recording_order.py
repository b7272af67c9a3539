"""The verdict's writes go out concurrently where they are independent, and still in the contract's order
(docs/contract.md "What is recorded in MLflow"): the run and every other tag first, ``ckpt_stage.status``
last; on a pass the status before the alias moves; on a quarantine the alias leaves first. No version is
read twice by one recording. A fake MLflow client logs when each call starts and ends."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.domain import Decision, Finding, ReasonCode, Report, Verdict, VersionRef
from ckpt_stage.registry import LEASE_OWNER, LEASE_UNTIL, STATUS, Registry

REF = VersionRef("m", "3")


class _Page(list):
    token = None


class _Client:
    """MlflowClient's recording calls; every call takes a little while, so overlapping calls overlap."""

    def __init__(self, root, owner, *, alias=None, promoted=("1",)):
        self.root, self.owner, self.alias, self.promoted = root, owner, alias, list(promoted)
        self.tags = {LEASE_OWNER: owner, LEASE_UNTIL: "2999-01-01T00:00:00Z"}
        self.log, self.lock = [], threading.Lock()

    def _call(self, what, fn=lambda: None):
        start = time.monotonic()
        time.sleep(0.02)
        out = fn()
        with self.lock:
            self.log.append((what, start, time.monotonic()))
        return out

    def _mv(self, version, tags):
        return SimpleNamespace(name=REF.name, version=version, tags=dict(tags), source="", run_id=None,
                               creation_timestamp=0, aliases=[])

    def get_experiment_by_name(self, name):
        return self._call("experiment", lambda: SimpleNamespace(experiment_id="1"))

    def create_run(self, experiment_id, tags):
        uri = (self.root / "run-1").as_uri()
        (self.root / "run-1").mkdir(exist_ok=True)
        return self._call("create_run", lambda: SimpleNamespace(info=SimpleNamespace(run_id="run-1", artifact_uri=uri)))

    def search_runs(self, *a, **k):
        return self._call("search_runs", lambda: [])

    def log_batch(self, run_id, **k):
        self._call("log_batch")

    def set_terminated(self, run_id, status):
        self._call(f"run {status}")

    def set_model_version_tag(self, name, version, key, value):
        def write():
            self.tags[key] = value
        self._call(f"tag {key}={value}" if key == STATUS else f"tag {key}", write)

    def delete_model_version_tag(self, name, version, key):
        self._call(f"delete {key}", lambda: self.tags.pop(key, None))

    def get_model_version(self, name, version):
        return self._call("get_version", lambda: self._mv(version, self.tags))

    def search_model_versions(self, **k):
        def search():
            versions = [self._mv(v, {STATUS: "promoted"}) for v in self.promoted]
            if self.tags.get(STATUS) == "promoted":
                versions.append(self._mv(REF.version, self.tags))
            return _Page(versions)
        return self._call("search_versions", search)

    def get_model_version_by_alias(self, name, alias):
        if self.alias is None:
            return self._call("get_alias", lambda: (_ for _ in ()).throw(
                type("E", (Exception,), {"error_code": "RESOURCE_DOES_NOT_EXIST"})("not found")))
        return self._call("get_alias", lambda: self._mv(self.alias, {}))

    def set_registered_model_alias(self, name, alias, version):
        self._call(f"set_alias {version}")

    def delete_registered_model_alias(self, name, alias):
        self._call("delete_alias")


def _report(verdict):
    return Report(verdict=verdict, reasons=(), model=REF, files=(), runtime={}, recorded={}, timings_s={},
                  resources={}, attempt=1, summary=verdict.value)


def _when(log, what):
    return next((start, end) for name, start, end in log if name == what)


@pytest.mark.parametrize("verdict", [Verdict.PASS, Verdict.QUARANTINE])
def test_independent_tags_go_at_once_and_status_goes_last(tmp_path, verdict):
    client = _Client(tmp_path, "me", alias="1")
    reg = Registry(Settings(), client=client)
    reasons = () if verdict is Verdict.PASS else (Finding(ReasonCode.UNSAFE_PICKLE, "x", "y"),)
    reg.record(_report(verdict), Decision(verdict, reasons), digest="d", owner="me")
    log = client.log
    status = "promoted" if verdict is Verdict.PASS else "quarantined"
    status_start, status_end = _when(log, f"tag {STATUS}={status}")
    others = [(s, e) for name, s, e in log if name.startswith("tag ") and STATUS not in name]
    assert len(others) == 7
    assert max(e for _, e in others) <= status_start  # every other tag landed before the status
    assert min(e for _, e in others) > max(s for s, _ in others)  # ...and they were in flight at once
    assert _when(log, "run FINISHED")[1] <= min(s for s, _ in others)  # the run is complete first
    if verdict is Verdict.PASS:
        assert _when(log, "set_alias 3")[0] >= status_end  # promoted before the alias moves
    else:
        assert _when(log, "get_alias")[1] <= status_start  # the alias was settled before the status
        assert not any(name.startswith("set_alias") for name, *_ in log)  # it stays on version 1
    assert [name for name, *_ in log].count("get_version") == (0 if verdict is Verdict.PASS else 1)
    assert LEASE_OWNER not in client.tags and LEASE_UNTIL not in client.tags
    assert reg.report_of("run-1")["verdict"] == verdict.value  # kept from the writing: no read back


def test_a_rivals_lease_is_left_alone(tmp_path):
    """The lease owner is checked after the last write (on a pass, from the search the alias move makes
    anyway): a lease another worker took over stays."""
    client = _Client(tmp_path, "rival")
    reg = Registry(Settings(), client=client)
    reg.record(_report(Verdict.PASS), Decision(Verdict.PASS, ()), digest="d", owner="me")
    assert client.tags[LEASE_OWNER] == "rival"
    assert not any(name.startswith("delete") for name, *_ in client.log)


def test_a_failed_tag_write_keeps_the_status_unwritten(tmp_path):
    """One of the concurrent tag writes fails: the others run to their end, the failure is raised, and the
    status is never written (the version stays eligible; its lease runs out)."""
    from ckpt_stage.errors import RegistryUnavailable
    from ckpt_stage.registry import RUN_ID

    class Failing(_Client):
        def set_model_version_tag(self, name, version, key, value):
            if key == RUN_ID:
                self._call("tag failed")
                raise ConnectionError("MLflow went away")
            super().set_model_version_tag(name, version, key, value)

    client = Failing(tmp_path, "me")
    with pytest.raises(RegistryUnavailable):
        Registry(Settings(), client=client).record(_report(Verdict.PASS), Decision(Verdict.PASS, ()), digest="d",
                                                   owner="me")
    assert STATUS not in client.tags and client.tags[LEASE_OWNER] == "me"
    assert len([n for n, *_ in client.log if n.startswith("tag ")]) == 7  # six landed, one failed
