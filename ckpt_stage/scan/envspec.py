"""The environment an MLflow model asks serving hosts to install, read as what it would install.

``mlflow models serve`` / ``build-docker`` / ``spark_udf`` (any ``env_manager`` but ``local``) build the
model's environment before loading it (MLflow 3.17 ``utils/virtualenv.py``, ``utils/conda.py``,
``utils/uv_utils.py``): ``python_function.env.virtualenv`` (``python_env.yaml``: ``build_dependencies``
and ``dependencies``, usually ``-r requirements.txt``) goes to ``pip install -r`` with the model folder as
working directory, ``python_function.env.conda`` (``conda.yaml``) to ``conda env create`` (its ``pip:``
list to pip as well, ``variables:`` into every activation's environment), and ``uv.lock`` with
``pyproject.toml`` to ``uv sync`` (uv also takes ``uv.toml`` / ``[tool.uv]`` in that folder as its
configuration). An install runs code: an sdist's ``setup.py``, a wheel's ``.pth`` file (run at every
interpreter start), a build backend. So a requirement that is not a package name from the package index — a URL, a VCS checkout, a local path or wheel, ``-e``, another index
(``--index-url``, ``--extra-index-url``, ``--find-links``), a per-requirement build option, an
environment path outside the model folder, a conda channel that is not a public one, a ``variables:``
block, a ``uv.lock`` source that is not PyPI — is code the version brings to the serving host, and is
``UNSAFE_CODE``. Names and versions from the index are not judged here (the index is the operator's).
"""

from __future__ import annotations

import posixpath
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from ckpt_stage.domain import ReasonCode

#: Files MLflow reads when ``python_function.env`` does not name them.
DEFAULT_CONDA = "conda.yaml"
DEFAULT_VIRTUALENV = "python_env.yaml"
REQUIREMENTS = "requirements.txt"
MAX_ENV_BYTES = 1 << 20
MAX_INCLUDE_DEPTH = 5
#: Public conda channels; any other (a URL, a path, a personal anaconda.org channel) serves packages
#: whose install scripts nobody here vetted.
PUBLIC_CHANNELS = frozenset({"conda-forge", "defaults", "pytorch", "nvidia", "anaconda", "main", "r", "msys2"})
#: pip options a requirements line may carry that install nothing from elsewhere.
_HARMLESS_PIP_OPTIONS = frozenset({"--pre", "--prefer-binary", "--require-hashes", "--only-binary",
                                   "--no-deps"})
PYPI_SIMPLE = "https://pypi.org/simple"

#: A PEP 508 requirement by name: name, extras, version specifiers, markers — no ``@ URL``.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_VERSION_SPEC = r"(?:===|==|!=|<=|>=|~=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_REQUIREMENT_RE = re.compile(
    rf"^{_NAME}\s*(?:\[\s*(?:{_NAME}\s*(?:,\s*{_NAME}\s*)*)?\])?\s*"
    rf"(?:\(?\s*{_VERSION_SPEC}\s*(?:,\s*{_VERSION_SPEC}\s*)*\)?)?\s*(?:;[^@]*)?$")
#: A conda match spec by name only (``python=3.11.7``, ``pip<=26.3``, ``numpy >=1.26,<2``, build strings).
_CONDA_SPEC_RE = re.compile(rf"^{_NAME}\s*(?:[=<>!~]{{1,2}}\s*[A-Za-z0-9.*+_!=<>,|-]+)?(?:\s+[A-Za-z0-9.*_]+)?$")
_PYTHON_VERSION_RE = re.compile(r"^\d+(?:\.\d+){0,2}$")
_CONDA_KEYS = frozenset({"name", "channels", "dependencies"})
_PYTHON_ENV_KEYS = frozenset({"python", "build_dependencies", "dependencies"})

HINT = ("list the model's dependencies as package names and versions from the package index "
        "(mlflow.pytorch.log_model(..., pip_requirements=['torch==2.13.0'])); ship the model's own code with "
        "code_paths (an operator allows it with CKPT_STAGE_ALLOW_MODEL_CODE), and have private packages "
        "pre-installed in the serving image rather than fetched by the model")

Report = Callable[[str, str, str], None]
"""``report(file, what, why)``: one finding about ``file``."""


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """pip's reading of a requirements file: ``\\`` joins lines, `` #`` starts a comment."""
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        if not buf:
            start = n
        if raw.endswith("\\"):
            buf += raw[:-1]
            continue
        line = re.sub(r"(^|\s)#.*$", "", buf + raw).strip()
        buf = ""
        if line:
            yield start, line
    if buf.strip():
        yield start, buf.strip()


