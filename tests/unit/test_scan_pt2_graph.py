"""The strict reader of a torch.export program's JSON (ckpt_stage/scan/pt2.py), on real archives.

Benign: programs torch 2.13 exports from ordinary modules (dynamic dims, derived dims with guard
code, buffers, constants, torch.cond, unbacked sizes, kwargs, dict inputs, LSTM, transformer) and
an MLflow pt2 model read clean. Hostile: one string of a real archive rewritten per field that
torch turns into Python (tests/corpus/pt2_code.py); the scanner alone refuses each with
UNSAFE_CODE naming the field, the worker refuses it even without the scanner, and for the
payloads plain torch demonstrably runs, a subprocess that loads the file the way a serving host
would creates the canary: the mechanism is real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.export import Dim

from ckpt_stage.config import Settings
from ckpt_stage.domain import FileFormat
from ckpt_stage.scan import pt2 as grammar, scan_version
from tests.corpus import pt2_code as P

S = Settings()


def codes(result) -> set[str]:
    return {f.code.value for f in result.findings if f.code}


# -- the grammar, directly -------------------------------------------------------------------------

TORCH_EXPRESSIONS = [
    "Symbol('s77', positive=True, integer=True)",
    "Add(Symbol('s16', positive=True, integer=True), Integer(-2))",
    "Mul(Integer(24), Max(Integer(1), Add(Symbol('s16', positive=True, integer=True), Integer(-2))))",
    "FloorDiv(Symbol('s0', positive=True, integer=True), Integer(2))",
    "Symbol('u0', integer=True)",
    "Float('1.5', precision=53)",
    "Rational(1, 2)",
    "2*s40 + 1", "2*s40", "s40", "s0*s1", "Max(2, s0)", "-s0 + 5", "s0**2", "(s0//2)", "Mod(s0, 2)",
    "Eq(s0, 3)", "s0 >= 2", "Ne(Mod(s0, 2), 0) & (s1 < 8)", "oo", "-oo", "int_oo", "S.Infinity", "True",
]

HOSTILE_EXPRESSIONS = [
    "__import__('os').system('id')",
    "Symbol('__import__')",
    "Symbol('s0').__class__",
    "s0.__class__",
    "exec('1')", "eval('1')", "open('/etc/passwd')", "getattr(s0, 'x')", "lambda: 0",
    "Integer('1; import os')", "Float('nan\\x00')", "Symbol('s0', evil=True)", "Symbol('s0', positive=os)",
    "[s0 for s0 in ()]", "s0[0]", "{}", "s0; s1", "s0\nimport os", "'s0'", "Max(s0, 'x')", "x", "s", "input",
    "Integer(" + "9" * 100 + ")", "(" * 200 + "s0" + ")" * 200, "Symbol('s0' 'x')", "s0 if s0 else s1", "",
]


@pytest.mark.parametrize("text", TORCH_EXPRESSIONS)
def test_expression_grammar_reads_what_torch_writes(text):
    grammar.check_expr(text)


@pytest.mark.parametrize("text", HOSTILE_EXPRESSIONS)
def test_expression_grammar_refuses_code(text):
    with pytest.raises(grammar._Refused):
        grammar.check_expr(text)


TORCH_GUARDS = [
    "((-1) + L['x'].size()[0]) == L['y'].size()[0]",
    "2 <= L['x'].size()[0] <= 64",
    "L['x'].size()[0] % 2 == 0 and L['args'][0]['k'].stride()[1] >= 1",
    "max(2, L['x'].size()[1]) == math.floor(L['y'].size()[0] / 2)",
    "not (L['x'].size()[0] == 1)",
]
HOSTILE_GUARDS = [
    "__import__('os').system('id') == 0",
    "L['x'].size()[0] == 1 or exec('1')",
    "L['x'].__class__",
    "L[__import__('os')]",
    "L['x'].size()[0] == 1\nimport os",
    "L['x'].size()[0] == 1)\n  __import__('os').system('id')\n  (1",
    "L['x'].numpy().tofile('/tmp/x')",
    "math.__dict__",
    "L['x'] == '\\x41'",
    "(lambda: 0)()",
]


@pytest.mark.parametrize("text", TORCH_GUARDS)
def test_guard_grammar_reads_what_torch_writes(text):
    grammar.check_guard(text)


@pytest.mark.parametrize("text", HOSTILE_GUARDS)
def test_guard_grammar_refuses_code(text):
    with pytest.raises(grammar._Refused):
        grammar.check_guard(text)


@pytest.mark.parametrize("name", ["x", "input", "p_l1_weight", "linear_1", "self", "match", "_x"])
def test_names_torch_writes(name):
    grammar.check_name(name)


@pytest.mark.parametrize("name", ["", "x y", "x=1", "1x", "class", "None", "__class__", "__builtins__", "x.y",
                                  "x\n", "é" * 3, "x" * 2000, 7, None])
def test_names_refused(name):
    with pytest.raises(grammar._Refused):
        grammar.check_name(name)


@pytest.mark.parametrize("fqn", ["weight", "l1.weight", "0.weight", "layers.10.attn.in_proj_bias", "_orig_mod.fc"])
def test_fqns_torch_writes(fqn):
    grammar.check_fqn(fqn)


@pytest.mark.parametrize("fqn", ["", "a..b", ".a", "a.", 'a")', "a.__class__", "a.b c", "a.class", "a/b"])
def test_fqns_refused(fqn):
    with pytest.raises(grammar._Refused):
        grammar.check_fqn(fqn)


@pytest.mark.parametrize("target", ["torch.ops.aten.linear.default", "torch.ops.prims.convert_element_type.default",
                                    "torch.ops.higher_order.cond", "_operator.getitem", "torch.sym_max",
                                    "math.trunc"])
def test_targets_torch_writes(target):
    grammar.check_target(target)


@pytest.mark.parametrize("target", ["torch.os.system", "torch.ops.mylib.op.default", "#mylib:op", "os.system",
                                    "builtins.eval", "_operator.attrgetter", "_operator.call", "math.__dict__",
                                    "torch.ops.aten.__class__.default", "torch.ops.higher_order.inline_asm_elementwise",
                                    "torch.ops.higher_order.flat_apply", "torch.export.custom_ops.x",
                                    "torch._dynamo.eval_frame", "torch.ops.aten.linear.default.x"])
def test_targets_refused(target):
    with pytest.raises(grammar._Refused):
        grammar.check_target(target)


# -- benign archives torch writes --------------------------------------------------------------------


class _Cond(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.lin(x).relu(), lambda x: self.lin(x).sigmoid(), (x,))


class _Derived(torch.nn.Module):
    def forward(self, x, y):
        return x[1:] + y


class _View(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        b = x.shape[0]
        return self.lin(x.reshape(b, -1)).view(b, 2, 4).mean(1)


class _Unbacked(torch.nn.Module):
    def forward(self, x):
        n = x.sum().to(torch.int64).item()
        torch._check(n >= 0)
        torch._check(n < 100)
        return torch.zeros(n) + 1, x * 2


class _DictIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.register_buffer("offset", torch.zeros(2), persistent=False)

    def forward(self, batch, *, alpha: float = 0.5):
        return {"out": self.lin(batch["feat"]) * alpha + batch["bias"] + self.offset}


class _Ops(torch.nn.Module):
    def forward(self, x):
        return torch.div(x, 3, rounding_mode="floor"), torch.nn.functional.gelu(x, approximate="tanh")


def _benign_programs():
    d = Dim("d", min=2, max=64)
    b = Dim("b", min=2, max=512)
    return {
        "net": (P.Net(), (torch.randn(3, 4),), {"x": {0: b}}, {}),
        "linear": (torch.nn.Linear(3, 2), (torch.randn(1, 3),), None, {}),
        "conv": (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                     torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)),
                 (torch.randn(2, 3, 8, 8),), {"input": {0: b, 2: Dim("h", min=4, max=64), 3: Dim("w", min=4, max=64)}},
                 {}),
        "cond": (_Cond(), (torch.randn(3, 4),), None, {}),
        "derived-dims": (_Derived(), (torch.randn(5, 3), torch.randn(4, 3)), {"x": {0: 2 * d + 1}, "y": {0: 2 * d}}, {}),
        "view": (_View(), (torch.randn(4, 2, 4),), {"x": {0: b}}, {}),
        "unbacked": (_Unbacked(), (torch.ones(3),), None, {}),
        "dict-kwargs": (_DictIn(), ({"feat": torch.randn(3, 4), "bias": torch.randn(3, 2)},), None, {"alpha": 2.0}),
        "train-bn": (torch.nn.BatchNorm1d(4).train(), (torch.randn(5, 4),), {"input": {0: b}}, {}),
        "string-args": (_Ops(), (torch.randn(6, 3),), {"x": {0: Dim.AUTO, 1: Dim.AUTO}}, {}),
        "transformer": (torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval(), (torch.randn(2, 5, 8),),
                        {"src": {0: Dim("bb", max=64), 1: Dim("seq", max=128)}}, {}),
        "lstm": (torch.nn.LSTM(4, 8, batch_first=True).eval(), (torch.randn(2, 5, 4),), None, {}),
        "embedding": (torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 2)),
                      (torch.randint(0, 10, (2, 3)),), None, {}),
    }


@pytest.fixture(scope="module")
def benign_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("benign-pt2")
    torch.manual_seed(0)
    for name, (model, args, dynamic, kwargs) in _benign_programs().items():
        model = model if name == "train-bn" else model.eval()
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic if not kwargs else None)
        torch.export.save(ep, str(out / f"{name}.pt2"))
    return out


@pytest.mark.parametrize("name", list(_benign_programs()))
def test_benign_exports_read_clean(benign_dir, name):
    result = scan_version(benign_dir, [f"{name}.pt2"], S)
    assert result.findings == (), [f.to_dict() for f in result.findings]
    assert result.formats[f"{name}.pt2"] is FileFormat.TORCH_EXPORT


def test_benign_export_with_guard_code_really_has_some(benign_dir):
    """The derived-dims program is the one whose guard code the grammar must read (not refuse)."""
    import zipfile

    with zipfile.ZipFile(benign_dir / "derived-dims.pt2") as z:
        doc = json.loads(z.read("derived-dims/models/model.json"))
    assert doc["guards_code"], "torch no longer writes guard code here; pick another benign program"


def test_benign_mlflow_pt2_model_reads_clean(tmp_path):
    import mlflow.pytorch
    import numpy as np

    d = tmp_path / "model"
    mlflow.pytorch.save_model(P.Net().eval(), str(d), input_example=np.zeros((3, 4), dtype=np.float32))
    rels = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    result = scan_version(d, rels, S)
    assert result.findings == (), [f.to_dict() for f in result.findings]
    assert result.formats["data/model.pt2"] is FileFormat.TORCH_EXPORT


def test_worker_reader_agrees_on_benign(benign_dir):
    from ckpt_stage.load import pt2

    for name in _benign_programs():
        facts = pt2.inspect(str(benign_dir / f"{name}.pt2"))
        assert facts.unsafe == [] and facts.unsupported == [], (name, facts.unsafe)


# -- hostile archives --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return P.benign(tmp_path_factory.mktemp("pt2-src") / "src.pt2")


@pytest.mark.parametrize("payload", P.PAYLOADS, ids=lambda p: p.name)
def test_scanner_alone_refuses_code_in_the_graph(payload, src, tmp_path):
    canary = tmp_path / "canary"
    payload.build(src, tmp_path / "m.pt2", canary)
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert codes(result) == {"UNSAFE_CODE"}, [f.to_dict() for f in result.findings]
    text = " ".join(f.message for f in result.findings)
    assert payload.field in text, text
    assert " = " in text  # the offending value is shown (escaped, truncated)
    hint = result.findings[0].hint
    assert "ckpt_stage.arch" in hint and "custom operators" in hint
    assert not canary.exists()


@pytest.mark.parametrize("payload", P.PAYLOADS, ids=lambda p: p.name)
def test_worker_refuses_without_the_scanner(payload, src, tmp_path):
    """The worker reads the same grammar before torch sees the file (a file the scan did not describe)."""
    from ckpt_stage.domain import ReasonCode
    from ckpt_stage.sandbox.job import LoadJob
    from ckpt_stage.load.loader import load_and_check

    canary = tmp_path / "canary"
    payload.build(src, tmp_path / "m.pt2", canary)
    result = load_and_check(LoadJob(root=str(tmp_path), files=(("m.pt2", "unknown"),)))
    got = {f.code for f in result.findings if f.code}
    assert ReasonCode.UNSAFE_CODE in got, [f.to_dict() for f in result.findings]
    assert not canary.exists()


@pytest.mark.parametrize("payload", [p for p in P.PAYLOADS if p.runs], ids=lambda p: p.name)
def test_without_the_reader_torch_runs_the_payload(payload, src, tmp_path):
    """The mechanism is real: torch 2.13 itself (a serving host's torch.export.load, .module() and a
    forward pass) runs the string, in a subprocess under a temp dir."""
    canary = tmp_path / "canary"
    path = payload.build(src, tmp_path / "m.pt2", canary)
    subprocess.run([sys.executable, "-c", P.TORCH_RUN, str(path)], capture_output=True, timeout=300,
                   cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert canary.exists(), f"torch no longer runs the {payload.name} payload; the test must find one it runs"


def _edit(src: Path, dest: Path, edit) -> Path:
    return P.rewrite(src, dest, edit)


def test_unknown_schema_major_is_unsupported(src, tmp_path):
    _edit(src, tmp_path / "m.pt2", lambda d: d["schema_version"].update(major=9))
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert codes(result) == {"UNSUPPORTED_FORMAT"}, [f.to_dict() for f in result.findings]
    assert "9." in result.findings[0].message and "re-export" in result.findings[0].hint


def test_field_outside_the_schema_is_refused(src, tmp_path):
    _edit(src, tmp_path / "m.pt2", lambda d: d["graph_module"]["graph"]["nodes"][0].update(code="os.system('x')"))
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert codes(result) == {"UNSAFE_CODE"}
    assert "nodes[0].code" in result.findings[0].message


@pytest.mark.parametrize("mutate", [
    lambda d: d["graph_module"].update(treespec_namedtuple_fields={"__main__.P": {"field_names": ["a"]}}),
    lambda d: d["graph_module"]["module_call_graph"][0]["signature"].update(
        in_spec=json.dumps([1, {"type": "collections.namedtuple", "context": "{}", "children_spec": []}])),
    lambda d: d["graph_module"]["graph"]["custom_obj_values"].update(obj={"name": "obj", "class_fqn": "x.y"}),
    lambda d: d["graph_module"]["module_call_graph"].append({"fqn": "a.__class__", "signature": None}),
    lambda d: d.update(verifiers=["x; import os"]),
    lambda d: d["graph_module"]["graph"]["tensor_values"]["x"]["device"].update(type="cpu'); import os; ('"),
    lambda d: d["graph_module"]["graph"]["nodes"][0]["outputs"].append({"as_operator": "torch.os.system"}),
    lambda d: d["graph_module"]["graph"]["nodes"][0]["inputs"].append(
        {"name": "k", "arg": {"as_graph": {"name": "g", "graph": {"inputs": [], "outputs": [], "nodes": [
            {"target": "torch.ops.evil.x.default", "inputs": [], "outputs": [], "metadata": {}}],
            "tensor_values": {}, "sym_int_values": {}, "sym_bool_values": {}}}}, "kind": 2}),
    lambda d: d["graph_module"]["metadata"].update({"custom\r": "x"}),
    lambda d: d.update(range_constraints={"s0": {"min_val": "__import__('os')", "max_val": 3}}),
], ids=["namedtuple-fields", "namedtuple-spec", "torchbind-object", "dunder-fqn", "verifier", "device-type",
        "operator-argument", "subgraph-target", "metadata-key", "range-bound"])
def test_siblings_outside_the_grammar_are_refused(src, tmp_path, mutate):
    _edit(src, tmp_path / "m.pt2", mutate)
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert "UNSAFE_CODE" in codes(result), [f.to_dict() for f in result.findings]


def test_many_problems_are_counted_not_listed(src, tmp_path):
    def edit(d):
        d["guards_code"] = [f"__import__('os').system('{i}')" for i in range(500)]
    _edit(src, tmp_path / "m.pt2", edit)
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert codes(result) == {"UNSAFE_CODE"}
    assert len(result.findings) == 1 and "more" in result.findings[0].message
    assert len(result.findings[0].message) < 5000


def test_deep_json_is_refused_not_a_crash(src, tmp_path):
    def edit(d):
        deep: dict = {}
        cur = deep
        for _ in range(300):
            cur["as_graph"] = {}
            cur = cur["as_graph"]
        d["graph_module"]["graph"]["outputs"].append(deep)
    _edit(src, tmp_path / "m.pt2", edit)
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert "UNSAFE_CODE" in codes(result) or "CORRUPT_ARCHIVE" in codes(result)
    assert "INTERNAL_ERROR" not in codes(result)
