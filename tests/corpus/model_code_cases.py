"""MLflow model directories that carry code a serving host would execute, built with the stock client.

Benign ones come straight from ``mlflow.pytorch.save_model`` / ``mlflow.pyfunc.save_model``
(``code_paths`` with a small package written here); hostile ones are those directories edited by hand
the way an attacker who can register a version would. Each hostile payload writes a file into the
canary folder when it runs; ``MECHANISMS`` names the hostile cases where stock
``mlflow.pyfunc.load_model(DIR)`` (then ``.predict``) does run it, so the tests can prove the gate
refuses a real mechanism and not a guess.

Used by tests/unit/test_scan_mlflow_dir.py (static scan) and tests/integration/test_model_code.py
(``ckpt-stage inspect`` with the isolated worker, and the mechanism proofs).
"""

from __future__ import annotations

import atexit
import gzip
import json
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import yaml

from tests.corpus import Built, Case
from tests.corpus.static_cases import os_system_pickle

PKG = "mypkg"
_NET = (
    "import torch\n"
    "class Net(torch.nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.body = torch.nn.Linear(4, 3)\n"
    "        self.head = torch.nn.Linear(3, 2)\n"
    "    def forward(self, x):\n"
    "        return self.head(torch.relu(self.body(x)))\n"
)

_LOCK = threading.Lock()
_TEMPLATES: dict[str, Path] = {}


def example() -> np.ndarray:
    return np.random.default_rng(0).random((2, 4), dtype=np.float32)


def canary_code(canary: Path, name: str) -> str:
    return f"import pathlib\npathlib.Path({str(canary)!r}, {name!r}).write_text('ran')\n"


def _template(kind: str) -> Path:
    """One stock save per process and kind; callers copy it."""
    with _LOCK:
        if kind not in _TEMPLATES:
            base = Path(tempfile.mkdtemp(prefix=f"ckpt-model-code-{kind}-"))
            atexit.register(shutil.rmtree, base, True)
            _TEMPLATES[kind] = _save(kind, base)
        return _TEMPLATES[kind]


def _save(kind: str, base: Path) -> Path:
    import mlflow.pyfunc
    import mlflow.pytorch

    dest = base / "model"
    if kind == "pickle":
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        mlflow.pytorch.save_model(model, str(dest), serialization_format="pickle", input_example=example(),
                                  pip_requirements=["torch"])
    elif kind == "pt2":
        from tests.corpus.load_cases import mlflow_template

        shutil.copytree(mlflow_template(), dest)
    elif kind in ("code_paths", "pyfunc"):
        src = base / "src" / PKG
        src.mkdir(parents=True)
        (src / "__init__.py").write_text("")
        (src / "net.py").write_text(_NET)
        (src / "pf.py").write_text(
            "import mlflow.pyfunc\n"
            "class Echo(mlflow.pyfunc.PythonModel):\n"
            "    def predict(self, context, model_input, params=None):\n"
            "        return model_input\n")
        sys.path.insert(0, str(src.parent))
        try:
            if kind == "code_paths":
                from mypkg.net import Net  # type: ignore[import-not-found]

                torch.manual_seed(0)
                mlflow.pytorch.save_model(Net(), str(dest), serialization_format="pickle", input_example=example(),
                                          code_paths=[str(src)], pip_requirements=["torch"])
            else:
                from mypkg.pf import Echo  # type: ignore[import-not-found]

                mlflow.pyfunc.save_model(str(dest), python_model=Echo(), code_paths=[str(src)],
                                         input_example=example(), pip_requirements=["mlflow"])
        finally:
            sys.path.remove(str(src.parent))
            for name in [n for n in sys.modules if n == PKG or n.startswith(PKG + ".")]:
                del sys.modules[name]
    elif kind == "from_code":
        script = base / "echo_model.py"
        script.write_text(
            "import mlflow.pyfunc, mlflow.models\n"
            "class Echo(mlflow.pyfunc.PythonModel):\n"
            "    def predict(self, context, model_input, params=None):\n"
            "        return model_input\n"
            "mlflow.models.set_model(Echo())\n")
        mlflow.pyfunc.save_model(str(dest), python_model=str(script), pip_requirements=["mlflow"])
    else:  # pragma: no cover
        raise ValueError(kind)
    return dest


