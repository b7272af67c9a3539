"""Kubernetes manifests for validation pods: the load as a pod of its own, sized from the estimate.

Under the KubernetesExecutor (a task's ``pod_override``) or a KubernetesPodOperator, one validation runs in
one pod. The pod's cgroup is then the memory limit of the load: inside an unprivileged pod the stage's own
measures (cgroup, network/PID namespaces, dropping to another uid) are off, and the report's ``isolation``
field says so. What the pod gives instead:

* memory and CPU requests equal to the limits (Guaranteed QoS: the pod is the last to be evicted), sized
  from the version's planned memory (``orchestrate.planned_memory``) or its worker class's budget, plus the
  stage's own process (interpreter, torch, the fork server);
* no service-account token (``automountServiceAccountToken: false``): code that escapes the loader finds
  no credentials for the Kubernetes API;
* ``runAsNonRoot``, a read-only root filesystem (writable: an ``emptyDir`` for the download cache and a
  small one for ``/tmp``), seccomp ``RuntimeDefault``, every capability dropped, no privilege escalation;
* a NetworkPolicy (``network_policy``) that denies all ingress and all egress except DNS and the
  destinations named (MLflow, S3 and, under the KubernetesExecutor, Airflow's API server).

The functions return plain dicts in the Kubernetes API's JSON shape (camelCase), the same shape as
``infra/k8s/*.yaml``; ``to_v1_pod`` turns one into the provider's ``kubernetes.client.V1Pod`` for
``executor_config={"pod_override": ...}`` or ``KubernetesPodOperator(full_pod_spec=...)``.
Nothing here imports Airflow or kubernetes at module level.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ckpt_stage.config import WorkerClass

#: Memory of the stage's own processes in the pod beyond the load's budget: the task's interpreter with
#: torch and MLflow imported, and the import-only fork server the loader is forked from.
RUNTIME_OVERHEAD_BYTES = 1 * 2**30
#: One CPU per this much planned memory (at least 1, at most MAX_CPUS): deserialising and the finiteness
#: checks scale with the tensor bytes; torch's intra-op threads use what the limit grants.
BYTES_PER_CPU = 4 * 2**30
MAX_CPUS = 8
#: Scratch space for the downloaded files beyond their size (MLflow metadata, the report).
SCRATCH_SLACK_BYTES = 1 * 2**30
TMP_BYTES = 256 * 2**20
#: The Airflow image's user (apache/airflow runs as uid 50000, group 0).
RUN_AS_USER = 50000
RUN_AS_GROUP = 0
GPU_RESOURCE = "nvidia.com/gpu"
APP_LABEL = "ckpt-stage"
CLASS_LABEL = "ckpt-stage/worker-class"
CONTAINER = "base"  # the KubernetesExecutor's container name: pod_override merges into it by this name
SCRATCH = "/scratch"

#: The security fields every validation pod has, as (path, value) pairs; infra/k8s/pod-template.yaml is
#: checked against these (tests/unit/test_k8s.py).
POD_SECURITY: tuple[tuple[str, Any], ...] = (
    ("spec.automountServiceAccountToken", False),
    ("spec.securityContext.runAsNonRoot", True),
    ("spec.securityContext.runAsUser", RUN_AS_USER),
    ("spec.securityContext.seccompProfile.type", "RuntimeDefault"),
    ("spec.containers[0].securityContext.readOnlyRootFilesystem", True),
    ("spec.containers[0].securityContext.allowPrivilegeEscalation", False),
    ("spec.containers[0].securityContext.runAsNonRoot", True),
    ("spec.containers[0].securityContext.capabilities.drop", ["ALL"]),
    ("spec.containers[0].securityContext.seccompProfile.type", "RuntimeDefault"),
)


def _mib_ceil(n: int) -> int:
    return int(math.ceil(n / 2**20))


def quantity(n_bytes: int) -> str:
    """Bytes → a Kubernetes quantity in whole MiB (``"1088Mi"``), rounded up."""
    return f"{_mib_ceil(n_bytes)}Mi"


def parse_quantity(text: str) -> int:
    """A Kubernetes memory quantity (``5Gi``, ``512Mi``, ``1G``, ``1000``) → bytes (for the tests and checks)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTE]i?|[kmgte])?", str(text).strip())
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    units = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "E": 10**18,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Ei": 2**60}
    return int(float(m.group(1)) * units[m.group(2) or ""])


def load_budget(worker_class: WorkerClass, estimated_bytes: int | None = None) -> int:
    """The memory the load gets: the planned estimate when known, else the class's whole budget.

    A version above its class's budget is routed to a larger class, or refused with RESOURCE_LIMIT before
    any pod is made; a pod for it is a bug in the caller.
    """
    if estimated_bytes is None:
        return worker_class.memory_bytes
    if estimated_bytes > worker_class.memory_bytes:
        raise ValueError(f"a version needing {estimated_bytes} bytes does not fit worker class "
                         f"{worker_class.name!r} ({worker_class.memory_bytes} bytes): route it with "
                         "Settings.class_for first; above the largest class it is RESOURCE_LIMIT, not a pod")
    return max(1, int(estimated_bytes))


