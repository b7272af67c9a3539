"""The scanner against torch's own weights_only unpickler: never refuse what torch accepts as weights
(its safe set), and call benign pickles that torch's safe unpickler cannot read UNSUPPORTED_FORMAT,
not UNSAFE_PICKLE. Both tables are static in the scanner; the drift tests compare them with the
installed torch."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch._weights_only_unpickler as wou

from ckpt_stage.config import Settings
from ckpt_stage.policy import decide
from ckpt_stage.scan import allowlist, scan_version
from ckpt_stage.scan.pickles import TORCH_SAFE_OPCODES, scan_stream, torch_safe_problems
from tests.corpus import Built
from tests.corpus.static_cases import LINEAR, LINEAR_KW, P, Reduce, touch
from tests.unit.test_loader import _run

S = Settings()


# -- drift -----------------------------------------------------------------------------------------


def test_static_safe_set_is_torchs_own():
    installed = set(wou._get_allowed_globals())
    assert installed == set(allowlist.TORCH_WEIGHTS_ONLY_GLOBALS), (
        "torch's weights-only safe set changed: update allowlist.TORCH_WEIGHTS_ONLY_GLOBALS",
        sorted(installed ^ set(allowlist.TORCH_WEIGHTS_ONLY_GLOBALS)))


@pytest.mark.parametrize("full", sorted(wou._get_allowed_globals()))
def test_every_torch_safe_global_is_allowed(full):
    module, name = allowlist.split_global(full)
    assert allowlist.check(module, name, S).allowed
    assert allowlist.check(module, name, Settings(allow_pickled_models=False)).allowed


def test_static_opcode_table_is_torchs_own():
    # The opcodes _weights_only_unpickler imports from pickle are exactly those Unpickler.load runs.
    imported = {n for n in dir(wou) if n.isupper() and isinstance(getattr(wou, n), bytes)
                and getattr(pickle, n, None) == getattr(wou, n)}
    assert imported == set(TORCH_SAFE_OPCODES)
    source = Path(wou.__file__).read_text()
    for name in TORCH_SAFE_OPCODES:
        assert f"key[0] == {name}[0]" in source or f"{name}[0]," in source or f"{name}[0]]" in source, name


# -- benign checkpoints torch accepts: scanner and worker both pass them --------------------------


class _AsFloatTensor:
    """Pickles as ``torch.FloatTensor([1.0, 2.0])``: the legacy typed-tensor constructor."""

    def __reduce__(self):
        return (torch.FloatTensor, ([1.0, 2.0],))


def _linear_sd() -> dict:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2).state_dict()


BENIGN = {
    "counter": lambda: {"model_state_dict": _linear_sd(), "counts": collections.Counter(a=2, b=1)},
    "nested_tensor": lambda: {"model_state_dict": _linear_sd(),
                              "ragged": torch.nested.nested_tensor([torch.zeros(2), torch.ones(3)])},
    "meta_tensor": lambda: {"model_state_dict": _linear_sd(), "shape_only": torch.zeros(2, 3, device="meta")},
    "legacy_float_tensor": lambda: {"model_state_dict": _linear_sd(), "legacy": _AsFloatTensor()},
    "protocol_3": lambda: _linear_sd(),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", sorted(BENIGN))
def test_torch_safe_content_passes_scanner_and_worker(kind, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(BENIGN[kind](), path, **({"pickle_protocol": 3} if kind == "protocol_3" else {}))
    torch.load(path, weights_only=True)  # torch itself accepts it
    result = scan_version(tmp_path, ["model.pt"], S)
    assert decide(result.findings, S).verdict.value == "pass", [f.to_dict() for f in result.findings]
    loaded, settings = _run(Built([path], arch=LINEAR, arch_kwargs=dict(LINEAR_KW)))
    decision = decide(loaded.findings, settings)
    assert decision.verdict.value == "pass", [f.to_dict() for f in loaded.findings]


@pytest.mark.parametrize("fn", ["_rebuild_device_tensor_from_numpy", "_rebuild_wrapper_subclass",
                                "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_tensor"])
def test_torch_rebuilders_are_not_refused(fn):
    stream = P.proto(2) + P.glob("torch._utils", fn) + P.EMPTY_TUPLE + P.REDUCE + P.STOP
    rep = scan_stream(stream, 0, S)
    assert rep.unsafe == [] and rep.anomalies == []


# -- benign but unreadable by torch's safe unpickler: UNSUPPORTED_FORMAT -----------------------------


def _save(tmp_path: Path, obj, **kw) -> Path:
    path = tmp_path / "model.pt"
    torch.save(obj, path, **kw)
    return path


UNREADABLE = {
    "protocol_1": (lambda: _linear_sd(), {"pickle_protocol": 1}, "protocol 0 opcodes INT"),
    "protocol_4": (lambda: _linear_sd(), {"pickle_protocol": 4}, "FRAME"),
    "protocol_5": (lambda: _linear_sd(), {"pickle_protocol": 5}, "STACK_GLOBAL"),
    "defaultdict_items": (lambda: {"w": _linear_sd(), "d": collections.defaultdict(list, {"a": [1]})}, {},
                          "collections.defaultdict"),
    "legacy_protocol_4": (lambda: _linear_sd(), {"pickle_protocol": 4, "_use_new_zipfile_serialization": False},
                          "MEMOIZE"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_torch_unreadable_benign_is_unsupported_format(kind, tmp_path):
    make, kw, needle = UNREADABLE[kind]
    path = _save(tmp_path, make(), **kw)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # torch's safe unpickler really cannot read it
    result = scan_version(tmp_path, ["model.pt"], S)
    decision = decide(result.findings, S)
    assert decision.verdict.value == "quarantine"
    assert {c.value for c in decision.codes} == {"UNSUPPORTED_FORMAT"}, [f.to_dict() for f in result.findings]
    (f,) = decision.reasons
    assert needle in f.message and "torch's safe loader" in f.message and "torch.save" in f.hint


@pytest.mark.parametrize("proto", [1, 4, 5])
def test_hostile_content_in_an_unreadable_protocol_stays_unsafe(proto, tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    _save(tmp_path, {"w": _linear_sd(), "x": Reduce(os.system, (touch(canary, "p"),))}, pickle_protocol=proto)
    result = scan_version(tmp_path, ["model.pt"], S)
    codes = {c.value for c in decide(result.findings, S).codes}
    assert "UNSAFE_PICKLE" in codes and "UNSUPPORTED_FORMAT" not in codes
    assert list(canary.iterdir()) == []


def test_unreadable_targets_are_named():
    list_subclass = P.proto(2) + P.glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + P.NONE + P.APPEND + P.STOP
    rep = scan_stream(list_subclass, 0, S)
    assert any("APPEND into" in p and "plain list" in p for p in torch_safe_problems([rep]))
    counter = P.proto(2) + P.glob("collections", "Counter") + P.EMPTY_TUPLE + P.REDUCE + P.bu("a") + b"K\x01" + P.SETITEM + P.STOP
    assert torch_safe_problems([scan_stream(counter, 0, S)]) == []
    odd_pid = P.proto(2) + P.bu("not-a-storage") + b"Q" + P.STOP
    assert any("persistent id" in p for p in torch_safe_problems([scan_stream(odd_pid, 0, S)]))
