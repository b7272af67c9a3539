"""Code a version carries that loading or serving would execute, found statically in the parent.

The question is "what will ``mlflow.pyfunc.load_model(DIR)`` (and ``.predict()``) run on a serving
host?". Answered from MLflow 3.17's own source, field by field:

* ``pyfunc/__init__.py`` ``load_model``: ``yaml.safe_load(MLmodel)``; ``conf = flavors.python_function``;
  ``_add_code_from_conf_to_system_path`` prepends ``DIR/<conf.code>`` to ``sys.path`` (every later
  import, torch's and the unpickler's included, may resolve there); then
  ``importlib.import_module(conf.loader_module)._load_pyfunc(DIR/<conf.data>)``: the loader module is
  code the version chooses.
* ``pytorch/__init__.py`` ``_load_pyfunc`` → ``_load_model(data)``: when ``data/model.pth`` exists (it
  wins over ``model.pt2``) it ``importlib.import_module``s the name written in
  ``data/pickle_module_info.txt`` (``flavors.python_function.pickle_module_name`` is only a record)
  and ``torch.load(model.pth, pickle_module=..., weights_only=False)``s it, importing every global of
  the pickle, from ``code/`` too; otherwise ``torch.export.load(data/model.pt2)`` (its graph strings
  are judged by the pt2 reader). ``mlflow.pytorch.load_model`` does the same with
  ``flavors.pytorch.code`` and ``.model_data``.
* loader ``mlflow.pyfunc.model`` / ``mlflow.pyfunc.loaders.*`` (a custom ``PythonModel``):
  ``cloudpickle.load(python_model)`` (possibly compressed, so not always visible as a pickle), or with
  ``model_code_path`` the file ``DIR/<basename>`` is run as a script (models from code); ``artifacts``
  are handed to that code.
* Hugging Face: ``auto_map`` in ``config.json`` (and the tokenizer/processor configs) makes
  ``transformers`` import the repository's ``.py`` files (``trust_remote_code``); a ``repo--module.Class``
  entry fetches code from another repository.
* ``requirements.txt``, ``conda.yaml``, ``python_env.yaml`` (and ``uv.lock``) are not executed by
  ``load_model``, but ``mlflow models serve`` / ``build-docker`` install them first: ``envspec`` judges
  what they would install.

Every such piece of code is ``UNSAFE_CODE`` unless the operator allowed it: loader modules by exact
name (``CKPT_STAGE_ALLOW_LOADER_MODULES``, default ``mlflow.pytorch``), the version's own modules by
prefix (``CKPT_STAGE_ALLOW_MODEL_CODE``). Allowed code folders travel to the worker in the ``LoadJob``;
nothing here imports or runs anything from the version.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import posixpath
import re
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ckpt_stage.config import Settings
from ckpt_stage.domain import Finding, ReasonCode, Severity
from ckpt_stage.scan.allowlist import DENIED_MODULE_PREFIXES
from ckpt_stage.scan.envspec import check_environment
from ckpt_stage.scan.sniff import CODE_EXTS, extension

MAX_MLMODEL_BYTES = 1 << 20
MAX_CONFIG_BYTES = 4 << 20
MAX_SMALL_TEXT = 4096
#: A cloudpickled PythonModel is a few KiB; larger ones are judged as uncheckable (code), not walked.
MAX_PYTHON_MODEL_BYTES = 16 << 20
MAX_LISTED = 10

PYTORCH_LOADER = "mlflow.pytorch"
PICKLE_MODULE = "mlflow.pytorch.pickle_module"
#: Flavors the stage validates: flavor name → the stock loader module of its pyfunc.
SUPPORTED_FLAVORS = {"pytorch": PYTORCH_LOADER, "transformers": "mlflow.transformers"}
#: Loader modules of a custom Python model (``mlflow.pyfunc.save_model(python_model=...)``).
_CUSTOM_PYFUNC_LOADERS = ("mlflow.pyfunc.model", "mlflow.pyfunc.loaders")
#: Classes of the serving runtime's MLflow that every cloudpickled PythonModel references (MLflow 3.17
#: stores the predict type hints with the model); any other ``mlflow.*`` global may be a gadget.
_PYFUNC_RUNTIME_GLOBALS = frozenset({"mlflow.models.signature._TypeHints"})
#: Keys of a Hugging Face config whose values name code to import.
_REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
#: Top-level names a version's code folder may never provide, allowed or not: shadowing them on
#: sys.path would replace the stage's (or the serving runtime's) own libraries.
_NEVER_MODEL_CODE = frozenset({"torch", "numpy", "mlflow", "ckpt_stage", "yaml", "safetensors", "sympy",
                               "transformers", "cloudpickle", "pandas", "scipy", "google", "typing_extensions",
                               "site", "sitecustomize", "usercustomize"})
_IMPORTABLE_SUFFIXES = tuple(importlib.machinery.all_suffixes())

SETTING = "CKPT_STAGE_ALLOW_MODEL_CODE"
HINT_SAFE = ("log the model without code of its own: mlflow.pytorch.log_model with serialization_format='pt2' "
             "(MLflow's default; no custom code) or a state_dict registered with the ckpt_stage.arch tag")


def _hint_allow(modules: Iterable[str] = ()) -> str:
    names = ",".join(sorted(set(modules))) or "<package>"
    return (f"{HINT_SAFE}; if the model needs its own classes (MLflow code_paths), an operator may allow "
            f"their packages with {SETTING}={names}, which imports them only inside the isolated worker")


@dataclass
class CodeScan:
    findings: list[Finding] = field(default_factory=list)
    model_code: dict[str, list[str]] = field(default_factory=dict)
    """Allowed code folders (relative to the version root) → their top-level modules (LoadJob.model_code)."""
    own_modules: dict[str, set[str]] = field(default_factory=dict)
    """MLmodel folder → top-level modules its code folders provide (allowed or not)."""
    pyfunc_models: set[str] = field(default_factory=set)
    """python_model files of custom pyfunc models: their pickle findings belong to the UNSAFE_CODE one."""
    other_flavors: dict[str, str] = field(default_factory=dict)
    """MLmodel files of a stock flavor the stage does not validate → that flavor (``sklearn``)."""
    recorded: dict[str, str] = field(default_factory=dict)
    """Library versions the model recorded (``recorded_versions``), from its first MLmodel."""

    @property
    def allowed_modules(self) -> tuple[str, ...]:
        return tuple(sorted({m for mods in self.model_code.values() for m in mods}))

    def add(self, code: ReasonCode, message: str, hint: str, file: str | None = None, **detail: Any) -> None:
        self.findings.append(Finding(code, message, hint, file=file, detail=detail))


def _show(value: Any, limit: int = 120) -> str:
    """A value from the version, quoted and cut short for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_allowed(module: str, settings: Settings) -> bool:
    """Whether a module the version itself provides may be imported (in the worker only)."""
    top = module.split(".")[0]
    if not module or not all(p.isidentifier() for p in module.split(".")):
        return False
    if top in _NEVER_MODEL_CODE or top in sys.stdlib_module_names or any(
            _under(module, p) for p in DENIED_MODULE_PREFIXES):
        return False
    return any(p and _under(module, p) for p in settings.allow_model_code)