def pod_resources(worker_class: WorkerClass, estimated_bytes: int | None = None, *, gpus: int = 0,
                  s3_bytes: int | None = None) -> dict[str, dict[str, str]]:
    """``resources`` of the validation container: requests == limits, from the estimate or the class."""
    budget = load_budget(worker_class, estimated_bytes)
    memory = quantity(budget + RUNTIME_OVERHEAD_BYTES)
    cpus = str(min(MAX_CPUS, max(1, math.ceil(budget / BYTES_PER_CPU))))
    scratch = quantity((s3_bytes if s3_bytes is not None else budget) + SCRATCH_SLACK_BYTES)
    res = {"cpu": cpus, "memory": memory, "ephemeral-storage": scratch}
    if gpus < 0:
        raise ValueError(f"gpus must not be negative, got {gpus}")
    if gpus:
        # Extended resources are limits only (the request defaults to the limit and may not differ).
        return {"requests": dict(res), "limits": {**res, GPU_RESOURCE: str(gpus)}}
    return {"requests": dict(res), "limits": dict(res)}


def validation_pod(worker_class: WorkerClass, *, image: str | None = None, estimated_bytes: int | None = None,
                   s3_bytes: int | None = None, gpus: int = 0, name: str | None = None,
                   namespace: str | None = None, command: Sequence[str] | None = None,
                   env: Mapping[str, str] | None = None, env_from_secret: str | None = None,
                   labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A validation pod as a Kubernetes API dict (see the module's docstring for what it enforces).

    ``command``: for a KubernetesPodOperator, e.g. ``["ckpt-stage", "validate", "--model", M, "--version",
    V, "--json"]``; under the KubernetesExecutor leave it None (the executor supplies the task command).
    ``env_from_secret``: a Secret whose keys become the container's environment (MLflow/S3 credentials,
    ``CKPT_STAGE_*``); ``env``: plain values (never credentials: they show in the pod spec).
    ``image``: None for a ``pod_override``, which keeps the pod template's image.
    """
    resources = pod_resources(worker_class, estimated_bytes, gpus=gpus, s3_bytes=s3_bytes)
    scratch_limit = resources["limits"]["ephemeral-storage"]
    container_env = [
        {"name": "CKPT_STAGE_CACHE_DIR", "value": f"{SCRATCH}/cache"},
        # The root filesystem is read-only: everything that writes goes to the emptyDirs.
        {"name": "HOME", "value": f"{SCRATCH}/home"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
    ]
    container_env += [{"name": k, "value": str(v)} for k, v in sorted((env or {}).items())]
    container: dict[str, Any] = {
        "name": CONTAINER,
        **({"image": image, "imagePullPolicy": "IfNotPresent"} if image else {}),
        "env": container_env,
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    if command:
        container["command"] = list(command)
    if env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": env_from_secret}}]
    metadata: dict[str, Any] = {
        "labels": {"app.kubernetes.io/name": APP_LABEL, CLASS_LABEL: worker_class.name, **dict(labels or {})},
    }
    if name:
        metadata["name"] = name
    if namespace:
        metadata["namespace"] = namespace
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # no other services' addresses in the environment
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_GROUP,
            "fsGroup": RUN_AS_GROUP,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "scratch", "emptyDir": {"sizeLimit": scratch_limit}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": quantity(TMP_BYTES)}},
        ],
    }
    if gpus:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def network_policy(*, name: str = "ckpt-stage-validation-egress", namespace: str | None = None,
                   allow_pods: Sequence[Mapping[str, str]] = (), allow_cidrs: Sequence[str] = (),
                   allow_ports: Sequence[int] = (443,), dns: bool = True) -> dict[str, Any]:
    """Deny every ingress and egress of validation pods except DNS and the destinations named.

    ``allow_pods``: label selectors of in-cluster destinations (the MLflow server; Airflow's API server
    for the KubernetesExecutor's execution API). ``allow_cidrs`` + ``allow_ports``: S3 (e.g. the VPC
    endpoint's prefix list or MinIO's address). Nothing given: egress denied except DNS.
    Instance metadata (169.254.169.254) is never reachable through a CIDR rule: it is excepted.
    """
    egress: list[dict[str, Any]] = []
    if dns:
        egress.append({"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                       "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]})
    for selector in allow_pods:
        egress.append({"to": [{"podSelector": {"matchLabels": dict(selector)}}]})
    if allow_cidrs:
        egress.append({"to": [{"ipBlock": {"cidr": c, **({"except": ["169.254.169.254/32"]}
                                                         if _contains_metadata(c) else {})}} for c in allow_cidrs],
                       "ports": [{"port": int(p), "protocol": "TCP"} for p in allow_ports]})
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": APP_LABEL}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }


def _contains_metadata(cidr: str) -> bool:
    import ipaddress

    net = ipaddress.ip_network(cidr, strict=False)
    return net.version == 4 and ipaddress.ip_address("169.254.169.254") in net


def pod_override(worker_class: WorkerClass) -> Any:
    """``executor_config={"pod_override": ...}`` of a class's validate task under the KubernetesExecutor:
    the class's memory and CPU over the pod template (infra/k8s/pod-template.yaml), same security fields."""
    return to_v1_pod(validation_pod(worker_class))


def to_v1_pod(manifest: Mapping[str, Any]) -> Any:
    """The manifest as the provider's ``kubernetes.client.V1Pod`` (needs ``ckpt-stage[kubernetes]``)."""
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

    return PodGenerator.deserialize_model_dict(dict(manifest))


def field_at(doc: Any, path: str) -> Any:
    """``field_at(pod, "spec.containers[0].securityContext.runAsNonRoot")``; KeyError/IndexError if absent."""
    for part in path.split("."):
        m = re.fullmatch(r"([^\[]+)(?:\[(\d+)\])?", part)
        if not m:
            raise KeyError(path)
        doc = doc[m.group(1)]
        if m.group(2) is not None:
            doc = doc[int(m.group(2))]
    return doc
