"""The pickle allowlist: which ``module.name`` globals a checkpoint's pickle may import.

Importable without torch: the static scanner uses it on bytes, and the worker's loader uses it to
decide which globals to hand to ``torch.serialization.safe_globals`` (import the object only after
``is_allowed`` said yes). docs/architecture.md, "Default pickle allowlist", is the source; extend it only
through settings (``CKPT_STAGE_PICKLE_MODULES``, ``CKPT_STAGE_ALLOW_PICKLED_MODELS``), never by
weakening a check here.

Names are compared after the same Python 2 → 3 renaming the unpickler applies (``__builtin__`` →
``builtins``, ``copy_reg`` → ``copyreg``, ``__builtin__.xrange`` → ``builtins.range``), so the
check sees what would actually be imported.
"""

from __future__ import annotations

import _compat_pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# -- tensors and storages ------------------------------------------------------------------------

#: Rebuild functions torch.save emits for plain, quantized and sparse tensors and parameters.
TENSOR_REBUILDERS = frozenset(
    {
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_sparse_tensor",
        "torch._tensor._rebuild_from_type_v2",
    }
)

#: Legacy typed-storage classes: only type tags for torch's ``persistent_load`` (never called).
#: name → element size in bytes.
STORAGE_ITEMSIZE: dict[str, int] = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
    "QInt8Storage": 1,
    "QUInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
}

#: Legacy typed storage classes (the type tag in a torch.save persistent id) → the dtype they hold.
STORAGE_DTYPE: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

#: torch dtype attribute names → element size in bytes (sub-byte packed types count 1).
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8, "double": 8, "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
    "complex32": 4, "chalf": 4, "complex64": 8, "cfloat": 8, "complex128": 16, "cdouble": 16,
    "uint8": 1, "int8": 1, "int16": 2, "short": 2, "int32": 4, "int": 4, "int64": 8, "long": 8,
    "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "bits8": 1, "bits16": 2,
    **{f"int{n}": 1 for n in range(1, 8)},
    **{f"uint{n}": 1 for n in range(1, 8)},
}

_QSCHEMES = ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
             "per_channel_symmetric", "per_channel_affine_float_qparams")

_LEGACY_TENSOR_TYPES = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short")

#: torch 2.13's own weights-only safe set (``torch._weights_only_unpickler._get_allowed_globals()``),
#: written out so this module stays importable without torch. We never refuse what torch itself
#: accepts as weights (nested, meta and wrapper-subclass tensors, ``collections.Counter``, the legacy
#: ``torch.FloatTensor`` family...). tests/unit/test_scan_torch_safe.py compares this table with the
#: installed torch, so an upgrade that changes the set fails a test instead of drifting silently.
TORCH_WEIGHTS_ONLY_GLOBALS: frozenset[str] = frozenset(
    {
        "_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set",
        "collections.Counter", "collections.OrderedDict",
        "torch.Size", "torch.Tensor", "torch.device", "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout", "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
        "torch._tensor._rebuild_from_type_v2",
        *(f"torch._utils.{f}" for f in (
            "_rebuild_device_tensor_from_cpu_tensor", "_rebuild_device_tensor_from_numpy",
            "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_parameter",
            "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor", "_rebuild_tensor",
            "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_wrapper_subclass")),
        # dtypes by their canonical names (str(torch.float32) == "torch.float32")
        *(f"torch.{d}" for d in (
            "bfloat16", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool", "complex128", "complex32",
            "complex64", "float16", "float32", "float4_e2m1fn_x2", "float64", "float8_e4m3fn", "float8_e4m3fnuz",
            "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "int16", "int32", "int64", "int8", "qint32",
            "qint8", "quint2x4", "quint4x2", "quint8", "uint16", "uint32", "uint64", "uint8")),
        *(f"torch.int{n}" for n in range(1, 8)),
        *(f"torch.uint{n}" for n in range(1, 8)),
        *(f"torch.{q}" for q in _QSCHEMES),
        # legacy tensor and storage classes (torch._tensor_classes, torch._storage_classes)
        *(f"torch.{t}Tensor" for t in _LEGACY_TENSOR_TYPES),
        *(f"torch.cuda.{t}Tensor" for t in _LEGACY_TENSOR_TYPES),
        *(f"torch.sparse.{t}Tensor" for t in _LEGACY_TENSOR_TYPES if t != "Bool"),
        *(f"torch.cuda.sparse.{t}Tensor" for t in _LEGACY_TENSOR_TYPES if t != "Bool"),
        *(f"torch.{t}Storage" for t in (*_LEGACY_TENSOR_TYPES, "ComplexDouble", "ComplexFloat", "QInt32", "QInt8",
                                         "QUInt2x4", "QUInt4x2", "QUInt8")),
        *(f"torch.cuda.{t}Storage" for t in (*_LEGACY_TENSOR_TYPES, "ComplexDouble", "ComplexFloat")),
    }
)

