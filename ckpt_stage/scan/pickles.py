"""Pickle streams, statically: every global they import, every trick they play, every tensor they
declare. No unpickling, no imports of anything the stream names.

``scan_stream`` walks one stream with ``pickletools.genops`` and a small abstract stack machine:
values are tracked symbolically (constants, containers, imported globals, calls, persistent ids)
so that ``STACK_GLOBAL`` operands fetched through the memo resolve to the names the real
unpickler would import, and torch's ``_rebuild_tensor_v2`` calls yield tensor metadata.

What a scanner must not trust (docs/architecture.md "scanner confusion"; picklescan bypasses such as
CVE-2025-1716 (pip.main missing from a denylist: hence an allowlist here), CVE-2025-1889 (pickles
under other extensions: hence sniffing by content) and the memo/STACK_GLOBAL trick of
mmaitre314/picklescan#22):

* a broken stream after a payload: the unpickler has already run the payload when it hits the
  break, so a parse error never hides what came before it;
* several streams back to back (torch's legacy format reads five): every stream is scanned;
* ``STACK_GLOBAL`` operands that are not plain string constants, memo gets of unset indices, memo
  slots written twice, ``FRAME`` lengths that lie, ``EXT*`` registry lookups, opcodes above the
  declared protocol, values left on the stack: legitimate picklers never produce them, so each is
  an anomaly reported as ``UNSAFE_PICKLE``;
* dotted global names (protocol 4 resolves ``A.b.c`` attribute by attribute).

Bounded work (the parent has no rlimit around the scan): the caller hands at most
``max_pickle_bytes``; every opcode costs O(1) amortised (no list copies, no searches, one final
depth walk that visits each edge once); the machine caps opcodes per stream, memo entries (both
reported as the scanner's own limit, RESOURCE_LIMIT), stack size and nesting depth (anomalies: no
writer produces them); it remembers a bounded number of container items, BUILD states, distinct
globals, anomalies and tensors, keeping the first ones and counting the rest; and it checks the
file's deadline (``budget.tick``) every few thousand opcodes.
"""

from __future__ import annotations

import io
import os
import pickletools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ckpt_stage.config import Settings
from ckpt_stage.scan import allowlist, budget

#: A legitimate checkpoint nests a few dozen levels; anything deeper than CPython's default
#: recursion limit crashes whatever walks it recursively afterwards (resource exhaustion).
MAX_NESTING = 1000
#: Items alive on the stack (and under marks). CPython's pickler batches 1000 items per MARK.
MAX_STACK = 1_000_000
MAX_MEMO = 2_000_000
#: Containers, calls and persistent ids one stream may build (~150-300 bytes each in the parent, so
#: this bounds the walk to a few hundred MB). A state dict needs about eight per tensor.
MAX_NODES = 1_500_000
#: Container items remembered per container / in total (only needed for names and shapes).
MAX_TRACKED_ITEMS = 100_000
MAX_TRACKED_TOTAL = 2_000_000

LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C

_UNICODE_OPS = frozenset({"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"})
_BYTESTR_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING"})
_BYTES_OPS = frozenset({"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"})
_SCALAR_OPS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT",
                         "BINFLOAT"})
_PUSH_OPS = _UNICODE_OPS | _BYTESTR_OPS | _BYTES_OPS | _SCALAR_OPS | {"NONE", "NEWTRUE", "NEWFALSE"}
_NODE_OPS = frozenset({"EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE",
                       "LIST", "FROZENSET", "DICT", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "PERSID",
                       "BINPERSID"})
#: Opcodes per stream: ~3 µs each here, so the cap bounds one stream to well under a minute.
MAX_OPS = 10_000_000
#: Distinct globals, anomalies, extra BUILD states per object and pending defaultdict factories kept
#: per stream: the first ones are reported, the rest only counted (1 M imports of os.system must
#: not become 1 M objects in the parent).
MAX_GLOBALS_KEPT = 10_000
MAX_ANOMALIES_KEPT = 50
MAX_EXTRA_STATES = 16
MAX_PENDING = 10_000
#: Tensor and storage declarations kept per stream (a 100k-tensor state dict stays well inside).
MAX_DECLS = 1_000_000
#: Streams read back to back from one buffer (torch's legacy format has five).
MAX_STREAMS = 64
#: Opcodes between two deadline checks.
TICK_EVERY = 4096


class BStr(str):
    """A str that came from a protocol-0/1 STRING opcode (not a unicode constant)."""

    __slots__ = ()


class Glob:
    __slots__ = ("module", "name", "offset", "opcode", "decision", "called", "factory_ok", "use")

    def __init__(self, module: str, name: str, offset: int, opcode: str):
        self.module, self.name, self.offset, self.opcode = module, name, offset, opcode
        self.decision: allowlist.Ruling | None = None
        self.called = False
        self.factory_ok = False
        self.use: GlobalUse | None = None

    @property
    def full(self) -> str:
        return f"{self.module}.{self.name}"


class Box:
    """A container built by the stream: tuple, list, dict (items are key, value, key, ...), set."""

    __slots__ = ("kind", "items", "truncated", "state")

    def __init__(self, kind: str, items: list | None = None):
        self.kind = kind
        self.items = items if items is not None else []
        self.truncated = False
        self.state: Any = None


