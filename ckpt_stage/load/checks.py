"""Checks on loaded weights and metadata, each turning one concrete problem into a Finding.

Pure functions over state dicts, shapes, dtypes and strings (no file I/O), so they are unit-tested
directly. The loader wires them together.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_stage.domain import Finding, ReasonCode, Severity
from ckpt_stage.errors import ArchError

SHOW = 5
"""How many names a message lists before ``…``."""

KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")
"""Key prefixes added by wrappers: DataParallel/DDP, torch.compile, Lightning-style ``self.model``."""

_BENIGN_MISSING = ("num_batches_tracked",)
"""BatchNorm buffers absent from checkpoints saved before torch 0.4.1; torch tolerates them."""


def count(n: int, word: str, plural: str | None = None) -> str:
    """``count(1, "tensor")`` → "1 tensor", ``count(3, "tensor")`` → "3 tensors"."""
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def listing(names: Sequence[str], limit: int = SHOW) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", …" if len(names) > limit else "")


def shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# architecture declared in tags: the string is checked before anything is imported

_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
ARCH_SETTING = "CKPT_STAGE_ARCH_MODULES"
ARCH_TAG_HINT = ("set the version tags ckpt_stage.arch (package.module:Class) and ckpt_stage.arch_kwargs "
                 "(JSON object), or pass --arch/--arch-kwargs to ckpt-stage inspect")


def parse_arch(spec: str) -> tuple[str, str]:
    """``pkg.mod:Class`` or ``pkg.mod.Class`` → (module, class name). Raises ``ArchError``."""
    text = spec.strip()
    if ":" in text:
        module, _, name = text.partition(":")
    else:
        module, _, name = text.rpartition(".")
    if not module or not _MODULE_RE.match(module) or not name.isidentifier():
        raise ArchError(f"architecture {spec!r} is not of the form package.module:Class", ARCH_TAG_HINT)
    return module, name


def module_allowed(module: str, prefixes: Sequence[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes if p)


def resolve_arch(spec: str, prefixes: Sequence[str]) -> type[torch.nn.Module]:
    """The class named by ``spec``, imported only when its module is under an allowed prefix.

    Tags can be set by anyone who can register a model (docs/contract.md), so the string is checked
    first; an ``os:system`` or ``subprocess:Popen`` never reaches ``import_module``.
    """
    module, name = parse_arch(spec)
    if not module_allowed(module, prefixes):
        raise ArchError(
            f"architecture {spec!r} is refused: module {module!r} is not under the allowed prefixes "
            f"({', '.join(prefixes) or 'none'})",
            f"ask the operator to add the package to {ARCH_SETTING} (comma-separated module prefixes), "
            "or declare an architecture from an allowed package",
        )
    try:
        obj = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ArchError(f"architecture {spec!r}: cannot import {module!r}: {exc}",
                        "install the package that defines the architecture in the serving runtime") from None
    except AttributeError:
        raise ArchError(f"architecture {spec!r}: module {module!r} has no attribute {name!r}",
                        "check the class name in ckpt_stage.arch") from None
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise ArchError(f"architecture {spec!r} is not an nn.Module subclass (it is a {type(obj).__name__})",
                        "name a torch.nn.Module class in ckpt_stage.arch")
    return obj


# --------------------------------------------------------------------------------------------------
# state dicts


@dataclass(frozen=True)
class Meta:
    shape: tuple[int, ...]
    dtype: torch.dtype


def metas(state: Mapping[str, Any]) -> dict[str, Meta]:
    return {k: Meta(tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)}


def layers_info(state: Mapping[str, Any], norms: Mapping[str, float] | None = None,
                ) -> tuple[dict[str, dict[str, Any]], int]:
    """``({name: {"shape": [...], "dtype": "float32"}}, element count)`` for drift and the report.

    With ``norms`` (from ``nonfinite``), each floating tensor also gets its parameter fingerprint for
    value drift (``ckpt_stage.drift``): ``norm``, its exact L2 norm, and ``sample``, the float32 values at
    the first positions of a fixed sequence (``sample_positions``) as base64, so two versions' reports
    compare tensor by tensor without either version's files being read again."""
    layers: dict[str, dict[str, Any]] = {}
    count = 0
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    fingerprinted = [k for k in tensors if norms is not None and k in norms]
    per_tensor = min(SAMPLE_MAX, SAMPLE_BUDGET // max(1, len(fingerprinted)))
    for k, v in tensors.items():
        layers[k] = {"shape": [int(d) for d in v.shape], "dtype": dtype_name(v.dtype)}
        count += v.numel()
        if norms is not None and k in norms:
            layers[k]["norm"] = norms[k]
            if per_tensor >= SAMPLE_MIN:
                layers[k]["sample"] = sample_values(v, per_tensor)
    return layers, count


#: Values sampled per tensor for value drift, at most and at least (fewer than this many: none), and per
#: report: 65,536 float32 values are ~350 KB of report.json whatever the number of tensors.
SAMPLE_MAX = 256
SAMPLE_MIN = 16
SAMPLE_BUDGET = 1 << 16
#: A prime: ``j * _STRIDE % n`` visits distinct positions for ``j < n`` (n is never a multiple of it in
#: practice: 2.6 billion elements in one tensor), spread over the whole tensor, and the first ``m`` of the
#: sequence are the same whatever ``m`` is, so two reports with different budgets still compare.
_STRIDE = 2_654_435_761


def sample_positions(n: int, m: int) -> list[int]:
    """The first ``min(m, n)`` positions of the fixed sample sequence of a tensor of ``n`` elements (all of
    them, in another order, when ``n <= m``: drift over a small tensor is then exact)."""
    return [(j * _STRIDE) % n for j in range(min(m, n))] if n > 0 else []


def sample_values(t: torch.Tensor, m: int) -> str:
    """Base64 of little-endian float32 values of ``t`` at ``sample_positions(t.numel(), m)``."""
    import base64

    positions = sample_positions(t.numel(), m)
    if not positions:
        return ""
    with torch.no_grad():
        flat = t.reshape(-1)
        if flat.is_complex():
            flat = flat.abs()
        vals = flat[torch.tensor(positions, dtype=torch.long)].to(torch.float32).contiguous()
    return base64.b64encode(vals.numpy().astype("<f4").tobytes()).decode("ascii")


def _strip(keys: Iterable[str], prefix: str) -> dict[str, str]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): k for k in keys}


