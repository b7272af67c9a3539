"""A sweep validates several versions at once (``CKPT_STAGE_SWEEP_CONCURRENCY``), in threads that
share the clients and the one fork server; outcomes keep the order of the work list."""

from __future__ import annotations

import threading
import time

import pytest

from ckpt_stage import pipeline
from ckpt_stage.config import Settings
from ckpt_stage.domain import VersionRef


@pytest.mark.parametrize("concurrency", [1, 3])
def test_run_many_keeps_order_and_bounds_concurrency(monkeypatch, concurrency):
    lock = threading.Lock()
    active, peak, seen = [0], [0], []

    def fake(ref, *, settings, batch, **kwargs):
        assert batch is True and kwargs == {"owner": "me"}
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05 if int(ref.version) % 2 else 0.01)  # finish out of order
        with lock:
            active[0] -= 1
        return pipeline.Outcome(None, skipped=ref.version)

    monkeypatch.setattr(pipeline, "validate_version_safely", fake)
    refs = [VersionRef("m", str(i)) for i in range(1, 10)]
    outcomes = pipeline.run_many(refs, settings=Settings(sweep_concurrency=concurrency), owner="me",
                                 on_result=lambda ref, o: seen.append(ref.version))
    assert [o.skipped for o in outcomes] == [r.version for r in refs]
    assert sorted(seen, key=int) == [r.version for r in refs]
    assert peak[0] == concurrency


def test_sweep_concurrency_setting(monkeypatch):
    monkeypatch.setenv("CKPT_STAGE_SWEEP_CONCURRENCY", "7")
    assert Settings.from_env().sweep_concurrency == 7
    monkeypatch.setenv("CKPT_STAGE_SWEEP_CONCURRENCY", "0")
    assert Settings.from_env().sweep_concurrency == 1


class _ArtifactClient:
    """Just the MLflow client call ``report_of`` makes (the run, for its artifact location), counted;
    the reports lie in a local artifact store."""

    def __init__(self, root, reports):
        import json

        self.root, self.reads = root, 0
        for run_id, report in reports.items():
            (root / run_id).mkdir()
            (root / run_id / "report.json").write_text(json.dumps(report))

    def get_run(self, run_id):
        from types import SimpleNamespace

        self.reads += 1
        return SimpleNamespace(info=SimpleNamespace(artifact_uri=(self.root / run_id).as_uri()))


def test_report_of_reads_each_run_once(tmp_path):
    """An attempt's report.json never changes once written: a sweep reads the promoted version's
    report (for drift) once, not once per validated version; a missing one is asked for again."""
    from ckpt_stage.registry import Registry

    client = _ArtifactClient(tmp_path, {"r1": {"verdict": "pass", "model_info": {"layers": [1]}}})
    reg = Registry(Settings(), client=client)
    first = reg.report_of("r1")
    first["verdict"] = "changed by a caller"
    assert reg.report_of("r1") == {"verdict": "pass", "model_info": {"layers": [1]}}
    assert client.reads == 1
    assert reg.report_of("missing") is None and reg.report_of("missing") is None
    assert client.reads == 3


def test_a_report_this_adapter_wrote_is_not_read_back(tmp_path):
    """The next version of a model in a sweep compares against the report the previous verdict wrote:
    kept from the writing, no request."""
    from ckpt_stage.registry import Registry

    client = _ArtifactClient(tmp_path, {})
    reg = Registry(Settings(), client=client)
    reg._remember_report("r2", {"verdict": "pass"})
    assert reg.report_of("r2") == {"verdict": "pass"} and client.reads == 0


def test_prompt_check_once_per_model_name():
    """MLflow's client reads the registered model before each tag write; the registry's client does
    it once per model name (a prompt is still refused: the first check of each name is MLflow's)."""
    from ckpt_stage.registry import _prompt_check_once

    calls = []

    class Client:  # the one method of MlflowClient this wraps
        def _raise_if_prompt(self, name):
            calls.append(name)
            if name == "a-prompt":
                raise ValueError("not a model")

    client = _prompt_check_once(Client())
    for name in ("m", "m", "n", "m"):
        client._raise_if_prompt(name)
    assert calls == ["m", "n"]
    for _ in range(2):
        with pytest.raises(ValueError):
            client._raise_if_prompt("a-prompt")
    assert calls == ["m", "n", "a-prompt", "a-prompt"]


def test_an_idle_reconcile_syncs_only_models_whose_alias_is_wrong():
    """MLflow's version search carries no aliases; the sweep's repair reads every model's alias from one
    listing of the registered models and syncs only a model whose alias is not on its highest promoted
    version (an idle sweep costs its listings, not two requests per model)."""
    from types import SimpleNamespace

    from ckpt_stage.registry import STATUS, Registry, VersionState

    class Page(list):
        token = None

    class Client:
        def __init__(self):
            self.calls = []

        def search_registered_models(self, **k):
            self.calls.append("models")
            return Page([SimpleNamespace(name="ok", aliases={"validated": "2", "champion": "1"}),
                         SimpleNamespace(name="wrong", aliases={"validated": "1"})])

        def search_model_versions(self, filter_string=None, **k):
            self.calls.append(f"versions {filter_string}")
            return Page([SimpleNamespace(name="wrong", version=v, tags={STATUS: "promoted"}, source="", run_id=None,
                                         creation_timestamp=0, aliases=[]) for v in ("1", "2")])

        def get_model_version_by_alias(self, name, alias):
            self.calls.append(f"alias {name}")
            return SimpleNamespace(name=name, version="1", tags={}, source="", run_id=None, creation_timestamp=0,
                                   aliases=[alias])

        def set_registered_model_alias(self, name, alias, version):
            self.calls.append(f"set {name} {version}")

    from ckpt_stage.domain import VersionRef

    listing = [VersionState(VersionRef(m, v), tags={STATUS: "promoted"}) for m in ("ok", "wrong") for v in ("1", "2")]
    client = Client()
    assert Registry(Settings(), client=client).reconcile(listing) == {"wrong": "2"}
    assert client.calls[0] == "models" and "set wrong 2" in client.calls
    assert not any("ok" in c for c in client.calls)
