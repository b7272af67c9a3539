"""Strict reading of a torch.export (``.pt2``) program's JSON, before torch ever sees it.

torch 2.13 turns strings of ``models/<name>.json`` into executed Python while it loads, unlifts
(``ExportedProgram.module()``) and runs a program:

* ``guards_code`` is pasted into a function body and ``exec``'d (torch/export/_unlift.py:876 →
  ``_convert_guards_code_to_fn``, exec at :213); a string constant input of the graph is pasted
  into the same code between quotes (``_get_input_guards_for_graph``, :691).
* graph input, node and output names become variable names of the ``def forward(...)`` that
  torch.fx generates and ``exec``'s (torch/fx/graph.py codegen; placeholders keep their raw
  serialized name, torch/_export/serde/serialize.py:2559-2576 ``placeholder_node.name = ...``;
  ``fx/graph_module.py:143`` ``exec(compile(src))``); keyword-argument names of a node
  (``NamedArgument.name``) become ``k = v`` in that code (fx/graph.py:644).
* ``module_call_graph[].signature.forward_arg_names`` are pasted into the generated signature and
  the keys of ``in_spec``'s kwargs dict between quotes (``_PyTreeCodeGen``, fx/graph.py:1133-1143).
* parameter / buffer / constant names (the input specs' targets) become ``get_attr`` targets, and
  a part that is not an identifier is pasted as ``getattr(self, "<part>")`` (fx/graph.py:254-262).
* every ``expr_str`` (symbolic sizes, strides, offsets, sym int/float/bool values) is handed to
  ``sympy.sympify`` (serialize.py:2412), which ``eval``s Python with builtins in scope.
* node targets are resolved by ``getattr`` over ``torch`` / ``_operator`` / ``math``, ``#ns:op``
  names through extension handlers (serialize.py:2338-2367): a custom namespace is someone's code.

So the whole document is read here under a grammar of what torch itself writes: every field is
known (schema 8.x of torch/_export/serde/schema.py), names are identifiers, FQNs are dotted
identifiers or indices, expressions parse under a small hand-written grammar (never ``sympify``),
targets come from torch's own namespaces, guard code is empty, and anything else is refused.
Refusing an unusual but harmless archive is the intended trade. Plain ``json``; no torch import.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ckpt_stage.domain import ReasonCode

SCHEMA_MAJOR = 8
"""``SCHEMA_VERSION[0]`` of torch 2.13 (torch/_export/serde/schema.py:12, ``(8, 20)``); the
grammar below is that schema. Another major means fields this reader does not know."""

MAX_DEPTH = 200
"""Nesting of the JSON document (higher-order-op subgraphs nest graphs; real ones are < 40)."""
MAX_EXPR_CHARS = 20_000
MAX_NAME_CHARS = 1_000
MAX_TEXT_CHARS = 1_000_000
MAX_PROBLEMS = 20

HINT = ("this torch.export archive holds strings that torch would run as Python code while loading or "
        "serving it, or strings outside the grammar torch.export itself writes; do not deploy it. Export "
        "a plain torch module without custom operators (torch.export.save / mlflow.pytorch.log_model), or "
        "log a state_dict with the ckpt_stage.arch tag; if you did not build this file, treat it as "
        "compromised")
HINT_SCHEMA = ("re-export the model with the serving runtime's torch (torch.export schema "
               f"{SCHEMA_MAJOR}.x), or log a state_dict with the ckpt_stage.arch tag")


@dataclass(frozen=True)
class Problem:
    code: ReasonCode
    field: str
    """JSON path of the offending value (``graph_module.graph.nodes[3].name``)."""
    value: str
    why: str

    @property
    def message(self) -> str:
        return f"{self.field} = {show(self.value)}: {self.why}"


@dataclass
class Reading:
    """What the strict read of one ``models/<name>.json`` found."""

    schema: tuple[int, int] | None = None
    torch_version: str | None = None
    problems: list[Problem] = field(default_factory=list)
    more: int = 0
    """Problems past ``MAX_PROBLEMS`` (counted, not kept)."""

    def summary(self, member: str) -> str:
        shown = "; ".join(p.message for p in self.problems)
        extra = f"; and {self.more} more" if self.more else ""
        return f"{member}: {shown}{extra}"


def show(value: Any, limit: int = 80) -> str:
    """A value for a message: ``repr`` (escapes control characters), truncated."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)[:limit * 2]
    r = repr(text)
    return r if len(r) <= limit else r[:limit] + "…"


class _Refused(Exception):
    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


# -- names ------------------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FQN_PART = re.compile(r"[A-Za-z0-9_]+\Z")
_SYMBOL = re.compile(r"(?:s|u|zf|zuf|ps)[0-9]{1,9}\Z")
"""Symbol names torch.export writes (torch/utils/_sympy/symbol.py ``prefix_str``: sizes ``s``,
unbacked ints ``u``, floats ``zf`` / ``zuf``, precomputed sizes ``ps``)."""
_SAFE_STRING = re.compile(r"[^'\"\\\x00-\x1f\x7f\u2028\u2029\x85]*\Z")
"""String constants: printable, no quotes or backslashes (one is pasted between quotes into guard
code, _unlift.py:691) and no line breaks."""
_TEXT = re.compile(r"[^\x00-\x08\x0b-\x1f\x7f\u2028\u2029\x85]*\Z")
"""Free text (stack traces, module paths): no control characters but newline and tab (a carriage
return ends a line in Python source, fx's verbose code puts stack traces in comments)."""
_WORD = re.compile(r"[A-Za-z0-9_.+<=>-]{0,64}\Z")


