"""Every setting of the stage, read once from the environment (``CKPT_STAGE_*``), with defaults.

``Settings.from_env()`` is the only place that reads the environment; everything else receives a
``Settings``. Malformed values raise ``ConfigError`` naming the variable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_stage.errors import ConfigError

PREFIX = "CKPT_STAGE_"

DEFAULT_ARCH_MODULES = ("torch.nn",)
#: ``python_function.loader_module`` values whose ``_load_pyfunc`` a serving host may run: only the
#: stock loaders of the flavors the stage validates (``mlflow.pyfunc.load_model`` imports them):
#: ``mlflow.transformers`` loads the save_pretrained folder the worker checks, without trust_remote_code
#: (a config with auto_map is refused by the scanner).
DEFAULT_LOADER_MODULES = ("mlflow.pytorch", "mlflow.transformers")
MIN_SWEEP_INTERVAL_S = 5.0
MIN_LEASE_S = 3.0
#: ``CKPT_STAGE_OTHER_FLAVORS``: what happens to a version whose MLflow flavor the stage does not
#: validate (sklearn, xgboost, ...): ``quarantine`` it (UNSUPPORTED_FORMAT), or ``skip`` it (status
#: ``skipped``: left alone, never promoted, not a problem, not swept again, re-runnable).
OTHER_FLAVOR_CHOICES = ("quarantine", "skip")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mi": 2**20, "mib": 2**20, "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30, "t": 10**12,
          "tb": 10**12, "ti": 2**40, "tib": 2**40}


def parse_size(text: str, *, name: str = "size") -> int:
    """``"512MiB"`` → 536870912. Plain numbers are bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"{name}: cannot read {text!r} as a size (examples: 512MiB, 8GiB, 1000000)")
    unit = (m.group(2) or "").lower()
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """``17179869184`` → ``16.0 GiB`` (binary units; the inverse of ``parse_size`` for humans)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def default_pool(class_name: str) -> str:
    """The Airflow pool of a worker class unless ``CKPT_STAGE_WORKER_CLASSES`` names one."""
    return f"ckpt_stage_{class_name}"


def default_queue(class_name: str) -> str:
    """The Celery queue of a worker class unless ``CKPT_STAGE_WORKER_CLASSES`` names one: ``ckpt-small``,
    ``ckpt-large``. Workers for the class listen with ``airflow celery worker --queues ckpt-<class>``."""
    return f"ckpt-{class_name}"


@dataclass(frozen=True)
class WorkerClass:
    """A worker size class: versions whose estimated memory fits ``memory_bytes`` run there.

    ``pool`` bounds how many loads of the class run at once; ``queue`` is the Celery queue (under the
    KubernetesExecutor, the pod's memory request/limit come from ``memory_bytes`` instead, ``ckpt_stage.k8s``).
    """

    name: str
    memory_bytes: int
    pool: str = ""
    queue: str = ""

    def __post_init__(self) -> None:
        # Frozen: fill the defaults through object.__setattr__ so WorkerClass("small", n) means the same
        # pool and queue as "small=n" in CKPT_STAGE_WORKER_CLASSES.
        if not self.pool:
            object.__setattr__(self, "pool", default_pool(self.name))
        if not self.queue:
            object.__setattr__(self, "queue", default_queue(self.name))


# Pool and queue names travel into Airflow (pool names), Celery/AMQP/Redis (queue names) and Kubernetes
# labels: keep them to a portable alphabet.
_CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def parse_worker_classes(text: str) -> tuple[WorkerClass, ...]:
    """``"small=2GiB,large=12GiB"`` (optionally ``small=2GiB:pool:queue``), sorted by size.

    The sizes are the routing thresholds: a version goes to the smallest class whose budget holds its
    estimate; one above the largest is refused with RESOURCE_LIMIT before it is loaded.
    """
    key = f"{PREFIX}WORKER_CLASSES"
    out: list[WorkerClass] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ConfigError(f"{key}: {part!r} is not NAME=SIZE[:POOL[:QUEUE]] (example: small=4GiB,large=16GiB)")
        name, _, rest = part.partition("=")
        name = name.strip()
        size, *more = rest.split(":")
        if len(more) > 2:
            raise ConfigError(f"{key}: {part!r} has more than NAME=SIZE:POOL:QUEUE")
        pool = more[0].strip() if len(more) > 0 and more[0].strip() else default_pool(name)
        queue = more[1].strip() if len(more) > 1 and more[1].strip() else default_queue(name)
        for what, value in (("class name", name), ("pool", pool), ("queue", queue)):
            if not _CLASS_NAME_RE.match(value):
                raise ConfigError(f"{key}: {what} {value!r} in {part!r} must be 1-63 letters, digits, '_', '.' "
                                  "or '-', starting with a letter or digit")
        out.append(WorkerClass(name, parse_size(size, name=key), pool, queue))
    if not out:
        raise ConfigError(f"{key} is empty; give at least one NAME=SIZE (example: small=4GiB,large=16GiB)")
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        # The DAG has one task per class, named after it. (Classes may share a pool or a queue on purpose.)
        raise ConfigError(f"{key}: class {', '.join(dupes)} is given twice; give each class its own name")
    return tuple(sorted(out, key=lambda c: c.memory_bytes))


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(PREFIX + key)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{PREFIX}{key}: expected true or false, got {raw!r}")


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(PREFIX + key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{key}: expected a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{PREFIX}{key}: must not be negative, got {raw!r}")
    return value


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    return int(_float(env, key, default))


def _size(env: Mapping[str, str], key: str, default: int) -> int:
    raw = (env.get(PREFIX + key) or "").strip()
    return parse_size(raw, name=PREFIX + key) if raw else default


def _choice(env: Mapping[str, str], key: str, choices: tuple[str, ...], default: str) -> str:
    raw = (env.get(PREFIX + key) or "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise ConfigError(f"{PREFIX}{key}: expected one of {', '.join(choices)}, got {env.get(PREFIX + key)!r}")
    return raw


def _list(env: Mapping[str, str], key: str) -> tuple[str, ...]:
    raw = env.get(PREFIX + key, "")
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def _default_s3_endpoint() -> str:
    # boto3's own variable for S3, then MLflow's: the stage's S3 client goes where MLflow's artifact client goes.
    env = os.environ
    return env.get(PREFIX + "S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("MLFLOW_S3_ENDPOINT_URL") or ""


SECRET_FIELDS = frozenset({"airflow_password", "airflow_token", "webhook_secret", "dashboard_token"})
"""Settings that are secrets: ``repr(settings)`` shows only whether they are set."""
URL_FIELDS = frozenset({"airflow_url", "mlflow_ui_url", "s3_endpoint_url", "artifacts_destination"})
"""Settings that are URLs: ``repr(settings)`` shows them without credentials (``user:password@``, query)."""


def redact_url(url: str) -> str:
    """``url`` without the credentials it may carry (userinfo and query string)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    if netloc != parts.netloc:
        netloc = "***@" + netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckpt-stage"


@dataclass(frozen=True)
class Settings:
    alias: str = "validated"
    experiment: str = "ckpt-stage-validations"
    arch_modules: tuple[str, ...] = DEFAULT_ARCH_MODULES
    pickle_modules: tuple[str, ...] = ()
    allow_pickled_models: bool = True
    allow_loader_modules: tuple[str, ...] = DEFAULT_LOADER_MODULES
    """Exact ``MLmodel`` ``python_function.loader_module`` names accepted (``CKPT_STAGE_ALLOW_LOADER_MODULES``
    adds to the default)."""
    allow_model_code: tuple[str, ...] = ()
    """Module prefixes whose code a version may carry (MLflow ``code_paths``, Hugging Face ``auto_map``):
    ``CKPT_STAGE_ALLOW_MODEL_CODE``. Such code is imported only inside the isolated worker."""
    allow_package_indexes: tuple[str, ...] = ()
    """``CKPT_STAGE_ALLOW_PACKAGE_INDEXES``: package index URLs (pip ``--index-url``/``--extra-index-url``,
    ``uv.lock`` registries) and conda channels, beside PyPI and the public channels, that a model's
    environment may install from on serving hosts (``scan/envspec.py``); anything else is UNSAFE_CODE."""
    require_input_example: bool = False
    drift_max_change: float = 0.0
    """``CKPT_STAGE_DRIFT_MAX_CHANGE``: a tensor whose relative L2 change against the alias holder exceeds
    this fraction (0.5 = 50 %) is a ``PARAMETER_DRIFT`` quarantine; 0 (default): drift is information only."""
    other_flavors: str = "quarantine"
    """``CKPT_STAGE_OTHER_FLAVORS`` (``OTHER_FLAVOR_CHOICES``): quarantine versions of a flavor the stage
    does not validate, or skip them."""
    cache_dir: Path = field(default_factory=_default_cache)
    keep_cache: bool = False
    cache_max_bytes: int = 20 * 2**30
    """``CKPT_STAGE_CACHE_MAX_BYTES``: size of the host's content-addressed cache of downloaded objects
    (``ckpt_stage.cache``) under ``cache_dir/objects``; re-runs of unchanged files download nothing. 0: off."""
    worker_python: str = ""
    worker_timeout_s: float = 300.0
    worker_cpu_s: float = 600.0
    worker_cgroup: str = ""
    """Parent cgroup directory for per-job memory cgroups; "" picks <memory v1 mount>/ckpt-stage or
    /sys/fs/cgroup/ckpt-stage (v2). On cgroup v2 it must be a delegated subtree without processes."""
    worker_classes: tuple[WorkerClass, ...] = (WorkerClass("small", 4 * 2**30), WorkerClass("large", 16 * 2**30))
    """Size classes, smallest first (``CKPT_STAGE_WORKER_CLASSES``): pools ``ckpt_stage_<name>``, Celery
    queues ``ckpt-<name>`` unless named."""
    lease_s: float = 60.0
    """How long a claim holds a version without news. A heartbeat renews it every third of it while the
    attempt runs, so a live attempt keeps its version however long it takes, and a killed one's versions
    are free again within ``lease_s`` (plus the next sweep's interval)."""
    sweep_interval_s: float = 300.0
    """How often ``ckpt_stage_validate`` sweeps for versions without a verdict (at least 5 s)."""
    sweep_concurrency: int = 1
    """Versions one ``sweep`` (or ``rerun`` of many) validates at once, in threads sharing one fork
    server (``CKPT_STAGE_SWEEP_CONCURRENCY``; 1: one after the other). Each holds its download on disk
    and its own worker, so memory is up to this many workers' limits."""
    worker_lost_limit: int = 3
    """WORKER_LOST is retried until this many attempts in a row of one version ended in it: that last loss
    quarantines the version as WORKER_CRASH (``CKPT_STAGE_WORKER_LOST_LIMIT``; 0: retried forever)."""
    owner: str = ""
    s3_attempts: int = 5
    s3_deadline_s: float = 120.0
    s3_max_concurrency: int = 8
    s3_connect_timeout_s: float = 5.0
    s3_read_timeout_s: float = 30.0
    """Socket timeouts of one S3 call; each attempt also gets no more than what is left of ``s3_deadline_s``."""
    s3_endpoint_url: str = field(default_factory=_default_s3_endpoint)
    """The S3 API's URL (``CKPT_STAGE_S3_ENDPOINT_URL``, else boto3's ``AWS_ENDPOINT_URL_S3``, else MLflow's
    ``MLFLOW_S3_ENDPOINT_URL``); "" is AWS itself."""
    mlflow_max_retries: int = 3
    mlflow_backoff_factor: int = 1
    mlflow_timeout_s: int = 30
    """Defaults for MLflow's own HTTP client retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR,
    _TIMEOUT), applied only where the operator did not set those variables. The stage never adds its
    own retry loop on top of the client's."""
    artifacts_destination: str = ""
    max_archive_entries: int = 100_000
    max_compression_ratio: float = 200.0
    max_pickle_bytes: int = 256 * 2**20
    scan_deadline_s: float = 60.0
    """Time the static scan of one file may take (plus 1 s per 200 MiB of file, for reading and CRCs);
    past it the file is quarantined RESOURCE_LIMIT. 0 turns the deadline off."""
    airflow_url: str = ""
    airflow_user: str = ""
    airflow_password: str = ""
    airflow_token: str = ""
    webhook_secret: str = ""
    dashboard_token: str = ""
    mlflow_ui_url: str = ""
    task_retries: int = 3
    task_retry_delay_s: float = 30.0
    task_max_retry_delay_s: float = 600.0
    """Airflow's retry policy for a validation task that ended in a transient error
    (``CKPT_STAGE_TASK_RETRIES``, ``_RETRY_DELAY_S``, ``_MAX_RETRY_DELAY_S``): the delay doubles per try."""

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                shown.append(f"{f.name}={'***' if value else ''!r}")
            elif f.name in URL_FIELDS and value:
                shown.append(f"{f.name}={redact_url(str(value))!r}")
            else:
                shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def largest_class(self) -> WorkerClass:
        return self.worker_classes[-1]

    def class_for(self, estimated_bytes: int) -> WorkerClass | None:
        """Smallest class whose budget holds the estimate; None when none does."""
        for wc in self.worker_classes:
            if estimated_bytes <= wc.memory_bytes:
                return wc
        return None

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = cls()
        arch_extra = _list(env, "ARCH_MODULES")
        classes_raw = env.get(PREFIX + "WORKER_CLASSES", "")
        cache = env.get(PREFIX + "CACHE_DIR", "")
        return cls(
            alias=env.get(PREFIX + "ALIAS", d.alias) or d.alias,
            experiment=env.get(PREFIX + "EXPERIMENT", d.experiment) or d.experiment,
            arch_modules=tuple(dict.fromkeys(DEFAULT_ARCH_MODULES + arch_extra)),
            pickle_modules=_list(env, "PICKLE_MODULES"),
            allow_pickled_models=_bool(env, "ALLOW_PICKLED_MODELS", d.allow_pickled_models),
            allow_loader_modules=tuple(dict.fromkeys(DEFAULT_LOADER_MODULES + _list(env, "ALLOW_LOADER_MODULES"))),
            allow_model_code=_list(env, "ALLOW_MODEL_CODE"),
            allow_package_indexes=_list(env, "ALLOW_PACKAGE_INDEXES"),
            require_input_example=_bool(env, "REQUIRE_INPUT_EXAMPLE", d.require_input_example),
            drift_max_change=_float(env, "DRIFT_MAX_CHANGE", d.drift_max_change),
            other_flavors=_choice(env, "OTHER_FLAVORS", OTHER_FLAVOR_CHOICES, d.other_flavors),
            cache_dir=Path(cache) if cache else d.cache_dir,
            keep_cache=_bool(env, "KEEP_CACHE", d.keep_cache),
            cache_max_bytes=_size(env, "CACHE_MAX_BYTES", d.cache_max_bytes),
            worker_python=env.get(PREFIX + "WORKER_PYTHON", ""),
            worker_timeout_s=_float(env, "WORKER_TIMEOUT_S", d.worker_timeout_s),
            worker_cpu_s=_float(env, "WORKER_CPU_S", d.worker_cpu_s),
            worker_cgroup=env.get(PREFIX + "WORKER_CGROUP", ""),
            worker_classes=parse_worker_classes(classes_raw) if classes_raw else d.worker_classes,
            lease_s=max(MIN_LEASE_S, _float(env, "LEASE_S", d.lease_s)),
            sweep_interval_s=max(MIN_SWEEP_INTERVAL_S, _float(env, "SWEEP_INTERVAL_S", d.sweep_interval_s)),
            sweep_concurrency=max(1, _int(env, "SWEEP_CONCURRENCY", d.sweep_concurrency)),
            worker_lost_limit=_int(env, "WORKER_LOST_LIMIT", d.worker_lost_limit),
            owner=env.get(PREFIX + "OWNER", ""),
            s3_attempts=max(1, _int(env, "S3_ATTEMPTS", d.s3_attempts)),
            s3_deadline_s=_float(env, "S3_DEADLINE_S", d.s3_deadline_s),
            s3_max_concurrency=max(1, _int(env, "S3_MAX_CONCURRENCY", d.s3_max_concurrency)),
            s3_connect_timeout_s=_float(env, "S3_CONNECT_TIMEOUT_S", d.s3_connect_timeout_s) or d.s3_connect_timeout_s,
            s3_read_timeout_s=_float(env, "S3_READ_TIMEOUT_S", d.s3_read_timeout_s) or d.s3_read_timeout_s,
            s3_endpoint_url=(env.get(PREFIX + "S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3")
                             or env.get("MLFLOW_S3_ENDPOINT_URL") or ""),
            mlflow_max_retries=_int(env, "MLFLOW_MAX_RETRIES", d.mlflow_max_retries),
            mlflow_backoff_factor=_int(env, "MLFLOW_BACKOFF_FACTOR", d.mlflow_backoff_factor),
            mlflow_timeout_s=max(1, _int(env, "MLFLOW_TIMEOUT_S", d.mlflow_timeout_s)),
            artifacts_destination=env.get(PREFIX + "ARTIFACTS_DESTINATION", ""),
            max_archive_entries=_int(env, "MAX_ARCHIVE_ENTRIES", d.max_archive_entries),
            max_compression_ratio=_float(env, "MAX_COMPRESSION_RATIO", d.max_compression_ratio),
            max_pickle_bytes=_int(env, "MAX_PICKLE_BYTES", d.max_pickle_bytes),
            scan_deadline_s=_float(env, "SCAN_DEADLINE_S", d.scan_deadline_s),
            airflow_url=env.get(PREFIX + "AIRFLOW_URL", ""),
            airflow_user=env.get(PREFIX + "AIRFLOW_USER", ""),
            airflow_password=env.get(PREFIX + "AIRFLOW_PASSWORD", ""),
            airflow_token=env.get(PREFIX + "AIRFLOW_TOKEN", ""),
            webhook_secret=env.get(PREFIX + "WEBHOOK_SECRET", ""),
            dashboard_token=env.get(PREFIX + "DASHBOARD_TOKEN", ""),
            mlflow_ui_url=env.get(PREFIX + "MLFLOW_UI_URL", ""),
            task_retries=max(0, _int(env, "TASK_RETRIES", d.task_retries)),
            task_retry_delay_s=max(1.0, _float(env, "TASK_RETRY_DELAY_S", d.task_retry_delay_s)),
            task_max_retry_delay_s=max(1.0, _float(env, "TASK_MAX_RETRY_DELAY_S", d.task_max_retry_delay_s)),
        )


def parse_arch_kwargs(text: str | None, *, source: str) -> dict:
    """The ``ckpt_stage.arch_kwargs`` tag / ``--arch-kwargs``: a JSON object or nothing."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON ({exc.msg} at position {exc.pos}): {text[:200]!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: must be a JSON object, got {type(value).__name__}")
    return value