def _option(line: str) -> tuple[str, str]:
    """``("-r", "x.txt")`` from ``-r x.txt`` / ``-rx.txt`` / ``--requirement=x.txt``."""
    m = re.match(r"^(--[A-Za-z-]+|-[A-Za-z])\s*=?\s*(.*)$", line)
    return (m.group(1), m.group(2).strip()) if m else (line, "")


#: pip options that name a package index (allowed for the indexes the operator trusts).
_INDEX_OPTIONS = frozenset({"-i", "--index-url", "--extra-index-url"})
INDEX_SETTING = "CKPT_STAGE_ALLOW_PACKAGE_INDEXES"


def trusted(url: str, indexes: tuple[str, ...]) -> bool:
    """``url`` is one of the operator's trusted indexes or channels, or below one (``https://pkgs.corp/simple``
    under ``https://pkgs.corp``); compared without trailing slashes, never by substring."""
    url = url.strip().rstrip("/")
    return bool(url) and any(url == t or url.startswith(t + "/") for t in (i.strip().rstrip("/") for i in indexes) if t)


def _public_spec(spec: str) -> str:
    """``conda-forge::numpy`` → ``numpy`` (a public channel); any other ``channel::`` stays and fails."""
    channel, sep, rest = spec.partition("::")
    return rest if sep and channel in PUBLIC_CHANNELS else spec