def copy(kind: str, workdir: Path) -> Path:
    dest = workdir / f"{kind}-model"
    shutil.copytree(_template(kind), dest)
    return dest


def edit_mlmodel(d: Path, edit) -> None:
    path = d / "MLmodel"
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


# -- benign -----------------------------------------------------------------------------------------


def b_pt2(w: Path, c: Path) -> Built:
    return Built([copy("pt2", w)])


def b_pickle(w: Path, c: Path) -> Built:
    return Built([copy("pickle", w)])


def b_code_paths_allowed(w: Path, c: Path) -> Built:
    return Built([copy("code_paths", w)], env={"CKPT_STAGE_ALLOW_MODEL_CODE": PKG})


def b_code_paths_not_allowed(w: Path, c: Path) -> Built:
    return Built([copy("code_paths", w)])


def b_code_paths_other_prefix(w: Path, c: Path) -> Built:
    return Built([copy("code_paths", w)], env={"CKPT_STAGE_ALLOW_MODEL_CODE": "otherpkg"})


def b_pyfunc(w: Path, c: Path) -> Built:
    return Built([copy("pyfunc", w)])


def b_pyfunc_code_allowed(w: Path, c: Path) -> Built:
    return Built([copy("pyfunc", w)], env={"CKPT_STAGE_ALLOW_MODEL_CODE": PKG})


def b_from_code(w: Path, c: Path) -> Built:
    return Built([copy("from_code", w)])


def b_sklearn_by_hand(w: Path, c: Path) -> Built:
    """What mlflow.sklearn.save_model writes (MLflow 3.17, skops by default), without needing sklearn."""
    d = w / "sk-model"
    d.mkdir()
    (d / "MLmodel").write_text(yaml.safe_dump({
        "flavors": {
            "python_function": {"env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
                                "loader_module": "mlflow.sklearn", "model_path": "model.skops",
                                "predict_fn": "predict", "python_version": "3.11.7"},
            "sklearn": {"code": None, "pickled_model": "model.skops", "serialization_format": "skops",
                        "sklearn_version": "1.9.1", "skops_trusted_types": None}},
        "mlflow_version": "3.17.2"}))
    (d / "model.skops").write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    (d / "conda.yaml").write_text("dependencies:\n- python=3.11\n")
    (d / "requirements.txt").write_text("scikit-learn==1.9.1\n")
    return Built([d])


# -- hostile: each writes into the canary folder if it ever runs --------------------------------------


def h_loader_in_code(w: Path, c: Path) -> Built:
    """python_function.loader_module names a module of the version's own code folder."""
    d = copy("pickle", w)
    (d / "code").mkdir()
    (d / "code" / "evil_loader.py").write_text(canary_code(c, "loader-module") + "def _load_pyfunc(path):\n"
                                               "    raise SystemExit(0)\n")

    def edit(doc: dict) -> None:
        doc["flavors"]["python_function"].update(loader_module="evil_loader", code="code")
    edit_mlmodel(d, edit)
    return Built([d])


def h_loader_in_code_allowed_prefix(w: Path, c: Path) -> Built:
    """The same, with the operator allowing the code folder's module: the loader is still not allowed."""
    built = h_loader_in_code(w, c)
    return Built(built.paths, env={"CKPT_STAGE_ALLOW_MODEL_CODE": "evil_loader"})


