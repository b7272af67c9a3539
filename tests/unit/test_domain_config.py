"""Report schema, error pickling and settings parsing."""

from __future__ import annotations

import json
import pickle

import pytest

from ckpt_stage.config import Settings, parse_arch_kwargs, parse_size, parse_worker_classes
from ckpt_stage.domain import (
    REPORT_SCHEMA,
    FileFormat,
    FileInfo,
    Finding,
    ReasonCode,
    Report,
    Verdict,
    VersionRef,
)
from ckpt_stage.errors import ConfigError, StorageUnavailable, TransientError
from ckpt_stage.storage import version_digest

REQUIRED = {"schema", "verdict", "reasons", "model", "files", "runtime", "recorded", "timings_s", "resources",
            "attempt"}


def _report(**kw):
    base = dict(
        verdict=Verdict.QUARANTINE,
        reasons=(Finding(ReasonCode.SHAPE_MISMATCH, "fc.weight: [3, 4] vs [2, 4]", "retrain", file="model.pt"),),
        model=VersionRef("clf", "3"),
        files=(FileInfo("model.pt", 10, "ab" * 32, FileFormat.TORCH_ZIP),),
        runtime={"python": "3.11.7", "torch": "2.13.0", "mlflow": "3.17.2"},
        recorded={"torch": "2.13.0"},
        timings_s={"download": 0.5, "load": 0.25},
        resources={"peak_anon_bytes": 123},
        attempt=2,
    )
    base.update(kw)
    return Report(**base)


def test_report_has_the_contract_fields_and_types():
    doc = json.loads(json.dumps(_report().to_dict()))
    assert set(doc) >= REQUIRED
    assert doc["schema"] == REPORT_SCHEMA
    assert doc["verdict"] == "quarantine"
    assert doc["reasons"][0] == {"code": "SHAPE_MISMATCH", "message": "fc.weight: [3, 4] vs [2, 4]", "hint": "retrain",
                                 "file": "model.pt", "severity": "error"}
    assert doc["model"] == {"name": "clf", "version": "3"}
    assert doc["files"] == [{"path": "model.pt", "format": "torch-zip", "size": 10, "sha256": "ab" * 32}]
    assert set(doc["timings_s"]) >= {"download", "scan", "load", "inference", "total"}
    assert set(doc["resources"]) >= {"peak_anon_bytes", "estimated_bytes", "limit_bytes"}
    assert doc["attempt"] == 2


def test_inspect_report_has_null_model():
    assert _report(model=None).to_dict()["model"] is None


def test_format_values_are_the_contract_ones():
    assert {f.value for f in FileFormat} == {"torch-zip", "torch-legacy", "safetensors", "torch-export",
                                             "torchscript", "pickle", "mlflow-model", "unknown"}


def test_verdict_exit_codes():
    assert [Verdict.PASS.exit_code, Verdict.QUARANTINE.exit_code, Verdict.ERROR.exit_code] == [0, 1, 3]


def test_errors_survive_pickling():
    err = StorageUnavailable("s3 down", hint="wait", file="x.pt")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, TransientError)
    assert (back.message, back.hint, back.fields, back.code) == ("s3 down", "wait", {"file": "x.pt"},
                                                                 ReasonCode.STORAGE_UNAVAILABLE)


def test_version_digest_is_order_independent_and_matches_the_contract():
    import hashlib

    a = version_digest([("b.pt", "22"), ("a/MLmodel", "11")])
    assert a == version_digest([("a/MLmodel", "11"), ("b.pt", "22")])
    assert a == hashlib.sha256(b"a/MLmodel\t11\nb.pt\t22\n").hexdigest()


@pytest.mark.parametrize(("text", "value"), [("512MiB", 512 * 2**20), ("8GiB", 8 * 2**30), ("1000", 1000),
                                             ("1.5G", 1_500_000_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_worker_classes_sorted_with_pools():
    classes = parse_worker_classes("large=16GiB,small=2GiB:tiny_pool:q1")
    assert [c.name for c in classes] == ["small", "large"]
    assert (classes[0].pool, classes[0].queue) == ("tiny_pool", "q1")
    assert (classes[1].pool, classes[1].queue) == ("ckpt_stage_large", "ckpt-large")


def test_default_worker_classes_have_celery_queues_per_class():
    s = Settings()
    assert [(c.name, c.pool, c.queue) for c in s.worker_classes] == [
        ("small", "ckpt_stage_small", "ckpt-small"), ("large", "ckpt_stage_large", "ckpt-large")]
    # The same defaults whether a class comes from code or from CKPT_STAGE_WORKER_CLASSES.
    assert Settings.from_env({"CKPT_STAGE_WORKER_CLASSES": "small=4GiB,large=16GiB"}).worker_classes == s.worker_classes
    # A pool given, the queue left to its default.
    assert parse_worker_classes("gpu=40GiB:gpu_pool")[0].queue == "ckpt-gpu"


@pytest.mark.parametrize(("text", "match"), [
    ("small=1GiB,small=2GiB", "class small is given twice"),
    ("small=1GiB:pool:q:extra", "more than NAME=SIZE:POOL:QUEUE"),
    ("small=1GiB:pool:bad queue", "queue 'bad queue'"),
    ("sm/all=1GiB", "class name 'sm/all'"),
    ("small=lots", "cannot read 'lots' as a size"),
    (" , ", "is empty"),
])
def test_worker_classes_errors_name_the_variable_and_the_problem(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_worker_classes(text)
    assert "WORKER_CLASSES" in str(info.value)


def test_settings_from_env_and_errors_name_the_variable():
    s = Settings.from_env({"CKPT_STAGE_ARCH_MODULES": "acme.models, other", "CKPT_STAGE_ALLOW_PICKLED_MODELS": "false",
                           "CKPT_STAGE_WORKER_CLASSES": "s=1GiB"})
    assert s.arch_modules == ("torch.nn", "acme.models", "other")
    assert s.allow_pickled_models is False
    assert s.class_for(2**30).name == "s" and s.class_for(2**30 + 1) is None
    with pytest.raises(ConfigError, match="CKPT_STAGE_ALLOW_PICKLED_MODELS"):
        Settings.from_env({"CKPT_STAGE_ALLOW_PICKLED_MODELS": "maybe"})
    with pytest.raises(ConfigError, match="CKPT_STAGE_WORKER_TIMEOUT_S"):
        Settings.from_env({"CKPT_STAGE_WORKER_TIMEOUT_S": "soon"})


def test_arch_kwargs_must_be_a_json_object():
    assert parse_arch_kwargs('{"a": 1}', source="tag") == {"a": 1}
    assert parse_arch_kwargs("", source="tag") == {}
    with pytest.raises(ConfigError, match="tag: must be a JSON object"):
        parse_arch_kwargs("[1]", source="tag")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_arch_kwargs("{", source="tag")