class Call:
    """The result of REDUCE / NEWOBJ / OBJ / INST: ``callee(*args)``; ``state`` from BUILD, later
    BUILD states and NEWOBJ_EX kwargs in ``extra`` (at most ``MAX_EXTRA_STATES``), items appended or
    set after construction (``OrderedDict()`` filled by SETITEMS) in ``items``."""

    __slots__ = ("callee", "args", "kind", "state", "tensor", "extra", "items")

    def __init__(self, callee: Any, args: Any, kind: str):
        self.callee, self.args, self.kind = callee, args, kind
        self.state: Any = None
        self.tensor: TensorDecl | None = None
        self.extra: list = []
        self.items: Box | None = None


class Pid:
    __slots__ = ("value", "decl")

    def __init__(self, value: Any):
        self.value = value
        self.decl: StorageDecl | None = None


class Opaque:
    __slots__ = ()


@dataclass(slots=True)
class GlobalUse:
    module: str
    name: str
    offset: int
    opcode: str
    allowed: bool
    why: str

    @property
    def full(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(slots=True)
class Anomaly:
    offset: int
    message: str


@dataclass(slots=True)
class StorageDecl:
    key: str
    storage_type: str
    itemsize: int | None
    numel: int | None
    location: str | None
    offset: int


@dataclass(slots=True)
class TensorDecl:
    storage_key: str | None
    storage_offset: Any
    size: Any
    stride: Any
    itemsize: int | None
    rebuild: str
    offset: int
    name: str | None = None
    dtype: str | None = None
    """Element type (``float32``...) from the storage's type tag or ``_rebuild_tensor_v3``'s dtype."""

    def concrete(self) -> bool:
        ints = (isinstance(self.storage_offset, int) and isinstance(self.size, tuple)
                and isinstance(self.stride, tuple))
        return ints and all(isinstance(x, int) and not isinstance(x, bool) for x in (*self.size, *self.stride))

    def needed_elements(self) -> int:
        """Elements of storage the view touches (``offset + Σ(size-1)·stride + 1``), 0 if empty."""
        if any(s == 0 for s in self.size):
            return 0
        return self.storage_offset + sum((s - 1) * st for s, st in zip(self.size, self.stride, strict=True)) + 1


@dataclass
class StreamReport:
    start: int
    end: int | None = None
    """Offset just after STOP; None when the stream did not parse to its STOP."""
    protocol: int = 0
    globals: list[GlobalUse] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    error: Anomaly | None = None
    storages: list[StorageDecl] = field(default_factory=list)
    tensors: list[TensorDecl] = field(default_factory=list)
    result: Any = None
    limit: str | None = None
    """Set when the scanner stopped at one of its own work limits (reported as RESOURCE_LIMIT)."""
    deadline: bool = False
    """The limit hit was the file's scan deadline."""
    looks_like_pickle: bool = False
    """For sniffing protocol 0/1 text: reached STOP, or imported a well-formed global."""
    unsafe_count: int = 0
    calls: int = 0
    """REDUCE / NEWOBJ / OBJ / INST opcodes executed (what makes a stream run code before any break)."""
    """Imports refused by the allowlist, all of them (``globals`` keeps distinct first uses only)."""
    globals_dropped: int = 0
    """Distinct globals past ``MAX_GLOBALS_KEPT``, counted but not kept."""
    anomaly_count: int = 0
    """Anomalies seen, all of them (``anomalies`` keeps the first ``MAX_ANOMALIES_KEPT``)."""
    opcodes: set[str] = field(default_factory=set)
    """Names of the opcodes the stream uses (for what torch's weights_only unpickler can read)."""
    unreadable: list[Anomaly] = field(default_factory=list)
    """Benign constructs torch's weights_only unpickler refuses (see ``torch_safe_problems``)."""

    @property
    def unsafe(self) -> list[GlobalUse]:
        return [g for g in self.globals if not g.allowed]

    @property
    def hostile(self) -> bool:
        return bool(self.unsafe_count or self.anomaly_count or self.unsafe or self.anomalies)


#: The opcodes torch 2.13's weights_only unpickler executes (torch/_weights_only_unpickler.py,
#: ``Unpickler.load``); anything else is "Unsupported operand". Protocol 2 (torch.save's default)
#: needs only these; protocols 0/1 (text INT, FLOAT, STRING, PUT, GET, POP, DICT/LIST...), 3 (BINBYTES)
#: and 4/5 (FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL, ADDITEMS...) use others.
#: tests/unit/test_scan_torch_safe.py compares this table with the installed torch.
TORCH_SAFE_OPCODES = frozenset({
    "APPEND", "APPENDS", "BINFLOAT", "BINGET", "BININT", "BININT1", "BININT2", "BINPERSID", "BINPUT",
    "BINUNICODE", "BUILD", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "EMPTY_TUPLE", "GLOBAL", "LONG1",
    "LONG_BINGET", "LONG_BINPUT", "MARK", "NEWFALSE", "NEWOBJ", "NEWTRUE", "NONE", "PROTO", "REDUCE",
    "SETITEM", "SETITEMS", "SHORT_BINSTRING", "STOP", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
})
#: What its SETITEM(S) accepts as a target besides a plain dict (``_check_set_item_target``).
TORCH_SAFE_MAPPINGS = frozenset({"collections.OrderedDict", "collections.Counter"})


def torch_safe_problems(reports: list[StreamReport]) -> list[str]:
    """Why torch's weights_only unpickler (what the worker and ``torch.load`` use) cannot read these
    streams, even with every allowlisted global added: opcodes it does not implement, and targets
    its APPEND/SETITEM/BINPERSID refuse. Empty when it can. Only streams parsed to STOP count."""
    done = [r for r in reports if r.end is not None]
    out: list[str] = []
    unsupported = sorted(set().union(*(r.opcodes for r in done)) - TORCH_SAFE_OPCODES) if done else []
    if unsupported:
        protocols = sorted({r.protocol for r in done if "PROTO" in r.opcodes}) or [0]
        shown = ", ".join(unsupported[:6]) + (f" and {len(unsupported) - 6} more" if len(unsupported) > 6 else "")
        out.append(f"pickle protocol {'/'.join(map(str, protocols))} opcodes {shown}")
    out.extend(f"{a.message} (offset {a.offset})" for r in done for a in r.unreadable[:3])
    return out


class _Broken(Exception):
    def __init__(self, offset: int, message: str):
        super().__init__(message)
        self.offset, self.message = offset, message


class _Limit(_Broken):
    """The scanner's own work limit, not a property of the stream."""


_NODES = (Box, Call, Pid)


def _children(v: Any) -> Iterator[Any]:
    """The values directly inside ``v``, without copying its item list."""
    if isinstance(v, Box):
        yield from v.items
        if v.state is not None:
            yield v.state
    elif isinstance(v, Call):
        yield v.args
        if v.state is not None:
            yield v.state
        yield from v.extra
        if v.items is not None:
            yield v.items
    elif isinstance(v, Pid):
        yield v.value


def nesting_depth(root: Any, limit: int = MAX_NESTING) -> int:
    """Longest chain of containment below ``root`` (cycles ignored), stopping once past ``limit``.

    One iterative post-order walk: each node is entered once and each edge followed once, so the
    cost is linear in what the machine tracked (shared sub-structures through the memo are not
    re-walked: a DAG of n nodes with 2^n paths costs n)."""
    if not isinstance(root, _NODES):
        return 0
    depth: dict[int, int] = {}
    on_path: set[int] = {id(root)}
    # frames: [node, its children iterator, deepest child so far]
    frames: list[list[Any]] = [[root, _children(root), 0]]
    steps = 0
    while frames:
        frame = frames[-1]
        steps += 1
        if not steps % 65536:
            budget.tick()
        kid = next(frame[1], _END)
        if kid is _END:
            frames.pop()
            nid = id(frame[0])
            on_path.discard(nid)
            d = 1 + frame[2]
            depth[nid] = d
            if d > limit:
                return d
            if frames and d > frames[-1][2]:
                frames[-1][2] = d
            continue
        if not isinstance(kid, _NODES):
            continue
        kid_id = id(kid)
        if kid_id in depth:
            if depth[kid_id] > frame[2]:
                frame[2] = depth[kid_id]
        elif kid_id not in on_path:
            on_path.add(kid_id)
            frames.append([kid, _children(kid), 0])
            if len(frames) > limit:
                return len(frames)
    return depth.get(id(root), 0)


_END = object()

#: Opcode name → its stack effect: a ``_Machine`` method taking ``(opcode name, argument, offset)``,
#: returning True at STOP. Filled by ``@_effect`` on the methods below (every pickletools opcode has
#: one: tests/unit/test_scan_pickles_table.py); ``ANALYSES`` run before each of them.
OPCODE_HANDLERS: dict[str, Callable[..., bool | None]] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def _effect(*names: str) -> Callable[[_F], _F]:
    """Register the decorated ``_Machine`` method as the stack effect of the opcodes ``names``."""
    def register(fn: _F) -> _F:
        for n in names:
            assert n not in OPCODE_HANDLERS, n
            OPCODE_HANDLERS[n] = fn
        return fn
    return register


_EMPTY_KINDS = {"EMPTY_TUPLE": "tuple", "EMPTY_LIST": "list", "EMPTY_DICT": "dict", "EMPTY_SET": "set"}
_MARKED_KINDS = {"TUPLE": "tuple", "LIST": "list", "FROZENSET": "frozenset", "DICT": "dict"}


class _Machine:
    def __init__(self, buf: bytes, report: StreamReport, settings: Settings,
                 extra_allow: Callable[[str, str], bool] | None):
        self.buf = buf
        self.r = report
        self.settings = settings
        self.extra_allow = extra_allow
        self.stack: list = []
        self.meta: list[list] = []
        self.live = 0
        self.memo: dict[int, Any] = {}
        self.tracked = 0
        self.nodes = 0
        self.declared_proto: int | None = None
        self.frame_end: int | None = None
        self.pending: list[Glob] = []
        self.kept: dict[tuple[str, str, bool], GlobalUse] = {}
        self.rulings: dict[tuple[str, str], tuple[str, str, allowlist.Ruling, bool]] = {}

    # -- stack helpers ----------------------------------------------------------------------
    def push(self, v: Any, pos: int) -> None:
        self.stack.append(v)
        self.live += 1
        if self.live > MAX_STACK:
            msg = f"more than {MAX_STACK:,} values on the stack (resource exhaustion)"
            self.anomaly(pos, msg)
            raise _Broken(pos, msg)

    def pop(self, pos: int, op: str) -> Any:
        if not self.stack:
            raise _Broken(pos, f"{op} pops from an empty stack")
        self.live -= 1
        return self.stack.pop()

    def top(self, pos: int, op: str) -> Any:
        if not self.stack:
            raise _Broken(pos, f"{op} needs a value but the stack is empty")
        return self.stack[-1]

    def pop_mark(self, pos: int, op: str) -> list:
        if not self.meta:
            raise _Broken(pos, f"{op} without a MARK")
        items = self.stack
        self.stack = self.meta.pop()
        self.live -= len(items)
        return items

    def anomaly(self, pos: int, msg: str) -> None:
        self.r.anomaly_count += 1
        if len(self.r.anomalies) < MAX_ANOMALIES_KEPT:
            self.r.anomalies.append(Anomaly(pos, msg))

    def track(self, box: Box, items: list) -> None:
        room = min(MAX_TRACKED_ITEMS - len(box.items), MAX_TRACKED_TOTAL - self.tracked)
        if room <= 0:
            box.truncated = box.truncated or bool(items)
            return
        if len(items) > room:
            items = items[:room]
            box.truncated = True
        box.items.extend(items)
        self.tracked += len(items)

    # -- globals ------------------------------------------------------------------------------
    def allowlist_ruling(self, module: str, name: str) -> tuple[str, str, allowlist.Ruling, bool]:
        """(normalized module, name, decision, allowed as a defaultdict factory), once per distinct
        name: the allowlist check costs tens of microseconds, and a stream may repeat a name 1 M times."""
        key = (module, name)
        hit = self.rulings.get(key)
        if hit is not None:
            return hit
        nm, nn = allowlist.normalize(module, name)
        factory = False
        if not (allowlist.valid_module(nm) and allowlist.valid_name(nn)):
            decision = allowlist.Ruling(False, "malformed")
        elif self.extra_allow is not None and self.extra_allow(nm, nn):
            decision = allowlist.Ruling(True, "format")
        else:
            decision = allowlist.check(nm, nn, self.settings)
            factory = not decision.allowed and allowlist.check(nm, nn, self.settings, factory=True).allowed
        out = (nm, nn, decision, factory)
        if len(self.rulings) < MAX_GLOBALS_KEPT:
            self.rulings[key] = out
        return out

    def make_global(self, module: str, name: str, pos: int, opcode: str) -> Glob:
        g = Glob(module, name, pos, opcode)
        nm, nn, g.decision, factory = self.allowlist_ruling(module, name)
        if g.decision.why == "malformed":
            self.anomaly(pos, f"{opcode} imports a malformed name {module!r} {name!r} "
                         "(not a plain dotted module and identifier)")
        elif factory and len(self.pending) < MAX_PENDING:
            self.pending.append(g)  # only OK as a defaultdict factory; decided at STOP
            return g
        self.record(g, nm, nn)
        return g

    def record(self, g: Glob, module: str, name: str) -> None:
        """Keep the first use of each distinct global (up to ``MAX_GLOBALS_KEPT``), count every use."""
        assert g.decision is not None
        allowed = g.decision.allowed
        if not allowed:
            self.r.unsafe_count += 1
        key = (module, name, allowed)
        use = self.kept.get(key)
        if use is None:
            use = GlobalUse(module, name, g.offset, g.opcode, allowed, g.decision.why)
            if len(self.kept) < MAX_GLOBALS_KEPT:
                self.kept[key] = use
                self.r.globals.append(use)
            else:
                self.r.globals_dropped += 1
        g.use = use

    def callee(self, v: Any, pos: int, op: str) -> None:
        self.r.calls += 1
        if isinstance(v, Glob):
            v.called = True
        elif isinstance(v, Call) and isinstance(v.callee, Glob) and v.callee.use is not None \
                and not v.callee.use.allowed:
            pass  # calling what an unsafe global returned: the global itself is already reported
        else:
            self.anomaly(pos, f"{op} calls something that is not an imported global "
                         f"({_describe(v)}): legitimate checkpoints only call imported names")

    def _raw_global(self, pos: int) -> tuple[str, str]:
        """GLOBAL/INST operands straight from the bytes, decoded as CPython does (UTF-8)."""
        end1 = self.buf.find(b"\n", pos + 1)
        end2 = self.buf.find(b"\n", end1 + 1) if end1 >= 0 else -1
        if end1 < 0 or end2 < 0:
            raise _Broken(pos, "GLOBAL operand is not terminated")
        try:
            return (self.buf[pos + 1:end1].decode("utf-8"), self.buf[end1 + 1:end2].decode("utf-8"))
        except UnicodeDecodeError:
            self.anomaly(pos, "GLOBAL operand is not valid UTF-8")
            return (self.buf[pos + 1:end1].decode("latin-1"), self.buf[end1 + 1:end2].decode("latin-1"))

    # -- tensors ------------------------------------------------------------------------------
    def tensor_call(self, call: Call, fn: str, args: Any, pos: int) -> None:
        if not isinstance(args, Box) or args.kind != "tuple":
            return
        a = args.items
        if fn == "torch._tensor._rebuild_from_type_v2":
            if len(a) >= 3 and isinstance(a[0], Glob) and isinstance(a[2], Box):
                inner = a[0].full
                if inner in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3"):
                    self.tensor_call(call, inner, a[2], pos)
            return
        if fn == "torch._utils._rebuild_parameter" or fn == "torch._utils._rebuild_parameter_with_state":
            if a and isinstance(a[0], Call) and a[0].tensor is not None:
                call.tensor = a[0].tensor
            return
        if fn not in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
                      "torch._utils._rebuild_qtensor") or len(a) < 4:
            return
        storage = self.storage_of(a[0])
        itemsize = storage.itemsize if storage else None
        dtype = None
        if storage is not None and storage.storage_type.rpartition(".")[0] in ("torch", "torch.cuda"):
            dtype = allowlist.STORAGE_DTYPE.get(storage.storage_type.rpartition(".")[2])
        if fn == "torch._utils._rebuild_tensor_v3" and len(a) >= 7 and isinstance(a[6], Glob):
            itemsize = allowlist.DTYPE_ITEMSIZE.get(a[6].name) if a[6].module == "torch" else None
            dtype = a[6].name if itemsize is not None else None
        t = TensorDecl(
            storage_key=storage.key if storage else None,
            storage_offset=a[1],
            size=_ints(a[2]),
            stride=_ints(a[3]),
            itemsize=itemsize,
            rebuild=fn.rsplit(".", 1)[-1],
            offset=pos,
            dtype=dtype if fn != "torch._utils._rebuild_qtensor" else None,
        )
        call.tensor = t
        if len(self.r.tensors) < MAX_DECLS:
            self.r.tensors.append(t)

    def storage_of(self, v: Any) -> StorageDecl | None:
        return v.decl if isinstance(v, Pid) else None

    def persistent(self, pid: Any, pos: int) -> Pid:
        p = Pid(pid)
        storage_pid = isinstance(pid, Box) and pid.kind == "tuple" and bool(pid.items) and pid.items[0] == "storage"
        if not (storage_pid or (type(pid) is int)) and len(self.r.unreadable) < 3:
            self.r.unreadable.append(Anomaly(pos, f"a persistent id that is not a storage ({_describe(pid)}), "
                                             "which torch's weights_only unpickler refuses"))
        if isinstance(pid, Box) and pid.kind == "tuple" and len(pid.items) >= 5 and pid.items[0] == "storage":
            _, stype, key, location, numel = pid.items[:5]
            if isinstance(stype, Glob) and isinstance(key, str):
                if stype.name in allowlist.STORAGE_ITEMSIZE:
                    itemsize: int | None = allowlist.STORAGE_ITEMSIZE[stype.name]
                elif stype.name in ("UntypedStorage", "TypedStorage"):
                    itemsize = 1
                else:
                    itemsize = None
                decl = StorageDecl(
                    key=key,
                    storage_type=stype.full,
                    itemsize=itemsize,
                    numel=numel if isinstance(numel, int) and not isinstance(numel, bool) else None,
                    location=location if isinstance(location, str) else None,
                    offset=pos,
                )
                p.decl = decl
                if len(self.r.storages) < MAX_DECLS:
                    self.r.storages.append(decl)
        return p

    # -- the step function ----------------------------------------------------------------------
    def step(self, op: pickletools.OpcodeInfo, arg: Any, pos: int) -> bool:
        """Run one opcode: the analyses every opcode gets (``ANALYSES``, in order), then its stack
        effect from ``OPCODE_HANDLERS``. True at STOP."""
        for analysis in ANALYSES:
            analysis(self, op, pos)
        return bool(OPCODE_HANDLERS.get(op.name, _Machine.op_unknown)(self, op.name, arg, pos))

    # -- analyses: run before every opcode, apart from its stack effect ------------------------
    def check_frame(self, op: pickletools.OpcodeInfo, pos: int) -> None:
        """An opcode may not straddle the end of the FRAME it starts in."""
        if self.frame_end is not None:
            if pos > self.frame_end:
                self.anomaly(pos, f"an opcode straddles the end of the FRAME ending at {self.frame_end}")
                self.frame_end = None
            elif pos == self.frame_end:
                self.frame_end = None

    def check_protocol(self, op: pickletools.OpcodeInfo, pos: int) -> None:
        """No opcode above the protocol the stream declares (1 when it declares none)."""
        proto = self.declared_proto if self.declared_proto is not None else 1
        if op.proto > proto and op.name != "PROTO":
            self.anomaly(pos, f"{op.name} needs pickle protocol {op.proto} but the stream declares {proto}")

    def count_nodes(self, op: pickletools.OpcodeInfo, pos: int) -> None:
        """The scanner's own limit on containers, calls and persistent ids per stream."""
        if op.name in _NODE_OPS:
            self.nodes += 1
            if self.nodes > MAX_NODES:
                raise _Limit(pos, f"more than {MAX_NODES:,} containers and calls in one stream")

    # -- stack effects: one handler per opcode family, registered in OPCODE_HANDLERS ------------
    # A handler takes (opcode name, argument, offset); the checks that need its operands (an odd
    # number of dict items, a memo slot written twice...) come first in it, as the unpickler's own.
    @_effect(*(_PUSH_OPS - _BYTESTR_OPS))
    def op_constant(self, name: str, arg: Any, pos: int) -> None:
        self.push(arg, pos)

    @_effect(*_BYTESTR_OPS)
    def op_bytestring(self, name: str, arg: Any, pos: int) -> None:
        self.push(BStr(arg) if isinstance(arg, str) else arg, pos)

    @_effect("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")
    def op_memo_put(self, name: str, arg: Any, pos: int) -> None:
        idx = len(self.memo) if name == "MEMOIZE" else arg
        if not isinstance(idx, int) or idx < 0:
            raise _Broken(pos, f"{name} with a negative index")
        if idx in self.memo:
            self.anomaly(pos, f"{name} overwrites memo slot {idx} (memo trick)")
        if len(self.memo) >= MAX_MEMO:
            raise _Limit(pos, f"more than {MAX_MEMO:,} memo entries")
        self.memo[idx] = self.top(pos, name)

    @_effect("GET", "BINGET", "LONG_BINGET")
    def op_memo_get(self, name: str, arg: Any, pos: int) -> None:
        if arg not in self.memo:
            self.anomaly(pos, f"{name} {arg} reads a memo slot that was never set (memo trick)")
            self.push(Opaque(), pos)
        else:
            self.push(self.memo[arg], pos)

    @_effect("MARK")
    def op_mark(self, name: str, arg: Any, pos: int) -> None:
        self.meta.append(self.stack)
        self.stack = []

    @_effect("PROTO")
    def op_proto(self, name: str, arg: Any, pos: int) -> None:
        if pos != self.r.start:
            self.anomaly(pos, "PROTO opcode in the middle of a stream")
        self.declared_proto = arg
        self.r.protocol = arg

    @_effect("FRAME")
    def op_frame(self, name: str, arg: Any, pos: int) -> None:
        if self.frame_end is not None:
            self.anomaly(pos, f"FRAME starts inside the previous frame (which ends at {self.frame_end})")
        end = pos + 9 + arg
        if end > len(self.buf):
            self.anomaly(pos, f"FRAME declares {arg:,} bytes but only {len(self.buf) - pos - 9:,} follow")
        self.frame_end = end

    @_effect("STOP")
    def op_stop(self, name: str, arg: Any, pos: int) -> bool:
        value = self.pop(pos, name)
        self.r.result = value
        if self.stack or self.meta:
            self.anomaly(pos, f"{len(self.stack) + sum(len(m) for m in self.meta)} value(s) and "
                         f"{len(self.meta)} mark(s) left on the stack at STOP")
        return True

    @_effect("POP")
    def op_pop(self, name: str, arg: Any, pos: int) -> None:
        if not self.stack:
            # CPython's POP pops a MARK when the stack is empty; other tools disagree.
            self.anomaly(pos, "POP on an empty stack (discards a MARK)")
            self.pop_mark(pos, name)
        else:
            self.pop(pos, name)

    @_effect("POP_MARK")
    def op_pop_mark(self, name: str, arg: Any, pos: int) -> None:
        self.pop_mark(pos, name)

    @_effect("DUP")
    def op_dup(self, name: str, arg: Any, pos: int) -> None:
        self.push(self.top(pos, name), pos)

    @_effect(*_EMPTY_KINDS)
    def op_empty(self, name: str, arg: Any, pos: int) -> None:
        self.push(Box(_EMPTY_KINDS[name]), pos)

    @_effect("TUPLE1", "TUPLE2", "TUPLE3")
    def op_small_tuple(self, name: str, arg: Any, pos: int) -> None:
        n = int(name[-1])
        items = [self.pop(pos, name) for _ in range(n)][::-1]
        b = Box("tuple")
        self.track(b, items)
        self.push(b, pos)

    @_effect(*_MARKED_KINDS)
    def op_marked_container(self, name: str, arg: Any, pos: int) -> None:
        items = self.pop_mark(pos, name)
        if name == "DICT" and len(items) % 2:
            raise _Broken(pos, "DICT with an odd number of items")
        b = Box(_MARKED_KINDS[name])
        self.track(b, items)
        if name == "DICT":
            self.name_tensors(items)
        self.push(b, pos)

    @_effect("GLOBAL")
    def op_global(self, name: str, arg: Any, pos: int) -> None:
        module, gname = self._raw_global(pos)
        self.push(self.make_global(module, gname, pos, name), pos)

    @_effect("STACK_GLOBAL")
    def op_stack_global(self, name: str, arg: Any, pos: int) -> None:
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

    @_effect("INST")
    def op_inst(self, name: str, arg: Any, pos: int) -> None:
        module, gname = self._raw_global(pos)
        g = self.make_global(module, gname, pos, name)
        g.called = True
        self.r.calls += 1
        args = self.pop_mark(pos, name)
        b = Box("tuple")
        self.track(b, args)
        self.push(Call(g, b, "inst"), pos)

    @_effect("OBJ")
    def op_obj(self, name: str, arg: Any, pos: int) -> None:
        items = self.pop_mark(pos, name)
        if not items:
            raise _Broken(pos, "OBJ without a class")
        self.callee(items[0], pos, name)
        b = Box("tuple")
        self.track(b, items[1:])
        self.push(Call(items[0], b, "obj"), pos)

    @_effect("EXT1", "EXT2", "EXT4")
    def op_extension(self, name: str, arg: Any, pos: int) -> None:
        self.anomaly(pos, f"{name} {arg} imports through the copyreg extension registry, "
                     "which hides the imported name from scanners")
        self.push(Opaque(), pos)

    @_effect("REDUCE")
    def op_reduce(self, name: str, arg: Any, pos: int) -> None:
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

    @_effect("NEWOBJ", "NEWOBJ_EX")
    def op_newobj(self, name: str, arg: Any, pos: int) -> None:
        kwargs = self.pop(pos, name) if name == "NEWOBJ_EX" else None
        args = self.pop(pos, name)
        cls = self.pop(pos, name)
        self.callee(cls, pos, name)
        call = Call(cls, args, "newobj")
        if kwargs is not None:
            call.extra.append(kwargs)
        self.push(call, pos)

    @_effect("BUILD")
    def op_build(self, name: str, arg: Any, pos: int) -> None:
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

    @_effect("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS")
    def op_add_items(self, name: str, arg: Any, pos: int) -> None:
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

    @_effect("PERSID")
    def op_text_persid(self, name: str, arg: Any, pos: int) -> None:
        self.anomaly(pos, "text PERSID (protocol 0 persistent id): torch never writes one")
        self.push(Pid(arg), pos)

    @_effect("BINPERSID")
    def op_persid(self, name: str, arg: Any, pos: int) -> None:
        self.push(self.persistent(self.pop(pos, name), pos), pos)

    @_effect("NEXT_BUFFER", "READONLY_BUFFER")
    def op_buffer(self, name: str, arg: Any, pos: int) -> None:
        self.anomaly(pos, f"{name}: out-of-band buffers are never used by checkpoints")
        if name == "NEXT_BUFFER":
            self.push(Opaque(), pos)

    def op_unknown(self, name: str, arg: Any, pos: int) -> None:  # pragma: no cover - genops knows no other
        self.anomaly(pos, f"unexpected opcode {name}")

    def torch_target(self, target: Any, op: str, pos: int) -> None:
        """Record what torch's weights_only APPEND/SETITEM would refuse (a ``defaultdict`` with items,
        a list subclass): benign, but unloadable by this runtime (reported UNSUPPORTED_FORMAT)."""
        if len(self.r.unreadable) >= 3:
            return
        if op in ("APPEND", "APPENDS"):
            ok = isinstance(target, Box) and target.kind == "list"
            want = "a plain list"
        elif op in ("SETITEM", "SETITEMS"):
            ok = (isinstance(target, Box) and target.kind == "dict") or (
                isinstance(target, Call) and isinstance(target.callee, Glob)
                and "{}.{}".format(*allowlist.normalize(target.callee.module, target.callee.name))
                in TORCH_SAFE_MAPPINGS)
            want = "a dict, OrderedDict or Counter"
        else:
            return
        if not ok:
            self.r.unreadable.append(Anomaly(pos, f"{op} into {_describe(target)}, where torch's weights_only "
                                             f"unpickler accepts only {want}"))

    def name_tensors(self, items: list) -> None:
        for k, v in zip(items[::2], items[1::2], strict=False):
            if isinstance(k, str) and isinstance(v, Call) and v.tensor is not None and v.tensor.name is None:
                v.tensor.name = k

    def finish(self) -> None:
        for g in self.pending:
            ok = g.factory_ok and not g.called
            if ok:
                g.decision = allowlist.Ruling(True, "defaultdict-factory")
            self.record(g, *allowlist.normalize(g.module, g.name))