#: Always allowed (state_dicts, tensors, containers, numpy arrays).
DEFAULT_GLOBALS: frozenset[str] = frozenset(
    {
        *TORCH_WEIGHTS_ONLY_GLOBALS,
        *TENSOR_REBUILDERS,
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        *(f"torch.{s}" for s in STORAGE_ITEMSIZE),
        # Old CUDA checkpoints name the storage class under torch.cuda; it is only a type tag.
        *(f"torch.cuda.{s}" for s in STORAGE_ITEMSIZE if not s.startswith("Q")),
        "torch.nn.parameter.Parameter",
        "torch.Tensor",  # the ``new_type`` argument of _rebuild_from_type_v2
        "torch.Size",
        "torch.device",
        *(f"torch.{d}" for d in DTYPE_ITEMSIZE),
        *(f"torch.{q}" for q in _QSCHEMES),
        # Layouts pickle as _get_layout("torch.sparse_coo"); memory formats are not picklable.
        "torch.serialization._get_layout",
        "collections.OrderedDict",
        "collections.Counter",
        "collections.defaultdict",  # its factory is checked separately (DEFAULTDICT_FACTORIES)
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.complex",
        "builtins.bytearray",
        "builtins.range",
        # Protocol-2 pickles spell every bytes object as _codecs.encode(str, "latin1"); torch's own
        # weights_only unpickler allows it for the same reason (numpy array payloads need it).
        "_codecs.encode",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.ndarray",
        "numpy.dtype",
    }
)

#: Not pickle globals, but torch's weights_only unpickler also wants the *type* of a rebuilt numpy
#: dtype in ``safe_globals`` before it BUILDs it. The loader adds these when a checkpoint's
#: allowed globals include numpy ones (``needs_numpy_dtype_classes``).
NUMPY_DTYPE_CLASSES: tuple[str, ...] = tuple(
    f"numpy.dtypes.{n}DType"
    for n in ("Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128", "Int8", "Int16", "Int32",
              "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Bool", "Long", "ULong", "LongLong", "ULongLong")
)

#: Allowed only as the ``default_factory`` argument of ``collections.defaultdict``.
DEFAULTDICT_FACTORIES: frozenset[str] = frozenset(
    {"builtins.list", "builtins.dict", "builtins.set", "builtins.int", "builtins.float",
     "builtins.str", "builtins.tuple", "collections.OrderedDict"}
)

#: Whole pickled modules (MLflow ``serialization_format="pickle"``), when allow_pickled_models.
PICKLED_MODEL_GLOBALS: frozenset[str] = frozenset(
    {
        "copyreg._reconstructor",
        "builtins.object",
        # nn.TransformerEncoderLayer and kin keep the activation *function* as an attribute.
        "torch.nn.functional.relu",
        "torch.nn.functional.gelu",
        "torch.nn.functional.silu",
    }
)

#: ``torch.nn.modules.<submodule>.<Class>``: statically we cannot prove nn.Module subclassing, so
#: the name must look like a public class; the loader re-checks ``issubclass(cls, nn.Module)``.
_NN_MODULE_CLASS = re.compile(r"^torch\.nn\.modules\.[a-z_][a-z0-9_]*\.[A-Z][A-Za-z0-9_]*$")

#: Never allowed, whatever the settings say: running code, importing, reflection, process and
#: file access, other serializers, and torch internals that compile or load code. A prefix in
#: CKPT_STAGE_PICKLE_MODULES cannot reach these (e.g. ``torch`` does not unlock ``torch.jit``).
DENIED_MODULE_PREFIXES: tuple[str, ...] = (
    "__main__", "__builtin__", "os", "posix", "nt", "subprocess", "sys", "importlib", "pkgutil",
    "runpy", "pip", "setuptools", "shutil", "socket", "ssl", "http", "urllib", "ctypes", "cffi",
    "pickle", "_pickle", "pickletools", "marshal", "shelve", "dill", "cloudpickle", "joblib",
    "types", "code", "codeop", "inspect", "functools", "operator", "_operator", "itertools",
    "webbrowser", "multiprocessing", "threading", "_thread", "asyncio", "signal", "pty", "tempfile",
    "io", "_io", "pathlib", "glob", "zipimport", "imp", "ast", "compileall", "py_compile",
    "timeit", "pdb", "bdb", "trace", "profile", "cProfile", "gc", "weakref",
    "torch._inductor", "torch.jit", "torch._jit_internal", "torch._dynamo", "torch.fx",
    "torch.package", "torch.hub", "torch.utils.cpp_extension", "torch.ops", "torch._ops",
    "torch._C", "torch._higher_order_ops", "torch.compiler", "torch.export", "torch._export",
    "torch.multiprocessing", "torch.distributed.rpc", "torch.utils._config_module",
    "torch.testing", "torch.library", "torch._library", "torch.cuda.memory", "torch.backends",
    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.lib", "numpy.ctypeslib",
    "mlflow", "yaml", "jinja2",
)