class EnvCheck:
    """Judges the environment files of one MLflow model folder ``mdir`` (relative to the version root)."""

    def __init__(self, root: Path, mdir: str, here: set[str], report: Report,
                 read: Callable[[Path, int], bytes | None], rel_inside: Callable[[str, Any], str | None],
                 indexes: tuple[str, ...] = ()):
        self.root, self.mdir, self.here, self.report = root, mdir, here, report
        self.read, self.rel_inside = read, rel_inside
        self.indexes = indexes
        """Package indexes and conda channels the operator trusts (``CKPT_STAGE_ALLOW_PACKAGE_INDEXES``)."""
        self.seen: set[str] = set()

    def full(self, rel: str) -> str:
        return posixpath.join(self.mdir, rel) if self.mdir else rel

    def text(self, rel: str) -> str | None:
        raw = self.read(self.root / self.full(rel), MAX_ENV_BYTES)
        if raw is None:
            self.report(self.full(rel), "is unreadable or larger than 1 MiB",
                        "serving hosts install what it lists, so the stage must read all of it")
            return None
        return raw.decode("utf-8", "replace")

    # -- pip ---------------------------------------------------------------------------------------

    def requirement(self, where: str, line: str, depth: int) -> None:
        """One pip requirements line, as pip installs it from the model folder."""
        if line.startswith("-"):
            opt, value = _option(line)
            if opt in ("-r", "--requirement", "-c", "--constraint"):
                self.include(where, value, depth)
            elif opt in _INDEX_OPTIONS and trusted(value, self.indexes):
                pass
            elif opt not in _HARMLESS_PIP_OPTIONS:
                self.report(where, f"has the pip option {line[:120]!r}",
                            "it makes pip install from somewhere other than the package index (an editable "
                            "checkout, another index or a download page) or change how packages are built"
                            + (f" (an operator trusts an index with {INDEX_SETTING})" if opt in _INDEX_OPTIONS
                               else ""))
            return
        spec, _, options = line.partition(" --")
        if options and not all(o.startswith("hash") for o in (" --" + options).split(" --")[1:]):
            self.report(where, f"passes build options with {line[:120]!r}",
                        "pip hands them to the package's build, which runs code")
            return
        if "${" in spec:
            self.report(where, f"names {spec[:120]!r}, which pip expands from the serving host's environment",
                        "what it installs is not in the version")
        elif not _REQUIREMENT_RE.match(spec.strip()):
            self.report(where, f"installs {spec[:120]!r}, which is not a package name from the package index "
                        "(a URL, a VCS checkout, a local path, a wheel or an archive)",
                        "pip downloads or builds it as given, running its setup code or installing its .pth files")

    def requirements_file(self, rel: str, depth: int) -> None:
        if rel in self.seen:
            return
        self.seen.add(rel)
        text = self.text(rel)
        if text is None:
            return
        for n, line in _logical_lines(text):
            self.requirement(f"{self.full(rel)} line {n}", line, depth + 1)

    def include(self, where: str, value: str, depth: int) -> None:
        # pip resolves -r/-c against the including file's folder; MLflow's files are all at the top.
        target = self.rel_inside("", value)
        if target is None or "://" in value:
            self.report(where, f"includes {value[:120]!r}, which is not a file inside the model folder",
                        "serving hosts would install requirements the version does not hold")
        elif depth > MAX_INCLUDE_DEPTH:
            self.report(where, f"nests -r/-c includes deeper than {MAX_INCLUDE_DEPTH}", "flatten the requirements")
        elif target in self.here:
            self.requirements_file(target, depth)

    # -- files --------------------------------------------------------------------------------------

    def env_paths(self, env: Any) -> tuple[str | None, str | None]:
        """(conda file, virtualenv file) that ``python_function.env`` names (MLflow's own defaults when
        absent); a path outside the model folder is reported and skipped."""
        if env is None:
            return DEFAULT_CONDA, DEFAULT_VIRTUALENV
        pairs = [("conda", env)] if isinstance(env, str) else (
            [("conda", env.get("conda")), ("virtualenv", env.get("virtualenv"))] if isinstance(env, dict) else [])
        out: dict[str, str | None] = {"conda": None, "virtualenv": None}
        for kind, value in pairs:
            if value is None:
                continue
            rel = self.rel_inside("", value)
            if rel is None or not rel:
                self.report(self.full("MLmodel"), f"names the {kind} environment {str(value)[:120]!r} (in "
                            "flavors.python_function.env), which is not a file inside the model folder",
                            "serving hosts would build the model's environment from a file the version does "
                            "not hold")
            else:
                out[kind] = rel
        if not isinstance(env, (str, dict)):
            self.report(self.full("MLmodel"), f"has flavors.python_function.env {str(env)[:120]!r}, which is "
                        "neither a file name nor a mapping", "re-log the model with mlflow")
        return out["conda"], out["virtualenv"]

    def yaml_doc(self, rel: str) -> dict[str, Any] | None:
        from ckpt_stage.scan.mlflow_dir import YamlProblem, load_yaml

        text = self.text(rel)
        if text is None:
            return None
        try:
            doc = load_yaml(text)
        except (yaml.YAMLError, YamlProblem) as exc:
            self.report(self.full(rel), f"is not a YAML document the stage can read "
                        f"({' '.join(str(exc).split())[:160]})", "serving hosts install what it lists")
            return None
        if not isinstance(doc, dict):
            self.report(self.full(rel), "is not a YAML mapping", "serving hosts install what it lists")
            return None
        return doc

    def deps_list(self, where: str, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.report(where, f"is {str(value)[:120]!r}, not a list of requirement lines",
                        "re-log the model with mlflow")
            return
        for item in value:
            for _n, line in _logical_lines(item):
                self.requirement(where, line, 0)

    def spec(self, rel: str, keys: frozenset[str]) -> tuple[dict[str, Any], str, list[str]] | None:
        """(document, its path for messages, keys MLflow never writes) of one environment YAML file."""
        doc = self.yaml_doc(rel)
        return None if doc is None else (doc, self.full(rel), sorted(str(k) for k in doc if k not in keys))

    def python_env(self, rel: str) -> None:
        read = self.spec(rel, _PYTHON_ENV_KEYS)
        if read is None:
            return
        doc, where, extra = read
        if extra:
            self.report(where, f"has keys MLflow does not write: {', '.join(extra)[:120]}",
                        "re-log the model with mlflow")
        python = doc.get("python")
        if python is not None and not _PYTHON_VERSION_RE.match(str(python)):
            self.report(where, f"asks for python {str(python)[:80]!r}, which is not a version number",
                        "serving hosts hand it to pyenv/uv to install an interpreter")
        for key in ("build_dependencies", "dependencies"):
            self.deps_list(f"{where} {key}", doc.get(key))

    def conda(self, rel: str) -> None:
        read = self.spec(rel, _CONDA_KEYS)
        if read is None:
            return
        doc, where, extra = read
        if extra:
            self.report(where, f"has {', '.join(extra)[:120]} (conda env create applies 'variables' to every "
                        "activation of the serving environment and installs to 'prefix')",
                        "environment variables such as PYTHONPATH, LD_PRELOAD or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD "
                        "change what the serving host runs")
        channels = doc.get("channels") or []
        if not isinstance(channels, list):
            channels = [channels]
        odd = [str(c) for c in channels if str(c) not in PUBLIC_CHANNELS and not trusted(str(c), self.indexes)]
        if odd:
            self.report(where, f"installs from the conda channel(s) {', '.join(odd)[:160]}",
                        f"conda packages run install scripts; only {', '.join(sorted(PUBLIC_CHANNELS))} are public "
                        f"(an operator trusts another channel with {INDEX_SETTING})")
        deps = doc.get("dependencies") or []
        if not isinstance(deps, list):
            self.report(where, "has dependencies that are not a list", "re-log the model with mlflow")
            return
        for dep in deps:
            if isinstance(dep, dict) and set(dep) <= {"pip"}:
                self.deps_list(f"{where} pip", dep.get("pip"))
            elif not isinstance(dep, str) or not _CONDA_SPEC_RE.match(_public_spec(dep.strip())):
                self.report(where, f"installs the conda package {str(dep)[:120]!r}, which is not a package name "
                            "from a channel (a URL, a path or a channel::package spec)",
                            "conda downloads it as given and runs its install scripts")

    def toml(self, rel: str) -> dict[str, Any] | None:
        text = self.text(rel)
        if text is None:
            return None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            self.report(self.full(rel), f"is not valid TOML ({str(exc)[:120]})", "uv reads it during the install")
            return None

    def uv_config(self) -> None:
        """uv (MLflow's ``env_manager="uv"``) reads ``uv.toml`` and ``pyproject.toml``'s ``[tool.uv]`` from its
        working directory — the model folder — as configuration of ``uv pip install`` and ``uv sync``:
        index URLs, sources, build settings."""
        if "uv.toml" in self.here:
            self.report(self.full("uv.toml"), "is uv configuration",
                        "uv takes its index URLs, sources and build settings from it when installing the model's "
                        "environment")
        if "pyproject.toml" in self.here:
            doc = self.toml("pyproject.toml")
            tool = doc.get("tool") if doc is not None else None
            if isinstance(tool, dict) and "uv" in tool:
                self.report(self.full("pyproject.toml"), "has a [tool.uv] table",
                            "uv takes its index URLs, sources and build settings from it when installing the "
                            "model's environment")

    def uv_lock(self, rel: str) -> None:
        doc = self.toml(rel)
        if doc is None:
            return
        for pkg in doc.get("package", []) if isinstance(doc.get("package"), list) else []:
            source = pkg.get("source") if isinstance(pkg, dict) else None
            if not isinstance(source, dict):
                continue
            kind = next(iter(source), "")
            value = source.get(kind)
            if kind == "virtual" or (kind == "registry" and (str(value).rstrip("/") == PYPI_SIMPLE
                                                             or trusted(str(value), self.indexes))):
                continue
            self.report(self.full(rel), f"locks {str(pkg.get('name'))[:60]!r} from {kind} {str(value)[:120]!r}, "
                        "not from PyPI", "uv sync installs (and builds) it as locked on every serving host"
                        + (f" (an operator trusts an index with {INDEX_SETTING})" if kind == "registry" else ""))

    def run(self, pyfunc: dict[str, Any] | None) -> None:
        conda, venv = self.env_paths(pyfunc.get("env") if pyfunc is not None else None)
        if venv and venv in self.here:
            self.python_env(venv)
        if conda and conda in self.here:
            self.conda(conda)
        if REQUIREMENTS in self.here:  # MLflow's fallback when python_env.yaml is missing
            self.requirements_file(REQUIREMENTS, 0)
        if "uv.lock" in self.here and "pyproject.toml" in self.here:
            self.uv_lock("uv.lock")
        self.uv_config()


def check_environment(root: Path, mdir: str, pyfunc: dict[str, Any] | None, here: set[str], add: Callable[..., None],
                      read: Callable[[Path, int], bytes | None], rel_inside: Callable[[str, Any], str | None],
                      indexes: tuple[str, ...] = ()) -> None:
    """Report (``add(code, message, hint, file)``) every entry of the model's environment files that
    would install code from outside the package index on a serving host."""
    def report(where: str, what: str, why: str) -> None:
        file = where.split(" ", 1)[0]
        add(ReasonCode.UNSAFE_CODE, f"{where} {what}; mlflow models serve and build-docker install the model's "
            f"environment on the serving host, and {why}", HINT, file)

    EnvCheck(root, mdir, here, report, read, rel_inside, indexes).run(pyfunc)