#: What ``step`` checks before every opcode's stack effect, in this order.
ANALYSES: tuple[Callable[[_Machine, pickletools.OpcodeInfo, int], None], ...] = (
    _Machine.check_frame, _Machine.check_protocol, _Machine.count_nodes)


#: Attribute names a BUILD state may never set: with a ``(state, slotstate)`` pair the unpickler
#: ``setattr``s each slot key, so ``__class__`` retypes the object into another (allowlisted) class and
#: ``__dict__`` replaces its attributes wholesale: the gadget step of several pickle exploits.
_RETYPE_KEYS = frozenset({"__class__", "__dict__"})


def _retyping_keys(state: Any) -> list[str]:
    """Keys of a BUILD state that retype an object or set a special attribute: ``__class__``/``__dict__``
    anywhere, any dunder name in the slot state (set with ``setattr``)."""
    dicts: list[tuple[Box, bool]] = []
    if isinstance(state, Box) and state.kind == "dict":
        dicts.append((state, False))
    elif isinstance(state, Box) and state.kind == "tuple" and len(state.items) == 2:
        dicts.extend((b, i == 1) for i, b in enumerate(state.items) if isinstance(b, Box) and b.kind == "dict")
    return [k for box, slots in dicts for k in box.items[::2]
            if isinstance(k, str) and (k in _RETYPE_KEYS or (slots and len(k) > 4 and k[:2] == k[-2:] == "__"))]