def h_pickle_module_info(w: Path, c: Path) -> Built:
    """data/pickle_module_info.txt names a module that mlflow.pytorch imports by name."""
    d = copy("pickle", w)
    (d / "code").mkdir()
    (d / "code" / "evil_pickle.py").write_text(canary_code(c, "pickle-module") + "from pickle import *  # noqa\n")
    (d / "data" / "pickle_module_info.txt").write_text("evil_pickle")

    def edit(doc: dict) -> None:
        doc["flavors"]["python_function"]["code"] = "code"
    edit_mlmodel(d, edit)
    return Built([d], env={"CKPT_STAGE_ALLOW_MODEL_CODE": "evil_pickle"})


def h_pickle_module_name(w: Path, c: Path) -> Built:
    d = copy("pickle", w)

    def edit(doc: dict) -> None:
        doc["flavors"]["python_function"]["pickle_module_name"] = "evil_pickle"
    edit_mlmodel(d, edit)
    return Built([d])


def h_code_paths_import(w: Path, c: Path) -> Built:
    """A code_paths model whose package runs code at import (the unpickler imports it)."""
    d = copy("code_paths", w)
    (d / "code" / PKG / "__init__.py").write_text(canary_code(c, "code-paths-import"))
    return Built([d])


def h_python_model_reduce(w: Path, c: Path) -> Built:
    """A custom pyfunc whose python_model.pkl runs a payload when cloudpickle loads it."""
    d = copy("pyfunc", w)
    (d / "python_model.pkl").write_bytes(os_system_pickle(f"touch {c}/python-model"))
    return Built([d])


def h_python_model_reduce_allowed(w: Path, c: Path) -> Built:
    """The opt-in covers the package, not a payload the cloudpickle carries."""
    built = h_python_model_reduce(w, c)
    return Built(built.paths, env={"CKPT_STAGE_ALLOW_MODEL_CODE": PKG})


def h_python_model_compressed(w: Path, c: Path) -> Built:
    """The same payload gzip-compressed (python_model_compression): no pickle bytes for a scanner to see."""
    d = copy("pyfunc", w)
    (d / "python_model.pkl").unlink()
    (d / "python_model.pkl.gz").write_bytes(gzip.compress(os_system_pickle(f"touch {c}/python-model-gz")))

    def edit(doc: dict) -> None:
        doc["flavors"]["python_function"].update(python_model="python_model.pkl.gz", python_model_compression="gzip")
    edit_mlmodel(d, edit)
    return Built([d])


def h_model_code_path(w: Path, c: Path) -> Built:
    """Models from code: the script named by model_code_path is run by load_model."""
    d = copy("from_code", w)
    (d / "echo_model.py").write_text(canary_code(c, "model-code-path") + (d / "echo_model.py").read_text())
    return Built([d])


def h_loose_py(w: Path, c: Path) -> Built:
    """A .py file next to a plain pt2 model (today read as metadata)."""
    d = copy("pt2", w)
    (d / "artifacts").mkdir()
    (d / "artifacts" / "helper.py").write_text(canary_code(c, "loose-py"))
    return Built([d])


def h_pyc_in_data(w: Path, c: Path) -> Built:
    d = copy("pt2", w)
    (d / "data" / "helper.cpython-311.pyc").write_bytes(b"\xa7\r\r\n" + b"\x00" * 12)
    return Built([d])


def h_code_folder_everything(w: Path, c: Path) -> Built:
    """flavors.pytorch.code: '.': the whole model folder on sys.path (data/ becomes a namespace package)."""
    d = copy("pickle", w)

    def edit(doc: dict) -> None:
        doc["flavors"]["pytorch"]["code"] = "."
    edit_mlmodel(d, edit)
    return Built([d], env={"CKPT_STAGE_ALLOW_MODEL_CODE": PKG})


def h_code_folder_outside(w: Path, c: Path) -> Built:
    d = copy("pickle", w)

    def edit(doc: dict) -> None:
        doc["flavors"]["python_function"]["code"] = "../../elsewhere"
    edit_mlmodel(d, edit)
    return Built([d])


