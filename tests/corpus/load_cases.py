"""Load-time corpus: real checkpoints that pass the static scan and must be judged by the worker.

Every builder writes small real files (a few tensors) into ``workdir``. MLflow models are expensive
to save (~9 s for pt2, docs/traps.md), so one pt2 model is saved per process and every MLflow case copies
and edits it; the ``pickle``-format model is derived from the same directory by writing
``data/model.pth`` exactly as ``mlflow.pytorch.save_model(serialization_format="pickle")`` does.
Those cases are ``slow=True`` (the first one pays for the save).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path

import torch

from tests.corpus import Built, Case

# -- helpers ----------------------------------------------------------------------------------------


def _linear_sd(in_features: int = 4, out_features: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(out_features, in_features, generator=g),
            "bias": torch.randn(out_features, generator=g)}


LINEAR = "torch.nn:Linear"
LINEAR_KW = {"in_features": 4, "out_features": 2}


def _save(workdir: Path, name: str, obj: object) -> Path:
    path = workdir / name
    torch.save(obj, path)
    return path


def _state_case(name: str, obj_fn, *, arch: str | None = LINEAR, kwargs: dict | None = None, filename="model.pt",
                env: dict | None = None):
    def build(workdir: Path, canary: Path) -> Built:
        path = _save(workdir, filename, obj_fn())
        return Built([path], arch=arch, arch_kwargs=dict(LINEAR_KW if kwargs is None else kwargs),
                     env=dict(env or {}))
    build.__name__ = f"build_{name.replace('-', '_')}"
    return build


# -- bare checkpoints -----------------------------------------------------------------------------


def build_safetensors(workdir: Path, canary: Path) -> Built:
    from safetensors.torch import save_file

    path = workdir / "model.safetensors"
    save_file(_linear_sd(), str(path), metadata={"format": "pt"})
    return Built([path], arch="torch.nn.Linear", arch_kwargs=dict(LINEAR_KW))


def build_sharded_safetensors(workdir: Path, canary: Path) -> Built:
    from safetensors.torch import save_file

    lstm = torch.nn.LSTM(input_size=3, hidden_size=4)
    sd = {k: v.detach().clone() for k, v in lstm.state_dict().items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    paths = []
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(workdir / fname), metadata={"format": "pt"})
        paths.append(workdir / fname)
    index = workdir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    return Built([*paths, index], arch="torch.nn:LSTM", arch_kwargs={"input_size": 3, "hidden_size": 4})


def build_missing_shard(workdir: Path, canary: Path) -> Built:
    built = build_sharded_safetensors(workdir, canary)
    missing = workdir / "model-00002-of-00002.safetensors"
    missing.unlink()
    return Built([p for p in built.paths if p != missing], arch=built.arch, arch_kwargs=built.arch_kwargs)


def build_cuda_saved(workdir: Path, canary: Path) -> Built:
    """Storages tagged ``cuda:0`` (as torch.save on a GPU writes them) without needing a GPU: the
    location tag is what a CPU host trips over unless it loads with map_location="cpu"."""
    import torch.serialization as ser

    real = ser.location_tag
    ser.location_tag = lambda storage: "cuda:0"
    try:
        path = _save(workdir, "model.pt", _linear_sd())
    finally:
        ser.location_tag = real
    return Built([path], arch=LINEAR, arch_kwargs=dict(LINEAR_KW))


def build_format_too_new(workdir: Path, canary: Path) -> Built:
    """A torch zip whose ``version`` record says 99 (this torch reads up to 10)."""
    path = _save(workdir, "model.pt", _linear_sd())
    # Patched in place (torch writes b"3\n"; b"99" has the same length), CRCs updated: the layout stays
    # torch's own (a rewrite with zipfile moves the storages, which is refused for its own reason).
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zin:
        info = next(i for i in zin.infolist() if i.filename.endswith("/version") and i.filename.count("/") == 1)
        assert zin.read(info) == b"3\n"
    name = info.filename.encode()
    (lextra,) = struct.unpack_from("<H", data, info.header_offset + 28)
    start = info.header_offset + 30 + len(name) + lextra
    data[start:start + 2] = b"99"
    crc = struct.pack("<I", zlib.crc32(b"99"))
    data[info.header_offset + 14:info.header_offset + 18] = crc
    desc = start + 2 + (4 if data[start + 2:start + 6] == b"PK\x07\x08" else 0)  # torch writes data descriptors
    data[desc:desc + 4] = crc
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        (nlen,) = struct.unpack_from("<H", data, pos + 28)
        if data[pos + 46:pos + 46 + nlen] == name:
            data[pos + 16:pos + 20] = crc
        pos = data.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))
    return Built([path], arch=LINEAR, arch_kwargs=dict(LINEAR_KW))


def build_legacy(workdir: Path, canary: Path) -> Built:
    """The pre-1.6 (non-zip) torch.save format: no mmap, same weights_only rules."""
    path = workdir / "model.pth"
    torch.save(_linear_sd(), path, _use_new_zipfile_serialization=False)
    return Built([path], arch=LINEAR, arch_kwargs=dict(LINEAR_KW))


def build_legacy_protocol_too_new(workdir: Path, canary: Path) -> Built:
    """A legacy file whose protocol record says 1002 (torch reads 1001)."""
    built = build_legacy(workdir, canary)
    path = built.paths[0]
    data = path.read_bytes()
    at = data.index(b"\x80\x02M\xe9\x03.")  # pickle of the int 1001 right after the magic number
    path.write_bytes(data[:at] + b"\x80\x02M\xea\x03." + data[at + 6:])
    return built


def _training(with_model: bool):
    def make() -> dict:
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        out = {"epoch": 3, "optimizer_state_dict": opt.state_dict(), "loss": 0.25}
        if with_model:
            out["model_state_dict"] = model.state_dict()
        return out
    return make


def _nan() -> dict:
    sd = _linear_sd()
    sd["weight"][0, 1] = float("nan")
    sd["weight"][1, 2] = float("nan")
    return sd


def _inf() -> dict:
    sd = _linear_sd()
    sd["bias"][1] = float("inf")
    return sd


def _int_weights() -> dict:
    sd = _linear_sd()
    sd["weight"] = (sd["weight"] * 100).to(torch.int64)
    return sd


def _half() -> dict:
    return {k: v.half() for k, v in _linear_sd().items()}


def _extra_missing() -> dict:
    sd = _linear_sd()
    return {"weight": sd["weight"], "head.weight": torch.zeros(3, 2)}


def _prefixed() -> dict:
    return {f"module.{k}": v for k, v in _linear_sd().items()}


# -- architectures that must not be imported, and one that may ----------------------------------


def _write_package(workdir: Path, pkg: str, body: str) -> Path:
    root = workdir / "pythonpath"
    (root / pkg).mkdir(parents=True, exist_ok=True)
    (root / pkg / "__init__.py").write_text(body)
    return root


def build_arch_canary_refused(workdir: Path, canary: Path) -> Built:
    """The declared architecture's package would drop a file in the canary folder if imported; its
    prefix is not allowed, so the worker must refuse it by name."""
    pkg = "ckpt_corpus_canary_arch"
    root = _write_package(workdir, pkg, (
        "import pathlib\n"
        f"pathlib.Path({str(canary)!r}, 'arch-imported').write_text('imported')\n"
        "import torch\n"
        "class Net(torch.nn.Linear):\n"
        "    pass\n"
    ))
    path = _save(workdir, "model.pt", _linear_sd())
    return Built([path], arch=f"{pkg}.models:Net", arch_kwargs=dict(LINEAR_KW), env={"PYTHONPATH": str(root)})


def build_arch_custom_allowed(workdir: Path, canary: Path) -> Built:
    """A package the operator allowed with CKPT_STAGE_ARCH_MODULES is imported and used."""
    pkg = "ckpt_corpus_allowed_arch"
    root = _write_package(workdir, pkg, (
        "import torch\n"
        "class TinyNet(torch.nn.Module):\n"
        "    def __init__(self, width=4, classes=2):\n"
        "        super().__init__()\n"
        "        self.body = torch.nn.Linear(width, width)\n"
        "        self.head = torch.nn.Linear(width, classes)\n"
        "    def forward(self, x):\n"
        "        return self.head(torch.relu(self.body(x)))\n"
    ))
    g = torch.Generator().manual_seed(1)
    sd = {"body.weight": torch.randn(4, 4, generator=g), "body.bias": torch.zeros(4),
          "head.weight": torch.randn(2, 4, generator=g), "head.bias": torch.zeros(2)}
    path = _save(workdir, "model.pt", sd)
    return Built([path], arch=f"{pkg}:TinyNet", arch_kwargs={"width": 4, "classes": 2},
                 env={"PYTHONPATH": str(root), "CKPT_STAGE_ARCH_MODULES": pkg})


# -- MLflow models --------------------------------------------------------------------------------

_TEMPLATE_LOCK = threading.Lock()
_TEMPLATE: Path | None = None


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def _example():
    import numpy as np

    return np.random.default_rng(0).random((2, 4), dtype=np.float32)


def mlflow_template() -> Path:
    """One real ``mlflow.pytorch.save_model`` (pt2 format, with input example and signature) per
    process; callers copy it."""
    global _TEMPLATE
    with _TEMPLATE_LOCK:
        if _TEMPLATE is None:
            import mlflow.pytorch

            base = Path(tempfile.mkdtemp(prefix="ckpt-corpus-mlflow-"))
            atexit.register(shutil.rmtree, base, True)
            mlflow.pytorch.save_model(_model(), str(base / "model"), input_example=_example())
            _TEMPLATE = base / "model"
        return _TEMPLATE


def _copy_template(workdir: Path) -> Path:
    dest = workdir / "mlflow-model"
    shutil.copytree(mlflow_template(), dest)
    return dest


def _edit_mlmodel(model_dir: Path, edit) -> None:
    import yaml

    path = model_dir / "MLmodel"
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _edit_example(model_dir: Path, rows: list[list[float]]) -> None:
    (model_dir / "input_example.json").write_text(json.dumps(rows))
    (model_dir / "serving_input_example.json").write_text(json.dumps({"inputs": rows}, indent=2))


def build_mlflow_pt2(workdir: Path, canary: Path) -> Built:
    return Built([_copy_template(workdir)])


def build_mlflow_bad_example(workdir: Path, canary: Path) -> Built:
    d = _copy_template(workdir)
    _edit_example(d, [[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]])  # width 5, model takes 4
    return Built([d])


def build_mlflow_output_signature(workdir: Path, canary: Path) -> Built:
    d = _copy_template(workdir)

    def edit(doc: dict) -> None:
        doc["signature"]["outputs"] = json.dumps(
            [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3]}}])
    _edit_mlmodel(d, edit)
    return Built([d])


def _torch_version(version: str):
    def build(workdir: Path, canary: Path) -> Built:
        d = _copy_template(workdir)

        def edit(doc: dict) -> None:
            doc["flavors"]["pytorch"]["pytorch_version"] = version
        _edit_mlmodel(d, edit)
        req = d / "requirements.txt"
        req.write_text("".join(f"torch=={version}\n" if line.startswith("torch==") else line
                               for line in req.read_text().splitlines(keepends=True)))
        return Built([d])
    return build


def build_mlflow_no_example(workdir: Path, canary: Path) -> Built:
    d = _copy_template(workdir)

    def edit(doc: dict) -> None:
        doc.pop("saved_input_example_info", None)
    _edit_mlmodel(d, edit)
    (d / "input_example.json").unlink()
    (d / "serving_input_example.json").unlink()
    return Built([d])


def _as_pickle_model(d: Path, obj: object) -> None:
    """What mlflow.pytorch.save_model(serialization_format="pickle") writes into data/ (MLmodel is
    the same for both formats in MLflow 3.17)."""
    import mlflow.pytorch.pickle_module as pickle_module

    (d / "data" / "model.pt2").unlink()
    torch.save(obj, d / "data" / "model.pth", pickle_module=pickle_module)
    (d / "data" / "pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module")


def build_mlflow_pickle(workdir: Path, canary: Path) -> Built:
    d = _copy_template(workdir)
    _as_pickle_model(d, _model())
    return Built([d])


def build_mlflow_pickle_disabled(workdir: Path, canary: Path) -> Built:
    built = build_mlflow_pickle(workdir, canary)
    return Built(built.paths, env={"CKPT_STAGE_ALLOW_PICKLED_MODELS": "false"})


def build_mlflow_pickle_state_dict(workdir: Path, canary: Path) -> Built:
    d = _copy_template(workdir)
    _as_pickle_model(d, _model().state_dict())
    return Built([d])


def build_mlflow_pickle_main_class(workdir: Path, canary: Path) -> Built:
    """A module class defined in a notebook / ``__main__``: cloudpickle stores it by value (code)."""
    d = _copy_template(workdir)
    cls = type("NotebookNet", (torch.nn.Sequential,), {"__module__": "__main__"})
    model = cls(torch.nn.Linear(4, 2))
    _as_pickle_model(d, model)
    return Built([d])


def build_pt2_file(workdir: Path, canary: Path) -> Built:
    """A bare torch.export archive (the one inside the MLflow model)."""
    path = workdir / "model.pt2"
    shutil.copyfile(mlflow_template() / "data" / "model.pt2", path)
    return Built([path])


def _rewrite_pt2(model_dir: Path, edit) -> None:
    """Rewrite ``data/model.pt2`` entry by entry; ``edit(records)`` gets {name without the archive's
    root folder: bytes} and may change, add or drop records."""
    src = model_dir / "data" / "model.pt2"
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        root = names[0].split("/", 1)[0]
        records = {n.split("/", 1)[1]: zin.read(n) for n in names}
    edit(records)
    tmp = src.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for name, data in records.items():
            zout.writestr(f"{root}/{name}", data)
    tmp.replace(src)


class _Touch:
    """A pickle payload that creates ``path`` when unpickled by anything but a weights_only loader."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _torch_bytes(obj: object) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def build_pt2_sample_inputs_payload(workdir: Path, canary: Path) -> Built:
    """torch 2.13's torch.export.load retries a failed weights_only load of
    ``data/sample_inputs/model.pt`` with weights_only=False: a payload there runs on load. The
    archive is otherwise the intact MLflow pt2 model."""
    d = _copy_template(workdir)

    def edit(records: dict[str, bytes]) -> None:
        records["data/sample_inputs/model.pt"] = _torch_bytes(((_Touch(canary / "pt2-sample-inputs"),), {}))
    _rewrite_pt2(d, edit)
    return Built([d])