def _ints(v: Any) -> Any:
    if isinstance(v, Box) and v.kind == "tuple" and not v.truncated:
        return tuple(v.items)
    return v


def _describe(v: Any) -> str:
    if isinstance(v, BStr):
        return f"STRING {str(v)[:40]!r}"
    if isinstance(v, str):
        return f"str {v[:40]!r}"
    if isinstance(v, Glob):
        return f"global {v.full}"
    if isinstance(v, Call):
        inner = v.callee.full if isinstance(v.callee, Glob) else type(v.callee).__name__
        return f"the result of calling {inner}"
    if isinstance(v, Box):
        return f"a {v.kind}"
    if isinstance(v, Opaque):
        return "an unresolvable value"
    return type(v).__name__


def scan_stream(buf: bytes, start: int, settings: Settings, *,
                extra_allow: Callable[[str, str], bool] | None = None) -> StreamReport:
    """Scan the pickle stream that begins at ``buf[start]``. Never raises on hostile input."""
    report = StreamReport(start=start)
    machine = _Machine(buf, report, settings, extra_allow)
    f = io.BytesIO(buf)
    f.seek(start)
    pos = start
    opcodes = report.opcodes
    try:
        for n_ops, (op, arg, op_pos) in enumerate(pickletools.genops(f)):
            pos = op_pos if op_pos is not None else pos  # genops gives None only for untellable files
            if not n_ops % TICK_EVERY:
                budget.tick()
                if n_ops >= MAX_OPS:
                    report.limit = f"more than {MAX_OPS:,} opcodes in one stream"
                    break
            opcodes.add(op.name)
            if machine.step(op, arg, pos):
                report.end = f.tell()
                break
        else:  # pragma: no cover - genops raises before running out without STOP
            raise _Broken(f.tell(), "stream ends without STOP")
        if report.limit:
            report.end = None
    except _Limit as exc:
        report.limit = f"{exc.message} (at offset {exc.offset})"
    except budget.ScanDeadline as exc:
        # What was found so far is still reported (an unsafe global before the deadline counts).
        report.limit = f"{exc} (at offset {pos:,})"
        report.deadline = True
    except _Broken as exc:
        report.error = Anomaly(exc.offset, exc.message)
    except RecursionError:  # pragma: no cover - genops is iterative; belt and braces
        report.error = Anomaly(pos, "stream nests too deeply to parse")
    except Exception as exc:  # genops raises ValueError & co. on truncated or malformed streams
        text = str(exc) or type(exc).__name__
        report.error = Anomaly(max(pos, f.tell() if not f.closed else pos), f"cannot parse: {text[:200]}")
    machine.finish()
    if report.end is not None and machine.frame_end is not None and report.end != machine.frame_end:
        machine.anomaly(report.end, f"STOP at {report.end - 1} leaves {machine.frame_end - report.end:,} "
                        "byte(s) of its FRAME unread")
    if report.end is not None and report.result is not None:
        try:
            depth = nesting_depth(report.result)
        except budget.ScanDeadline as exc:
            report.limit, report.deadline, depth = f"{exc} (measuring nesting)", True, 0
        if depth > MAX_NESTING:
            machine.anomaly(start, f"values nest more than {MAX_NESTING} levels deep (resource exhaustion)")
    report.looks_like_pickle = report.end is not None or any(
        allowlist.valid_module(g.module) and allowlist.valid_name(g.name) for g in report.globals
    )
    return report