def check_name(value: Any) -> None:
    if not isinstance(value, str):
        raise _Refused("a name must be a string")
    if len(value) > MAX_NAME_CHARS or not _IDENT.match(value):
        raise _Refused("not a Python identifier")
    if keyword.iskeyword(value):
        raise _Refused("a Python keyword")
    if value.startswith("__"):
        raise _Refused("a dunder name")


def check_fqn(value: Any, *, empty: bool = False) -> None:
    """``layer.0.weight``: dotted parts, each an identifier or an index."""
    if not isinstance(value, str):
        raise _Refused("a qualified name must be a string")
    if value == "" and empty:
        return
    if len(value) > MAX_NAME_CHARS:
        raise _Refused("too long")
    for part in value.split("."):
        if not _FQN_PART.match(part):
            raise _Refused("not a dotted name of identifiers and indices")
        if part.startswith("__"):
            raise _Refused("a dunder attribute")
        if not part.isdigit() and (keyword.iskeyword(part) or not part.isidentifier()):
            raise _Refused("a part is neither an identifier nor an index")


def check_text(value: Any, limit: int = MAX_TEXT_CHARS) -> None:
    if not isinstance(value, str):
        raise _Refused("must be a string")
    if len(value) > limit:
        raise _Refused(f"longer than {limit:,} characters")
    if not _TEXT.match(value):
        raise _Refused("holds control characters")


def check_string_constant(value: Any) -> None:
    if not isinstance(value, str):
        raise _Refused("must be a string")
    if len(value) > MAX_NAME_CHARS or not _SAFE_STRING.match(value):
        raise _Refused("a string constant with quotes, backslashes or control characters")


def check_word(value: Any) -> None:
    if not isinstance(value, str) or not _WORD.match(value):
        raise _Refused("not a plain word")


# -- operator targets -------------------------------------------------------------------------------

_OP = re.compile(r"torch\.ops\.(aten|prims)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\Z")

TORCH_HOPS = frozenset({
    "cond", "while_loop", "while_loop_stack_output", "map_impl", "scan", "associative_scan",
    "wrap_with_set_grad_enabled", "wrap_with_autocast", "invoke_subgraph", "out_dtype", "hints_wrapper",
    "auto_functionalized", "auto_functionalized_v2", "with_effects", "tag_activation_checkpoint",
    "flex_attention",
})
"""Higher-order operators torch 2.13 ships (``torch._ops._higher_order_ops``) whose arguments are
tensors, graphs and operators only. Left out: those that carry native or foreign code
(``inline_asm_elementwise``, ``inductor_compiled_code``, ``aoti_call_delegate``,
``executorch_call_delegate``, ``call_torchbind``), or call arbitrary Python (``flat_apply``,
``invoke_leaf_function``, ``custom_function_call``, ``autograd_function_apply``)."""

OPERATOR_FUNCTIONS = frozenset({
    "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv", "mod", "pow",
    "truediv", "and_", "or_", "lshift", "rshift", "getitem",
})
"""``_operator`` functions export emits (serialize.py ``_SYM_OPS`` and ``getitem``)."""

TORCH_FUNCTIONS = frozenset({
    "torch.sym_int", "torch.sym_float", "torch.sym_ite", "torch.sym_max", "torch.sym_min", "torch.sym_not",
    "torch.sym_sqrt", "torch.sym_sum", "torch._C._set_grad_enabled",
    "torch.autograd.grad_mode.set_grad_enabled", "torch.amp.autocast_mode._enter_autocast",
    "torch.amp.autocast_mode._exit_autocast",
    "torch.fx.experimental.symbolic_shapes.cast_symbool_to_symint_guardless",
    "math.trunc", "math.ceil", "math.floor", "math.sqrt",
})
"""The builtins and torch functions torch/_export/verifier.py:226 accepts (less
``torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch``, a user's autograd
function), plus ``math.trunc`` of ``_SYM_OPS``."""


def check_target(value: Any) -> None:
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
        raise _Refused("an operator target must be a short string")
    m = _OP.match(value)
    if m:
        if m.group(2).startswith("__") or m.group(3).startswith("__"):
            raise _Refused("a dunder operator name")
        return
    if value.startswith("torch.ops.higher_order."):
        if value.removeprefix("torch.ops.higher_order.") in TORCH_HOPS:
            return
        raise _Refused("a higher-order operator outside the ones this stage runs")
    if value.startswith("_operator.") and value.removeprefix("_operator.") in OPERATOR_FUNCTIONS:
        return
    if value in TORCH_FUNCTIONS:
        return
    if value.startswith("torch.ops."):
        raise _Refused("an operator from a custom namespace (only aten, prims and torch's higher-order ops)")
    raise _Refused("not an operator of torch's own namespaces (aten, prims, higher_order, _operator)")


# -- symbolic expressions ---------------------------------------------------------------------------