def h_code_shadows_library(w: Path, c: Path) -> Built:
    """A code folder providing 'yaml': allowed by prefix, still refused (it would replace a library)."""
    d = copy("code_paths", w)
    (d / "code" / "yaml").mkdir()
    (d / "code" / "yaml" / "__init__.py").write_text(canary_code(c, "shadow-yaml"))
    return Built([d], env={"CKPT_STAGE_ALLOW_MODEL_CODE": f"{PKG},yaml"})


def h_second_code_folder(w: Path, c: Path) -> Built:
    """python_function.code allowed; flavors.pytorch.code (used by mlflow.pytorch.load_model) is another folder."""
    d = copy("code_paths", w)
    (d / "code2" / "sneaky").mkdir(parents=True)
    (d / "code2" / "sneaky" / "__init__.py").write_text(canary_code(c, "second-code-folder"))

    def edit(doc: dict) -> None:
        doc["flavors"]["pytorch"]["code"] = "code2"
    edit_mlmodel(d, edit)
    return Built([d], env={"CKPT_STAGE_ALLOW_MODEL_CODE": PKG})


def h_data_mismatch(w: Path, c: Path) -> Built:
    """pyfunc serves other/ while the pytorch flavor (what a validator reads) names data/."""
    d = copy("pt2", w)
    shutil.copytree(d / "data", d / "other")

    def edit(doc: dict) -> None:
        doc["flavors"]["python_function"]["data"] = "other"
    edit_mlmodel(d, edit)
    return Built([d])


def _auto_map(d: Path, c: Path, name: str = "config.json", value: object = None) -> None:
    (d / name).write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": value or {"AutoConfig": "configuration_evil.EvilConfig",
                              "AutoModel": "modeling_evil.EvilModel"}}))
    (d / "configuration_evil.py").write_text(canary_code(c, "auto-map") + (
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'evil'\n"))


def h_auto_map_bare(w: Path, c: Path) -> Built:
    """A Hugging Face folder (no MLmodel) whose config.json asks for remote code."""
    from safetensors.torch import save_file

    d = w / "hf"
    d.mkdir()
    save_file({"weight": torch.zeros(2, 4)}, str(d / "model.safetensors"))
    _auto_map(d, c)
    return Built([d])


def h_auto_map_in_mlflow_dir(w: Path, c: Path) -> Built:
    d = copy("pt2", w)
    _auto_map(d / "data", c)
    (d / "data" / "configuration_evil.py").unlink()
    return Built([d])


def h_auto_map_other_repo(w: Path, c: Path) -> Built:
    """'repo--module.Class' fetches code from another Hub repository: refused whatever is allowed."""
    d = copy("pt2", w)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["someone/repo--tokenization_evil.EvilTokenizer", None]}}))
    return Built([d], env={"CKPT_STAGE_ALLOW_MODEL_CODE": "tokenization_evil,someone"})


def h_auto_map_nested(w: Path, c: Path) -> Built:
    d = copy("pt2", w)
    (d / "config.json").write_text(json.dumps({"model_type": "x", "text_config": {
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}}))
    return Built([d])


def h_both_pt2_and_pth(w: Path, c: Path) -> Built:
    """data/ holds a good model.pt2 and a model.pth with NaN weights: mlflow.pytorch serves model.pth."""
    import mlflow.pytorch.pickle_module as pickle_module

    d = copy("pt2", w)
    bad = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        bad[0].weight.fill_(float("nan"))
    torch.save(bad, d / "data" / "model.pth", pickle_module=pickle_module)
    (d / "data" / "pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module")
    return Built([d])


def _q(name, build, codes=("UNSAFE_CODE",), needles=(), hostile=True) -> Case:
    return Case(name, build, "quarantine", tuple(codes), tuple(needles), hostile=hostile)


