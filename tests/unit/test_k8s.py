"""Validation pod specs (ckpt_stage.k8s) against the Kubernetes provider's own client models, and the shipped
templates in infra/k8s kept in step with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ckpt_stage import k8s, orchestrate
from ckpt_stage.config import Settings, WorkerClass, parse_worker_classes

kubernetes = pytest.importorskip("kubernetes", reason="ckpt-stage[kubernetes] (in dev) carries the client")
from kubernetes.client import ApiClient, V1NetworkPolicy, V1Pod  # noqa: E402

INFRA = Path(__file__).resolve().parents[2] / "infra" / "k8s"
GiB = 2**30


def _roundtrip(manifest: dict, model: type) -> object:
    """Through the client's own (de)serialiser: a field the model does not know is dropped, so comparing the
    result with the input shows a misspelt or misplaced field."""
    obj = ApiClient()._ApiClient__deserialize(manifest, model.__name__)  # what PodGenerator does too
    assert isinstance(obj, model)
    assert ApiClient().sanitize_for_serialization(obj) == manifest
    return obj


def test_pod_is_sized_from_the_estimate_with_requests_equal_to_limits():
    wc = WorkerClass("large", 16 * GiB)
    pod = k8s.validation_pod(wc, image="img:1", estimated_bytes=6 * GiB, s3_bytes=5 * GiB)
    res = k8s.field_at(pod, "spec.containers[0].resources")
    assert res["requests"] == res["limits"]  # Guaranteed QoS
    assert k8s.parse_quantity(res["limits"]["memory"]) == 6 * GiB + k8s.RUNTIME_OVERHEAD_BYTES
    assert res["limits"]["cpu"] == "2"  # one per 4 GiB, rounded up
    assert k8s.parse_quantity(res["limits"]["ephemeral-storage"]) == 5 * GiB + k8s.SCRATCH_SLACK_BYTES
    assert pod["metadata"]["labels"][k8s.CLASS_LABEL] == "large"
    # Without an estimate: the class's whole budget.
    whole = k8s.pod_resources(wc)
    assert k8s.parse_quantity(whole["limits"]["memory"]) == 16 * GiB + k8s.RUNTIME_OVERHEAD_BYTES
    assert whole["limits"]["cpu"] == "4"
    # Rounded up to whole MiB, never down; CPU capped.
    odd = k8s.pod_resources(WorkerClass("xl", 200 * GiB), estimated_bytes=100 * GiB + 1)
    assert odd["limits"]["memory"] == f"{100 * 1024 + 1024 + 1}Mi"
    assert odd["limits"]["cpu"] == str(k8s.MAX_CPUS)


def test_a_version_above_its_class_gets_no_pod():
    with pytest.raises(ValueError, match="RESOURCE_LIMIT"):
        k8s.validation_pod(WorkerClass("small", GiB), image="img", estimated_bytes=GiB + 1)


def test_gpu_is_a_limit_with_a_toleration():
    pod = k8s.validation_pod(WorkerClass("gpu", 40 * GiB), image="img", gpus=1)
    res = k8s.field_at(pod, "spec.containers[0].resources")
    assert res["limits"][k8s.GPU_RESOURCE] == "1" and k8s.GPU_RESOURCE not in res["requests"]
    assert pod["spec"]["tolerations"][0]["key"] == k8s.GPU_RESOURCE
    assert k8s.GPU_RESOURCE not in k8s.pod_resources(WorkerClass("cpu", GiB))["limits"]
    with pytest.raises(ValueError):
        k8s.pod_resources(WorkerClass("gpu", GiB), gpus=-1)


def test_pod_security_fields_through_the_kubernetes_models():
    pod = k8s.validation_pod(WorkerClass("small", 4 * GiB), image="img:1", name="v-1", namespace="ml",
                             command=["ckpt-stage", "validate", "--model", "clf", "--version", "3", "--json"],
                             env={"CKPT_STAGE_WORKER_CLASSES": "small=4GiB"}, env_from_secret="ckpt-stage")
    v1 = _roundtrip(pod, V1Pod)
    assert isinstance(v1, V1Pod)
    assert v1.spec.automount_service_account_token is False
    assert v1.spec.security_context.run_as_non_root is True
    assert v1.spec.security_context.seccomp_profile.type == "RuntimeDefault"
    c = v1.spec.containers[0]
    assert c.name == "base"
    assert c.security_context.read_only_root_filesystem is True
    assert c.security_context.allow_privilege_escalation is False
    assert c.security_context.capabilities.drop == ["ALL"] and not c.security_context.capabilities.add
    assert c.env_from[0].secret_ref.name == "ckpt-stage"
    # Every path that must be writable is an emptyDir mount (the root filesystem is read-only).
    mounts = {m.mount_path for m in c.volume_mounts}
    env = {e.name: e.value for e in c.env}
    for var in ("CKPT_STAGE_CACHE_DIR", "HOME", "TMPDIR", "MPLCONFIGDIR"):
        assert any(env[var].startswith(m) for m in mounts), (var, env[var], mounts)
    assert all(v.empty_dir is not None for v in v1.spec.volumes)
    for path, value in k8s.POD_SECURITY:
        assert k8s.field_at(pod, path) == value, path


def test_to_v1_pod_is_the_providers_model_and_a_valid_pod_override():
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

    pod = k8s.validation_pod(WorkerClass("small", 4 * GiB), image="img:1")
    v1 = k8s.to_v1_pod(pod)
    assert isinstance(v1, V1Pod)
    assert PodGenerator.serialize_pod(v1) == pod
    # Merged over the shipped template as the KubernetesExecutor does with a task's pod_override.
    base = PodGenerator.deserialize_model_file(str(INFRA / "pod-template.yaml"))
    merged = PodGenerator.reconcile_pods(base, k8s.to_v1_pod(k8s.validation_pod(WorkerClass("large", 16 * GiB),
                                                                                image="img:1")))
    assert merged.spec.containers[0].resources.limits["memory"] == f"{16 * 1024 + 1024}Mi"
    assert merged.spec.automount_service_account_token is False
    assert merged.spec.containers[0].security_context.read_only_root_filesystem is True


def test_shipped_pod_template_matches_the_built_spec():
    docs = list(yaml.safe_load_all((INFRA / "pod-template.yaml").read_text()))
    # The executor reads the template with yaml.safe_load: exactly one document (a second one, e.g. the
    # NetworkPolicy, makes every task pod fail to build).
    assert len(docs) == 1
    template = docs[0]
    _roundtrip(template, V1Pod)
    small = Settings().worker_classes[0]
    built = k8s.validation_pod(small, image=template["spec"]["containers"][0]["image"])
    for path, value in k8s.POD_SECURITY:
        assert k8s.field_at(template, path) == value, f"infra/k8s/pod-template.yaml {path}"
    for path in ("spec.containers[0].resources", "spec.volumes", "spec.containers[0].volumeMounts",
                 "spec.enableServiceLinks", "spec.restartPolicy", "metadata.labels",
                 "spec.containers[0].securityContext", "spec.securityContext"):
        assert k8s.field_at(template, path) == k8s.field_at(built, path), f"infra/k8s/pod-template.yaml {path}"
    built_env = {e["name"]: e["value"] for e in built["spec"]["containers"][0]["env"]}
    assert {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]} == built_env


def test_network_policy_denies_by_default_and_allows_only_what_is_named():
    deny = k8s.network_policy(dns=False)
    v1 = _roundtrip(deny, V1NetworkPolicy)
    assert isinstance(v1, V1NetworkPolicy)
    assert v1.spec.policy_types == ["Ingress", "Egress"] and not v1.spec.egress and not v1.spec.ingress
    assert v1.spec.pod_selector.match_labels == {"app.kubernetes.io/name": k8s.APP_LABEL}

    allow = k8s.network_policy(allow_pods=[{"app": "mlflow"}, {"component": "api-server", "release": "airflow"}],
                               allow_cidrs=["0.0.0.0/0"])
    _roundtrip(allow, V1NetworkPolicy)
    blocks = [peer["ipBlock"] for rule in allow["spec"]["egress"] for peer in rule["to"] if "ipBlock" in peer]
    assert blocks == [{"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}]  # no instance metadata
    assert k8s.network_policy(allow_cidrs=["10.0.0.0/8"])["spec"]["egress"][1]["to"][0]["ipBlock"] == {
        "cidr": "10.0.0.0/8"}
    # The shipped policy is this function's output for the documented destinations.
    shipped = yaml.safe_load((INFRA / "network-policy.yaml").read_text())
    assert shipped == allow


def test_every_worker_class_gets_a_pod_for_its_budget():
    settings = Settings(worker_classes=parse_worker_classes("small=4GiB,large=16GiB,gpu=40GiB:gpu_pool:gpu"))
    for wc in settings.worker_classes:
        pod = k8s.validation_pod(wc, image="img")
        limit = k8s.parse_quantity(k8s.field_at(pod, "spec.containers[0].resources.limits.memory"))
        assert limit == wc.memory_bytes + k8s.RUNTIME_OVERHEAD_BYTES
    # Routing and pod sizing agree: the planned memory of a version fits the pod of the class it is routed to.
    need = orchestrate.planned_memory(5 * GiB)
    wc = orchestrate.route(need, settings)
    assert wc.name == "large"
    res = k8s.pod_resources(wc, need)
    assert k8s.parse_quantity(res["limits"]["memory"]) >= need + k8s.RUNTIME_OVERHEAD_BYTES


K8S_PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
bag = DagBag(sys.argv[1])
dag = bag.dags["ckpt_stage_validate"]
out = {"errors": {k: v[-2000:] for k, v in bag.import_errors.items()}, "tasks": {}}
for t in dag.tasks:
    override = (t.executor_config or {}).get("pod_override")
    out["tasks"][t.task_id] = PodGenerator.serialize_pod(override) if override is not None else None
print(json.dumps(out))
"""


def test_under_the_kubernetes_executor_each_class_task_carries_its_pod_override(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from ckpt_stage.dev import devstack

    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
           "AIRFLOW__CORE__DAGS_FOLDER": str(devstack.dags_folder()), "AIRFLOW__CORE__EXECUTOR": "KubernetesExecutor",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
           "CKPT_STAGE_WORKER_CLASSES": "small=2GiB,large=8GiB"}
    proc = subprocess.run([sys.executable, "-c", K8S_PROBE, str(devstack.dags_folder())], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    tasks = out["tasks"]
    assert tasks["discover"] is None and tasks["plan"] is None  # light tasks: the template as it is
    for name, budget in (("small", 2 * GiB), ("large", 8 * GiB)):
        pod = tasks[f"validate_{name}"]
        assert pod == k8s.validation_pod(WorkerClass(name, budget))
        limits = k8s.field_at(pod, "spec.containers[0].resources.limits")
        assert k8s.parse_quantity(limits["memory"]) == budget + k8s.RUNTIME_OVERHEAD_BYTES
        assert "image" not in pod["spec"]["containers"][0]  # the template's image stays
