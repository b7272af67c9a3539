"""An MLflow model directory, read without MLflow's pyfunc machinery (no imports it chooses, no
``pickle_module`` it names): the MLmodel YAML, recorded versions, signature and input example.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from ckpt_stage.load.checks import TensorSpec, parse_tensor_specs
from ckpt_stage.errors import ExampleError, ModelDirError
from ckpt_stage.scan.mlflow_dir import MAX_MLMODEL_BYTES, REQUIREMENT_PIN_RE, YamlProblem, load_yaml

MAX_EXAMPLE_BYTES = 64 * 2**20


@dataclass
class MlflowModel:
    root: str
    """Absolute path of the model directory (the folder holding MLmodel)."""
    rel: str
    """The same folder relative to the job root ("" when it is the root)."""
    mlmodel: dict[str, Any]
    pytorch: dict[str, Any] | None
    recorded: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    example_info: dict[str, Any] | None = None

    def relpath(self, *parts: str) -> str:
        return "/".join(p for p in (self.rel, *parts) if p)

    def inside(self, relative: str) -> str:
        """Absolute path of ``relative`` under the model dir; refuses ``..`` and absolute paths."""
        full = os.path.realpath(os.path.join(self.root, relative))
        root = os.path.realpath(self.root)
        if full != root and not full.startswith(root + os.sep):
            raise ModelDirError(f"MLmodel names {relative!r}, which lies outside the model directory",
                                "MLmodel paths must be relative to the model directory", file="MLmodel")
        return full


def read(root: str, rel: str) -> MlflowModel:
    path = os.path.join(root, "MLmodel")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_MLMODEL_BYTES + 1)
        if len(text) > MAX_MLMODEL_BYTES:
            raise YamlProblem(f"it is larger than {MAX_MLMODEL_BYTES >> 20} MiB")
        doc = load_yaml(text)
    except YamlProblem as exc:
        raise ModelDirError(f"MLmodel is not used: {exc}", "re-log the model with mlflow", file="MLmodel") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelDirError(f"MLmodel cannot be read as YAML: {exc}".strip(), "re-log the model with mlflow",
                            file="MLmodel") from None
    if not isinstance(doc, dict):
        raise ModelDirError("MLmodel is not a YAML mapping", "re-log the model with mlflow", file="MLmodel")
    flavors: dict[str, Any] = doc["flavors"] if isinstance(doc.get("flavors"), dict) else {}
    pytorch = flavors["pytorch"] if isinstance(flavors.get("pytorch"), dict) else None
    model = MlflowModel(root=root, rel=rel, mlmodel=doc, pytorch=pytorch)
    sig: dict[str, Any] = doc["signature"] if isinstance(doc.get("signature"), dict) else {}
    model.inputs = parse_tensor_specs(sig.get("inputs"))
    model.outputs = parse_tensor_specs(sig.get("outputs"))
    info = doc.get("saved_input_example_info")
    model.example_info = info if isinstance(info, dict) else None
    _recorded(model, flavors)
    return model


def _put(model: MlflowModel, lib: str, value: Any, source: str) -> None:
    if lib not in model.recorded and isinstance(value, (str, int, float)) and str(value).strip():
        model.recorded[lib] = str(value).strip()
        model.sources[lib] = source


def _recorded(model: MlflowModel, flavors: dict[str, Any]) -> None:
    pyfunc: dict[str, Any] = flavors["python_function"] if isinstance(flavors.get("python_function"), dict) else {}
    _put(model, "torch", (model.pytorch or {}).get("pytorch_version"), "MLmodel flavors.pytorch.pytorch_version")
    _put(model, "mlflow", model.mlmodel.get("mlflow_version"), "MLmodel mlflow_version")
    _put(model, "python", pyfunc.get("python_version"), "MLmodel flavors.python_function.python_version")
    env = _small_text(os.path.join(model.root, "python_env.yaml"))
    if env:
        try:
            penv = load_yaml(env)
        except (yaml.YAMLError, YamlProblem):
            penv = None
        if isinstance(penv, dict):
            _put(model, "python", penv.get("python"), "python_env.yaml")
    reqs = _small_text(os.path.join(model.root, "requirements.txt"))
    for name, ver in REQUIREMENT_PIN_RE.findall(reqs or ""):
        _put(model, "torch" if name.lower() == "torch" else "mlflow", ver, "requirements.txt")


def _small_text(path: str, limit: int = 1 << 20) -> str | None:
    try:
        if os.path.getsize(path) > limit:
            return None
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# the version's own code (MLflow code_paths), when the operator allowed it


@dataclass
class ModelCode:
    folders: list[str] = field(default_factory=list)
    """Absolute code folders put on sys.path."""
    modules: list[str] = field(default_factory=list)
    """Top-level modules the scan found there and the operator allowed (pickle allowlist prefixes)."""
    ran: list[str] = field(default_factory=list)
    """Modules imported from those folders by the time the block ended (what really ran)."""


def _from_folders(mod: object, folders: list[str]) -> bool:
    files = [getattr(mod, "__file__", None) or ""] + [str(p) for p in (getattr(mod, "__path__", None) or [])]
    return any(f and os.path.realpath(f).startswith(tuple(d + os.sep for d in folders)) for f in files)


@contextmanager
def model_code_on_path(job_root: str, model_code: dict[str, list[str]]) -> Iterator[ModelCode]:
    """Put the version's allowed code folders first on ``sys.path``, as ``mlflow.pyfunc.load_model``
    does on a serving host (``_add_code_from_conf_to_system_path``), but here only inside the isolated,
    throw-away worker. Folders outside the job root are ignored. On exit, the folders leave ``sys.path``
    and what was imported from them leaves ``sys.modules`` (for in-process callers; a worker ends anyway).
    """
    root = os.path.realpath(job_root)
    code = ModelCode()
    for rel, modules in sorted(model_code.items()):
        full = os.path.realpath(os.path.join(root, rel))
        if full != root and not full.startswith(root + os.sep) or not os.path.isdir(full):
            continue
        code.folders.append(full)
        code.modules.extend(m for m in modules if m not in code.modules)
    if not code.folders:
        yield code
        return
    saved_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # the version's folder is read-only; never leave .pyc files in it
    sys.path[:0] = code.folders
    before = set(sys.modules)
    try:
        yield code
    finally:
        code.ran[:] = sorted(n for n in set(sys.modules) - before if _from_folders(sys.modules[n], code.folders))
        for folder in code.folders:
            while folder in sys.path:
                sys.path.remove(folder)
        for name in code.ran:
            sys.modules.pop(name, None)
        sys.dont_write_bytecode = saved_bytecode


# --------------------------------------------------------------------------------------------------
# input example → tensors


_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
           "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool, "double": torch.float64,
           "float": torch.float32, "long": torch.int64, "integer": torch.int32}


def _to_tensor(value: Any, spec: TensorSpec | None, label: str, *, frame: bool = False) -> torch.Tensor:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ExampleError(f"{label} is not a rectangular array: {exc}") from None
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise ExampleError(f"{label} holds {arr.dtype.kind == 'O' and 'mixed or ragged' or 'string'} values, "
                           "not numbers")
    dtype = _DTYPES.get(spec.dtype) if spec else None
    if dtype is None and frame:
        dtype = torch.float32  # mlflow.pytorch's predict: DataFrame.to_numpy(dtype=np.float32)
    if dtype is None:
        dtype = {"f": torch.float32, "i": torch.int64, "u": torch.int64, "b": torch.bool}.get(arr.dtype.kind,
                                                                                          torch.float32)
    return torch.as_tensor(arr).to(dtype)


def example_files(model: MlflowModel) -> list[str]:
    info = model.example_info or {}
    return [str(info[k]) for k in ("artifact_path", "serving_input_path") if info.get(k)]


def read_example(model: MlflowModel) -> tuple[list[torch.Tensor], str]:
    """The logged input example as positional tensors, and the file it came from.

    ``artifact_path`` (the raw example) first, ``serving_input_path`` (``{"inputs": ...}`` or
    ``{"dataframe_split": ...}``) when the former is absent. Dtypes follow the input signature.
    """
    info = model.example_info or {}
    kind = str(info.get("type", "ndarray"))
    if kind.startswith("sparse_matrix"):
        raise ExampleError(f"input example of type {kind} is not supported for a forward pass")
    doc, used = None, ""
    for key in ("artifact_path", "serving_input_path"):
        rel = info.get(key)
        if not rel:
            continue
        full = model.inside(str(rel))
        if not os.path.isfile(full):
            continue
        if os.path.getsize(full) > MAX_EXAMPLE_BYTES:
            raise ExampleError(f"{rel} is larger than {MAX_EXAMPLE_BYTES >> 20} MiB")
        try:
            with open(full, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ExampleError(f"{rel} is not valid JSON: {exc}") from None
        used = str(rel)
        if key == "serving_input_path" and isinstance(doc, dict):
            for wrapper in ("inputs", "instances", "dataframe_split", "dataframe_records"):
                if wrapper in doc:
                    doc = doc[wrapper]
                    break
        break
    if not used:
        raise FileNotFoundError(", ".join(example_files(model)) or "input example")
    specs = model.inputs or []
    frame = kind == "dataframe"
    if isinstance(doc, dict) and "data" in doc and ("columns" in doc or frame):
        doc, frame = doc["data"], True  # pandas split orient; mlflow feeds a DataFrame as one array
    if isinstance(doc, dict):
        names = [s.name for s in specs if s.name] or list(doc)
        missing = [n for n in names if n not in doc]
        if missing:
            raise ExampleError(f"{used} lacks the signature inputs {', '.join(missing)}")
        by_name = {s.name: s for s in specs}
        return [_to_tensor(doc[n], by_name.get(n), f"{used}[{n!r}]") for n in names], used
    return [_to_tensor(doc, specs[0] if specs else None, used, frame=frame)], used
