"""The pickle allowlist, and how it compares with torch's own weights_only allowlist."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.scan import allowlist
from ckpt_stage.scan.allowlist import DEFAULT_GLOBALS, check, is_allowed, normalize, split_global

DEFAULT = Settings()
OPERATOR = Settings(pickle_modules=("mypkg", "os", "torch"))
NO_MODELS = Settings(allow_pickled_models=False, pickle_modules=("mypkg",))


@pytest.mark.parametrize(
    ("full", "settings", "allowed", "why"),
    [
        ("torch._utils._rebuild_tensor_v2", DEFAULT, True, "default"),
        ("torch._utils._rebuild_parameter", DEFAULT, True, "default"),
        ("torch.FloatStorage", DEFAULT, True, "default"),
        ("torch.storage.UntypedStorage", DEFAULT, True, "default"),
        ("torch.bfloat16", DEFAULT, True, "default"),
        ("torch.float8_e4m3fn", DEFAULT, True, "default"),
        ("torch.serialization._get_layout", DEFAULT, True, "default"),
        ("torch.Size", DEFAULT, True, "default"),
        ("collections.OrderedDict", DEFAULT, True, "default"),
        ("numpy._core.multiarray._reconstruct", DEFAULT, True, "default"),
        ("numpy.core.multiarray.scalar", DEFAULT, True, "default"),
        ("_codecs.encode", DEFAULT, True, "default"),
        ("torch.nn.modules.linear.Linear", DEFAULT, True, "pickled-model"),
        ("torch.nn.modules.container.Sequential", DEFAULT, True, "pickled-model"),
        ("copyreg._reconstructor", DEFAULT, True, "pickled-model"),
        ("builtins.object", DEFAULT, True, "pickled-model"),
        ("torch.nn.modules.linear.Linear", NO_MODELS, False, "pickled-models-disabled"),
        ("mypkg.models.Net", NO_MODELS, False, "pickled-models-disabled"),
        ("mypkg.models.Net", OPERATOR, True, "operator-prefix:mypkg"),
        ("mypkg.Net", OPERATOR, True, "operator-prefix:mypkg"),
        ("mypkg.models._private_helper", OPERATOR, False, "not-allowlisted"),
        ("mypkg_evil.models.Net", OPERATOR, False, "not-allowlisted"),
        # an operator prefix never reaches the hard-denied modules
        ("os.system", OPERATOR, False, "denied"),
        ("torch.jit.load", OPERATOR, False, "denied"),
        ("torch._inductor.codecache.write_atomic", OPERATOR, False, "denied"),
        ("torch.serialization.load", OPERATOR, False, "denied"),
        ("torch.fx.graph_module.reduce_graph_module", OPERATOR, False, "denied"),
        ("posix.system", DEFAULT, False, "denied"),
        ("subprocess.Popen", DEFAULT, False, "denied"),
        ("builtins.eval", DEFAULT, False, "denied"),
        ("builtins.exec", DEFAULT, False, "denied"),
        ("builtins.getattr", DEFAULT, False, "denied"),
        ("builtins.__import__", DEFAULT, False, "denied"),
        ("builtins.list", DEFAULT, False, "not-allowlisted"),
        ("importlib.import_module", DEFAULT, False, "denied"),
        ("pkgutil.resolve_name", DEFAULT, False, "denied"),
        ("runpy.run_path", DEFAULT, False, "denied"),
        ("pip.main", DEFAULT, False, "denied"),
        ("functools.partial", DEFAULT, False, "denied"),
        ("cloudpickle.cloudpickle._make_skeleton_class", DEFAULT, False, "denied"),
        ("__main__.MyNet", DEFAULT, False, "denied"),
        ("torch.nn.modules.module.register_module_forward_hook", DEFAULT, False, "not-allowlisted"),
        ("torchvision.models.resnet.ResNet", DEFAULT, False, "not-allowlisted"),
        ("numpy.load", DEFAULT, False, "not-allowlisted"),
    ],
)
def test_check(full, settings, allowed, why):
    module, name = split_global(full)
    decision = check(module, name, settings)
    assert (decision.allowed, decision.why) == (allowed, why)
    assert is_allowed(module, name, settings) is allowed


@pytest.mark.parametrize(
    ("module", "name", "expected"),
    [
        ("__builtin__", "set", ("builtins", "set")),
        ("__builtin__", "xrange", ("builtins", "range")),
        ("copy_reg", "_reconstructor", ("copyreg", "_reconstructor")),
        ("commands", "Popen", ("subprocess", "Popen")),
        ("torch", "FloatStorage", ("torch", "FloatStorage")),
    ],
)
def test_normalize_applies_python2_renames(module, name, expected):
    assert normalize(module, name) == expected


@pytest.mark.parametrize(
    ("module", "name"),
    [("torch.nn.modules.module", "torch.load"), ("os ", "system"), ("", "x"), ("torch", "Linear.forward"),
     ("t\u00f6rch", "x"), ("torch..nn", "Linear")],
)
def test_malformed_names_are_refused(module, name):
    assert check(module, name).why == "malformed"


def test_defaultdict_factories_only_as_factories():
    assert not is_allowed("builtins", "list")
    assert is_allowed("builtins", "list", factory=True)
    assert is_allowed("__builtin__", "list", factory=True)
    assert not is_allowed("builtins", "eval", factory=True)


def test_importable_without_torch():
    code = "import sys, ckpt_stage.scan.allowlist, ckpt_stage.scan; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# -- torch comparison ------------------------------------------------------------------------------

#: In torch's weights_only allowlist but not in ours, and why.
TORCH_ONLY = {
    "collections.Counter",  # not in docs/architecture.md's list; no checkpoint writer needs it
    "torch._utils._rebuild_tensor",  # pre-1.0 rebuild, never written by a supported torch
    "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_wrapper_subclass",  # takes an arbitrary tensor subclass
}
TORCH_ONLY_PREFIXES = ("torch.cuda.sparse.", "torch.sparse.")
TORCH_ONLY_SUFFIX = "Tensor"  # legacy torch.FloatTensor & co. type objects


def _torch_allowed() -> set[str]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return set(_get_allowed_globals())


def test_torch_allowlist_is_covered_or_documented():
    theirs = _torch_allowed()
    missing = {
        n for n in theirs - DEFAULT_GLOBALS
        if n not in TORCH_ONLY and not n.startswith(TORCH_ONLY_PREFIXES) and not n.endswith(TORCH_ONLY_SUFFIX)
    }
    assert missing == set(), f"torch allows these by default; add them or document why not: {sorted(missing)}"


def test_our_extras_are_what_the_loader_must_add_as_safe_globals():
    extras = DEFAULT_GLOBALS - _torch_allowed()
    expected = {
        "collections.defaultdict", "builtins.frozenset", "builtins.slice", "builtins.range",
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.ndarray", "numpy.dtype",
    }
    # dtype aliases (torch.float, torch.long ...) are the same objects under another name.
    aliases = {n for n in extras if n.startswith("torch.") and n.split(".", 1)[1] in allowlist.DTYPE_ITEMSIZE}
    assert extras - aliases == expected


def test_torch_registered_safe_globals_are_not_silently_trusted():
    import torch

    for obj in torch.serialization.get_safe_globals():
        target = obj[0] if isinstance(obj, tuple) else obj
        full = f"{target.__module__}.{target.__qualname__}"
        assert not is_allowed(*split_global(full)), full


def _save(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_unsafe_globals_in_checkpoint_agree(tmp_path):
    """torch.serialization.get_unsafe_globals_in_checkpoint lists what torch would refuse; what we
    allow of it is exactly what the loader must pass to safe_globals, and the rest we refuse too."""
    import torch

    from ckpt_stage.scan.pickles import pickle_globals
    from tests.corpus.static_cases import Reduce

    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())
    cases = {
        "module": model,
        "evil": {"w": torch.zeros(2), "x": Reduce(os.system, ("true",))},
        "defaultdict": {"d": __import__("collections").defaultdict(list)},
    }
    for label, obj in cases.items():
        path = tmp_path / f"{label}.pt"
        path.write_bytes(_save(obj))
        theirs = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        with zipfile.ZipFile(path) as zf:
            pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        ours = {f"{m}.{n}" for m, n in pickle_globals(pkl)}
        assert theirs <= ours, label
        refused = {n for n in theirs if not is_allowed(*split_global(n), factory=n == "builtins.list")}
        if label == "evil":
            assert refused == {"posix.system"}
        else:
            assert refused == set(), (label, refused)


def load_like_the_worker(path: str):
    """The recipe the worker's loader follows: torch names what it would refuse, the allowlist
    decides, only then are the objects imported and handed to ``safe_globals``."""
    import importlib

    import torch

    objects = []
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    for full in names:
        module, name = split_global(full)
        # the scanner already checked that factories only appear as defaultdict factories
        assert is_allowed(module, name) or is_allowed(module, name, factory=True), full
        objects.append(getattr(importlib.import_module(module), name))
    if allowlist.needs_numpy_dtype_classes(names):
        import numpy.dtypes

        objects += [getattr(numpy.dtypes, n.rsplit(".", 1)[1]) for n in allowlist.NUMPY_DTYPE_CLASSES
                    if hasattr(numpy.dtypes, n.rsplit(".", 1)[1])]
    with torch.serialization.safe_globals(objects):
        return torch.load(path, weights_only=True)


def test_allowlisted_checkpoints_load_with_weights_only(tmp_path):
    import collections

    import numpy as np
    import torch

    torch.manual_seed(0)
    objs = {
        "zoo": torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 2)),
        "lstm": torch.nn.LSTM(4, 3),
        "encoder": torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16), 1),
        "containers": {"s": {1}, "f": frozenset([2]), "sl": slice(1, 2), "r": range(3),
                       # torch 2.13's weights_only unpickler refuses SETITEM on a defaultdict, so only
                       # an empty one loads; the scanner allows both (docs/architecture.md), the load decides.
                       "d": collections.defaultdict(list)},
        "numpy": {"a": np.arange(3.0), "s": np.float32(1.5)},
    }
    for label, obj in objs.items():
        path = tmp_path / f"{label}.pt"
        torch.save(obj, path)
        loaded = load_like_the_worker(str(path))
        assert type(loaded) is type(obj), label
