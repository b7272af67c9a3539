"""The pickle stream scanner, on hand-written streams: every opcode trick is a row."""

from __future__ import annotations

import collections
import pickle
import struct

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.scan.pickles import (
    LEGACY_TORCH_MAGIC,
    MAX_NESTING,
    nesting_depth,
    pickle_globals,
    scan_stream,
)
from tests.corpus.static_cases import P, Reduce, os_system_pickle

S = Settings()


def su(s):
    return P.su(s)


def reduce_call(module, name, arg="x", proto=2):
    return P.proto(proto) + P.glob(module, name) + P.bu(arg) + P.TUPLE1 + P.REDUCE + P.STOP


# (id, stream, unsafe globals, anomaly substring or None, parse error expected)
ROWS = [
    ("plain_dict", pickle.dumps({"a": [1, 2.0, "x", b"y", None, True]}, protocol=2), set(), None, False),
    ("plain_proto4", pickle.dumps({"a": (1, 2), "b": frozenset({3})}, protocol=4), set(), None, False),
    ("plain_proto5", pickle.dumps({"a": bytearray(b"xy"), "s": {1}}, protocol=5), set(), None, False),
    ("ordered_dict", pickle.dumps(collections.OrderedDict(a=1), protocol=2), set(), None, False),
    ("defaultdict_list", pickle.dumps(collections.defaultdict(list), protocol=2), set(), None, False),
    ("defaultdict_proto4", pickle.dumps(collections.defaultdict(dict), protocol=4), set(), None, False),
    ("range_slice_complex", pickle.dumps([range(3), slice(1, 2), 1j], protocol=2), set(), None, False),
    ("os_system", os_system_pickle("touch x"), {"posix.system"}, None, False),
    ("eval_proto0", b"c__builtin__\neval\n(S'1'\ntR.", {"builtins.eval"}, None, False),
    ("list_as_callee", reduce_call("builtins", "list"), {"builtins.list"}, None, False),
    ("list_factory_then_called",
     P.proto(2) + P.glob("builtins", "list") + P.binput(0) + P.POP + P.glob("collections", "defaultdict")
     + P.binget(0) + P.TUPLE1 + P.REDUCE + P.POP + P.binget(0) + P.bu("x") + P.TUPLE1 + P.REDUCE + P.STOP,
     {"builtins.list"}, None, False),
    ("memo_stack_global",
     P.proto(4) + su("os") + P.MEMOIZE + P.POP + su("system") + P.MEMOIZE + P.POP + P.binget(0) + P.binget(1)
     + P.STACK_GLOBAL + su("x") + P.TUPLE1 + P.REDUCE + P.STOP, {"os.system"}, None, False),
    ("memo_overwrite",
     P.proto(4) + su("collections") + P.binput(0) + P.POP + su("os") + P.binput(0) + P.POP
     + P.binget(0) + su("system") + P.STACK_GLOBAL + P.STOP, {"os.system"}, "overwrites memo slot 0", False),
    ("memo_unset", P.proto(2) + P.binget(7) + P.STOP, set(), "never set", False),
    ("stack_global_from_strings", P.proto(4) + b"S'os'\nS'system'\n" + P.STACK_GLOBAL + P.STOP,
     {"os.system"}, "not unicode string constants", False),
    ("stack_global_from_call",
     P.proto(4) + P.glob("_codecs", "encode") + su("os") + su("latin1") + P.TUPLE2 + P.REDUCE + su("system")
     + P.STACK_GLOBAL + P.STOP, set(), "not unicode string constants", False),
    ("proto_too_low_for_opcode", P.proto(2) + su("a") + P.STOP, set(), "needs pickle protocol 4", False),
    ("frame_lie", P.proto(4) + P.frame(P.NONE + P.STOP, declared=10**6), set(), "FRAME declares", False),
    ("frame_straddle", P.proto(4) + P.frame(su("abc") + P.POP + P.NONE + P.STOP, declared=1),
     set(), "straddles", False),
    ("frame_left_unread", P.proto(4) + P.frame(P.NONE + P.STOP + P.NONE * 4), set(), "FRAME unread", False),
    ("ext1", P.proto(2) + b"\x82\x01" + P.STOP, set(), "extension registry", False),
    ("inst", b"(ios\nsystem\n.", {"os.system"}, None, False),
    ("obj", P.proto(2) + P.MARK + P.glob("subprocess", "Popen") + b"o" + P.STOP, {"subprocess.Popen"}, None, False),
    ("dotted_name", P.proto(4) + su("torch.nn.modules.module") + su("torch.load") + P.STACK_GLOBAL + P.STOP,
     {"torch.nn.modules.module.torch.load"}, "malformed name", False),
    # genops is stricter than CPython here (ASCII): a stream it cannot parse is never passed.
    ("non_ascii_global", P.proto(2) + b"c\xc3\xb6s\nsystem\n" + P.STOP, set(), None, True),
    ("build_on_global", P.proto(2) + P.glob("collections", "OrderedDict") + P.NONE + P.BUILD + P.STOP,
     set(), "monkey-patching", False),
    ("setitem_on_global", P.proto(2) + P.glob("collections", "OrderedDict") + P.bu("a") + P.NONE + P.SETITEM + P.STOP,
     set(), "mutates the imported global", False),
    ("reduce_non_global", P.proto(2) + P.bu("x") + P.EMPTY_TUPLE + P.REDUCE + P.STOP, set(), "not an imported global", False),
    ("build_retypes_via_slotstate",
     P.proto(2) + P.glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + P.NONE + b"}" + P.bu("__class__")
     + P.glob("collections", "Counter") + P.SETITEM + P.TUPLE2 + P.BUILD + P.STOP, set(), "retypes the object", False),
    ("build_dict_state_with_class",
     P.proto(2) + P.glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + b"}" + P.bu("__dict__")
     + b"}" + P.SETITEM + P.BUILD + P.STOP, set(), "swaps its attribute dict", False),
    ("build_slot_dunder",
     P.proto(2) + P.glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + P.NONE + b"}" + P.bu("__setstate__")
     + P.NONE + P.SETITEM + P.TUPLE2 + P.BUILD + P.STOP, set(), "BUILD sets __setstate__", False),
    ("leftover_stack", P.proto(2) + P.NONE + P.NONE + P.STOP, set(), "left on the stack", False),
    ("pop_on_empty_pops_mark", P.proto(2) + P.MARK + P.POP + P.NONE + P.STOP, set(), "POP on an empty stack", False),
    ("persid_text", b"Pfoo\n.", set(), "text PERSID", False),
    ("next_buffer", P.proto(5) + b"\x97" + P.STOP, set(), "out-of-band", False),
    ("proto_in_middle", P.proto(2) + P.proto(2) + P.NONE + P.STOP, set(), "PROTO opcode in the middle", False),
    # broken streams
    ("truncated", pickle.dumps({"a": 1}, protocol=2)[:-3], set(), None, True),
    ("unknown_opcode", P.proto(2) + b"\xff" + P.STOP, set(), None, True),
    ("payload_then_garbage", os_system_pickle("x")[:-1] + b"\xfe\xfe", {"posix.system"}, None, True),
    ("underflow", P.proto(2) + P.REDUCE + P.STOP, set(), None, True),
    ("odd_dict", P.proto(2) + P.MARK + P.NONE + b"d" + P.STOP, set(), None, True),
    ("binbytes8_huge", P.proto(4) + b"\x8e" + struct.pack("<Q", 2**62) + b"abc", set(), None, True),
    ("long_text_too_big", b"L" + b"9" * 5000 + b"L\n.", set(), None, True),
]


