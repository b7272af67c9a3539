"""Loading torch files with ``weights_only`` semantics and nothing else, inside the worker.

``weights_only=True`` is necessary, not sufficient (CVE-2025-32434 bypassed it before torch 2.6,
CVE-2026-24747 corrupted memory through it before 2.10): the static scan runs first, the worker is
isolated, and this module makes sure the worker itself never weakens the safe load:

* ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` silently turns ``weights_only`` off for calls that do not pass
  it; it is popped from the environment at import, and every call here passes ``weights_only=True``.
* ``forced_weights_only()`` guards third-party loaders that we cannot pass arguments to. In torch
  2.13, ``torch.export.load`` unpickles the archive's sample inputs and legacy weights through
  ``torch._export.serde.serialize.deserialize_torch_artifact``, which catches a failed
  ``weights_only=True`` load and retries with ``weights_only=False`` (so a ``__reduce__`` payload in
  ``data/sample_inputs/model.pt`` runs); ``_package._load_state_dict`` / ``_load_constants`` call
  ``torch.load(weights_only=False)`` for ``use_pickle`` payloads and ``pickle.loads`` for opaque
  objects. MLflow 3.17 documents the same hole (``mlflow.pytorch._validate_pt2_archive_is_pickle_free``).
  The guard makes every ``torch.load`` a ``weights_only=True`` load and refuses ``pickle.loads`` in the
  pt2 package module for the duration of the call.
* A failed safe load is never retried unsafely; it may be retried safely with one more allowlisted
  global, which is what ``load_allowlisted`` does for whole pickled modules.

Which globals a load may add is decided by ``ckpt_stage.scan.allowlist`` (docs/architecture.md's default list,
shared with the static scan); this module imports an allowed name and re-checks the object.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# Popped before torch is imported: torch reads it at every torch.load call (serialization.py).
os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)

import torch  # noqa: E402  (after the environment is cleaned)

_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")
_BUILD_RE = re.compile(r"but got <class '([\w.]+)'>")
# numpy scalars pickle as numpy.dtype(...) whose *instance* is a numpy.dtypes.<X>DType: never a
# GLOBAL, but torch's BUILD wants its class allowlisted too (torch.load docs, "numpy" example).
_NUMPY_DTYPE_CLASS = re.compile(r"^numpy\.dtypes\.[A-Za-z0-9]+DType$")


class RefusedUnsafeLoad(pickle.UnpicklingError):
    """A loader asked for an unsafe unpickle (``weights_only=False`` or ``pickle.loads``)."""

    def __init__(self, message: str, globals_: Sequence[str] = ()):
        super().__init__(message)
        self.globals = tuple(globals_)


class RefusedGlobals(pickle.UnpicklingError):
    """The pickle names globals outside the allowlist; ``refused`` holds (name, why) pairs."""

    def __init__(self, refused: Sequence[tuple[str, str]]):
        self.refused = tuple(refused)
        names = ", ".join(f"{n} ({why})" for n, why in self.refused[:5])
        more = f" and {len(self.refused) - 5} more" if len(self.refused) > 5 else ""
        super().__init__(f"imports {names}{more}")


def strip_force_env() -> None:
    """Drop environment switches that weaken ``torch.load`` (call again before each load)."""
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)


def unsafe_global_in(message: str) -> str | None:
    """The ``module.name`` torch's weights_only unpickler refused, parsed from its message."""
    m = _GLOBAL_RE.search(message)
    return m.group(1).rstrip(".") if m else None


def unbuildable_class_in(message: str) -> str | None:
    """The class torch's weights_only unpickler would not BUILD ("Can only build … but got <class X>")."""
    m = _BUILD_RE.search(message)
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------------
# allowlist: names are decided by ckpt_stage.scan.allowlist (the scanner's list, so the static scan
# and the load agree); only then is anything imported, and the object is re-checked here.