EXPR_FUNCTIONS = frozenset({
    # sympy constructors as srepr writes them (torch 2.13 serializes expressions with sympy.srepr)
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    # torch.utils._sympy.functions, the ``locals`` serialize.py:2925 gives sympify
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
})
EXPR_CONSTANTS = frozenset({
    "oo", "zoo", "nan", "True", "False", "true", "false", "S", "Infinity", "NegativeInfinity",
    "IntInfinity", "NegativeIntInfinity", "Zero", "One", "NegativeOne", "Half", "NaN", "BooleanTrue",
    "BooleanFalse", "int_oo",
})
"""Bare names an expression may use: sympy's singletons as srepr / str write them (``oo``,
``S.Infinity``...) and torch's ``int_oo``."""
ASSUMPTIONS = frozenset({
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite",
    "zero", "nonzero", "rational", "extended_real", "commutative", "even", "odd", "prime", "composite",
    "extended_positive", "extended_negative", "extended_nonnegative", "extended_nonpositive", "complex",
    "precision", "evaluate",
})
"""Keyword arguments srepr writes: ``Symbol('s0', positive=True, integer=True)``,
``Float('1.5', precision=53)``."""

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<str>'[^'\\]{0,64}')
  | (?P<op>\*\*|//|==|!=|<=|>=|[-+*/%<>(),=&|~.\[\]])
)""", re.VERBOSE)
_NUMBER_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?\Z|[-+]?(?:inf|nan)\Z")
MAX_INT_DIGITS = 40
MAX_EXPR_NESTING = 40
"""Parentheses / calls / unary signs deep (torch's own stay under ~10; each level is ~10 frames)."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise _Refused(f"unexpected character {text[pos:].lstrip()[:1]!r} in a symbolic expression")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


GUARD_FUNCTIONS = frozenset({"max", "min", "abs"})
GUARD_MATH = frozenset({"floor", "ceil", "trunc", "sqrt"})
GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_KEY = re.compile(r"'[A-Za-z_][A-Za-z0-9_]{0,200}'\Z")


class _ExprParser:
    """Recursive descent over: or/and/not, comparisons, ``+ - * / // % **``, unary minus, integers,
    floats, symbols, whitelisted calls ``F(arg, ...)`` with string literals (only a symbol name or
    a number) and ``assumption=True`` keywords. Depth is bounded.

    With ``guard=True``, the grammar of the guard code torch.export writes (torch's PythonPrinter
    over input sources): ``L['x'].size()[0]``-style input paths instead of symbols, ``and`` /
    ``or`` / ``not``, chained comparisons, ``max`` / ``min`` / ``abs`` / ``math.floor``-style calls."""

    def __init__(self, text: str, *, guard: bool = False):
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0
        self.guard = guard

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise _Refused("an expression ends early")
        tok = self.toks[self.i]
        if want is not None and tok[1] != want:
            raise _Refused(f"expected {want!r}, found {tok[1]!r} in an expression")
        self.i += 1
        return tok

    def parse(self) -> None:
        if not self.toks:
            raise _Refused("an empty expression")
        self.expr()
        if self.i != len(self.toks):
            raise _Refused(f"unexpected {self.toks[self.i][1]!r} in an expression")

    def _nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_EXPR_NESTING:
            raise _Refused("an expression nested too deeply")

    def expr(self) -> None:
        self._nest()
        self.conj()
        while self.peek() == "|" or (self.guard and self.peek() == "or"):
            self.take()
            self.conj()
        self.depth -= 1

    def conj(self) -> None:
        self.neg()
        while self.peek() == "&" or (self.guard and self.peek() == "and"):
            self.take()
            self.neg()

    def neg(self) -> None:
        if self.peek() == "~" or (self.guard and self.peek() == "not"):
            self.take()
            self._nest()
            self.neg()
            self.depth -= 1
            return
        self.comparison()

    def comparison(self) -> None:
        self.arith()
        while self.peek() in ("==", "!=", "<", "<=", ">", ">="):
            self.take()
            self.arith()

    def arith(self) -> None:
        self.term()
        while self.peek() in ("+", "-"):
            self.take()
            self.term()

    def term(self) -> None:
        self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            self.take()
            self.unary()

    def unary(self) -> None:
        if self.peek() in ("-", "+"):
            self.take()
            self._nest()
            self.unary()
            self.depth -= 1
            return
        self.power()

    def power(self) -> None:
        self.atom()
        if self.peek() == "**":
            self.take()
            self._nest()
            self.unary()
            self.depth -= 1

    def atom(self) -> None:  # noqa: C901 - one branch per atom form
        kind, text = self.take()
        if kind == "num":
            if len(text) > MAX_INT_DIGITS:
                raise _Refused("a number too long for a size")
            return
        if text == "(":
            self.expr()
            self.take(")")
            return
        if kind != "name":
            raise _Refused(f"unexpected {text!r} in an expression")
        if self.guard:
            self.guard_atom(text)
            return
        if self.peek() == "(":
            if text not in EXPR_FUNCTIONS:
                raise _Refused(f"call of {text!r}, not a sympy or torch size function")
            self.call(text)
            return
        if self.peek() == "." and text == "S":  # S.Infinity, S.Zero...
            self.take(".")
            _, attr = self.take()
            if attr not in EXPR_CONSTANTS:
                raise _Refused(f"S.{attr} is not a sympy constant this stage reads")
            return
        if _SYMBOL.match(text) or (text in EXPR_CONSTANTS and text != "S"):
            return
        raise _Refused(f"name {text!r} is neither a size symbol (s0, u0, ...) nor a sympy constant")

    def guard_atom(self, text: str) -> None:
        if text in ("True", "False", "inf"):
            return
        if text == "L" and self.peek() == "[":
            self.take("[")
            kind, key = self.take()
            if kind != "str" or not _GUARD_KEY.match(key):
                raise _Refused(f"input {key!r} of a guard is not a quoted identifier")
            self.take("]")
            self.input_path()
            return
        if text == "math" and self.peek() == ".":
            self.take(".")
            _, text = self.take()
            if text not in GUARD_MATH:
                raise _Refused(f"math.{text} is not a function guards use")
            self.guard_call()
            return
        if text in GUARD_FUNCTIONS and self.peek() == "(":
            self.guard_call()
            return
        raise _Refused(f"name {text!r} in guard code (only input sizes L['x'].size()[i], numbers, "
                       "arithmetic, comparisons and max/min/abs)")

    def input_path(self) -> None:
        for _ in range(32):
            if self.peek() == "[":
                self.take("[")
                kind, key = self.take()
                if not ((kind == "num" and key.isdigit()) or (kind == "str" and _GUARD_KEY.match(key))):
                    raise _Refused(f"index {key!r} of a guard input is neither an integer nor a quoted identifier")
                self.take("]")
            elif self.peek() == ".":
                self.take(".")
                _, method = self.take()
                if method not in GUARD_METHODS:
                    raise _Refused(f".{method}() is not a tensor property guards use")
                self.take("(")
                self.take(")")
            else:
                return
        raise _Refused("an input path too long")

    def guard_call(self) -> None:
        self.take("(")
        self._nest()
        self.expr()
        while self.peek() == ",":
            self.take(",")
            self.expr()
        self.take(")")
        self.depth -= 1

    def call(self, func: str) -> None:
        self.take("(")
        self._nest()
        first = True
        while self.peek() != ")":
            if not first:
                self.take(",")
                if self.peek() == ")":
                    break
            if self.i + 1 < len(self.toks) and self.toks[self.i][0] == "name" and self.toks[self.i + 1][1] == "=":
                _, key = self.take()
                self.take("=")
                if key not in ASSUMPTIONS:
                    raise _Refused(f"keyword {key!r} in {func}(...) is not a sympy assumption")
                kind, val = self.take()
                if not (val in ("True", "False") or kind == "num"):
                    raise _Refused(f"{key}= takes True, False or a number")
            elif self.i < len(self.toks) and self.toks[self.i][0] == "str":
                _, lit = self.take()
                inner = lit[1:-1]
                if func == "Symbol" and first:
                    if not _SYMBOL.match(inner):
                        raise _Refused(f"symbol name {inner!r} is not a size symbol (s0, u0, ...)")
                elif func in ("Float", "Integer", "Rational") and _NUMBER_TEXT.match(inner):
                    pass
                else:
                    raise _Refused(f"string {lit} in {func}(...)")
            else:
                self.expr()
            first = False
        self.take(")")
        self.depth -= 1


def check_guard(value: Any) -> None:
    """One entry of ``guards_code``: torch pastes it into ``torch._assert(<it>, ...)`` and execs it
    (torch/export/_unlift.py:204-213), so only the grammar torch's own printer writes is read."""
    if not isinstance(value, str):
        raise _Refused("guard code must be a string")
    if len(value) > MAX_EXPR_CHARS:
        raise _Refused(f"guard code longer than {MAX_EXPR_CHARS:,} characters")
    if not _SAFE_GUARD.match(value):
        raise _Refused("guard code with characters torch's printer never writes")
    _ExprParser(value, guard=True).parse()


_SAFE_GUARD = re.compile(r"[A-Za-z0-9_ ()\[\]'.,+\-*/%<>=!]*\Z")


def check_expr(value: Any) -> None:
    if not isinstance(value, str):
        raise _Refused("a symbolic expression must be a string")
    if len(value) > MAX_EXPR_CHARS:
        raise _Refused(f"a symbolic expression longer than {MAX_EXPR_CHARS:,} characters")
    _ExprParser(value).parse()


# -- the schema -------------------------------------------------------------------------------------


class _Walker:
    def __init__(self) -> None:
        self.reading = Reading()

    def refuse(self, path: str, value: Any, why: str, code: ReasonCode = ReasonCode.UNSAFE_CODE) -> None:
        r = self.reading
        if len(r.problems) >= MAX_PROBLEMS:
            r.more += 1
            return
        r.problems.append(Problem(code, path, value if isinstance(value, str) else show(value), why))

    def check(self, path: str, value: Any, fn: Any, **kw: Any) -> None:
        try:
            fn(value, **kw)
        except _Refused as exc:
            self.refuse(path, value, exc.why)
        except RecursionError:  # pragma: no cover - bounded above; never a crash of the scan
            self.refuse(path, value, "nested too deeply")

    # structure helpers: each returns False (after refusing) when the value has the wrong shape
    def obj(self, path: str, value: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> bool:
        if not isinstance(value, dict):
            self.refuse(path, value, "expected an object")
            return False
        for k in value:
            if k not in required and k not in optional:
                self.refuse(f"{path}.{k}", k, "a field outside the torch.export schema this stage reads")
        missing = [k for k in required if k not in value]
        if missing:
            self.refuse(path, ",".join(missing), "required fields missing")
            return False
        return True

    def union(self, path: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, Any] | None:
        if not isinstance(value, dict) or len(value) != 1:
            self.refuse(path, value, "expected an object with exactly one of " + ", ".join(allowed[:6]))
            return None
        ((k, v),) = value.items()
        if k not in allowed:
            self.refuse(f"{path}.{k}", k, "a variant outside the torch.export schema this stage reads")
            return None
        return k, v

    def items(self, path: str, value: Any) -> Iterator[tuple[str, Any]]:
        if not isinstance(value, list):
            self.refuse(path, value, "expected a list")
            return
        for i, v in enumerate(value):
            yield f"{path}[{i}]", v

    def mapping(self, path: str, value: Any) -> Iterator[tuple[str, str, Any]]:
        if not isinstance(value, dict):
            self.refuse(path, value, "expected an object")
            return
        for k, v in value.items():
            yield f"{path}[{show(k, 40)}]", k, v

    def int_(self, path: str, value: Any, *, null: bool = False) -> None:
        if value is None and null:
            return
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) >= 2**64:
            self.refuse(path, value, "expected an integer")

    def float_(self, path: str, value: Any) -> None:
        # torch writes non-finite floats as the strings "Infinity", "-Infinity", "NaN"
        special = isinstance(value, str) and value in ("Infinity", "-Infinity", "NaN")
        if not special and (isinstance(value, bool) or not isinstance(value, int | float)):
            self.refuse(path, value, "expected a number")

    def bool_(self, path: str, value: Any, *, null: bool = False) -> None:
        if not (isinstance(value, bool) or (value is None and null)):
            self.refuse(path, value, "expected true or false")

    # -- types of torch/_export/serde/schema.py (schema 8.20) --

    def program(self, doc: Any) -> None:
        r = self.reading
        if not self.obj("", doc, ("graph_module", "schema_version"),
                        ("opset_version", "range_constraints", "verifiers", "torch_version", "guards_code")):
            return
        sv = doc["schema_version"]
        if self.obj("schema_version", sv, ("major", "minor")):
            major, minor = sv["major"], sv["minor"]
            if all(isinstance(x, int) and not isinstance(x, bool) for x in (major, minor)):
                r.schema = (major, minor)
                if major != SCHEMA_MAJOR and (major, minor) != (0, 0):
                    self.refuse("schema_version", f"{major}.{minor}",
                                f"a torch.export schema this stage does not read (it reads {SCHEMA_MAJOR}.x)",
                                ReasonCode.UNSUPPORTED_FORMAT)
                    return  # the rest is another grammar: nothing more to say about it
            else:
                self.refuse("schema_version", sv, "major and minor must be integers")
        tv = doc.get("torch_version")
        if tv is not None:
            self.check("torch_version", tv, check_word)
            r.torch_version = tv if isinstance(tv, str) else None
        for p, g in self.items("guards_code", doc.get("guards_code", [])):
            # torch.export writes guards of its own (relations between dynamic dims, e.g.
            # "((-1) + L['x'].size()[0]) == L['y'].size()[0]"); .module() execs them.
            try:
                check_guard(g)
            except _Refused as exc:
                self.refuse(p, g if isinstance(g, str) else show(g),
                            f"guard code, which torch executes as Python, outside the grammar torch writes "
                            f"({exc.why})")
        for p, k, v in self.mapping("opset_version", doc.get("opset_version", {})):
            self.check(p, k, check_name)
            self.int_(p, v)
        for p, k, v in self.mapping("range_constraints", doc.get("range_constraints", {})):
            self.check(p, k, check_expr)
            if self.obj(p, v, ("min_val", "max_val")):
                self.int_(f"{p}.min_val", v["min_val"], null=True)
                self.int_(f"{p}.max_val", v["max_val"], null=True)
        for p, v in self.items("verifiers", doc.get("verifiers", [])):
            self.check(p, v, check_name)
        self.graph_module("graph_module", doc["graph_module"])

    def graph_module(self, path: str, gm: Any) -> None:
        if not self.obj(path, gm, ("graph", "signature", "module_call_graph"),
                        ("metadata", "treespec_namedtuple_fields")):
            return
        self.graph(f"{path}.graph", gm["graph"], 0, top=True)
        self.signature(f"{path}.signature", gm["signature"])
        for p, entry in self.items(f"{path}.module_call_graph", gm["module_call_graph"]):
            if not self.obj(p, entry, ("fqn",), ("signature",)):
                continue
            self.check(f"{p}.fqn", entry["fqn"], check_fqn, empty=True)
            sig = entry.get("signature")
            if sig is not None:
                self.call_signature(f"{p}.signature", sig)
        self.metadata(f"{path}.metadata", gm.get("metadata", {}))
        for p, _k, v in self.mapping(f"{path}.treespec_namedtuple_fields", gm.get("treespec_namedtuple_fields", {})):
            self.refuse(p, v, "a namedtuple in the program's inputs or outputs (a Python type torch would "
                              "rebuild by name); return plain tensors, tuples, lists or dicts")

    def call_signature(self, path: str, sig: Any) -> None:
        if not self.obj(path, sig, ("inputs", "outputs", "in_spec", "out_spec"), ("forward_arg_names",)):
            return
        for p, a in self.items(f"{path}.inputs", sig["inputs"]):
            self.argument(p, a, 0)
        for p, a in self.items(f"{path}.outputs", sig["outputs"]):
            self.argument(p, a, 0)
        self.treespec(f"{path}.in_spec", sig["in_spec"], keys_are_names=True)
        self.treespec(f"{path}.out_spec", sig["out_spec"], keys_are_names=False)
        names = sig.get("forward_arg_names")
        if names is not None:
            for p, n in self.items(f"{path}.forward_arg_names", names):
                self.check(p, n, check_name)

    # pytree specs (torch/utils/_pytree.py treespec_dumps, protocol 1), a JSON document in a string
    TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict",
                                "collections.OrderedDict", "torch.fx.immutable_collections.immutable_list",
                                "torch.fx.immutable_collections.immutable_dict"})

    def treespec(self, path: str, text: Any, *, keys_are_names: bool) -> None:
        if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
            self.refuse(path, text, "a pytree spec must be a JSON string")
            return
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            self.refuse(path, text, "a pytree spec that is not JSON")
            return
        if not (isinstance(doc, list) and len(doc) == 2 and doc[0] == 1):
            self.refuse(path, text, "a pytree spec of an unknown protocol (torch writes [1, {...}])")
            return
        self.spec_node(path, doc[1], 0, keys_are_names)

    def spec_node(self, path: str, node: Any, depth: int, keys_are_names: bool) -> None:
        if depth > MAX_DEPTH:
            self.refuse(path, "…", "a pytree spec nested too deeply")
            return
        if not self.obj(path, node, ("type", "context", "children_spec")):
            return
        typ, ctx = node["type"], node["context"]
        if typ not in self.TREESPEC_TYPES:
            self.refuse(f"{path}.type", typ, "a container type other than tuple, list or dict (torch would "
                                             "rebuild it by name); use plain containers")
            return
        if typ in ("builtins.dict", "collections.OrderedDict", "torch.fx.immutable_collections.immutable_dict"):
            try:
                keys = json.loads(ctx) if isinstance(ctx, str) else None
            except (ValueError, RecursionError):
                keys = None
            if not isinstance(keys, list):
                self.refuse(f"{path}.context", ctx, "dict keys of a pytree spec must be a JSON list")
            else:
                for i, k in enumerate(keys):
                    # in_spec's kwargs keys are pasted into generated code between quotes
                    # (fx/graph.py:1138); out_spec keys only name outputs.
                    if keys_are_names:
                        self.check(f"{path}.context[{i}]", k, check_name)
                    elif not (isinstance(k, int) and not isinstance(k, bool)):
                        self.check(f"{path}.context[{i}]", k, check_string_constant)
        elif typ is not None and ctx not in ("null", None):
            self.refuse(f"{path}.context", ctx, "a tuple or list spec carries no context")
        elif typ is None and ctx is not None:
            self.refuse(f"{path}.context", ctx, "a leaf carries no context")
        for p, child in self.items(f"{path}.children_spec", node["children_spec"]):
            self.spec_node(p, child, depth + 1, keys_are_names and typ in ("builtins.tuple",) and depth == 0)

    def metadata(self, path: str, meta: Any) -> None:
        for p, k, v in self.mapping(path, meta):
            self.check(p, k, check_name)
            self.check(p, v, check_text)

    def graph(self, path: str, g: Any, depth: int, *, top: bool = False) -> None:
        if depth > 16:
            self.refuse(path, "…", "subgraphs nested too deeply")
            return
        if not self.obj(path, g, ("inputs", "outputs", "nodes", "tensor_values", "sym_int_values",
                                  "sym_bool_values"),
                        ("is_single_tensor_return", "custom_obj_values", "sym_float_values")):
            return
        for p, a in self.items(f"{path}.inputs", g["inputs"]):
            kv = self.union(p, a, ("as_tensor", "as_sym_int", "as_sym_float", "as_sym_bool", "as_custom_obj",
                                   "as_int", "as_float", "as_bool", "as_none", "as_string", "as_token"))
            if kv is not None:
                self.argument(p, a, depth, const_strings=True)
        for p, a in self.items(f"{path}.outputs", g["outputs"]):
            self.argument(p, a, depth)
        for p, n in self.items(f"{path}.nodes", g["nodes"]):
            self.node(p, n, depth)
        for p, k, v in self.mapping(f"{path}.tensor_values", g["tensor_values"]):
            self.check(p, k, check_name)
            self.tensor_meta(p, v)
        for key, fn in (("sym_int_values", self.sym_int), ("sym_float_values", self.sym_float),
                        ("sym_bool_values", self.sym_bool)):
            for p, k, v in self.mapping(f"{path}.{key}", g.get(key, {})):
                self.check(p, k, check_name)
                fn(p, v)
        for p, _k, v in self.mapping(f"{path}.custom_obj_values", g.get("custom_obj_values", {})):
            self.refuse(p, v, "a TorchBind custom object (native code from a custom class)")
        self.bool_(f"{path}.is_single_tensor_return", g.get("is_single_tensor_return", False))

    def node(self, path: str, n: Any, depth: int) -> None:
        if not self.obj(path, n, ("target", "inputs", "outputs", "metadata"), ("is_hop_single_tensor_return", "name")):
            return
        self.check(f"{path}.target", n["target"], check_target)
        for p, na in self.items(f"{path}.inputs", n["inputs"]):
            if self.obj(p, na, ("name", "arg"), ("kind",)):
                if na["name"] != "":  # positional arguments of higher-order ops are unnamed
                    self.check(f"{p}.name", na["name"], check_name)
                self.argument(f"{p}.arg", na["arg"], depth)
                self.int_(f"{p}.kind", na.get("kind"), null=True)
        for p, a in self.items(f"{path}.outputs", n["outputs"]):
            self.argument(p, a, depth)
        self.metadata(f"{path}.metadata", n["metadata"])
        self.bool_(f"{path}.is_hop_single_tensor_return", n.get("is_hop_single_tensor_return"), null=True)
        if n.get("name") is not None:
            self.check(f"{path}.name", n["name"], check_name)

    def named(self, path: str, value: Any, key: str = "name") -> None:
        if self.obj(path, value, (key,)):
            self.check(f"{path}.{key}", value[key], check_name)

    def sym_arg(self, path: str, value: Any, const: str) -> None:
        kv = self.union(path, value, ("as_name", const))
        if kv is None:
            return
        k, v = kv
        if k == "as_name":
            self.check(f"{path}.as_name", v, check_name)
        elif const == "as_int":
            self.int_(f"{path}.{k}", v)
        elif const == "as_float":
            self.float_(f"{path}.{k}", v)
        else:
            self.bool_(f"{path}.{k}", v)

    def optional_tensor(self, path: str, value: Any) -> None:
        kv = self.union(path, value, ("as_tensor", "as_none"))
        if kv is not None and kv[0] == "as_tensor":
            self.named(f"{path}.as_tensor", kv[1])

    ARGUMENTS = ("as_none", "as_tensor", "as_tensors", "as_int", "as_ints", "as_float", "as_floats", "as_string",
                 "as_strings", "as_sym_int", "as_sym_ints", "as_scalar_type", "as_memory_format", "as_layout",
                 "as_device", "as_bool", "as_bools", "as_sym_bool", "as_sym_bools", "as_graph",
                 "as_optional_tensors", "as_custom_obj", "as_operator", "as_sym_float", "as_sym_floats",
                 "as_optional_tensor", "as_complex", "as_nested_tensors", "as_int_lists",
                 "as_string_to_argument", "as_float_lists", "as_token")

    def argument(self, path: str, a: Any, depth: int, *, const_strings: bool = False) -> None:  # noqa: C901
        kv = self.union(path, a, self.ARGUMENTS)
        if kv is None:
            return
        k, v = kv
        p = f"{path}.{k}"
        if k == "as_none":
            return
        if k in ("as_tensor", "as_token"):
            self.named(p, v)
        elif k == "as_tensors":
            for q, t in self.items(p, v):
                self.named(q, t)
        elif k == "as_nested_tensors":
            for q, ts in self.items(p, v):
                for r, t in self.items(q, ts):
                    self.named(r, t)
        elif k in ("as_int", "as_scalar_type", "as_memory_format", "as_layout"):
            self.int_(p, v)
        elif k == "as_ints":
            for q, x in self.items(p, v):
                self.int_(q, x)
        elif k == "as_int_lists":
            for q, xs in self.items(p, v):
                for r, x in self.items(q, xs):
                    self.int_(r, x)
        elif k == "as_float":
            self.float_(p, v)
        elif k == "as_floats":
            for q, x in self.items(p, v):
                self.float_(q, x)
        elif k == "as_float_lists":
            for q, xs in self.items(p, v):
                for r, x in self.items(q, xs):
                    self.float_(r, x)
        elif k == "as_bool":
            self.bool_(p, v)
        elif k == "as_bools":
            for q, x in self.items(p, v):
                self.bool_(q, x)
        elif k == "as_string":
            # fx writes node arguments with repr(); a graph input's or a constant input's string is
            # pasted between quotes into guard code (_unlift.py:691), so those get the strict rule.
            self.check(p, v, check_string_constant if const_strings else check_text, **(
                {} if const_strings else {"limit": MAX_NAME_CHARS}))
        elif k == "as_strings":
            for q, x in self.items(p, v):
                self.check(q, x, check_text, limit=MAX_NAME_CHARS)
        elif k in ("as_sym_int", "as_sym_float", "as_sym_bool"):
            self.sym_arg(p, v, {"as_sym_int": "as_int", "as_sym_float": "as_float", "as_sym_bool": "as_bool"}[k])
        elif k in ("as_sym_ints", "as_sym_floats", "as_sym_bools"):
            const = {"as_sym_ints": "as_int", "as_sym_floats": "as_float", "as_sym_bools": "as_bool"}[k]
            for q, x in self.items(p, v):
                self.sym_arg(q, x, const)
        elif k == "as_device":
            self.device(p, v)
        elif k == "as_graph":
            if self.obj(p, v, ("name", "graph")):
                self.check(f"{p}.name", v["name"], check_name)
                self.graph(f"{p}.graph", v["graph"], depth + 1)
        elif k in ("as_optional_tensor",):
            self.optional_tensor(p, v)
        elif k == "as_optional_tensors":
            for q, x in self.items(p, v):
                self.optional_tensor(q, x)
        elif k == "as_custom_obj":
            self.refuse(p, v, "a TorchBind custom object (native code from a custom class)")
        elif k == "as_operator":
            self.check(p, v, check_target)
        elif k == "as_complex":
            if self.obj(p, v, ("real", "imag")):
                self.float_(f"{p}.real", v["real"])
                self.float_(f"{p}.imag", v["imag"])
        elif k == "as_string_to_argument":
            for q, key, x in self.mapping(p, v):
                self.check(q, key, check_name)
                self.argument(q, x, depth)

    def device(self, path: str, d: Any) -> None:
        if self.obj(path, d, ("type",), ("index",)):
            self.check(f"{path}.type", d["type"], check_name)
            self.int_(f"{path}.index", d.get("index"), null=True)

    def sym_value(self, path: str, v: Any, const: str) -> None:
        kv = self.union(path, v, ("as_expr", const))
        if kv is None:
            return
        k, x = kv
        if k == "as_expr":
            if self.obj(f"{path}.as_expr", x, ("expr_str",), ("hint",)):
                self.check(f"{path}.as_expr.expr_str", x["expr_str"], check_expr)
                hint = x.get("hint")
                if hint is not None:
                    hk = self.union(f"{path}.as_expr.hint", hint, ("as_int", "as_bool", "as_float"))
                    if hk is not None:
                        {"as_int": self.int_, "as_bool": self.bool_, "as_float": self.float_}[hk[0]](
                            f"{path}.as_expr.hint.{hk[0]}", hk[1])
        elif const == "as_int":
            self.int_(f"{path}.{k}", x)
        elif const == "as_float":
            self.float_(f"{path}.{k}", x)
        else:
            self.bool_(f"{path}.{k}", x)

    def sym_int(self, path: str, v: Any) -> None:
        self.sym_value(path, v, "as_int")

    def sym_float(self, path: str, v: Any) -> None:
        self.sym_value(path, v, "as_float")

    def sym_bool(self, path: str, v: Any) -> None:
        self.sym_value(path, v, "as_bool")

    def tensor_meta(self, path: str, tm: Any) -> None:
        if not self.obj(path, tm, ("dtype", "sizes", "requires_grad", "device", "strides", "storage_offset",
                                   "layout")):
            return
        self.int_(f"{path}.dtype", tm["dtype"])
        self.int_(f"{path}.layout", tm["layout"])
        self.bool_(f"{path}.requires_grad", tm["requires_grad"])
        self.device(f"{path}.device", tm["device"])
        for p, s in self.items(f"{path}.sizes", tm["sizes"]):
            self.sym_int(p, s)
        for p, s in self.items(f"{path}.strides", tm["strides"]):
            self.sym_int(p, s)
        self.sym_int(f"{path}.storage_offset", tm["storage_offset"])

    INPUT_SPECS = ("user_input", "parameter", "buffer", "tensor_constant", "custom_obj", "token", "constant_input")
    OUTPUT_SPECS = ("user_output", "loss_output", "buffer_mutation", "gradient_to_parameter",
                    "gradient_to_user_input", "user_input_mutation", "token", "parameter_mutation")
    # spec kind → (its target field, check); targets become get_attr targets or placeholder lookups
    TARGETS = {"parameter": "parameter_name", "buffer": "buffer_name", "tensor_constant": "tensor_constant_name",
               "buffer_mutation": "buffer_name", "gradient_to_parameter": "parameter_name",
               "parameter_mutation": "parameter_name", "gradient_to_user_input": "user_input_name",
               "user_input_mutation": "user_input_name"}

    def signature(self, path: str, sig: Any) -> None:
        if not self.obj(path, sig, ("input_specs", "output_specs")):
            return
        for p, spec in self.items(f"{path}.input_specs", sig["input_specs"]):
            kv = self.union(p, spec, self.INPUT_SPECS)
            if kv is not None:
                self.spec(f"{p}.{kv[0]}", kv[0], kv[1], inputs=True)
        for p, spec in self.items(f"{path}.output_specs", sig["output_specs"]):
            kv = self.union(p, spec, self.OUTPUT_SPECS)
            if kv is not None:
                self.spec(f"{p}.{kv[0]}", kv[0], kv[1], inputs=False)

    def spec(self, path: str, kind: str, v: Any, *, inputs: bool) -> None:
        if kind == "custom_obj":
            self.refuse(path, v, "a TorchBind custom object (native code from a custom class)")
            return
        if kind == "constant_input":
            if self.obj(path, v, ("name", "value")):
                self.check(f"{path}.name", v["name"], check_name)
                cv = self.union(f"{path}.value", v["value"], ("as_none", "as_int", "as_float", "as_string", "as_bool"))
                if cv is not None:
                    self.argument(f"{path}.value", v["value"], 0, const_strings=True)
            return
        target = self.TARGETS.get(kind)
        optional = ("persistent",) if kind == "buffer" else ()
        required = ("arg", target) if target else ("arg",)
        if not self.obj(path, v, required, optional):
            return
        if kind in ("user_input", "user_output"):
            self.argument(f"{path}.arg", v["arg"], 0)
        else:
            self.named(f"{path}.arg", v["arg"])
        if target:
            if target == "user_input_name":
                self.check(f"{path}.{target}", v[target], check_name)
            else:
                self.check(f"{path}.{target}", v[target], check_fqn)
        if kind == "buffer":
            self.bool_(f"{path}.persistent", v.get("persistent"), null=True)