@pytest.mark.parametrize(("stream", "unsafe", "anomaly", "broken"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_stream(stream, unsafe, anomaly, broken):
    rep = scan_stream(stream, 0, S)
    assert {g.full for g in rep.unsafe} == unsafe
    if anomaly is None:
        assert rep.anomalies == []
    else:
        assert any(anomaly in a.message for a in rep.anomalies), rep.anomalies
    assert (rep.error is not None) is broken, rep.error
    assert (rep.end is None) is broken


def test_real_torch_state_dict_tensors():
    import io
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2, 3), "v": torch.arange(10)[2:5], "h": torch.zeros(4, dtype=torch.float8_e4m3fn),
                "p": torch.nn.Parameter(torch.ones(2))}, buf)
    zf = zipfile.ZipFile(buf)
    rep = scan_stream(zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl"))), 0, S)
    assert rep.unsafe == [] and rep.anomalies == [] and rep.error is None
    tensors = {t.name: t for t in rep.tensors}
    assert tensors["w"].size == (2, 3) and tensors["w"].itemsize == 4 and tensors["w"].needed_elements() == 6
    assert tensors["v"].storage_offset == 2 and tensors["v"].itemsize == 8
    assert tensors["h"].itemsize == 1 and tensors["h"].rebuild == "_rebuild_tensor_v3"
    assert tensors["p"].size == (2,)
    storages = {s.key: s for s in rep.storages}
    assert {s.numel for s in storages.values()} >= {6, 10}


def test_legacy_magic_is_recognised():
    rep = scan_stream(pickle.dumps(LEGACY_TORCH_MAGIC, protocol=2), 0, S)
    assert rep.result == LEGACY_TORCH_MAGIC


def test_scan_starts_at_offset_and_reports_end():
    first = pickle.dumps([1, 2], protocol=2)
    data = first + os_system_pickle("x")
    a = scan_stream(data, 0, S)
    b = scan_stream(data, a.end, S)
    assert a.end == len(first) and not a.unsafe
    assert [g.full for g in b.unsafe] == ["posix.system"] and b.end == len(data)


def test_settings_extend_and_restrict():
    stream = P.proto(2) + P.glob("mypkg.layers", "Block") + P.EMPTY_TUPLE + b"\x81" + P.STOP
    assert {g.full for g in scan_stream(stream, 0, S).unsafe} == {"mypkg.layers.Block"}
    assert scan_stream(stream, 0, Settings(pickle_modules=("mypkg",))).unsafe == []
    nn = P.proto(2) + P.glob("torch.nn.modules.linear", "Linear") + P.EMPTY_TUPLE + b"\x81" + P.STOP
    assert scan_stream(nn, 0, S).unsafe == []
    assert [g.why for g in scan_stream(nn, 0, Settings(allow_pickled_models=False)).unsafe] == [
        "pickled-models-disabled"]


def test_extra_allow_for_torchscript():
    stream = P.proto(2) + P.glob("__torch__.model", "Net") + P.EMPTY_TUPLE + b"\x81" + P.STOP
    assert scan_stream(stream, 0, S).unsafe
    assert not scan_stream(stream, 0, S, extra_allow=lambda m, n: m.startswith("__torch__")).unsafe


def test_deep_nesting_reported():
    n = MAX_NESTING + 50
    rep = scan_stream(P.proto(2) + P.EMPTY_LIST * n + P.APPEND * (n - 1) + P.STOP, 0, S)
    assert any("nest more than" in a.message for a in rep.anomalies)


def test_late_mutation_nesting_is_measured():
    # Build lists top-down: each list is appended into its parent *after* the parent was nested,
    # so only a walk of the final structure sees the depth.
    n = MAX_NESTING + 10
    body = b"".join(P.EMPTY_LIST + struct.pack("<BI", ord("r"), i) + P.POP for i in range(n))
    for i in range(n - 1):
        body += b"j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i + 1) + P.APPEND + P.POP
    rep = scan_stream(P.proto(2) + body + b"j" + struct.pack("<I", 0) + P.STOP, 0, S)
    assert any("nest more than" in a.message for a in rep.anomalies)


def test_nesting_depth_handles_cycles():
    rep = scan_stream(P.proto(2) + P.EMPTY_LIST + P.binput(0) + P.binget(0) + P.APPEND + P.STOP, 0, S)
    assert rep.anomalies == [] and nesting_depth(rep.result) == 1


def test_pickle_globals_for_the_loader():
    data = pickle.dumps(collections.OrderedDict(), protocol=2) + pickle.dumps(Reduce(print, ("x",)), protocol=2)
    assert pickle_globals(data) == [("collections", "OrderedDict"), ("builtins", "print")]


@pytest.mark.parametrize("size", [0, 1, 2, 7, 100])
def test_never_raises_on_prefixes(size):
    stream = os_system_pickle("touch x", proto=4)
    rep = scan_stream(stream[:size], 0, S)
    assert rep.end is None or size >= len(stream)


def test_fuzz_random_bytes_never_raise():
    import random

    rng = random.Random(1234)
    base = pickle.dumps({"a": [1, (2, 3)], "b": collections.OrderedDict(x=b"yy")}, protocol=4)
    for _ in range(500):
        data = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        scan_stream(bytes(data), 0, S)  # must not raise


# --- what a torch zip state_dict holds, for the worker's cross-check ----------------------------


def _data_pkl(obj) -> bytes:
    import io
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    z = zipfile.ZipFile(buf)
    return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def test_flat_state_dict_reads_names_shapes_and_dtypes():
    import torch

    from ckpt_stage.scan.pickles import flat_state_dict

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(torch.bfloat16)
    sd = m.state_dict()
    want = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in sd.items()}
    assert flat_state_dict(_data_pkl(sd)) == want
    # Plain dicts, parameters, dtypes without a legacy storage class (_rebuild_tensor_v3 names them).
    assert flat_state_dict(_data_pkl({"p": torch.nn.Parameter(torch.ones(5)), "u": torch.zeros(2, dtype=torch.uint16)})) \
        == {"p": {"shape": [5], "dtype": "float32"}, "u": {"shape": [2], "dtype": "uint16"}}