def build_pt2_pickled_weight(workdir: Path, canary: Path) -> Built:
    """A weight marked ``use_pickle``: torch.export.load reads it with torch.load(weights_only=False)."""
    d = _copy_template(workdir)

    def edit(records: dict[str, bytes]) -> None:
        cfg_name = "data/weights/model_weights_config.json"
        cfg = json.loads(records[cfg_name])
        meta = cfg["config"]["0.bias"]
        meta["use_pickle"] = True
        records[f"data/weights/{meta['path_name']}"] = _torch_bytes(_Touch(canary / "pt2-pickled-weight"))
        records[cfg_name] = json.dumps(cfg).encode()
    _rewrite_pt2(d, edit)
    return Built([d])


def build_pt2_opaque_object(workdir: Path, canary: Path) -> Built:
    """An "opaque object" constant: torch.export.load hands its bytes to pickle.loads."""
    import pickle

    d = _copy_template(workdir)

    def edit(records: dict[str, bytes]) -> None:
        cfg = {"config": {"helper": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                     "tensor_meta": None}}}
        records["data/constants/model_constants_config.json"] = json.dumps(cfg).encode()
        records["data/constants/opaque_obj_0"] = pickle.dumps(_Touch(canary / "pt2-opaque-object"))
    _rewrite_pt2(d, edit)
    return Built([d])


