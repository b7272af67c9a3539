"""The child-side loader, called in-process on real generated checkpoints (tests/corpus/load_cases.py),
plus the pure checks it is made of and ``drift.compare``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from ckpt_stage import drift
from ckpt_stage.config import Settings
from ckpt_stage.domain import Finding, ReasonCode as R, Severity, Verdict
from ckpt_stage.policy import NO_INPUT_EXAMPLE, decide
from ckpt_stage.load import checks
from ckpt_stage.sandbox.job import LoadJob, LoadResult
from ckpt_stage.load.loader import load_and_check
from tests.corpus import Built
from tests.corpus.load_cases import CASES, LINEAR, LINEAR_KW

# -- running a corpus case in-process ---------------------------------------------------------------


def _job(built: Built, settings: Settings, **extra) -> LoadJob:
    paths = [Path(p) for p in built.paths]
    if len(paths) == 1 and paths[0].is_dir():
        root = paths[0]
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    else:
        root = Path(os.path.commonpath([str(p.parent) for p in paths]))
        files = sorted(str(p.relative_to(root)) for p in paths)
    return LoadJob(root=str(root), files=tuple((f, "unknown") for f in files), arch=built.arch,
                   arch_kwargs=dict(built.arch_kwargs or {}), arch_modules=settings.arch_modules,
                   pickle_modules=settings.pickle_modules, allow_pickled_models=settings.allow_pickled_models,
                   **extra)


def _run(built: Built, **extra) -> tuple[LoadResult, Settings]:
    settings = Settings.from_env(built.env)
    added = [p for p in built.env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = added
    before = set(sys.modules)
    try:
        return load_and_check(_job(built, settings, **extra)), settings
    finally:
        for p in added:
            sys.path.remove(p)
        for name in set(sys.modules) - before:  # an allowed architecture package from the work dir
            if any(str(getattr(sys.modules[name], "__file__", "") or "").startswith(p) for p in added):
                del sys.modules[name]


@pytest.fixture
def dirs(tmp_path):
    work, canary = tmp_path / "work", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    return work, canary


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_load_case(case, dirs):
    work, canary = dirs
    built = case.build(work, canary)
    result, settings = _run(built)
    decision = decide(result.findings, settings)
    shown = [f.to_dict() for f in result.findings]
    assert decision.verdict.value == case.verdict, shown
    codes = {c.value for c in decision.codes}
    if case.verdict == "pass":
        assert not codes, shown
    assert set(case.codes) <= codes, shown
    if case.message_contains:
        first = next(f for f in decision.reasons if f.code and f.code.value in case.codes)
        text = first.message + " " + first.hint
        for needle in case.message_contains:
            assert needle in text, (needle, first.to_dict())
    assert not any(f.code is R.INTERNAL_ERROR for f in result.findings), shown
    assert list(canary.iterdir()) == [], "a payload or a refused architecture ran"
    assert set(result.timings_s) >= {"load", "inference"}
    assert result.runtime["torch"] == torch.__version__


def test_arch_refused_by_name_is_never_imported(dirs):
    work, canary = dirs
    case = next(c for c in CASES if c.name == "load-arch-canary-package")
    built = case.build(work, canary)
    result, _ = _run(built)
    assert "ckpt_corpus_canary_arch" not in sys.modules
    assert list(canary.iterdir()) == []
    (f,) = [f for f in result.findings if f.code is R.PARTIAL_CHECKPOINT]
    assert "CKPT_STAGE_ARCH_MODULES" in f.hint


def test_state_dict_pass_reports_layers_and_no_example_warning(dirs):
    work, canary = dirs
    path = work / "m.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    result, settings = _run(Built([path], arch=LINEAR, arch_kwargs=LINEAR_KW))
    assert result.info["param_count"] == 10
    layers = result.info["layers"]
    assert {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in layers.items()} == \
        {"weight": {"shape": [2, 4], "dtype": "float32"}, "bias": {"shape": [2], "dtype": "float32"}}
    # and each tensor's fingerprint for drift: its L2 norm and (8 and 2 elements) every value
    assert layers["weight"]["norm"] > 0 and len(layers["weight"]["sample"]) == len("A" * 44)
    warn = [f for f in result.findings if f.detail.get("kind") == NO_INPUT_EXAMPLE]
    assert warn and warn[0].severity is Severity.WARNING
    assert decide(result.findings, settings).verdict is Verdict.PASS
    strict = decide(result.findings, settings.replace(require_input_example=True))
    assert strict.codes == (R.SMOKE_INFERENCE_FAILED,)


def test_training_checkpoint_says_which_key(dirs):
    work, canary = dirs
    case = next(c for c in CASES if c.name == "load-training-checkpoint-with-model")
    result, _ = _run(case.build(work, canary))
    info = [f for f in result.findings if f.severity is Severity.INFO and "model_state_dict" in f.message]
    assert info, [f.to_dict() for f in result.findings]
    assert result.info["weights_key"] == "model_state_dict"


def test_force_no_weights_only_env_is_ignored(dirs, monkeypatch):
    work, canary = dirs
    target = canary / "env-payload"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    path = work / "model.pt"
    torch.save({"weight": torch.ones(2, 4), "x": Payload()}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    result, _ = _run(Built([path], arch=LINEAR, arch_kwargs=LINEAR_KW))
    assert not target.exists()
    (f,) = [f for f in result.findings if f.code is R.UNSAFE_PICKLE]
    assert "posix.system" in f.message or "os.system" in f.message


@pytest.mark.parametrize("kind", ["zip", "safetensors"])
def test_truncated_file_is_corrupt_archive(dirs, kind):
    work, _ = dirs
    if kind == "zip":
        path = work / "model.pt"
        torch.save(torch.nn.Linear(64, 64).state_dict(), path)
    else:
        from safetensors.torch import save_file

        path = work / "model.safetensors"
        save_file(torch.nn.Linear(64, 64).state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result, _ = _run(Built([path], arch=LINEAR, arch_kwargs={"in_features": 64, "out_features": 64}))
    codes = [f.code for f in result.findings if f.blocking]
    assert codes == [R.CORRUPT_ARCHIVE], [f.to_dict() for f in result.findings]


def test_no_checkpoint_at_all(dirs):
    work, _ = dirs
    (work / "README.md").write_text("hello")
    result, _ = _run(Built([work / "README.md"]))
    assert [f.code for f in result.findings] == [R.NOT_A_CHECKPOINT]


def test_unexpected_exception_becomes_internal_error(dirs, monkeypatch):
    work, _ = dirs
    path = work / "m.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)

    def boom(*a, **k):
        raise KeyError("oops")
    monkeypatch.setattr(checks, "nonfinite", boom)
    result, _ = _run(Built([path], arch=LINEAR, arch_kwargs=LINEAR_KW))
    (f,) = [f for f in result.findings if f.code is R.INTERNAL_ERROR]
    assert "KeyError: 'oops'" in f.message
    assert result.runtime["torch"] == torch.__version__


@pytest.mark.parametrize("builder", ["build_pt2_sample_inputs_payload", "build_pt2_pickled_weight",
                                     "build_pt2_opaque_object"])
def test_pt2_guard_alone_stops_payloads(dirs, builder):
    """Stock torch.export.load (torch 2.13) runs each of these payloads; the guard alone, without the
    archive inspection in front of it, refuses them and restores torch afterwards."""
    from ckpt_stage.load import pt2, safe_torch
    from tests.corpus import load_cases

    work, canary = dirs
    built = getattr(load_cases, builder)(work, canary)
    real_load = torch.load
    with pytest.raises(safe_torch.RefusedUnsafeLoad):
        pt2.load(str(Path(built.paths[0]) / "data" / "model.pt2"))
    assert list(canary.iterdir()) == []
    assert torch.load is real_load
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_read_example_dataframe_and_named_inputs(tmp_path):
    import json

    from ckpt_stage.load import mlflow_model

    (tmp_path / "ex.json").write_text(json.dumps({"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}))
    m = mlflow_model.MlflowModel(root=str(tmp_path), rel="", mlmodel={}, pytorch={},
                                 example_info={"type": "dataframe", "artifact_path": "ex.json"})
    (t,), used = mlflow_model.read_example(m)
    assert used == "ex.json" and t.dtype == torch.float32 and tuple(t.shape) == (2, 2)

    (tmp_path / "named.json").write_text(json.dumps({"ids": [[1, 2]], "mask": [[1.0, 0.0]]}))
    m.example_info = {"type": "ndarray", "artifact_path": "named.json"}
    m.inputs = checks.parse_tensor_specs(json.dumps([
        {"type": "tensor", "name": "ids", "tensor-spec": {"dtype": "int64", "shape": [-1, 2]}},
        {"type": "tensor", "name": "mask", "tensor-spec": {"dtype": "float32", "shape": [-1, 2]}}]))
    ids, mask = mlflow_model.read_example(m)[0]
    assert ids.dtype == torch.int64 and mask.dtype == torch.float32

    m.example_info = {"type": "ndarray", "artifact_path": "../../etc/passwd"}
    with pytest.raises(mlflow_model.ModelDirError):
        mlflow_model.read_example(m)


# -- pure checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["os:system", "subprocess:Popen", "collections:OrderedDict", "torch.nnx.Linear",
                                  "ckpt_never_imported_pkg.sub:Net", "torch:load", "builtins.eval"])
def test_arch_prefix_refusal_before_import(spec):
    module = checks.parse_arch(spec)[0]
    before = module in sys.modules
    with pytest.raises(checks.ArchError) as err:
        checks.resolve_arch(spec, ("torch.nn",))
    assert "not under the allowed prefixes" in err.value.message
    assert checks.ARCH_SETTING in err.value.hint
    assert (module in sys.modules) == before


@pytest.mark.parametrize(("spec", "expected"), [
    ("torch.nn:Linear", ("torch.nn", "Linear")),
    ("torch.nn.Linear", ("torch.nn", "Linear")),
    ("torch.nn.modules.conv:Conv2d", ("torch.nn.modules.conv", "Conv2d")),
])
def test_parse_arch(spec, expected):
    assert checks.parse_arch(spec) == expected


@pytest.mark.parametrize("spec", ["Linear", "torch.nn:", ":Linear", "torch..nn:Linear", "torch.nn:Lin ear",
                                  "../x:Y"])
def test_parse_arch_rejects_malformed(spec):
    with pytest.raises(checks.ArchError):
        checks.parse_arch(spec)


def test_resolve_arch_requires_module_subclass():
    assert checks.resolve_arch("torch.nn:Linear", ("torch.nn",)) is torch.nn.Linear
    with pytest.raises(checks.ArchError, match="not an nn.Module subclass"):
        checks.resolve_arch("torch.nn.functional:relu", ("torch.nn",))
    with pytest.raises(checks.ArchError, match="has no attribute"):
        checks.resolve_arch("torch.nn:NoSuchLayer", ("torch.nn",))


MODEL = ["fc.weight", "fc.bias", "bn.running_mean", "bn.num_batches_tracked"]


@pytest.mark.parametrize(("ckpt", "fix"), [
    (["module." + k for k in MODEL], ("strip", "module.")),
    (["_orig_mod." + k for k in MODEL], ("strip", "_orig_mod.")),
    (["module._orig_mod." + k for k in MODEL], ("strip", "module._orig_mod.")),
    (["model." + k for k in MODEL[:3]], ("strip", "model.")),  # num_batches_tracked may be absent
    ([k.removeprefix("model.") for k in ["fc.weight"]], None),
    (MODEL, None),
    (["module.fc.weight", "head.weight"], None),
])
def test_find_prefix_fix(ckpt, fix):
    assert checks.find_prefix_fix(ckpt, MODEL) == fix


def test_find_prefix_fix_add():
    assert checks.find_prefix_fix(["fc.weight"], ["model.fc.weight"]) == ("add", "model.")


def _metas(**shapes):
    return {k: checks.Meta(tuple(v[0]), v[1]) for k, v in shapes.items()}


def test_compare_state_names_counts_and_first_keys():
    model = {f"l{i}.weight": checks.Meta((2, 2), torch.float32) for i in range(8)}
    ckpt = {"l0.weight": checks.Meta((2, 2), torch.float32), "extra.weight": checks.Meta((1,), torch.float32)}
    (f,) = checks.compare_state(ckpt, model, file="m.pt", arch="Net")
    assert f.code is R.ARCHITECTURE_MISMATCH
    assert "7 missing keys (l1.weight, l2.weight, l3.weight, l4.weight, l5.weight, …)" in f.message
    assert "1 unexpected (extra.weight)" in f.message
    assert f.detail["missing"] == [f"l{i}.weight" for i in range(1, 8)]


def test_compare_state_prefix_hint_and_shape_after_strip():
    model = {"w": checks.Meta((2, 3), torch.float32)}
    ckpt = {"module.w": checks.Meta((3, 3), torch.float32)}
    findings = checks.compare_state(ckpt, model, file=None, arch="Net")
    assert [f.code for f in findings] == [R.ARCHITECTURE_MISMATCH, R.SHAPE_MISMATCH]
    assert "'module.'" in findings[0].hint
    assert "w: checkpoint [3, 3] vs model [2, 3]" in findings[1].message


@pytest.mark.parametrize(("ck", "mo", "severity"), [
    (torch.int64, torch.float32, Severity.ERROR),
    (torch.bool, torch.float32, Severity.ERROR),
    (torch.float16, torch.float32, Severity.WARNING),
    (torch.bfloat16, torch.float32, Severity.WARNING),
    (torch.float32, torch.int64, Severity.ERROR),
])
def test_compare_dtypes(ck, mo, severity):
    (f,) = checks.compare_dtypes({"w": ck}, {"w": mo}, file=None)
    assert f.code is R.DTYPE_MISMATCH and f.severity is severity


def test_nonfinite_names_tensors_and_counts():
    sd = {"a": torch.zeros(3), "b": torch.tensor([float("nan"), 1.0, float("inf"), float("-inf")]),
          "i": torch.arange(3)}
    f = checks.nonfinite(sd, file="x")
    assert f is not None and f.code is R.NONFINITE_WEIGHTS
    assert "b (1 NaN, 2 Inf of 4)" in f.message
    assert checks.nonfinite({"a": torch.ones(2)}, file=None) is None
    # float8 has no isfinite kernel in torch 2.13: checked through a float32 copy of that tensor
    f8 = torch.tensor([1.0, float("nan")]).to(torch.float8_e5m2)
    assert "f8 (1 NaN of 2)" in checks.nonfinite({"f8": f8}, file=None).message


@pytest.mark.parametrize(("obj", "key", "has"), [
    ({"epoch": 1, "model_state_dict": {"w": torch.ones(1)}, "optimizer_state_dict": {}}, "model_state_dict", True),
    ({"state_dict": {"w": torch.ones(1)}, "hparams": {}}, "state_dict", True),
    ({"model": {"model": {"w": torch.ones(1)}}}, "model.model", True),
    ({"ema": {"w": torch.ones(1)}}, "ema", True),
    ({"w": torch.ones(1)}, None, True),
    ({"epoch": 3, "optimizer_state_dict": {"state": {}, "param_groups": []}}, None, False),
    ({"state": {}, "param_groups": []}, None, False),
    ([torch.ones(1)], None, False),
])
def test_find_weights(obj, key, has):
    w = checks.find_weights(obj)
    assert (w.state is not None) == has
    assert w.key == key


def test_signature_output_check():
    (spec,) = checks.parse_tensor_specs('[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 2]}}]')
    assert spec.shape == (-1, 2)
    assert checks.check_output([spec], torch.zeros(5, 2)) is None
    assert "expected float32 [-1, 2], got float32 [5, 3]" in checks.check_output([spec], torch.zeros(5, 3))
    assert "got float64 [5, 2]" in checks.check_output([spec], torch.zeros(5, 2, dtype=torch.float64))
    assert "returned 2 outputs" in checks.check_output([spec], (torch.zeros(1, 2), torch.zeros(1, 2)))
    assert checks.parse_tensor_specs('[{"type": "double", "name": "x"}]') is None


@pytest.mark.parametrize(("recorded", "runtime", "code", "severity"), [
    ("99.0.0", "2.13.0+cpu", R.LIBRARY_VERSION_MISMATCH, Severity.ERROR),
    ("2.14.0", "2.13.0", R.LIBRARY_VERSION_MISMATCH, Severity.ERROR),
    ("2.9.1", "2.13.0", R.LIBRARY_VERSION_MISMATCH, Severity.WARNING),
    ("2.13.1+cu121", "2.13.0+cpu", None, None),
])
def test_compare_library(recorded, runtime, code, severity):
    f = checks.compare_library("torch", recorded, runtime, file=None, newer_blocks=True)
    if code is None:
        assert f is None
    else:
        assert f.code is code and f.severity is severity
        assert checks.public(recorded) in f.message and checks.public(runtime) in f.message
        assert "+cpu" not in f.message


# -- drift --------------------------------------------------------------------------------------------


def test_drift_compare():
    prev = {"fc.weight": {"shape": [10, 4], "dtype": "float32"}, "fc.bias": {"shape": [10], "dtype": "float32"},
            "old.weight": {"shape": [3], "dtype": "float32"}}
    cur = {"fc.weight": {"shape": [2, 4], "dtype": "float32"}, "fc.bias": {"shape": [2], "dtype": "float16"},
           "head.weight": {"shape": [2, 2], "dtype": "float32"}}
    [f] = drift.compare(prev, cur, "3")  # no fingerprints: the architecture finding alone
    assert isinstance(f, Finding) and f.code is None and f.severity is Severity.INFO
    assert "version 3" in f.message
    assert "53 → 14 (-39)" in f.message
    assert "1 added (head.weight)" in f.message and "1 removed (old.weight)" in f.message
    assert "fc.weight [10, 4]→[2, 4]" in f.message
    assert f.detail["added"] == ["head.weight"] and f.detail["removed"] == ["old.weight"]
    assert {"name": "fc.weight", "previous": [10, 4], "current": [2, 4]} in f.detail["reshaped"]
    assert f.detail["retyped"] == []  # fc.bias changed shape, which wins
    assert f.detail["param_count"] == {"previous": 53, "current": 14, "delta": -39}
    assert not f.blocking


def test_drift_none_when_same_or_unknown():
    layers = {"w": {"shape": [2], "dtype": "float32"}}
    assert drift.compare(layers, dict(layers), "1") == []
    assert drift.compare({}, layers, "1") == []
    [retyped] = drift.compare(layers, {"w": {"shape": [2], "dtype": "bfloat16"}}, "1")
    assert "changed dtype" in retyped.message