@pytest.mark.parametrize("build", [
    lambda t: {"w": t, "epoch": 3},                      # not only tensors: the loader keeps a subset
    lambda t: {"model_state_dict": {"w": t}},            # nested: the loader picks the key
    lambda t: [t],
    lambda t: {1: t},
    lambda t: {},
])
def test_flat_state_dict_gives_no_expectation_where_the_loader_may_choose(build):
    import torch

    from ckpt_stage.scan.pickles import flat_state_dict

    assert flat_state_dict(_data_pkl(build(torch.zeros(2)))) is None


def test_flat_state_dict_of_a_hostile_stream_is_none():
    from ckpt_stage.scan.pickles import flat_state_dict

    assert flat_state_dict(os_system_pickle("x")) is None
    assert flat_state_dict(P.proto(2) + P.binget(3) + P.STOP) is None


def test_torch_legacy_tensors_reads_the_fourth_stream(tmp_path):
    import torch

    from ckpt_stage.scan.pickles import torch_legacy_tensors

    sd = torch.nn.Linear(3, 2).state_dict()
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch_legacy_tensors(tmp_path / "old.pt") == {"weight": {"shape": [2, 3], "dtype": "float32"},
                                                          "bias": {"shape": [2], "dtype": "float32"}}
    (tmp_path / "evil.pt").write_bytes(os_system_pickle("x"))
    assert torch_legacy_tensors(tmp_path / "evil.pt") is None
