"""The pickle walker's dispatch table against the if-chain it replaced: every pickle stream the
scanner walks for the static and pickle corpora, the scanner-exhaustion generators at small sizes
and a few thousand seeded random mutations of benign torch pickles are scanned by both, and the
reports (globals, anomalies, errors, limits, tensors, storages, the symbolic result) must be equal.

``_frozen_step`` is the walker's ``step`` as it was before the table, kept here only as the oracle."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import pickletools
import random
import zipfile
from collections import OrderedDict
from typing import Any

import pytest
import torch

from ckpt_stage.config import Settings
from ckpt_stage.scan import pickles, scan_version
from ckpt_stage.scan.pickles import (
    _BYTESTR_OPS,
    _NODE_OPS,
    _PUSH_OPS,
    MAX_EXTRA_STATES,
    MAX_MEMO,
    MAX_NODES,
    BStr,
    Box,
    Call,
    Glob,
    Opaque,
    Pid,
    _Broken,
    _describe,
    _Limit,
    _retyping_keys,
    allowlist,
)
from tests.corpus import pickle_bombs
from tests.corpus.pickle_cases import CASES as PICKLE_CASES
from tests.corpus.static_cases import CASES as STATIC_CASES
from tests.unit.test_scan_corpus import expand

def _frozen_step(self, op: pickletools.OpcodeInfo, arg: Any, pos: int) -> bool:  # noqa: C901
    name = op.name
    if self.frame_end is not None:
        if pos > self.frame_end:
            self.anomaly(pos, f"an opcode straddles the end of the FRAME ending at {self.frame_end}")
            self.frame_end = None
        elif pos == self.frame_end:
            self.frame_end = None
    proto = self.declared_proto if self.declared_proto is not None else 1
    if op.proto > proto and name != "PROTO":
        self.anomaly(pos, f"{name} needs pickle protocol {op.proto} but the stream declares {proto}")

    if name in _NODE_OPS:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Limit(pos, f"more than {MAX_NODES:,} containers and calls in one stream")
    if name in _PUSH_OPS:
        self.push(BStr(arg) if name in _BYTESTR_OPS and isinstance(arg, str) else arg, pos)
    elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
        idx = len(self.memo) if name == "MEMOIZE" else arg
        if not isinstance(idx, int) or idx < 0:
            raise _Broken(pos, f"{name} with a negative index")
        if idx in self.memo:
            self.anomaly(pos, f"{name} overwrites memo slot {idx} (memo trick)")
        if len(self.memo) >= MAX_MEMO:
            raise _Limit(pos, f"more than {MAX_MEMO:,} memo entries")
        self.memo[idx] = self.top(pos, name)
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        if arg not in self.memo:
            self.anomaly(pos, f"{name} {arg} reads a memo slot that was never set (memo trick)")
            self.push(Opaque(), pos)
        else:
            self.push(self.memo[arg], pos)
    elif name == "MARK":
        self.meta.append(self.stack)
        self.stack = []
    elif name == "PROTO":
        if pos != self.r.start:
            self.anomaly(pos, "PROTO opcode in the middle of a stream")
        self.declared_proto = arg
        self.r.protocol = arg
    elif name == "FRAME":
        if self.frame_end is not None:
            self.anomaly(pos, f"FRAME starts inside the previous frame (which ends at {self.frame_end})")
        end = pos + 9 + arg
        if end > len(self.buf):
            self.anomaly(pos, f"FRAME declares {arg:,} bytes but only {len(self.buf) - pos - 9:,} follow")
        self.frame_end = end
    elif name == "STOP":
        value = self.pop(pos, name)
        self.r.result = value
        if self.stack or self.meta:
            self.anomaly(pos, f"{len(self.stack) + sum(len(m) for m in self.meta)} value(s) and "
                         f"{len(self.meta)} mark(s) left on the stack at STOP")
        return True
    elif name == "POP":
        if not self.stack:
            # CPython's POP pops a MARK when the stack is empty; other tools disagree.
            self.anomaly(pos, "POP on an empty stack (discards a MARK)")
            self.pop_mark(pos, name)
        else:
            self.pop(pos, name)
    elif name == "POP_MARK":
        self.pop_mark(pos, name)
    elif name == "DUP":
        self.push(self.top(pos, name), pos)
    elif name in ("EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
        self.push(Box({"EMPTY_TUPLE": "tuple", "EMPTY_LIST": "list", "EMPTY_DICT": "dict",
                       "EMPTY_SET": "set"}[name]), pos)
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        n = int(name[-1])
        items = [self.pop(pos, name) for _ in range(n)][::-1]
        b = Box("tuple")
        self.track(b, items)
        self.push(b, pos)
    elif name in ("TUPLE", "LIST", "FROZENSET", "DICT"):
        items = self.pop_mark(pos, name)
        if name == "DICT" and len(items) % 2:
            raise _Broken(pos, "DICT with an odd number of items")
        b = Box({"TUPLE": "tuple", "LIST": "list", "FROZENSET": "frozenset", "DICT": "dict"}[name])
        self.track(b, items)
        if name == "DICT":
            self.name_tensors(items)
        self.push(b, pos)
    elif name == "GLOBAL":
        module, gname = self._raw_global(pos)
        self.push(self.make_global(module, gname, pos, name), pos)
    elif name == "STACK_GLOBAL":
        gname = self.pop(pos, name)
        module = self.pop(pos, name)
        if type(module) is not str or type(gname) is not str:
            self.anomaly(pos, "STACK_GLOBAL operands are not unicode string constants "
                         f"({_describe(module)}, {_describe(gname)}): built to confuse scanners")
            if isinstance(module, str) and isinstance(gname, str):
                self.push(self.make_global(str(module), str(gname), pos, name), pos)
            else:
                self.push(Opaque(), pos)
        else:
            self.push(self.make_global(module, gname, pos, name), pos)
    elif name == "INST":
        module, gname = self._raw_global(pos)
        g = self.make_global(module, gname, pos, name)
        g.called = True
        self.r.calls += 1
        args = self.pop_mark(pos, name)
        b = Box("tuple")
        self.track(b, args)
        self.push(Call(g, b, "inst"), pos)
    elif name == "OBJ":
        items = self.pop_mark(pos, name)
        if not items:
            raise _Broken(pos, "OBJ without a class")
        self.callee(items[0], pos, name)
        b = Box("tuple")
        self.track(b, items[1:])
        self.push(Call(items[0], b, "obj"), pos)
    elif name in ("EXT1", "EXT2", "EXT4"):
        self.anomaly(pos, f"{name} {arg} imports through the copyreg extension registry, "
                     "which hides the imported name from scanners")
        self.push(Opaque(), pos)
    elif name == "REDUCE":
        args = self.pop(pos, name)
        fn = self.pop(pos, name)
        self.callee(fn, pos, name)
        call = Call(fn, args, "reduce")
        if isinstance(fn, Glob):
            full = f"{allowlist.normalize(fn.module, fn.name)[0]}.{fn.name}"
            if full in allowlist.TENSOR_REBUILDERS:
                self.tensor_call(call, full, args, pos)
            elif full == "collections.defaultdict" and isinstance(args, Box) and args.items:
                factory = args.items[0]
                if isinstance(factory, Glob):
                    factory.factory_ok = True
        self.push(call, pos)
    elif name in ("NEWOBJ", "NEWOBJ_EX"):
        kwargs = self.pop(pos, name) if name == "NEWOBJ_EX" else None
        args = self.pop(pos, name)
        cls = self.pop(pos, name)
        self.callee(cls, pos, name)
        call = Call(cls, args, "newobj")
        if kwargs is not None:
            call.extra.append(kwargs)
        self.push(call, pos)
    elif name == "BUILD":
        state = self.pop(pos, name)
        target = self.top(pos, name)
        if isinstance(target, Glob):
            self.anomaly(pos, f"BUILD sets attributes on the imported global {target.full} "
                         "itself (monkey-patching), not on an instance")
        elif isinstance(target, Call | Box):
            retype = _retyping_keys(state)
            if retype:
                self.anomaly(pos, f"BUILD sets {', '.join(sorted(set(retype))[:4])} on {_describe(target)} "
                             "(retypes the object or swaps its attribute dict; no pickler writes this)")
            if target.state is None:
                target.state = state
            elif isinstance(target, Call):
                if len(target.extra) < MAX_EXTRA_STATES:
                    target.extra.append(state)
                elif len(target.extra) == MAX_EXTRA_STATES:
                    # A pickler BUILDs each object once; keeping every state of a BUILD chain
                    # made the walk quadratic. Past the cap the states are dropped, which is
                    # safe only because the stream is refused for it.
                    target.extra.append(Opaque())
                    self.anomaly(pos, f"BUILD applied more than {MAX_EXTRA_STATES} times to one object "
                                 "(no pickler does this)")
    elif name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"):
        if name in ("APPEND", "SETITEM"):
            items = [self.pop(pos, name) for _ in range(1 if name == "APPEND" else 2)][::-1]
        else:
            items = self.pop_mark(pos, name)
        target = self.top(pos, name)
        if name.startswith("SET") and len(items) % 2:
            raise _Broken(pos, f"{name} with an odd number of items")
        if isinstance(target, Glob):
            self.anomaly(pos, f"{name} mutates the imported global {target.full} itself")
        else:
            self.torch_target(target, name, pos)
        if isinstance(target, Box):
            self.track(target, items)
        elif isinstance(target, Call):
            # OrderedDict()/defaultdict()/list subclasses filled after construction.
            if target.items is None:
                target.items = Box("items")
            self.track(target.items, items)
        if name.startswith("SET"):
            self.name_tensors(items)
    elif name == "PERSID":
        self.anomaly(pos, "text PERSID (protocol 0 persistent id): torch never writes one")
        self.push(Pid(arg), pos)
    elif name == "BINPERSID":
        self.push(self.persistent(self.pop(pos, name), pos), pos)
    elif name in ("NEXT_BUFFER", "READONLY_BUFFER"):
        self.anomaly(pos, f"{name}: out-of-band buffers are never used by checkpoints")
        if name == "NEXT_BUFFER":
            self.push(Opaque(), pos)
    else:  # pragma: no cover - genops knows no other opcodes
        self.anomaly(pos, f"unexpected opcode {name}")
    return False





class _FrozenMachine(pickles._Machine):
    step = _frozen_step


_NODE_TYPES = (Box, Call, Pid, Glob, Opaque)


def _snapshot(rep: pickles.StreamReport) -> Any:
    """Every field of the report as plain tuples; the symbolic values as a numbered graph (shared
    values and cycles through the memo stay shared), so two walks compare with ``==``."""
    ids: dict[int, int] = {}
    todo: list[Any] = []

    def conv(v: Any) -> Any:
        if isinstance(v, _NODE_TYPES):
            if id(v) not in ids:
                ids[id(v)] = len(ids)
                todo.append(v)
            return ("#", ids[id(v)])
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return (type(v).__name__, tuple(conv(getattr(v, f.name)) for f in dataclasses.fields(v)))
        if isinstance(v, list | tuple):
            return (type(v).__name__, tuple(conv(x) for x in v))
        if isinstance(v, set | frozenset):
            return ("set", tuple(sorted(map(repr, v))))
        if type(v) is int:
            return ("int", hex(v))  # repr of a LONG4 int may exceed Python's digit limit
        return (type(v).__name__, repr(v))

    top = conv(rep)
    nodes = []
    while todo:
        v = todo.pop()
        slots = [s for c in type(v).__mro__ for s in getattr(c, "__slots__", ())]
        nodes.append((ids[id(v)], type(v).__name__, tuple((s, conv(getattr(v, s))) for s in slots)))
    return top, sorted(nodes, key=lambda n: n[0])


def _both(buf: bytes, start: int, settings: Settings, extra_allow: Any, monkeypatch) -> tuple[Any, Any]:
    monkeypatch.setattr(pickles, "_Machine", _FrozenMachine)
    old = _snapshot(pickles.scan_stream(buf, start, settings, extra_allow=extra_allow))
    monkeypatch.setattr(pickles, "_Machine", _TABLE_MACHINE)
    new = _snapshot(pickles.scan_stream(buf, start, settings, extra_allow=extra_allow))
    return old, new


_TABLE_MACHINE = pickles._Machine


def _walk_all(buf: bytes, settings: Settings, monkeypatch) -> int:
    """Compare both walkers on every stream of ``buf`` read back to back; the number compared."""
    pos, n = 0, 0
    for _ in range(pickles.MAX_STREAMS):
        if pos >= len(buf):
            break
        old, new = _both(buf, pos, settings, None, monkeypatch)
        assert old == new, (pos, buf[:200])
        n += 1
        monkeypatch.setattr(pickles, "_Machine", _TABLE_MACHINE)
        end = pickles.scan_stream(buf, pos, settings).end
        if end is None or end <= pos:
            break
        pos = end
    return n


#: Cases that save an MLflow model (~3.5 s each): their nn.Module pickle is among ``_benign_pickles``.
_MLFLOW_SAVES = {"static_benign_mlflow_pickle_sequential", "static_benign_mlflow_pt2"}


@pytest.fixture(scope="module")
def corpus_streams(tmp_path_factory) -> list[tuple[bytes, int, Settings, Any]]:
    """Every stream ``scan_version`` hands the walker for the static and pickle corpora."""
    seen: dict[tuple[str, int], tuple[bytes, int, Settings, Any]] = {}

    class Recording(_TABLE_MACHINE):  # type: ignore[misc, valid-type]
        def __init__(self, buf, report, settings, extra_allow):
            super().__init__(buf, report, settings, extra_allow)
            key = (hashlib.sha256(buf).hexdigest(), report.start)
            seen.setdefault(key, (bytes(buf), report.start, settings, extra_allow))

    mp = pytest.MonkeyPatch()
    mp.setattr(pickles, "_Machine", Recording)
    try:
        for case in [*STATIC_CASES, *PICKLE_CASES]:
            if case.slow or case.name in _MLFLOW_SAVES:
                continue
            base = tmp_path_factory.mktemp(case.name[:40])
            work, canary = base / "work", base / "canary"
            work.mkdir()
            canary.mkdir()
            built = case.build(work, canary)
            root, rels = expand(built.paths)
            scan_version(root, rels, Settings.from_env(dict(built.env)))
            assert list(canary.iterdir()) == []
    finally:
        mp.undo()
    return list(seen.values())


def test_corpus_streams_walk_the_same(corpus_streams, monkeypatch):
    assert len(corpus_streams) > 50
    for buf, start, settings, extra_allow in corpus_streams:
        old, new = _both(buf, start, settings, extra_allow, monkeypatch)
        assert old == new, (start, buf[start:start + 200])


_BOMBS = ["build_append_chain", "build_chain", "appends_chain", "setitems_chain", "setitem_on_call_chain",
          "mark_tower", "nested_tuples", "nested_lists", "nested_dicts", "shared_dag", "memo_flood",
          "memo_overwrite_flood", "dup_flood", "unsafe_globals_flood", "distinct_unsafe_globals",
          "factory_flood", "reduce_chain", "frame_lies", "many_streams"]


def test_exhaustion_generators_walk_the_same(monkeypatch):
    settings = Settings()
    for name in _BOMBS:
        buf = getattr(pickle_bombs, name)(300)
        assert _walk_all(buf, settings, monkeypatch) >= 1, name
    for name in ("binunicode_lie", "binbytes8_lie", "long4_lie", "long4_huge"):
        _walk_all(getattr(pickle_bombs, name)(), settings, monkeypatch)


def _benign_pickles() -> list[bytes]:
    """Streams torch and pickle write for ordinary checkpoints (every protocol, legacy and zip)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    sd = lin.state_dict()
    out: list[bytes] = []
    module = torch.nn.Sequential(lin, torch.nn.ReLU())  # what MLflow's ``pickle`` format saves
    for obj, proto in ((sd, 2), (sd, 4), (module, 2)):
        zbuf = io.BytesIO()
        torch.save(obj, zbuf, pickle_protocol=proto)
        with zipfile.ZipFile(io.BytesIO(zbuf.getvalue())) as z:
            out.append(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    legacy = io.BytesIO()
    torch.save({"sd": sd, "step": 3, "lr": 0.5, "names": ["a", "b"]}, legacy, _use_new_zipfile_serialization=False)
    out.append(legacy.getvalue())
    plain = {"a": (1, 2.5, None, True), "b": [b"x", "y", frozenset({1})], "c": OrderedDict(k=1), "d": {1, 2}}
    out.extend(pickle.dumps(plain, protocol=p) for p in range(6))
    return out


_OPCODE_BYTES = [o.code.encode("latin-1") for o in pickletools.opcodes]


def _mutate(rng: random.Random, buf: bytes) -> bytes:
    b = bytearray(buf)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if kind == 0 and b:  # flip a byte
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif kind == 1:  # insert an opcode byte
            b[i:i] = rng.choice(_OPCODE_BYTES)
        elif kind == 2 and b:  # delete a run
            del b[i:i + rng.randint(1, 8)]
        elif kind == 3:  # duplicate a run
            j = rng.randrange(len(b) + 1)
            b[i:i] = b[j:j + rng.randint(1, 16)]
        elif kind == 4:  # truncate
            del b[i:]
        else:  # splice in a small byte (memo index, length, count)
            b[i:i] = bytes([rng.choice((0, 1, 2, 255))])
    return bytes(b)


def test_random_mutations_walk_the_same(monkeypatch):
    rng = random.Random(1913)
    settings = Settings()
    bases = _benign_pickles()
    compared = 0
    for _ in range(3000):
        compared += _walk_all(_mutate(rng, rng.choice(bases)), settings, monkeypatch)
    assert compared >= 3000


def test_every_opcode_has_a_handler():
    missing = {o.name for o in pickletools.opcodes} - set(pickles.OPCODE_HANDLERS)
    assert not missing