def _resolve(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class PicklePolicy:
    """What a safe load may add to torch's default weights_only globals."""

    allow_pickled_models: bool = False
    """Whole ``nn.Module`` pickles (MLflow ``pickle`` format): torch.nn.modules classes and more."""
    pickle_modules: tuple[str, ...] = ()
    """Operator-allowed module prefixes for classes (``CKPT_STAGE_PICKLE_MODULES``)."""

    def check(self, full: str, *, factory: bool = False) -> tuple[Any | None, str]:
        """``(object, "")`` when ``full`` may be unpickled, else ``(None, why)``. The name is decided
        first; only then is its module imported and the object checked for what the name claims."""
        from ckpt_stage.scan import allowlist

        if _NUMPY_DTYPE_CLASS.match(full):
            import numpy as np

            obj = getattr(np.dtypes, full.rsplit(".", 1)[1], None)
            ok = isinstance(obj, type) and issubclass(obj, np.dtype)
            return (obj, "") if ok else (None, "not a numpy dtype class")

        module, name = allowlist.split_global(full)
        decision = allowlist.check(module, name, self, factory=factory)
        if not decision.allowed:
            why = {"denied": "denied", "pickled-models-disabled": "pickled models are disabled",
                   "not-allowlisted": "outside the allowlist", "malformed": "malformed name"}.get(
                       decision.why, decision.why)
            if module == "__main__" or module.startswith("cloudpickle"):
                why = "code defined in __main__ or pickled by value by cloudpickle"
            return None, why
        module, name = allowlist.normalize(module, name)
        try:
            obj = _resolve(module, name)
        except (ImportError, AttributeError) as exc:
            return None, f"cannot be resolved: {exc}"
        if decision.why == "default" or full in allowlist.PICKLED_MODEL_GLOBALS:
            return obj, ""
        if not isinstance(obj, type):
            return None, "not a class"
        # A module may re-export something from elsewhere (``from subprocess import Popen``): only
        # classes really defined under the allowed name count.
        if getattr(obj, "__module__", "") != module or obj.__qualname__ != name:
            return None, f"is really {obj.__module__}.{obj.__qualname__}"
        if module.startswith("torch.nn.modules.") and not issubclass(obj, torch.nn.Module):
            return None, "not an nn.Module subclass"
        return obj, ""


def _allow(policy: PicklePolicy, names: Sequence[str], context: Sequence[str] = ()) -> list[tuple[Any, str]]:
    allowed, refused = [], []
    every = set(names) | set(context)
    for full in sorted(set(names)):
        # A defaultdict's factory (builtins.list…) is allowed only next to the defaultdict.
        obj, why = policy.check(full, factory="collections.defaultdict" in every)
        if obj is None:
            refused.append((full, why))
        else:
            allowed.append((obj, full))
    if refused:
        raise RefusedGlobals(refused)
    return allowed


def _torch_load(path: str, *, mmap: bool, extra: Sequence[tuple[Any, str]]) -> Any:
    strip_force_env()
    with torch.serialization.safe_globals(list(extra)):
        return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")


def _globals_by_scanner(path: str) -> list[str]:
    import zipfile

    from ckpt_stage.scan.pickles import pickle_globals

    with zipfile.ZipFile(path) as z:
        member = next((n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
        if member is None:
            raise pickle.UnpicklingError("no data.pkl in the checkpoint")
        buf = z.read(member)
    return [f"{m}.{n}" for m, n in pickle_globals(buf)]


def load_allowlisted(path: str, *, zip_format: bool, policy: PicklePolicy, max_rounds: int = 64) -> Any:
    """``torch.load(weights_only=True)`` plus the policy's extra globals.

    Zip checkpoints are listed statically first (``get_unsafe_globals_in_checkpoint``); legacy ones
    cannot be, so each refused global is checked against the policy and the *safe* load repeated
    with it added. Raises ``RefusedGlobals`` for anything outside the policy.
    """
    extra: list[tuple[Any, str]] = []
    if zip_format:
        strip_force_env()
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except pickle.UnpicklingError:
            # torch's static lister knows fewer opcodes than pickle (cloudpickle's POP, for one):
            # ask the scanner's disassembler instead, so the refusal still names the globals.
            names = _globals_by_scanner(path)
        extra = _allow(policy, names)
    seen = {full for _, full in extra}
    for _ in range(max_rounds):
        try:
            return _torch_load(path, mmap=zip_format, extra=extra)
        except pickle.UnpicklingError as exc:
            full = unsafe_global_in(str(exc)) or unbuildable_class_in(str(exc))
            if not full or full in seen:
                raise
            seen.add(full)
            extra += _allow(policy, [full], context=sorted(seen))
    raise pickle.UnpicklingError(f"more than {max_rounds} distinct globals")


# --------------------------------------------------------------------------------------------------
# guard for loaders we cannot pass weights_only to


class _RefusingPickle:
    """Stands in for the ``pickle`` module inside torch's pt2 package loader."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def loads(*_a: Any, **_k: Any) -> Any:
        raise RefusedUnsafeLoad("the archive holds an opaque pickled object (pickle.loads), which is code")

    load = loads


@contextlib.contextmanager
def forced_weights_only() -> Iterator[list[str]]:
    """Every ``torch.load`` inside becomes ``weights_only=True`` (mmap off, CPU), and a request for an
    unsafe load raises ``RefusedUnsafeLoad`` carrying torch's own refusal message.

    Yields the list of refusals seen (a caller may swallow our exception; the list still tells).
    """
    refusals: list[str] = []
    real_load: Callable[..., Any] = torch.load

    def guarded_load(f: Any, map_location: Any = None, pickle_module: Any = None, *,
                     weights_only: bool | None = None, **kwargs: Any) -> Any:
        strip_force_env()
        if hasattr(f, "seek"):
            f.seek(0)
        try:
            return real_load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if weights_only is False:
                # deserialize_torch_artifact's fallback: refuse instead of retrying unsafely.
                msg = " ".join(str(exc).split())
                full = unsafe_global_in(msg)
                what = f"imports {full}" if full else f"is refused by weights_only ({msg[:200]})"
                text = (f"holds a pickled payload that {what}; torch would retry it with weights_only=False "
                        "(arbitrary code), the stage refuses")
                refusals.append(text)
                raise RefusedUnsafeLoad(text, [full] if full else []) from None
            raise

    saved_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    package: Any = None
    with contextlib.suppress(ImportError):
        from torch.export.pt2_archive import _package as package
    saved_pickle = getattr(package, "pickle", None)
    torch.load = guarded_load  # type: ignore[assignment]
    # Belt and braces: torch itself forces weights_only=True, even over an explicit False, when
    # this is set (serialization.py); it must not coexist with the NO_ variant, popped above.
    strip_force_env()
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    if package is not None and saved_pickle is not None:
        package.pickle = _RefusingPickle()  # type: ignore[attr-defined]
    try:
        yield refusals
    finally:
        torch.load = real_load  # type: ignore[assignment]
        if package is not None and saved_pickle is not None:
            package.pickle = saved_pickle  # type: ignore[attr-defined]
        if saved_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved_env