def _rel_inside(base: str, value: Any) -> str | None:
    """``base/value`` normalised, or None when ``value`` is not a relative path inside ``base``."""
    if not isinstance(value, str) or not value or value.startswith(("/", "\\")) or "\\" in value:
        return None
    joined = posixpath.normpath(posixpath.join(base, value)) if base else posixpath.normpath(value)
    if joined == ".":
        joined = ""
    if joined.startswith("../") or joined == ".." or (base and joined != base and not joined.startswith(base + "/")):
        return None
    return joined


def _read_small(path: Path, limit: int) -> bytes | None:
    """At most ``limit`` bytes; None when the file is larger or unreadable (size decided first)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return os.pread(fd, limit + 1, 0)[:limit]
    finally:
        os.close(fd)


#: Values of an MLmodel after YAML aliases are expanded. MLflow writes a few hundred; an alias bomb
#: ("billion laughs": ten aliases of ten aliases of ...) is a KB of text that expands to 10^9 values,
#: which PyYAML builds by reference in microseconds and which every later ``repr``, ``str`` or JSON
#: dump of a field (a refusal message, a report detail) then expands in the parent.
MAX_YAML_VALUES = 100_000


class YamlProblem(Exception):
    """An MLmodel-like YAML document the stage refuses to use (not what a YAML writer produces)."""


def _expanded_values(doc: Any, limit: int) -> int:
    """How many values ``doc`` holds with every alias expanded, counted once per distinct container
    (linear in what PyYAML built); raises ``YamlProblem`` past ``limit`` or on a cycle."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(doc, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        nid = id(node)
        kids = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if done:
            on_path.discard(nid)
            total = 1 + sum(sizes.get(id(k), 1) for k in kids)
            if total > limit:
                raise YamlProblem(f"its YAML aliases expand to more than {limit:,} values (an alias bomb)")
            sizes[nid] = total
            continue
        if nid in sizes:
            continue
        if nid in on_path:
            raise YamlProblem("it holds a YAML alias that refers to itself (a recursive value)")
        on_path.add(nid)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if isinstance(k, (dict, list)))
    return sizes.get(id(doc), 1)


def load_yaml(text: str, limit: int = MAX_YAML_VALUES) -> Any:
    """``yaml.safe_load`` (what MLflow's ``Model.load`` uses, so both read the same document) with
    bounds: deep nesting (PyYAML's composer recurses) and alias bombs or recursive aliases raise
    ``YamlProblem`` instead of exhausting the parent. Shared by the scanner and the worker."""
    try:
        doc = yaml.safe_load(text)
    except RecursionError:
        raise YamlProblem("it nests too deeply to read") from None
    _expanded_values(doc, limit)
    return doc