CASES: list[Case] = [
    Case("mc_pt2", b_pt2, "pass"),
    Case("mc_pickle", b_pickle, "pass"),
    Case("mc_code_paths_allowed", b_code_paths_allowed, "pass"),
    _q("mc_code_paths_not_allowed", b_code_paths_not_allowed, needles=("code/", PKG, "CKPT_STAGE_ALLOW_MODEL_CODE"),
       hostile=False),
    _q("mc_code_paths_other_prefix", b_code_paths_other_prefix,
       needles=(PKG, f"CKPT_STAGE_ALLOW_MODEL_CODE={PKG}"), hostile=False),
    _q("mc_custom_pyfunc", b_pyfunc, needles=("custom Python model", "python_function", "serving"), hostile=False),
    _q("mc_custom_pyfunc_code_allowed", b_pyfunc_code_allowed, ("UNSUPPORTED_FORMAT",),
       ("custom Python model", "allowed by CKPT_STAGE_ALLOW_MODEL_CODE", "validates PyTorch models"), hostile=False),
    _q("mc_models_from_code", b_from_code, needles=("model_code_path", "custom Python model"), hostile=False),
    _q("mc_sklearn_flavor", b_sklearn_by_hand, ("UNSUPPORTED_FORMAT",),
       ("sklearn flavor", "ckpt-stage validates PyTorch models"), hostile=False),
    _q("mc_loader_in_code", h_loader_in_code, needles=("loader_module", "evil_loader")),
    _q("mc_loader_in_code_allowed_prefix", h_loader_in_code_allowed_prefix, needles=("evil_loader",
                                                                                     "CKPT_STAGE_ALLOW_LOADER_MODULES")),
    _q("mc_pickle_module_info", h_pickle_module_info, needles=("pickle_module_info.txt", "evil_pickle")),
    _q("mc_pickle_module_name", h_pickle_module_name, needles=("pickle_module_name", "evil_pickle")),
    _q("mc_code_paths_import", h_code_paths_import, needles=(PKG,)),
    _q("mc_python_model_reduce", h_python_model_reduce, needles=("custom Python model",)),
    _q("mc_python_model_reduce_allowed", h_python_model_reduce_allowed, needles=("posix.system",)),
    _q("mc_python_model_compressed", h_python_model_compressed, needles=("custom Python model",)),
    _q("mc_model_code_path", h_model_code_path, needles=("model_code_path", "echo_model.py")),
    _q("mc_loose_py", h_loose_py, needles=("artifacts/helper.py",)),
    _q("mc_pyc_in_data", h_pyc_in_data, needles=("helper.cpython-311.pyc",)),
    _q("mc_code_folder_everything", h_code_folder_everything, needles=("data",)),
    _q("mc_code_folder_outside", h_code_folder_outside, needles=("../../elsewhere",)),
    _q("mc_code_shadows_library", h_code_shadows_library, needles=("yaml",)),
    _q("mc_second_code_folder", h_second_code_folder, needles=("code2/", "sneaky")),
    _q("mc_data_mismatch", h_data_mismatch, needles=("python_function.data",)),
    _q("mc_auto_map_bare", h_auto_map_bare, needles=("auto_map", "configuration_evil")),
    _q("mc_auto_map_in_mlflow_dir", h_auto_map_in_mlflow_dir, needles=("data/config.json", "auto_map")),
    _q("mc_auto_map_other_repo", h_auto_map_other_repo, needles=("another repository",)),
    _q("mc_auto_map_nested", h_auto_map_nested, needles=("text_config.auto_map",)),
]

#: Hostile cases whose payload stock ``mlflow.pyfunc.load_model(DIR)`` + ``predict`` really runs.
MECHANISMS = ("mc_loader_in_code", "mc_pickle_module_info", "mc_code_paths_import", "mc_python_model_reduce",
              "mc_python_model_compressed", "mc_model_code_path")

#: Decided by the worker, not the static scan (the scan's reading is right, the load finds the rest).
LOAD_CASES: list[Case] = [
    Case("mc_both_pt2_and_pth", h_both_pt2_and_pth, "quarantine", ("NONFINITE_WEIGHTS",), ("0.weight",)),
]