def build_pt2_aotinductor(workdir: Path, canary: Path) -> Built:
    """An AOTInductor package: load_pt2 would dlopen the shared library under data/aotinductor/."""
    d = _copy_template(workdir)

    def edit(records: dict[str, bytes]) -> None:
        records["data/aotinductor/model/model.so"] = b"\x7fELF" + bytes(60)
        records["data/aotinductor/model/model_metadata.json"] = b"{}"
    _rewrite_pt2(d, edit)
    return Built([d])


# -- the cases ------------------------------------------------------------------------------------

_NOT_MODULE_ENV = {"CKPT_STAGE_ARCH_MODULES": "collections"}

CASES: list[Case] = [
    # good ones
    Case("load-state-dict-linear", _state_case("sd", _linear_sd), "pass"),
    Case("load-safetensors-linear", build_safetensors, "pass"),
    Case("load-sharded-safetensors", build_sharded_safetensors, "pass"),
    Case("load-training-checkpoint-with-model", _state_case("train", _training(True)), "pass"),
    Case("load-float16-weights", _state_case("half", _half), "pass"),
    Case("load-saved-on-cuda", build_cuda_saved, "pass"),
    Case("load-legacy-format", build_legacy, "pass"),
    Case("load-whole-module-file", _state_case("whole", _model, arch=None), "pass"),
    Case("load-whole-module-file-disabled", _state_case("whole_off", _model, arch=None,
                                                        env={"CKPT_STAGE_ALLOW_PICKLED_MODELS": "false"}),
         "quarantine", ("UNSAFE_PICKLE",), ("torch.nn.modules.container.Sequential",
                                            "CKPT_STAGE_ALLOW_PICKLED_MODELS")),
    Case("load-arch-allowed-package", build_arch_custom_allowed, "pass"),
    # architecture against weights
    Case("load-arch-missing-unexpected-keys", _state_case("keys", _extra_missing), "quarantine",
         ("ARCHITECTURE_MISMATCH",), ("1 missing key (bias)", "1 unexpected (head.weight)")),
    Case("load-shape-mismatch", _state_case("shape", lambda: _linear_sd(8, 10),
                                            kwargs={"in_features": 8, "out_features": 2}),
         "quarantine", ("SHAPE_MISMATCH",), ("weight: checkpoint [10, 8] vs model [2, 8]",)),
    Case("load-dataparallel-prefix", _state_case("prefix", _prefixed), "quarantine",
         ("ARCHITECTURE_MISMATCH",), ("'module.'",)),
    Case("load-integer-weights", _state_case("int", _int_weights), "quarantine",
         ("DTYPE_MISMATCH",), ("weight: checkpoint int64 vs model float32",)),
    Case("load-no-arch", _state_case("noarch", _linear_sd, arch=None), "quarantine",
         ("PARTIAL_CHECKPOINT",), ("bare state_dict", "ckpt_stage.arch")),
    Case("load-optimizer-only", _state_case("opt", _training(False)), "quarantine",
         ("PARTIAL_CHECKPOINT",), ("without model weights", "optimizer_state_dict")),
    Case("load-nan-weights", _state_case("nan", _nan), "quarantine",
         ("NONFINITE_WEIGHTS",), ("weight (2 NaN of 8)",)),
    Case("load-inf-weights", _state_case("inf", _inf), "quarantine",
         ("NONFINITE_WEIGHTS",), ("bias (1 Inf of 2)",)),
    Case("load-format-version-too-new", build_format_too_new, "quarantine",
         ("LIBRARY_VERSION_MISMATCH",), ("version 99",)),
    Case("load-legacy-protocol-too-new", build_legacy_protocol_too_new, "quarantine",
         ("LIBRARY_VERSION_MISMATCH",), ("1002",)),
    Case("load-missing-shard", build_missing_shard, "quarantine",
         ("ARTIFACT_MISSING",), ("model-00002-of-00002.safetensors",)),
    # architectures refused by name (never imported)
    Case("load-arch-os-system", _state_case("os", _linear_sd, arch="os:system"), "quarantine",
         ("PARTIAL_CHECKPOINT",), ("'os'", "CKPT_STAGE_ARCH_MODULES")),
    Case("load-arch-subprocess-popen", _state_case("popen", _linear_sd, arch="subprocess:Popen"), "quarantine",
         ("PARTIAL_CHECKPOINT",), ("'subprocess'", "CKPT_STAGE_ARCH_MODULES")),
    Case("load-arch-outside-prefix", _state_case("nnx", _linear_sd, arch="torch.nnx.Linear"), "quarantine",
         ("PARTIAL_CHECKPOINT",), ("'torch.nnx'",)),
    Case("load-arch-canary-package", build_arch_canary_refused, "quarantine",
         ("PARTIAL_CHECKPOINT",), ("ckpt_corpus_canary_arch.models",), hostile=True),
    Case("load-arch-not-a-module", _state_case("od", _linear_sd, arch="collections:OrderedDict",
                                               kwargs={}, env=_NOT_MODULE_ENV), "quarantine",
         ("PARTIAL_CHECKPOINT",), ("not an nn.Module subclass",)),
    Case("load-arch-function", _state_case("fn", _linear_sd, arch="torch.nn.functional:relu", kwargs={}),
         "quarantine", ("PARTIAL_CHECKPOINT",), ("not an nn.Module subclass",)),
    Case("load-arch-bad-kwargs", _state_case("kw", _linear_sd, kwargs={"in_features": 4, "outputs": 2}),
         "quarantine", ("PARTIAL_CHECKPOINT",), ("outputs",)),
    # MLflow models (one real save per process, then copies)
    Case("load-mlflow-pt2", build_mlflow_pt2, "pass", slow=True),
    Case("load-mlflow-pt2-file", build_pt2_file, "pass", slow=True),
    Case("load-mlflow-bad-input-example", build_mlflow_bad_example, "quarantine",
         ("SMOKE_INFERENCE_FAILED",), ("[2, 5]",), slow=True),
    Case("load-mlflow-output-signature", build_mlflow_output_signature, "quarantine",
         ("SMOKE_INFERENCE_FAILED",), ("expected float32 [-1, 3], got float32 [2, 2]",), slow=True),
    Case("load-mlflow-torch-from-future", _torch_version("99.0.0"), "quarantine",
         ("LIBRARY_VERSION_MISMATCH",), ("99.0", "2.13"), slow=True),
    Case("load-mlflow-older-torch", _torch_version("2.9.1"), "pass", slow=True),
    Case("load-mlflow-no-input-example", build_mlflow_no_example, "pass", slow=True),
    Case("load-mlflow-pickle", build_mlflow_pickle, "pass", slow=True),
    Case("load-mlflow-pickle-disabled", build_mlflow_pickle_disabled, "quarantine",
         ("UNSAFE_PICKLE",), ("CKPT_STAGE_ALLOW_PICKLED_MODELS",), slow=True),
    Case("load-mlflow-pickle-state-dict", build_mlflow_pickle_state_dict, "quarantine",
         ("PARTIAL_CHECKPOINT",), ("state_dict",), slow=True),
    Case("load-mlflow-pickle-main-class", build_mlflow_pickle_main_class, "quarantine",
         ("UNSAFE_PICKLE",), ("__main__",), slow=True),
    Case("load-pt2-sample-inputs-payload", build_pt2_sample_inputs_payload, "quarantine",
         ("UNSAFE_PICKLE",), ("posix.system",), hostile=True, slow=True),
    Case("load-pt2-pickled-weight", build_pt2_pickled_weight, "quarantine",
         ("UNSAFE_PICKLE",), ("posix.system",), hostile=True, slow=True),
    Case("load-pt2-opaque-object", build_pt2_opaque_object, "quarantine",
         ("UNSAFE_PICKLE",), ("opaque_obj_0",), hostile=True, slow=True),
    Case("load-pt2-aotinductor", build_pt2_aotinductor, "quarantine",
         ("UNSUPPORTED_FORMAT",), ("data/aotinductor/model/model.so",), slow=True),
]