def _top_modules(files_under: Iterable[str]) -> set[str]:
    """Top-level names importable from a folder on sys.path, given the files below it (relative)."""
    out = set()
    for rest in files_under:
        first, _, deeper = rest.partition("/")
        if deeper:
            out.add(first)  # a package, or a namespace package (any folder is importable)
        elif first.endswith(_IMPORTABLE_SUFFIXES):
            out.add(first.split(".", 1)[0])
    return out


def scan_code(root: Path, paths: Sequence[str], settings: Settings) -> CodeScan:
    """Every MLmodel folder of the version, every Python file and every Hugging Face config."""
    out = CodeScan()
    code_dirs: set[str] = set()
    for mlmodel in sorted(p for p in paths if posixpath.basename(p) == "MLmodel"):
        _scan_mlmodel(Path(root), mlmodel, paths, settings, out, code_dirs)
    _scan_loose_code(paths, settings, out, code_dirs)
    _scan_hf_configs(Path(root), paths, settings, out)
    return out


# -- MLmodel -----------------------------------------------------------------------------------------


def _scan_mlmodel(root: Path, mlmodel: str, paths: Sequence[str], settings: Settings, out: CodeScan,
                  code_dirs: set[str]) -> None:
    mdir = posixpath.dirname(mlmodel)
    raw = _read_small(root / mlmodel, MAX_MLMODEL_BYTES)
    if raw is None:
        out.add(ReasonCode.CORRUPT_ARCHIVE, f"{mlmodel} is unreadable or larger than {MAX_MLMODEL_BYTES >> 20} MiB",
                "re-log the model with mlflow; MLmodel is a small YAML file", mlmodel)
        return
    try:
        doc = load_yaml(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        out.add(ReasonCode.CORRUPT_ARCHIVE, f"{mlmodel} is not valid YAML: {' '.join(str(exc).split())[:200]}",
                "re-log the model with mlflow", mlmodel)
        return
    except YamlProblem as exc:
        out.add(ReasonCode.CORRUPT_ARCHIVE, f"{mlmodel} is not used: {exc}",
                "re-log the model with mlflow (MLflow writes a plain YAML mapping without such aliases)", mlmodel)
        return
    if not isinstance(doc, dict):
        out.add(ReasonCode.CORRUPT_ARCHIVE, f"{mlmodel} is not a YAML mapping", "re-log the model with mlflow",
                mlmodel)
        return
    flavors = doc.get("flavors")
    flavors = flavors if isinstance(flavors, dict) else {}
    if not out.recorded:
        reqs = _read_small(root / mdir / "requirements.txt", MAX_SMALL_TEXT * 16)
        out.recorded = recorded_versions(doc, reqs.decode("utf-8", "replace") if reqs else None)
    names = [str(k) for k in flavors]
    pyfunc = flavors.get("python_function") if isinstance(flavors.get("python_function"), dict) else None
    pytorch = flavors.get("pytorch") if isinstance(flavors.get("pytorch"), dict) else None
    in_dir = [p[len(mdir) + 1:] if mdir else p for p in paths if not mdir or p.startswith(mdir + "/")]
    here = set(in_dir)

    # Code folders of every flavor: pyfunc.load_model uses python_function's, mlflow.<flavor>.load_model
    # its own flavor's; all of them end up on some host's sys.path.
    own: set[str] = set()
    for fname, conf in flavors.items():
        if not isinstance(conf, dict) or conf.get("code") in (None, ""):
            continue
        folder = _rel_inside(mdir, conf.get("code"))
        if folder is None:
            out.add(ReasonCode.UNSAFE_CODE,
                    f"{mlmodel}: flavors.{fname}.code is {_show(conf.get('code'))}, which is not a folder inside the "
                    "model directory; a serving host would put that path on sys.path", _hint_allow(), mlmodel)
            continue
        if folder in code_dirs:
            continue
        code_dirs.add(folder)
        prefix = folder + "/" if folder else ""
        below = [p[len(prefix):] for p in paths if p.startswith(prefix)]
        modules = _top_modules(below)
        own |= modules
        if not modules:
            continue
        refused = sorted(m for m in modules if not module_allowed(m, settings))
        shown = ", ".join(sorted(modules)[:MAX_LISTED])
        if refused:
            out.add(ReasonCode.UNSAFE_CODE,
                    f"{mlmodel}: the model carries its own Python code in {folder or '.'}/ ({shown}); "
                    "mlflow.pyfunc.load_model puts that folder on sys.path and imports from it on every serving "
                    f"host, and {SETTING} does not allow {', '.join(refused[:MAX_LISTED])}",
                    _hint_allow(m for m in refused if m.isidentifier()), mlmodel, folder=folder or ".",
                    modules=sorted(modules)[:50], refused=refused[:50])
        else:
            out.model_code[folder] = sorted(modules)
    out.own_modules[mdir] = own

    check_environment(root, mdir, pyfunc, here, out.add, _read_small, _rel_inside, settings.allow_package_indexes)
    if pyfunc is not None:
        _check_pyfunc(mdir, mlmodel, pyfunc, pytorch, names, here, root, settings, out)
    elif pytorch is None and names:
        _unsupported_flavor(mlmodel, names, None, out)
    if pytorch is not None or (pyfunc is not None and pyfunc.get("loader_module") == PYTORCH_LOADER):
        _check_pytorch(mdir, mlmodel, pyfunc, pytorch, here, root, out)
    hf = flavors.get("transformers")
    if pytorch is None and isinstance(hf, dict):
        _check_transformers(mlmodel, hf, here, out)
    if mlmodel in out.other_flavors and isinstance(flavors.get("sklearn"), dict):
        _skops_types(root, mdir, flavors["sklearn"], here, out)


#: What save_pretrained writes as weights (single file, shards, their indexes).
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def _check_transformers(mlmodel: str, flavor: dict[str, Any], here: set[str], out: CodeScan) -> None:
    """mlflow.transformers keeps the save_pretrained folder under ``model_binary``; logged with
    save_pretrained=False it holds none, and serving would download weights from the Hub at load time:
    what is served is then not in the version, so it cannot be validated."""
    folder = _rel_inside("", flavor.get("model_binary") or "model")
    if folder is None:
        out.add(ReasonCode.CORRUPT_ARCHIVE, f"{mlmodel}: flavors.transformers.model_binary is "
                f"{_show(flavor.get('model_binary'))}, not a folder inside the model directory",
                "re-log the model with mlflow.transformers.log_model", mlmodel)
        return
    if any(p.startswith(folder + "/") and p.endswith(_HF_WEIGHT_SUFFIXES) for p in here):
        return
    source = flavor.get("source_model_name")
    ref = f" (it names {_show(source)} as its source)" if source else ""
    out.add(ReasonCode.ARTIFACT_MISSING,
            f"{mlmodel}: the transformers flavor holds no weights under {folder}/{ref}: logged with "
            "save_pretrained=False (serving would fetch them from the Hugging Face Hub), or the folder was not "
            "uploaded", "log the model with mlflow.transformers.log_model(..., save_pretrained=True) (the default), "
            "so the weights the stage validates are the ones served", mlmodel)


REQUIREMENT_PIN_RE = re.compile(r"^\s*(torch|mlflow|mlflow-skinny)\s*==\s*([0-9][^\s;#,]*)", re.IGNORECASE | re.MULTILINE)


def recorded_versions(mlmodel: Any, requirements: str | None = None) -> dict[str, str]:
    """The library versions a model recorded: ``{"python", "torch", "mlflow"}`` (what is known), from a
    parsed ``MLmodel`` (``flavors.pytorch.pytorch_version``, ``mlflow_version``,
    ``flavors.python_function.python_version``), then from ``torch==`` / ``mlflow==`` pins in
    ``requirements.txt``. Pure: the report shows them even when the scan stops a version before the
    worker (which reads the same fields) could load it."""
    out: dict[str, str] = {}

    def put(lib: str, value: Any) -> None:
        if lib not in out and isinstance(value, str | int | float) and not isinstance(value, bool) \
                and str(value).strip():
            out[lib] = str(value).strip()[:64]

    def mapping(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    doc = mapping(mlmodel)
    flavors = mapping(doc.get("flavors"))
    pytorch, pyfunc = mapping(flavors.get("pytorch")), mapping(flavors.get("python_function"))
    put("python", pyfunc.get("python_version"))
    put("torch", pytorch.get("pytorch_version"))
    put("mlflow", doc.get("mlflow_version"))
    for name, ver in REQUIREMENT_PIN_RE.findall(requirements or ""):
        put("torch" if name.lower() == "torch" else "mlflow", ver)
    return out


def _flavor_label(names: Sequence[str]) -> str:
    others = [n for n in names if n != "python_function"] or list(names)
    return ", ".join(others)


def _unsupported_flavor(mlmodel: str, names: Sequence[str], loader: str | None, out: CodeScan) -> None:
    label = _flavor_label(names)
    via = f" (served through {loader})" if loader else ""
    out.other_flavors[mlmodel] = label
    out.add(ReasonCode.UNSUPPORTED_FORMAT,
            f"{label} flavor{via}: ckpt-stage validates PyTorch models (mlflow.pytorch), not {label} models",
            "register PyTorch models here (mlflow.pytorch.log_model, or a torch/safetensors checkpoint) and "
            "validate other flavors with a gate made for them; an operator may set CKPT_STAGE_OTHER_FLAVORS=skip "
            "to leave such versions alone (status skipped, never promoted)", mlmodel, flavors=list(names))


MAX_SKOPS_BYTES = 64 << 20


def _skops_types(root: Path, mdir: str, conf: dict[str, Any], here: set[str], out: CodeScan) -> None:
    """For an sklearn model saved with skops (MLflow 3.17's default): the types ``skops.io.load`` would
    refuse unless trusted, from ``skops.io.get_untrusted_types``, which reads the file's schema and
    builds no object. Information only (the flavor is not validated here), and only where skops is
    installed; a file too large to read into memory is not looked at."""
    name = conf.get("pickled_model")
    if conf.get("serialization_format") != "skops" or not isinstance(name, str) or name not in here:
        return
    rel = posixpath.join(mdir, name) if mdir else name
    try:
        import skops.io as sio
    except ImportError:
        return
    try:
        if os.path.getsize(root / rel) > MAX_SKOPS_BYTES:
            return
        untrusted = sio.get_untrusted_types(file=str(root / rel))
    except Exception as exc:  # noqa: BLE001 - a malformed file is the flavor gate's to judge
        out.findings.append(Finding(None, f"{rel}: skops could not read the file's schema: "
                                    f"{type(exc).__name__}: {str(exc)[:200]}", file=rel, severity=Severity.INFO))
        return
    if untrusted:
        shown = ", ".join(untrusted[:MAX_LISTED]) + (f" and {len(untrusted) - MAX_LISTED} more"
                                                     if len(untrusted) > MAX_LISTED else "")
        out.findings.append(Finding(None, f"{rel}: skops.io.load refuses {len(untrusted)} type(s) it does not "
                                    f"trust by default: {shown}", "review them before passing trusted=[...] to "
                                    "skops.io.load on a serving host", file=rel, severity=Severity.WARNING,
                                    detail={"untrusted_types": untrusted[:100]}))
    else:
        out.findings.append(Finding(None, f"{rel}: skops.io.get_untrusted_types finds only types skops trusts "
                                    "by default", file=rel, severity=Severity.INFO))


def other_flavor(code: CodeScan, paths: Sequence[str]) -> str:
    """The flavor(s) of a version made only of models of flavors the stage does not validate (every
    ``MLmodel`` of it is one), else ``""``: a version that also holds a PyTorch model is judged as one."""
    mlmodels = [p for p in paths if posixpath.basename(p) == "MLmodel"]
    if not mlmodels or any(m not in code.other_flavors for m in mlmodels):
        return ""
    return ", ".join(dict.fromkeys(code.other_flavors[m] for m in sorted(mlmodels)))


def _check_pyfunc(mdir: str, mlmodel: str, pyfunc: dict[str, Any], pytorch: dict[str, Any] | None,
                  names: list[str], here: set[str], root: Path, settings: Settings, out: CodeScan) -> None:
    loader = pyfunc.get("loader_module")
    custom = (isinstance(loader, str) and any(_under(loader, p) for p in _CUSTOM_PYFUNC_LOADERS)) or any(
        k in pyfunc for k in ("python_model", "model_code_path"))
    if custom:
        _custom_pyfunc(mdir, mlmodel, pyfunc, here, root, settings, out)
        return
    if not isinstance(loader, str) or not loader:
        out.add(ReasonCode.CORRUPT_ARCHIVE, f"{mlmodel}: flavors.python_function has no loader_module",
                "re-log the model with mlflow", mlmodel)
        return
    if loader in settings.allow_loader_modules:
        return  # its data is judged with the pytorch flavor (or, without weights, as no checkpoint)
    flavor = loader.rsplit(".", 1)[-1]
    if loader == f"mlflow.{flavor}" and flavor in names and flavor not in SUPPORTED_FLAVORS:
        _unsupported_flavor(mlmodel, names, loader, out)  # a stock MLflow flavor: not ours, not the version's code
        return
    own = out.own_modules.get(mdir, set())
    where = " (a module of the model's own code folder)" if loader.split(".")[0] in own else ""
    out.add(ReasonCode.UNSAFE_CODE,
            f"{mlmodel}: flavors.python_function.loader_module is {_show(loader)}{where}; mlflow.pyfunc.load_model "
            "imports it and calls its _load_pyfunc on every serving host, and only "
            f"{', '.join(settings.allow_loader_modules)} is allowed",
            f"{HINT_SAFE}; an operator may allow another loader with CKPT_STAGE_ALLOW_LOADER_MODULES", mlmodel,
            loader_module=str(loader)[:200])


def _python_model_code(root: Path, rel: str | None, compression: Any, settings: Settings) -> list[str] | None:
    """The globals a custom pyfunc's python_model pickle imports that are not allowed code (empty: all
    allowed), or None when it cannot be read statically (compressed, missing, too large)."""
    from ckpt_stage.scan import allowlist
    from ckpt_stage.scan.pickles import pickle_globals

    if rel is None or compression:
        return None
    raw = _read_small(root / rel, min(settings.max_pickle_bytes, MAX_PYTHON_MODEL_BYTES))
    if raw is None:
        return None
    pickles = settings.replace(pickle_modules=tuple(settings.pickle_modules) + tuple(settings.allow_model_code))
    refused = []
    for module, name in pickle_globals(raw, settings):
        full = f"{module}.{name}"
        if full in _PYFUNC_RUNTIME_GLOBALS or allowlist.check(module, name, pickles).allowed:
            continue
        refused.append(full)
    return refused


def _custom_pyfunc(mdir: str, mlmodel: str, pyfunc: dict[str, Any], here: set[str], root: Path,
                   settings: Settings, out: CodeScan) -> None:
    loader = pyfunc.get("loader_module")
    parts = []
    uncovered: list[str] = []
    model_file = pyfunc.get("python_model")
    if model_file is not None:
        rel = _rel_inside(mdir, model_file)
        parts.append(f"python_model {_show(model_file)} (cloudpickle)")
        if rel is not None:
            out.pyfunc_models.add(rel)
        refused = _python_model_code(root, rel, pyfunc.get("python_model_compression"), settings)
        uncovered += [f"{_show(model_file)} (compressed or unreadable)"] if refused is None else refused
    code_path = pyfunc.get("model_code_path")
    if code_path is not None:
        # pyfunc/model.py runs DIR/<basename(model_code_path)> as a script (models from code).
        base = posixpath.basename(str(code_path).replace("\\", "/"))
        parts.append(f"model_code_path {_show(base)} (a Python script run at load)")
        if not module_allowed(base.split(".", 1)[0], settings):
            uncovered.append(base)
    if model_file is None and code_path is None:
        uncovered.append(f"loader {_show(loader)}")
    artifacts = pyfunc.get("artifacts")
    if isinstance(artifacts, dict) and artifacts:
        parts.append(f"{len(artifacts)} artifact(s) handed to that code")
    what = "; ".join(parts) or "no python_model"
    if settings.allow_model_code and not uncovered:
        # The operator allowed all of its code: what is left is a flavor the stage cannot check.
        out.add(ReasonCode.UNSUPPORTED_FORMAT,
                f"{mlmodel}: custom Python model (python_function flavor, loader {_show(loader)}; {what}): its code is "
                f"allowed by {SETTING}, but ckpt-stage validates PyTorch models and a custom pyfunc has no "
                "PyTorch weights to check", "log the torch module itself with mlflow.pytorch.log_model, or "
                "validate this model with a gate made for it", mlmodel, loader_module=loader,
                flavor="python_function")
        return
    shown = ", ".join(uncovered[:MAX_LISTED])
    out.add(ReasonCode.UNSAFE_CODE,
            f"{mlmodel}: python_function flavor with loader {_show(loader)}: the version is a custom Python model "
            f"(mlflow.pyfunc.PythonModel) whose own code would run at serving ({what}; not allowed: {shown}); "
            "ckpt-stage validates PyTorch models",
            f"{HINT_SAFE}. A custom pyfunc has no PyTorch weights the stage can check; allowing its code with "
            f"{SETTING}=<package> (classes importable from code_paths, not cloudpickled by value) leaves it "
            "unvalidated (UNSUPPORTED_FORMAT), not promoted", mlmodel, loader_module=loader,
            flavor="python_function", refused=uncovered[:50])


def _check_pytorch(mdir: str, mlmodel: str, pyfunc: dict[str, Any] | None, pytorch: dict[str, Any] | None,
                   here: set[str], root: Path, out: CodeScan) -> None:
    """The data folders mlflow.pytorch loads from: flavors.pytorch.model_data (mlflow.pytorch.load_model)
    and flavors.python_function.data (pyfunc.load_model; absent means the model folder itself)."""
    folders: list[str] = []
    model_data: str | None = None
    if pytorch is not None:
        raw = pytorch.get("model_data", "data")
        model_data = _rel_inside("", raw)
        if not model_data:
            out.add(ReasonCode.CORRUPT_ARCHIVE, f"{mlmodel}: flavors.pytorch.model_data is {_show(raw)}, not a folder "
                    "inside the model directory", "re-log the model with mlflow.pytorch.log_model", mlmodel)
            return
        folders.append(model_data)
    if pyfunc is not None and pyfunc.get("loader_module") == PYTORCH_LOADER:
        raw = pyfunc.get("data")
        data = "" if raw is None else _rel_inside("", raw)
        if data is None:
            out.add(ReasonCode.CORRUPT_ARCHIVE, f"{mlmodel}: flavors.python_function.data is {_show(raw)}, not a path "
                    "inside the model directory", "re-log the model with mlflow.pytorch.log_model", mlmodel)
            return
        if model_data is not None and data != model_data:
            out.add(ReasonCode.UNSAFE_CODE,
                    f"{mlmodel}: flavors.python_function.data is {_show(raw)} but flavors.pytorch.model_data is "
                    f"{_show(model_data)}: mlflow.pyfunc.load_model would serve something other than what the stage "
                    "validates", "re-log the model with mlflow.pytorch.log_model (both name the same folder)",
                    mlmodel)
        if data not in folders:
            folders.append(data)
    name = pyfunc.get("pickle_module_name") if pyfunc is not None else None
    if name is not None and name != PICKLE_MODULE:
        out.add(ReasonCode.UNSAFE_CODE,
                f"{mlmodel}: flavors.python_function.pickle_module_name is {_show(name)}, not {PICKLE_MODULE}",
                HINT_SAFE, mlmodel, pickle_module=str(name)[:200])
    for folder in folders:
        pth = f"{folder}/model.pth" if folder else "model.pth"
        if pth not in here:
            continue
        info = f"{folder}/pickle_module_info.txt" if folder else "pickle_module_info.txt"
        info_full = f"{mdir}/{info}" if mdir else info
        if info not in here:
            out.add(ReasonCode.ARTIFACT_MISSING,
                    f"{info_full} is missing: mlflow.pytorch cannot load {pth} without it",
                    "upload the whole model directory that mlflow.pytorch.log_model wrote", info_full)
            continue
        raw_info = _read_small(root / info_full, MAX_SMALL_TEXT)
        text = raw_info.decode("utf-8", "replace") if raw_info is not None else None
        # mlflow.pytorch._load_model: importlib.import_module(f.read()) — the exact text, not stripped.
        if text != PICKLE_MODULE:
            shown = repr(text[:200]) if text is not None else "(unreadable or too large)"
            out.add(ReasonCode.UNSAFE_CODE,
                    f"{info_full} names the pickle module {shown}; mlflow.pytorch imports that module by name and "
                    f"unpickles the model with it on every serving host; only {PICKLE_MODULE} is allowed",
                    HINT_SAFE, info_full, pickle_module=(text or "")[:200])


# -- Python files and Hugging Face configs anywhere in the version --------------------------------


def _scan_loose_code(paths: Sequence[str], settings: Settings, out: CodeScan, code_dirs: set[str]) -> None:
    """Python files outside the code folders judged above (those decided as a whole)."""
    loose = []
    for rel in paths:
        if extension(rel) not in CODE_EXTS:
            continue
        if any(d == "" or rel.startswith(d + "/") for d in code_dirs):
            continue
        stem = posixpath.basename(rel).split(".", 1)[0]
        if module_allowed(stem, settings):
            continue  # e.g. Hugging Face remote code the operator allowed by module name
        loose.append(rel)
    for rel in loose[:MAX_LISTED]:
        out.add(ReasonCode.UNSAFE_CODE,
                f"{rel} is Python code carried by the version; serving hosts may import it (an MLflow code "
                "folder, models-from-code, or Hugging Face remote code), so the stage does not treat it as metadata",
                _hint_allow([posixpath.basename(rel).split(".", 1)[0]]), rel)
    if len(loose) > MAX_LISTED:
        out.add(ReasonCode.UNSAFE_CODE, f"{len(loose) - MAX_LISTED} more Python file(s) not listed", _hint_allow())


def _is_hf_config(rel: str) -> bool:
    base = posixpath.basename(rel)
    return base.endswith("config.json")


def _remote_code(doc: Any, budget: int = 200_000) -> list[tuple[str, Any]]:
    """(key path, value) of every remote-code key, at any depth (sub-configs carry their own)."""
    found = []
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack and budget > 0:
        where, node = stack.pop()
        budget -= 1
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{where}.{k}" if where else str(k)
                if k in _REMOTE_CODE_KEYS and v:
                    found.append((key, v))
                elif isinstance(v, (dict, list)):
                    stack.append((key, v))
        elif isinstance(node, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(node))
    return found


def _referenced_modules(value: Any) -> list[str]:
    """Module names an auto_map / custom_pipelines value would import ("a.b.Class" → "a.b")."""
    out: list[str] = []
    stack = [value]
    while stack and len(out) < 1000:
        v = stack.pop()
        if isinstance(v, str):
            out.append(v.rsplit(".", 1)[0] if "." in v and "--" not in v else v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return out


#: A PEFT adapter's config. With peft installed, transformers' ``from_pretrained`` finds it in the folder
#: (``integrations/peft.py`` ``maybe_load_adapters``): beside a config.json it loads the folder's model and
#: then applies the adapter's weights on top; alone, it loads ``base_model_name_or_path`` (a Hub id or any
#: local path) as the model. Either way the model served is not the weights the stage validated.
ADAPTER_CONFIG = "adapter_config.json"


def _adapter(rel: str, doc: Any, out: CodeScan) -> None:
    base = doc.get("base_model_name_or_path") if isinstance(doc, dict) else None
    named = f" names its base model {_show(base)} and" if base else ""
    out.add(ReasonCode.UNSUPPORTED_FORMAT,
            f"{rel} is a PEFT adapter config: it{named} makes from_pretrained (with peft installed) load a base "
            "model and apply this adapter on top, so the model served is not the weights the stage validates",
            "merge the adapter into its base model (peft: model.merge_and_unload()) and register the merged "
            "model saved with save_pretrained", rel, kind="peft-adapter")


def _scan_hf_configs(root: Path, paths: Sequence[str], settings: Settings, out: CodeScan) -> None:
    for rel in paths:
        if not _is_hf_config(rel):
            continue
        raw = _read_small(root / rel, MAX_CONFIG_BYTES)
        if raw is None:
            out.add(ReasonCode.UNSAFE_CODE,
                    f"{rel} is larger than {MAX_CONFIG_BYTES >> 20} MiB or unreadable, so it cannot be checked for "
                    "auto_map remote code", "keep Hugging Face configs small (save_pretrained writes a few KiB)", rel)
            continue
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            continue  # transformers cannot read it either; the HF checks say so
        except RecursionError:
            # Readable by a process with a higher recursion limit (a serving host may raise it): what it
            # would import there cannot be known here, so it is not skipped as broken.
            out.add(ReasonCode.UNSAFE_CODE,
                    f"{rel} nests too deeply for the stage to read, so it cannot be checked for auto_map remote code",
                    "save the config with save_pretrained (Hugging Face configs are a few levels deep)", rel)
            continue
        if posixpath.basename(rel) == ADAPTER_CONFIG:
            _adapter(rel, doc, out)
        if posixpath.basename(rel) == "config.json" and isinstance(doc, dict) and "transformers_weights" in doc:
            # modeling_utils._get_resolved_checkpoint_files: a config's transformers_weights overrides the
            # save_pretrained layout; save_pretrained never writes it (configuration_utils drops it on save).
            out.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"{rel} sets transformers_weights to {_show(doc['transformers_weights'])}: from_pretrained loads "
                    "that file instead of model.safetensors (or its index, or pytorch_model.bin), so what is served "
                    "is chosen by the config rather than by the layout the stage validates",
                    "remove transformers_weights from config.json (save_pretrained never writes it) and keep one "
                    "copy of the weights under the names save_pretrained uses", rel, kind="explicit-weights")
        for key, value in _remote_code(doc):
            modules = _referenced_modules(value)
            # "repo--module.Class" pulls code from another Hub repository at load: never allowed.
            remote = [m for m in modules if "--" in m]
            refused = [m for m in modules if "--" in m or not module_allowed(m, settings)]
            if not refused:
                continue
            shown = ", ".join(sorted(set(refused))[:MAX_LISTED])
            extra = " (from another repository)" if remote else ""
            out.add(ReasonCode.UNSAFE_CODE,
                    f"{rel}: {key} names remote code{extra} that transformers imports with trust_remote_code: {shown}",
                    "register a model whose architecture ships with transformers (no auto_map), or "
                    + _hint_allow(m.split(".")[0] for m in refused if "--" not in m and m.split(".")[0].isidentifier()),
                    rel, key=key, modules=sorted(set(refused))[:50])


# -- folding ----------------------------------------------------------------------------------------


def fold_pickle_findings(findings: Sequence[Finding], code: CodeScan) -> list[Finding]:
    """One clear reason instead of two: an ``UNSAFE_PICKLE`` that only says "imports the version's own
    code" (or any pickle finding on a custom pyfunc's python_model) joins the ``UNSAFE_CODE`` finding
    that already names that code; the pickle's message is kept in it."""
    own = {m for mods in code.own_modules.values() for m in mods}
    into: dict[int, list[Finding]] = {}
    kept: list[Finding] = []
    for f in findings:
        target = None
        if f.code is ReasonCode.UNSAFE_PICKLE:
            names = f.detail.get("globals")
            own_only = (isinstance(names, list) and 0 < len(names) < 50
                        and all(str(n).split(".")[0] in own for n in names))
            listed = isinstance(names, list)  # "imports X": not a scanner-confusion finding, which stays
            key = "flavor" if f.file in code.pyfunc_models and listed else "folder" if own_only else None
            if key is not None:
                target = next((i for i, g in enumerate(findings) if key in g.detail and g.code in (
                    ReasonCode.UNSAFE_CODE, ReasonCode.UNSUPPORTED_FORMAT)), None)
        if target is None:
            kept.append(f)
        else:
            into.setdefault(target, []).append(f)
    if not into:
        return list(findings)
    out = []
    for f in kept:
        i = next((i for i, g in enumerate(findings) if g is f), -1)
        folded = into.get(i)
        if folded:
            notes = "; ".join(g.message for g in folded[:3])
            # Under an UNSUPPORTED_FORMAT (code allowed) the only possible note is MLflow's own type-hint
            # class, which the scanner's pickle allowlist does not know: kept in the detail only.
            text = f"{f.message} [{notes[:400]}]" if f.code is ReasonCode.UNSAFE_CODE else f.message
            f = Finding(f.code, text, f.hint, f.file, f.severity,
                        {**f.detail, "pickle_findings": [g.message for g in folded[:10]]})
        out.append(f)
    return out