MODELS_DIR = "models/"
"""torch 2.13 ``_load_exported_programs`` (torch/export/pt2_archive/_package.py:991) deserializes
*every* record whose name starts with ``models/`` as an exported program, whatever its extension,
and names the program ``record[len("models/"):-len(".json")]``: ``models/model.txt1`` is read as
program ``model`` (and replaces a benign ``models/model.json`` listed before it)."""
_PROGRAM_RECORD = re.compile(r"models/[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}\.json\Z")


def is_program_record(rel: str) -> bool:
    """Whether torch.export.load reads the archive record ``rel`` (relative to the archive folder)
    as a program graph: every record under ``models/``."""
    return rel.startswith(MODELS_DIR)


def program_record_problem(rel: str) -> Problem | None:
    """A program record whose name is not what torch.export.save writes (``models/<name>.json``):
    torch would still deserialize it, under a derived name the reader cannot trust."""
    if _PROGRAM_RECORD.match(rel):
        return None
    return Problem(ReasonCode.UNSAFE_CODE, "record", rel,
                   "torch.export.load deserializes every record under models/ as an exported program "
                   "(any extension, name cut as record[7:-5]); torch.export.save writes only "
                   "models/<name>.json")


def read_program(doc: Any) -> Reading:
    """Read a parsed ``models/<name>.json`` under the grammar; problems say what was refused."""
    w = _Walker()
    if _too_deep(doc):
        w.refuse("", "…", f"JSON nested deeper than {MAX_DEPTH} levels")
        return w.reading
    w.program(doc)
    return w.reading


def read_payload_config(doc: Any) -> list[Problem]:
    """Names in ``data/{weights,constants}/*_config.json``: the FQNs torch assigns onto the module."""
    w = _Walker()
    config = doc.get("config") if isinstance(doc, dict) else None
    for p, k, _v in w.mapping("config", config if isinstance(config, dict) else {}):
        w.check(p, k, check_fqn)
    return w.reading.problems


def _too_deep(doc: Any) -> bool:
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return False
