"""infra/ checked without a Docker engine or a cluster: compose.yaml against the Compose Specification's
JSON schema (vendored in tests/data/compose-spec), and every service, queue, pool and environment variable
the infra files name against the code, and the other way round (config.Settings is the source of
``CKPT_STAGE_*`` names)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ckpt_stage import orchestrate
from ckpt_stage.config import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SCHEMA = ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json"
ENV_RE = re.compile(r"\b" + PREFIX + r"[A-Z0-9_]+\b")
# Mentions in prose of a group of variables, e.g. "CKPT_STAGE_AIRFLOW_URL, _TOKEN": only whole names count.


def _compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft201909Validator)
    cls.check_schema(schema)
    return cls(schema)


def _errors(doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(doc)]


def settings_env_names() -> dict[str, str]:
    """``CKPT_STAGE_<FIELD>`` → field, for every Settings field, each checked to be read by ``from_env``."""
    samples = {bool: None, float: "7", int: "7", str: "x-sample"}
    defaults = Settings()
    out = {}
    for f in dataclasses.fields(Settings):
        name = PREFIX + f.name.upper()
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            raw = "false" if default else "true"
        elif f.name == "worker_classes":
            raw = "zz=1GiB"
        elif f.name == "other_flavors":
            raw = "skip"
        elif isinstance(default, tuple):
            raw = "sample.module"
        elif isinstance(default, Path):
            raw = "/tmp/sample-dir"
        else:
            raw = samples[type(default)]
        assert getattr(Settings.from_env({name: raw}), f.name) != default, f"{name} is not read by Settings.from_env"
        out[name] = f.name
    return out


def _infra_texts() -> dict[str, str]:
    files = [INFRA / "compose.yaml", INFRA / "helm" / "values.yaml", INFRA / "README.md",
             *sorted((INFRA / "k8s").glob("*.yaml")), *sorted((INFRA / "compose").glob("*"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def _compose_settings(service: str = "airflow-worker-small") -> Settings:
    env = _compose()["services"][service]["environment"]
    return Settings.from_env({k: str(v) for k, v in env.items()})


def _worker_queues(doc: dict[str, Any]) -> dict[str, list[str]]:
    out = {}
    for name, svc in doc["services"].items():
        cmd = svc.get("command") or []
        cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        if cmd[:2] == ["celery", "worker"]:
            out[name] = cmd[cmd.index("--queues") + 1].split(",")
    return out


# -- the Compose specification ----------------------------------------------------------------------------
def test_compose_file_follows_the_compose_specification():
    assert _errors(_compose()) == []


@pytest.mark.parametrize("break_it", [
    lambda d: d["services"]["redis"].update(healthchek={"test": ["CMD", "true"]}),      # misspelt key
    lambda d: d["services"]["postgres"]["healthcheck"].update(retries="many"),          # wrong type
    lambda d: d["services"]["mlflow"]["depends_on"]["postgres"].update(condition="up"),  # unknown enum
    lambda d: d.update(service={}),                                                     # unknown top level
])
def test_the_schema_check_catches_a_broken_compose_file(break_it):
    doc = copy.deepcopy(_compose())
    break_it(doc)
    assert _errors(doc), "the schema accepted a broken file"


def test_every_service_is_health_checked_or_a_job_others_wait_for():
    services = _compose()["services"]
    waited_for = {dep: cond["condition"] for svc in services.values()
                  for dep, cond in (svc.get("depends_on") or {}).items()}
    assert set(waited_for) <= set(services), "depends_on names a service that does not exist"
    for name, svc in services.items():
        if svc.get("restart") == "no":  # a one-shot job
            assert svc["healthcheck"] == {"disable": True}, name
            assert name == "webhook-register" or waited_for.get(name) == "service_completed_successfully", name
        else:
            assert svc["healthcheck"]["test"], f"{name} has no health check"
            assert not svc["healthcheck"].get("disable"), name
    # Whatever waits for a long-running service waits for it to be healthy, not merely started.
    for svc in services.values():
        for dep, cond in (svc.get("depends_on") or {}).items():
            if services[dep].get("restart") != "no":
                assert cond["condition"] == "service_healthy", dep


def test_hosts_the_services_call_are_services_of_the_file():
    doc = _compose()
    text = (INFRA / "compose.yaml").read_text()
    hosts = set(re.findall(r"(?:https?|redis|postgresql\+psycopg2|db\+postgresql\+psycopg2)://(?:[^@/\s]+@)?"
                           r"([a-z][a-z0-9-]*)(?::\d+)?", text))
    assert hosts - {"localhost"} <= set(doc["services"]), hosts - set(doc["services"])
    assert {"mlflow", "minio", "redis", "postgres", "airflow-apiserver"} <= hosts


def test_compose_has_every_airflow_component_and_the_stack_the_issue_names():
    services = _compose()["services"]
    commands = {name: svc.get("command") for name, svc in services.items()}
    for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
        assert any(isinstance(c, list) and c and c[0] == component for c in commands.values()), component
    assert {"postgres", "redis", "minio", "minio-init", "mlflow", "airflow-init", "webhook-register"} <= set(services)
    mlflow = services["mlflow"]
    args = " ".join(mlflow["command"])
    assert "--backend-store-uri=postgresql+psycopg2://" in args and "--default-artifact-root=s3://mlflow/" in args
    assert "--no-serve-artifacts" in args
    assert mlflow["environment"]["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"].startswith("${")  # fixed, from .env
    assert "mc mb --ignore-existing local/mlflow" in services["minio-init"]["command"][0]
    assert services["webhook-register"]["command"][:2] == ["webhook", "register"]
    init = services["airflow-init"]["command"][0]
    assert "airflow db migrate" in init and "airflow pools import /opt/ckpt-stage/infra/airflow/pools.json" in init


# -- queues and pools -------------------------------------------------------------------------------------
def test_each_worker_class_has_a_celery_worker_on_its_queue_and_no_worker_listens_elsewhere():
    doc = _compose()
    settings = _compose_settings()
    queues = _worker_queues(doc)
    assert sorted(q for qs in queues.values() for q in qs) == sorted(wc.queue for wc in settings.worker_classes)
    assert {wc.queue for wc in settings.worker_classes} == {"ckpt-small", "ckpt-large"}
    env = doc["services"]["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == orchestrate.control_queue(settings)
    # The same classes (so queues and pools) in every component, and on Kubernetes.
    classes = {n: s["environment"].get(PREFIX + "WORKER_CLASSES") for n, s in doc["services"].items()
               if "environment" in s and PREFIX + "WORKER_CLASSES" in s["environment"]}
    helm = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    helm_env = {e["name"]: e.get("value") for e in helm["env"]}
    assert set(classes.values()) == {helm_env[PREFIX + "WORKER_CLASSES"]}
    # Worker memory: each worker container holds its pool's slots x the class budget.
    pools = orchestrate.pool_definitions(settings)
    for name, (q,) in queues.items():
        wc = next(c for c in settings.worker_classes if c.queue == q)
        limit = doc["services"][name]["mem_limit"]
        assert int(limit.rstrip("g")) * 2**30 >= pools[wc.pool]["slots"] * wc.memory_bytes, name
        assert doc["services"][name]["command"][doc["services"][name]["command"].index("--concurrency") + 1] == str(
            pools[wc.pool]["slots"]), name


def test_shipped_pools_are_the_pools_of_the_worker_classes():
    shipped = json.loads((INFRA / "airflow" / "pools.json").read_text())
    for settings in (Settings(), _compose_settings()):
        expected = orchestrate.pool_definitions(settings)
        assert {k: v["slots"] for k, v in shipped.items()} == {k: v["slots"] for k, v in expected.items()}
    assert all(v["include_deferred"] is False for v in shipped.values())


def test_queue_and_pool_names_in_the_docs_exist_in_the_code():
    settings = Settings()
    queues = {wc.queue for wc in settings.worker_classes}
    pools = {wc.pool for wc in settings.worker_classes}
    for path, text in _infra_texts().items():
        for q in set(re.findall(r"--queues[ =]+`?([A-Za-z0-9_.,-]+)", text)):
            assert set(q.split(",")) <= queues, f"{path} names queue {q}"
        for p in set(re.findall(r"\bckpt_stage_[a-z0-9_]+\b", text)):
            assert p in pools or p in {"ckpt_stage_validate", "ckpt_stage_rerun"}, f"{path} names pool {p}"
    readme = (INFRA / "README.md").read_text()
    assert queues <= set(re.findall(r"ckpt-[a-z0-9-]+", readme)), "infra/README.md must name every queue"
    assert pools <= set(re.findall(r"ckpt_stage_[a-z0-9_]+", readme)), "infra/README.md must name every pool"


# -- environment variables --------------------------------------------------------------------------------
def test_every_stage_variable_the_infra_files_name_is_a_setting_and_every_setting_is_documented():
    known = settings_env_names()
    for path, text in _infra_texts().items():
        named = set(ENV_RE.findall(text))
        assert named <= set(known), f"{path} names {sorted(named - set(known))}, which Settings does not read"
    readme = (INFRA / "README.md").read_text()
    assert set(known) <= set(ENV_RE.findall(readme)), (
        f"infra/README.md does not mention {sorted(set(known) - set(ENV_RE.findall(readme)))}")


def test_settings_env_names_are_read_by_from_env():
    names = settings_env_names()
    assert names[PREFIX + "WORKER_CLASSES"] == "worker_classes"
    assert len(names) == len(dataclasses.fields(Settings))


def test_helm_values_use_the_kubernetes_executor_and_the_shipped_pod_template():
    helm = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    assert helm["executor"] == "KubernetesExecutor"
    assert helm["podTemplate"] is None  # given with --set-file podTemplate=infra/k8s/pod-template.yaml
    text = (INFRA / "helm" / "values.yaml").read_text() + (INFRA / "README.md").read_text()
    assert "--set-file podTemplate=infra/k8s/pod-template.yaml" in text
    # Credentials come from a Secret, never as plain values.
    plain = {e["name"] for e in helm["env"]}
    assert not plain & {PREFIX + "WEBHOOK_SECRET", PREFIX + "AIRFLOW_TOKEN", PREFIX + "AIRFLOW_PASSWORD",
                        PREFIX + "DASHBOARD_TOKEN"}
    assert {s["envName"] for s in helm["secret"]} >= {PREFIX + "WEBHOOK_SECRET"}