def pickle_globals(buf: bytes, settings: Settings | None = None) -> list[tuple[str, str]]:
    """Every ``(module, name)`` the streams in ``buf`` import, in order, after Python 2 → 3
    renaming. For the loader: intersect with ``allowlist.is_allowed`` to build safe_globals."""
    settings = settings or Settings()
    out: dict[tuple[str, str], None] = {}
    pos = 0
    for _ in range(MAX_STREAMS):
        if pos >= len(buf):
            break
        rep = scan_stream(buf, pos, settings)
        for g in rep.globals:
            out.setdefault((g.module, g.name), None)
        if rep.end is None or rep.end <= pos:
            break
        pos = rep.end
    return list(out)


def str_items(v: Any) -> list[str] | None:
    """The items of a list/tuple of str constants, or None if it is anything else."""
    if not isinstance(v, Box) or v.kind not in ("list", "tuple") or v.truncated:
        return None
    items = v.items
    if not all(type(x) is str for x in items):
        return None
    return list(items)


#: A ``data.pkl`` larger than this is not walked a second time for ``flat_state_dict`` (a state_dict
#: pickle is ~100 bytes per tensor: 16 MiB is over 100,000 tensors).
MAX_STATE_PICKLE = 16 * 2**20


def flat_state_dict(buf: bytes, settings: Settings | None = None, *, start: int = 0
                    ) -> dict[str, dict[str, Any]] | None:
    """``{name: {"shape": [...], "dtype": "float32"}}`` when the stream in ``buf`` is a plain
    state_dict (a dict or ``OrderedDict()`` whose every key is a str constant and every value a tensor
    or parameter with a concrete shape and a known dtype), else None. What a loader of the same bytes
    must report having read (``runner.cross_check``); anything less clear-cut gives no expectation."""
    if len(buf) - start > MAX_STATE_PICKLE:
        return None
    rep = scan_stream(buf, start, settings or Settings())
    if rep.end is None or rep.hostile or rep.limit:
        return None
    v = rep.result
    if isinstance(v, Call):
        callee = v.callee
        if not (isinstance(callee, Glob) and callee.full == "collections.OrderedDict" and v.items is not None
                and isinstance(v.args, Box) and not v.args.items):
            return None
        box: Box = v.items
    elif isinstance(v, Box) and v.kind == "dict":
        box = v
    else:
        return None
    if box.truncated or not box.items:
        return None
    out: dict[str, dict[str, Any]] = {}
    for k, t in zip(box.items[::2], box.items[1::2], strict=True):
        decl = t.tensor if isinstance(t, Call) else None
        if type(k) is not str or k in out or decl is None or decl.dtype is None or not isinstance(decl.size, tuple) \
                or not all(type(d) is int for d in decl.size):
            return None
        out[k] = {"shape": list(decl.size), "dtype": decl.dtype}
    return out