# ``_under(x, p)`` for every denied prefix at once (C-level; the scanner decides every distinct name).
_DENIED_EXACT = frozenset(DENIED_MODULE_PREFIXES)
_DENIED_DOTTED = tuple(p + "." for p in DENIED_MODULE_PREFIXES)

#: Everything ``builtins`` offers beyond the plain containers above (eval, exec, getattr,
#: __import__, open, compile, breakpoint, ...) is refused.
_SAFE_BUILTINS = frozenset(n for n in DEFAULT_GLOBALS if n.startswith("builtins."))

_IDENT_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def normalize(module: str, name: str) -> tuple[str, str]:
    """What Python 3's unpickler imports for a protocol 0-2 ``module``/``name`` pair."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def valid_module(module: str) -> bool:
    """A dotted ASCII identifier (what a real import of a package module looks like)."""
    return bool(module) and all(_IDENT_PART.match(p) for p in module.split("."))


def valid_name(name: str) -> bool:
    """One ASCII identifier. Dotted names are refused: with protocol 4+ the unpickler walks them
    attribute by attribute (``Linear.forward.__globals__``...), escaping any module allowlist."""
    return bool(_IDENT_PART.match(name))


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def denied(module: str, name: str) -> bool:
    full = f"{module}.{name}"
    if module == "builtins":
        return full not in _SAFE_BUILTINS and full not in DEFAULTDICT_FACTORIES and full != "builtins.object"
    if module == "torch.serialization":
        return name != "_get_layout"
    return (module in _DENIED_EXACT or full in _DENIED_EXACT or module.startswith(_DENIED_DOTTED)
            or full.startswith(_DENIED_DOTTED))


@dataclass(frozen=True)
class Ruling:
    """The allowlist's ruling on one global: may a checkpoint's pickle import it, and why."""

    allowed: bool
    why: str
    """Short reason: ``default``, ``pickled-model``, ``operator-prefix:<p>``, ``denied``,
    ``pickled-models-disabled``, ``not-allowlisted``, ``malformed``."""


class PickleOptions(Protocol):
    """The two settings the allowlist reads: ``Settings`` carries them, and so do the worker's job
    (``LoadJob``) and its ``safe_torch.PicklePolicy``, so the worker never builds a ``Settings``."""

    @property
    def allow_pickled_models(self) -> bool: ...

    @property
    def pickle_modules(self) -> Sequence[str]: ...


def check(module: str, name: str, options: PickleOptions | None = None, *, factory: bool = False) -> Ruling:
    """Decide one global. ``factory=True`` when it is the default_factory of a defaultdict; ``options``
    None: the defaults (pickled models allowed, no operator prefixes)."""
    allow_models = True if options is None else options.allow_pickled_models
    operator_prefixes: tuple[str, ...] = () if options is None else tuple(options.pickle_modules)
    module, name = normalize(module, name)
    if not (valid_module(module) and valid_name(name)):
        return Ruling(False, "malformed")
    full = f"{module}.{name}"
    if factory and full in DEFAULTDICT_FACTORIES:
        return Ruling(True, "default")
    if full in DEFAULT_GLOBALS:
        return Ruling(True, "default")
    if denied(module, name):
        return Ruling(False, "denied")
    model_global = full in PICKLED_MODEL_GLOBALS or bool(_NN_MODULE_CLASS.match(full))
    prefix = next((p for p in operator_prefixes if p and _under(module, p)), None)
    if prefix is not None and name.startswith("_"):
        prefix = None  # private helpers are functions, not the classes the operator meant to allow
    if model_global or prefix is not None:
        if not allow_models:
            return Ruling(False, "pickled-models-disabled")
        return Ruling(True, "pickled-model" if model_global else f"operator-prefix:{prefix}")
    return Ruling(False, "not-allowlisted")


def is_allowed(module: str, name: str, options: PickleOptions | None = None, *, factory: bool = False) -> bool:
    """True when a checkpoint's pickle may import ``module.name`` under ``options`` (a ``Settings``).

    The loader uses this to build torch's ``safe_globals``: take the names from
    ``torch.serialization.get_unsafe_globals_in_checkpoint(path)`` (or ``pickle_globals`` of the
    scanner), keep those ``is_allowed`` accepts, import and pass them. A
    ``defaultdict`` factory (``builtins.list``...) is allowed only with ``factory=True``.
    """
    return check(module, name, options, factory=factory).allowed


def needs_numpy_dtype_classes(globals_: list[str] | set[str]) -> bool:
    """Whether the loader should add ``NUMPY_DTYPE_CLASSES`` (those that exist) to safe_globals."""
    return any(g.startswith(("numpy.core.multiarray.", "numpy._core.multiarray.", "numpy.dtype")) for g in globals_)


def split_global(full: str) -> tuple[str, str]:
    """``"torch.nn.modules.linear.Linear"`` → (``torch.nn.modules.linear``, ``Linear``)."""
    module, _, name = full.rpartition(".")
    return module, name