def find_prefix_fix(ckpt_keys: Iterable[str], model_keys: Iterable[str]) -> tuple[str, str] | None:
    """``("strip", "module.")`` when removing a wrapper prefix from every checkpoint key makes the key
    sets equal, ``("add", "model.")`` when the architecture expects one the checkpoint lacks."""
    ck, mk = set(ckpt_keys), {k for k in model_keys if not k.endswith(_BENIGN_MISSING)}
    if not ck:
        return None

    def same(a: set[str], b: set[str]) -> bool:
        return {k for k in a if not k.endswith(_BENIGN_MISSING)} == b or a == b

    for prefix in KNOWN_PREFIXES:
        if all(k.startswith(prefix) for k in ck):
            stripped = set(_strip(ck, prefix))
            if same(stripped, mk):
                return ("strip", prefix)
            for inner in KNOWN_PREFIXES:  # e.g. DataParallel around a compiled module
                if all(k.startswith(inner) for k in stripped) and same(set(_strip(stripped, inner)), mk):
                    return ("strip", prefix + inner)
    for prefix in KNOWN_PREFIXES:
        if mk and all(k.startswith(prefix) for k in mk) and same({prefix + k for k in ck}, mk):
            return ("add", prefix)
    return None


def compare_state(ckpt: Mapping[str, Meta], model: Mapping[str, Meta], *, file: str | None,
                  arch: str) -> list[Finding]:
    """Key sets, shapes and dtypes of a checkpoint against the architecture's own state_dict."""
    findings: list[Finding] = []
    fix = find_prefix_fix(ckpt, model)
    if fix is not None:
        action, prefix = fix
        if action == "strip":
            renamed = {k[len(prefix):]: v for k, v in ckpt.items()}
            hint = (f"strip the prefix {prefix!r} from every key before saving "
                    f"(e.g. save model.module.state_dict() or {{k.removeprefix({prefix!r}): v ...}})")
            what = f"every checkpoint key starts with {prefix!r}, which {arch} does not expect"
        else:
            renamed = {prefix + k: v for k, v in ckpt.items()}
            hint = f"add the prefix {prefix!r} to every key, or declare the inner module as ckpt_stage.arch"
            what = f"{arch} expects every key under {prefix!r}, the checkpoint has none"
        sample = listing(sorted(ckpt))
        findings.append(Finding(
            ReasonCode.ARCHITECTURE_MISMATCH, f"{what} (checkpoint keys: {sample})", hint, file,
            detail={"prefix": prefix, "action": action},
        ))
        ckpt = renamed
    missing = sorted(k for k in model if k not in ckpt and not k.endswith(_BENIGN_MISSING))
    unexpected = sorted(k for k in ckpt if k not in model)
    if fix is None and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{count(len(missing), 'missing key')} ({listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({listing(unexpected)})")
        findings.append(Finding(
            ReasonCode.ARCHITECTURE_MISMATCH,
            f"checkpoint does not fit {arch}: " + ", ".join(parts),
            "check that ckpt_stage.arch names the architecture these weights were trained with "
            "(and its ckpt_stage.arch_kwargs)",
            file,
            detail={"missing": missing, "unexpected": unexpected},
        ))
    shapes = [(k, ckpt[k].shape, model[k].shape) for k in sorted(model) if k in ckpt
              and ckpt[k].shape != model[k].shape]
    if shapes:
        first = "; ".join(f"{k}: checkpoint {shape_str(c)} vs model {shape_str(m)}" for k, c, m in shapes[:SHOW])
        more = f"; and {len(shapes) - SHOW} more" if len(shapes) > SHOW else ""
        findings.append(Finding(
            ReasonCode.SHAPE_MISMATCH,
            f"{count(len(shapes), 'tensor')} {'differs' if len(shapes) == 1 else 'differ'} in shape from {arch}: "
            f"{first}{more}",
            "the architecture's constructor arguments differ from training: fix ckpt_stage.arch_kwargs "
            "(e.g. num_classes, hidden sizes) or re-export the weights",
            file,
            detail={"shapes": [{"key": k, "checkpoint": list(c), "model": list(m)} for k, c, m in shapes]},
        ))
    findings += compare_dtypes(
        {k: ckpt[k].dtype for k in model if k in ckpt and ckpt[k].shape == model[k].shape},
        {k: model[k].dtype for k in model}, file=file)
    return findings


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    if dtype == torch.bool:
        return "bool"
    return "int"


def compare_dtypes(ckpt: Mapping[str, torch.dtype], model: Mapping[str, torch.dtype], *,
                   file: str | None) -> list[Finding]:
    """Integer (or bool/complex) weights where the model has floats block; a narrower or wider float
    (float16/bfloat16/float64 vs float32) is a warning: assign=True keeps the checkpoint's dtype."""
    bad: list[tuple[str, Any, Any]] = []
    soft: list[tuple[str, Any, Any]] = []
    for k in sorted(ckpt):
        c, m = ckpt[k], model.get(k)
        if m is None or c == m:
            continue
        (bad if _kind(c) != _kind(m) else soft).append((k, c, m))
    out = []
    for items, sev in ((bad, Severity.ERROR), (soft, Severity.WARNING)):
        if not items:
            continue
        first = "; ".join(f"{k}: checkpoint {dtype_name(c)} vs model {dtype_name(m)}" for k, c, m in items[:SHOW])
        more = f"; and {len(items) - SHOW} more" if len(items) > SHOW else ""
        if sev is Severity.ERROR:
            msg = f"{count(len(items), 'tensor')} with a dtype the architecture cannot take: "
            hint = "save the floating-point weights (not quantized/integer copies) or declare the matching architecture"
        else:
            msg = f"{count(len(items), 'tensor')} in another float precision than the model: "
            hint = "fine if intended (mixed precision); the model will run in the checkpoint's precision"
        out.append(Finding(ReasonCode.DTYPE_MISMATCH, msg + first + more, hint, file, sev,
                           detail={"dtypes": [{"key": k, "checkpoint": dtype_name(c), "model": dtype_name(m)}
                                              for k, c, m in items]}))
    return out


#: Elements checked at a time: isfinite() materialises temporaries (abs() and two masks) as large as its
#: input, so a whole 1 GiB tensor at once would cost ~1.5 GiB of anonymous memory on top of the mmap.
FINITE_CHUNK = 1 << 22


def _pieces(t: torch.Tensor):
    flat = t.reshape(-1)  # a view for contiguous tensors (all torch.save/safetensors state_dicts)
    return flat.split(FINITE_CHUNK)


def _all_finite(t: torch.Tensor) -> bool:
    for piece in _pieces(t):
        try:
            if not bool(torch.isfinite(piece).all()):
                return False
        except (RuntimeError, NotImplementedError):
            # float8 and other exotic dtypes lack isfinite: check a float32 copy of this piece only.
            if not bool(torch.isfinite(piece.to(torch.float32)).all()):
                return False
    return True


def _piece_norm(piece: torch.Tensor) -> float:
    wide = torch.complex128 if piece.is_complex() else torch.float64
    try:
        return float(torch.linalg.vector_norm(piece, dtype=wide))
    except (RuntimeError, NotImplementedError):  # float8: no promotion to float64
        return float(torch.linalg.vector_norm(piece.to(torch.float32), dtype=torch.float64))


def finite_and_norm(t: torch.Tensor) -> tuple[bool, float | None]:
    """``(every value is finite, the L2 norm)`` in one bounded pass over ``t``.

    The sum of squares is taken in float64, where no float32/16 value can overflow: it is finite exactly
    when every value is, so one reduction answers both (and costs less than ``isfinite``, which builds
    masks). Only a float64 tensor with values above ~1e154 overflows with finite values: then ``isfinite``
    decides and the norm is unknown (None)."""
    total = 0.0
    for piece in _pieces(t):
        n = _piece_norm(piece)
        total += n * n
    if math.isfinite(total):
        return True, math.sqrt(total)
    return _all_finite(t), None


def _count(t: torch.Tensor, fn) -> int:
    total = 0
    for piece in _pieces(t):
        try:
            total += int(fn(piece).sum())
        except (RuntimeError, NotImplementedError):
            total += int(fn(piece.to(torch.float32)).sum())
    return total


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal when the dtypes match; for two floating dtypes, the wider copy rounded to the
    narrower one equals it (``model.fp16.safetensors`` beside ``model.safetensors`` is one model)."""
    if a.dtype != b.dtype:
        if not (a.is_floating_point() and b.is_floating_point()):
            return False
        if a.element_size() < b.element_size():
            a, b = b, a
        for pa, pb in zip(_pieces(a), _pieces(b), strict=True):
            if not torch.equal(pa.to(pb.dtype).view(torch.uint8), pb.view(torch.uint8)):
                return False
        return True
    for pa, pb in zip(_pieces(a), _pieces(b), strict=True):
        if not torch.equal(pa.view(torch.uint8), pb.view(torch.uint8)):
            return False
    return True


def differing(used: Mapping[str, Any], copy: Mapping[str, Any]) -> list[str]:
    """Names whose tensor in ``copy`` is not the one in ``used``: another shape, or other values.

    A version that holds the same weights twice (``model.safetensors`` and ``pytorch_model.bin``, a
    ``model.safetensors`` beside the shards of ``model.safetensors.index.json``, a ``model.fp16``
    variant) is validated once, but serving hosts pick one copy by their own rules (``from_pretrained``
    prefers the single file to the index, ``use_safetensors=False`` takes the ``.bin``, ``variant=``
    the variant): every copy must therefore be the weights that were checked."""
    out: list[str] = []
    for name, t in copy.items():
        u = used.get(name)
        if not isinstance(t, torch.Tensor) or not isinstance(u, torch.Tensor):
            if t is not u:
                out.append(name)
            continue
        try:
            same = (t.shape == u.shape and t.layout == u.layout == torch.strided and "meta" not in
                    (t.device.type, u.device.type) and _same_values(u.contiguous(), t.contiguous()))
        except (RuntimeError, TypeError):
            same = False
        if not same:
            out.append(name)
    return out


def nonfinite(state: Mapping[str, Any], *, file: str | None,
              norms: dict[str, float] | None = None) -> Finding | None:
    """NaN/Inf in any floating tensor, checked a bounded piece at a time (no copy of a tensor, let alone
    of the whole dict). ``norms``, when given, receives each finite floating tensor's L2 norm (the same
    pass computes it; ``layers_info`` records it for drift)."""
    bad: list[dict[str, Any]] = []
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.layout != torch.strided:
            continue
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        with torch.no_grad():
            finite, norm = finite_and_norm(t)
            if finite:
                if norms is not None and norm is not None:
                    norms[name] = norm
                continue
            bad.append({"key": name, "nan": _count(t, torch.isnan), "inf": _count(t, torch.isinf),
                        "numel": int(t.numel())})
    if not bad:
        return None

    def one(b: dict[str, Any]) -> str:
        parts = [f"{b[k]} {label}" for k, label in (("nan", "NaN"), ("inf", "Inf")) if b[k]]
        return f"{b['key']} ({', '.join(parts)} of {b['numel']})"

    shown = ", ".join(one(b) for b in bad[:SHOW]) + (", …" if len(bad) > SHOW else "")
    return Finding(
        ReasonCode.NONFINITE_WEIGHTS,
        f"{count(len(bad), 'tensor')} with non-finite values: {shown}",
        "the training run diverged or the weights were damaged: export them from an earlier healthy checkpoint",
        file,
        detail={"tensors": bad},
    )


# --------------------------------------------------------------------------------------------------
# training checkpoints: find the model weights inside

MODEL_KEYS = ("model_state_dict", "state_dict", "model", "model_state", "net", "network", "module",
              "weights", "params", "ema_state_dict", "ema", "model_ema", "state_dict_ema")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim", "opt", "scheduler",
                  "lr_scheduler", "scheduler_state_dict", "scaler", "grad_scaler")


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def is_optimizer_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "param_groups" in obj and "state" in obj


@dataclass
class Weights:
    state: dict[str, torch.Tensor] | None
    """The model weights found, or None."""
    key: str | None = None
    """Where inside a training checkpoint they were (``None``: the object itself)."""
    module: torch.nn.Module | None = None
    other_keys: tuple[str, ...] = ()
    problem: str = ""
    """Why there are no weights (when ``state`` is None)."""
    copies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Other copies of the weights in the same training checkpoint (``{"model": sd, "ema": sd2}``),
    by key: not loaded into the architecture, but finite-checked like the weights used."""


def find_weights(obj: Any, *, depth: int = 2) -> Weights:
    """A state_dict, a whole module, or a training checkpoint dict holding one of them."""
    if isinstance(obj, torch.nn.Module):
        return Weights(dict(obj.state_dict()), module=obj)
    if is_state_dict(obj):
        return Weights(dict(obj))
    if not isinstance(obj, Mapping):
        return Weights(None, problem=f"holds a {type(obj).__name__}, not a state_dict or a module")
    if not obj:
        return Weights(None, problem="holds an empty dict")
    keys = tuple(str(k) for k in obj)
    if is_optimizer_state(obj):
        return Weights(None, other_keys=keys, problem="holds an optimizer state_dict (state, param_groups), "
                                                      "not model weights")
    if depth > 0:
        for key in MODEL_KEYS:
            if key in obj:
                inner = find_weights(obj[key], depth=depth - 1)
                if inner.state is not None:
                    where = key if inner.key is None else f"{key}.{inner.key}"
                    copies = {f"{key}.{k}": v for k, v in inner.copies.items()}
                    for other in MODEL_KEYS:
                        if other != key and other in obj and is_state_dict(obj[other]):
                            copies[other] = dict(obj[other])
                    return Weights(inner.state, where, inner.module, tuple(k for k in keys if k != key), copies=copies)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and not any(k in obj for k in OPTIMIZER_KEYS):
        # A state_dict with a few extra entries (an epoch counter, a config): keep the tensors.
        return Weights(tensors, None, None, tuple(k for k in keys if k not in tensors))
    return Weights(None, other_keys=keys,
                   problem=f"is a training checkpoint without model weights (keys: {listing(sorted(keys), 8)})")


# --------------------------------------------------------------------------------------------------
# MLflow signatures


@dataclass(frozen=True)
class TensorSpec:
    name: str | None
    dtype: str
    shape: tuple[int, ...]


def parse_tensor_specs(text: Any) -> list[TensorSpec] | None:
    """MLflow's ``signature.inputs``/``outputs`` (a JSON string); None when not tensor-based."""
    if not text:
        return None
    try:
        items = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None
    specs: list[TensorSpec] = []
    for item in items if isinstance(items, list) else []:
        spec = item.get("tensor-spec") if isinstance(item, dict) and item.get("type") == "tensor" else None
        if not isinstance(spec, dict):
            return None
        specs.append(TensorSpec(item.get("name"), str(spec.get("dtype", "")),
                                tuple(int(d) for d in spec.get("shape", ()))))
    return specs or None


def shape_ok(expected: Sequence[int], got: Sequence[int]) -> bool:
    return len(expected) == len(got) and all(e == -1 or e == g for e, g in zip(expected, got, strict=True))


def check_output(specs: Sequence[TensorSpec], output: Any) -> str | None:
    """What breaks the output signature, or None. Tensors, tuples/lists of tensors, dicts by name."""
    if isinstance(output, torch.Tensor):
        outs: list[tuple[str, Any]] = [("output", output)]
    elif isinstance(output, (tuple, list)):
        outs = [(f"output[{i}]", o) for i, o in enumerate(output)]
    elif isinstance(output, Mapping):
        outs = [(f"output[{k!r}]", v) for k, v in output.items()]
    else:
        return f"the model returned a {type(output).__name__}, the signature expects tensors"
    if len(outs) != len(specs):
        return f"the model returned {len(outs)} outputs, the signature declares {len(specs)}"
    problems = []
    for (label, t), spec in zip(outs, specs, strict=True):
        if not isinstance(t, torch.Tensor):
            problems.append(f"{label} is a {type(t).__name__}, expected a tensor")
            continue
        got_dtype = dtype_name(t.dtype)
        if not shape_ok(spec.shape, tuple(t.shape)) or (spec.dtype and spec.dtype != got_dtype):
            problems.append(f"{label}: expected {spec.dtype} {shape_str(spec.shape)}, "
                            f"got {got_dtype} {shape_str(t.shape)}")
    return "; ".join(problems) or None


# --------------------------------------------------------------------------------------------------
# versions

_VER_RE = re.compile(r"^\s*v?(\d+)\.(\d+)")


def major_minor(version: str | None) -> tuple[int, int] | None:
    m = _VER_RE.match(version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def public(version: str) -> str:
    """``2.13.0+cpu`` → ``2.13.0``: local labels say how a wheel was built, not what it reads."""
    return version.split("+", 1)[0].strip()


def compare_library(lib: str, recorded: str | None, runtime: str | None, *, file: str | None,
                    newer_blocks: bool, older_warns: bool = True, source: str = "") -> Finding | None:
    """One library's recorded version against the runtime's, at major.minor granularity."""
    rec, run = major_minor(recorded), major_minor(runtime)
    if rec is None or run is None or rec == run:
        return None
    where = f" ({source})" if source else ""
    rec_s, run_s = public(recorded or ""), public(runtime or "")
    if rec > run:
        return Finding(
            ReasonCode.LIBRARY_VERSION_MISMATCH,
            f"saved with {lib} {rec_s}{where}, newer than this runtime's {lib} {run_s}",
            f"re-save the model with {lib} {run[0]}.{run[1]} or older, or upgrade the serving runtime's {lib}",
            file, Severity.ERROR if newer_blocks else Severity.WARNING,
            detail={"library": lib, "recorded": rec_s, "runtime": run_s},
        )
    if not older_warns:
        return None
    return Finding(
        ReasonCode.LIBRARY_VERSION_MISMATCH,
        f"saved with {lib} {rec_s}{where}, older than this runtime's {lib} {run_s}; it loads, "
        "but behaviour may differ",
        f"re-save the model with {lib} {run[0]}.{run[1]} when convenient",
        file, Severity.WARNING,
        detail={"library": lib, "recorded": rec_s, "runtime": run_s},
    )