def torch_zip_tensors(path: Any, reading: Any) -> dict[str, dict[str, Any]] | None:
    """``flat_state_dict`` of a torch zip's ``data.pkl``, located through the scan's ``Reading`` (the
    member table the worker is held to), or None."""
    member = reading.records().get("data.pkl") if reading is not None else None
    if member is None or member.method != 0 or member.usize != member.csize or member.usize > MAX_STATE_PICKLE:
        return None
    try:
        with open(path, "rb") as fh:
            buf = os.pread(fh.fileno(), member.usize, member.data_offset)
    except OSError:
        return None
    return flat_state_dict(buf) if len(buf) == member.usize else None


def torch_legacy_tensors(path: Any) -> dict[str, dict[str, Any]] | None:
    """``flat_state_dict`` of a legacy torch file (``_use_new_zipfile_serialization=False``): its fourth
    pickle stream is the object, after the magic number, protocol version and sys_info."""
    try:
        with open(path, "rb") as fh:
            buf = fh.read(MAX_STATE_PICKLE + 4096)
    except OSError:
        return None
    settings, pos = Settings(), 0
    for _ in range(3):
        rep = scan_stream(buf, pos, settings)
        if rep.end is None or rep.hostile:
            return None
        pos = rep.end
    return flat_state_dict(buf, settings, start=pos)

