"""Hugging Face folders and sharded checkpoints, through the parent's scan and the worker's load in-process
(the sandboxed worker runs the same code: tests/integration/test_hf_models.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from ckpt_stage.config import Settings  # noqa: E402
from ckpt_stage.domain import ReasonCode as R  # noqa: E402
from ckpt_stage.domain import Verdict  # noqa: E402
from ckpt_stage.policy import decide  # noqa: E402
from ckpt_stage.sandbox.job import LoadJob  # noqa: E402
from ckpt_stage.sandbox.loader import load_and_check  # noqa: E402
from ckpt_stage.scan import scan_version  # noqa: E402
from ckpt_stage.scan.reading import Reading  # noqa: E402
from tests.corpus import hf_cases as hf  # noqa: E402


def _rels(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def run(root: Path, settings: Settings | None = None):
    settings = settings or Settings()
    rels = _rels(root)
    scan = scan_version(root, rels, settings)
    findings = list(scan.findings)
    result = None
    if not any(f.blocking for f in findings):
        job = LoadJob(root=str(root), files=tuple((r, scan.formats[r].value) for r in rels),
                      readings=tuple(scan.readings[r] for r in rels if r in scan.readings))
        result = load_and_check(job)
        findings += list(result.findings)
    return decide(findings, settings), findings, result


def codes(findings) -> set[str]:
    return {f.code.value for f in findings if f.blocking and f.code is not None}


def blocking(findings):
    return [f for f in findings if f.blocking]


def dump(findings) -> list[dict]:
    return [f.to_dict() for f in findings]


@pytest.mark.parametrize("builder", [hf.gpt2_folder, hf.bert_folder, hf.gpt2_sharded, hf.bert_sharded,
                                     hf.gpt2_bin_sharded, hf.gpt2_bin_single])
def test_benign_folders_pass_with_a_forward_pass(tmp_path, builder):
    decision, findings, result = run(builder(tmp_path))
    assert decision.verdict is Verdict.PASS, dump(findings)
    assert result is not None
    assert result.info["model_kind"] == "hf-folder"
    assert result.info["arch"] in ("transformers.GPT2LMHeadModel", "transformers.BertModel")
    assert result.info["forward"].startswith("synthetic input_ids int64 [1, 8]")
    assert result.runtime["transformers"]
    assert not [f for f in findings if f.detail.get("kind") == "no-input-example"], dump(findings)


def test_gpt2_tied_lm_head_is_not_missing(tmp_path):
    hf.gpt2_folder(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in set(fh.keys())  # what makes it a test of tying
    decision, findings, _ = run(tmp_path)
    assert decision.verdict is Verdict.PASS, dump(findings)


def test_untied_config_makes_the_absent_lm_head_missing(tmp_path):
    """With tie_word_embeddings false the lm_head is a weight of its own: absent, it is missing."""
    hf.gpt2_folder(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(doc))
    decision, findings, _ = run(tmp_path)
    assert decision.verdict is Verdict.QUARANTINE
    (f,) = blocking(findings)
    assert f.code is R.ARCHITECTURE_MISMATCH and "lm_head.weight" in f.message, dump(findings)


def test_synthetic_forward_output_matches_from_pretrained(tmp_path):
    """The model the worker builds (meta + assign + tie + buffers) computes what from_pretrained's does."""
    import torch
    import transformers

    from ckpt_stage.sandbox import hf as worker_hf
    from ckpt_stage.sandbox.loader import _load_safetensors, _Run

    for builder in (hf.gpt2_folder, hf.bert_folder):
        d = tmp_path / builder.__name__
        d.mkdir()
        builder(d)
        built = worker_hf.build(worker_hf.read_config(str(d / "config.json"), "config.json"), "config.json")
        scan = scan_version(d, ["model.safetensors"], Settings())
        r = _Run(LoadJob(root=str(d), files=(("model.safetensors", "safetensors"),),
                         readings=(scan.readings["model.safetensors"],)))
        r.readings = {"model.safetensors": scan.readings["model.safetensors"]}
        state = _load_safetensors(r, "model.safetensors")
        built.model.load_state_dict(state, strict=False, assign=True)
        assert worker_hf.finish(built.model) == []
        ref = getattr(transformers, built.arch.split(".")[1]).from_pretrained(str(d)).eval()
        ids = torch.randint(0, 100, (1, 8))
        with torch.inference_mode():
            assert torch.equal(built.model.eval()(input_ids=ids)[0], ref(input_ids=ids)[0])


@pytest.mark.parametrize(("builder", "code", "words"), [
    (hf.missing_shard, R.ARTIFACT_MISSING, ["model.safetensors.index.json names 1 shard missing",
                                            "model-00002-of-00002.safetensors"]),
    (hf.bin_missing_shard, R.ARTIFACT_MISSING, ["pytorch_model-00002-of-00003.bin"]),
    (hf.index_wrong_shard, R.CORRUPT_ARCHIVE, ["does not describe its shards", "does not hold it",
                                               "does not map to it"]),
    (hf.bin_index_wrong_shard, R.CORRUPT_ARCHIVE, ["pytorch_model.bin.index.json does not describe its shards"]),
    (hf.index_missing_tensor, R.CORRUPT_ARCHIVE, ["does not map to it"]),
    (hf.index_names_absent_tensor, R.CORRUPT_ARCHIVE, ["transformer.h.9.attn.c_attn.weight", "does not hold it"]),
    (hf.index_duplicate_key, R.CORRUPT_ARCHIVE, ["more than once"]),
    (hf.tensor_in_two_shards, R.CORRUPT_ARCHIVE, ["model-00002-of-00002.safetensors holds 1 tensor the index "
                                                  "does not map to it"]),
    (hf.unnamed_shard, R.CORRUPT_ARCHIVE, ["model-00003-of-00003.safetensors", "not named by it"]),
    (hf.config_shape_mismatch, R.SHAPE_MISMATCH, ["transformer.wte.weight: checkpoint [100, 16] vs model [120, 16]"]),
    (hf.config_foreign_architecture, R.PARTIAL_CHECKPOINT, ["'AcmeGPT2ForProfit' is not a model class of "
                                                            "transformers"]),
    (hf.config_non_model_attribute, R.PARTIAL_CHECKPOINT, ["'pipeline' is not a model class"]),
    (hf.missing_tensor, R.ARCHITECTURE_MISMATCH, ["transformer.h.1.mlp.c_fc.weight", "missing"]),
    (hf.nan_weight, R.NONFINITE_WEIGHTS, ["transformer.h.0.ln_1.weight (1 NaN"]),
])
def test_broken_folders_are_quarantined_with_the_problem_named(tmp_path, builder, code, words):
    decision, findings, _ = run(builder(tmp_path))
    assert decision.verdict is Verdict.QUARANTINE, dump(findings)
    hits = [f for f in blocking(findings) if f.code is code]
    assert hits, dump(findings)
    text = " ".join(f.message for f in hits)
    for w in words:
        assert w in text, (w, text)
    assert all(f.hint for f in hits)
    if code in (R.ARTIFACT_MISSING, R.CORRUPT_ARCHIVE) and builder is not hf.tensor_in_two_shards:
        # a lying index is said once, as the index's fault; not as an architecture problem too
        assert codes(findings) == {code.value}, dump(findings)


def test_tensor_in_two_shards_is_not_also_reported_as_an_architecture_problem(tmp_path):
    _, findings, _ = run(hf.tensor_in_two_shards(tmp_path))
    assert codes(findings) == {"CORRUPT_ARCHIVE"}, dump(findings)


def test_sharded_without_config_names_the_shards_correctly(tmp_path):
    """The old message read "a.safetensors, b.safetensors holds…"."""
    decision, findings, _ = run(hf.sharded_without_config(tmp_path))
    assert decision.verdict is Verdict.QUARANTINE
    (f,) = blocking(findings)
    assert f.code is R.PARTIAL_CHECKPOINT
    assert f.message.startswith("the 2 shards of model.safetensors.index.json hold a bare state_dict"), f.message
    assert "config.json" in f.hint and "ckpt_stage.arch" in f.hint


def test_sharded_without_config_loads_with_the_arch_tag(tmp_path):
    """ckpt_stage.arch still works for shards: they load as one state_dict."""
    import torch

    from ckpt_stage.domain import FileFormat

    d = tmp_path
    lin = torch.nn.Linear(4, 3)
    from safetensors.torch import save_file

    save_file({"weight": lin.weight.detach().contiguous()}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"bias": lin.bias.detach().contiguous()}, str(d / "model-00002-of-00002.safetensors"))
    (d / hf.SAFE_INDEX).write_text(json.dumps({"weight_map": {"weight": "model-00001-of-00002.safetensors",
                                                              "bias": "model-00002-of-00002.safetensors"}}))
    rels = _rels(d)
    scan = scan_version(d, rels, Settings())
    job = LoadJob(root=str(d), files=tuple((r, scan.formats[r].value) for r in rels),
                  readings=tuple(scan.readings[r] for r in rels), arch="torch.nn:Linear",
                  arch_kwargs={"in_features": 4, "out_features": 3})
    result = load_and_check(job)
    assert not [f for f in result.findings if f.blocking], dump(result.findings)
    assert result.info["arch"] == "torch.nn:Linear"
    assert scan.formats["model-00001-of-00002.safetensors"] is FileFormat.SAFETENSORS


def test_auto_map_is_unsafe_code_and_nothing_runs(tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    d = tmp_path / "m"
    d.mkdir()
    hf.auto_map_factory(canary / "ran")(d)
    decision, findings, result = run(d)
    assert decision.verdict is Verdict.QUARANTINE
    assert codes(findings) == {"UNSAFE_CODE"}, dump(findings)
    assert any("auto_map" in f.message for f in findings)
    assert result is None  # refused by the scan: the worker never started
    assert not list(canary.iterdir())


def test_worker_refuses_auto_map_even_without_the_scan(tmp_path):
    """Second lock: a job the scan did not stop (in-process caller) still never builds auto_map code."""
    canary = tmp_path / "canary"
    canary.mkdir()
    d = tmp_path / "m"
    d.mkdir()
    hf.auto_map_only_config_factory(canary / "ran")(d)
    rels = [r for r in _rels(d) if not r.endswith(".py")]
    result = load_and_check(LoadJob(root=str(d), files=tuple((r, "unknown") for r in rels)))
    (f,) = [f for f in result.findings if f.blocking]
    assert f.code is R.UNSAFE_CODE and "auto_map" in f.message and f.file == "config.json"
    assert not list(canary.iterdir())


def test_without_transformers_the_finding_says_what_to_install(tmp_path, monkeypatch):
    hf.gpt2_folder(tmp_path)
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers → ImportError
    decision, findings, _ = run(tmp_path)
    assert decision.verdict is Verdict.QUARANTINE
    (f,) = blocking(findings)
    assert f.code is R.LIBRARY_VERSION_MISMATCH
    assert "needs transformers" in f.message and "CKPT_STAGE_WORKER_PYTHON" in f.hint and "ckpt-stage[hf]" in f.hint


def test_mlflow_transformers_model_passes(tmp_path):
    target = hf.mlflow_transformers_dir(tmp_path)
    decision, findings, result = run(target)
    assert decision.verdict is Verdict.PASS, dump(findings)
    assert result is not None and result.info["flavor"] == "transformers"
    assert result.info["arch"] == "transformers.GPT2LMHeadModel"
    assert result.recorded["transformers"] == result.runtime["transformers"]


def test_mlflow_transformers_without_weights_is_artifact_missing(tmp_path):
    target = hf.mlflow_transformers_dir(tmp_path)
    for p in (target / "model").iterdir():
        if p.suffix == ".safetensors":
            p.unlink()
    decision, findings, _ = run(target)
    assert decision.verdict is Verdict.QUARANTINE
    (f,) = blocking(findings)
    assert f.code is R.ARTIFACT_MISSING and "save_pretrained=False" in f.message, dump(findings)


def test_index_reading_keeps_repeated_keys_and_round_trips(tmp_path):
    hf.index_duplicate_key(tmp_path)
    scan = scan_version(tmp_path, _rels(tmp_path), Settings())
    r = scan.readings[hf.SAFE_INDEX]
    names = [t for t, _ in r.weight_map or ()]
    assert len(names) == len(set(names)) + 1
    assert Reading.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_the_scan_of_a_hf_folder_imports_neither_transformers_nor_torch(tmp_path):
    import subprocess

    hf.gpt2_sharded(tmp_path)
    code = (
        "import sys; from pathlib import Path\n"
        "from ckpt_stage.config import Settings\n"
        "from ckpt_stage.scan import scan_version\n"
        f"root = Path({str(tmp_path)!r})\n"
        "rels = sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file())\n"
        "scan = scan_version(root, rels, Settings())\n"
        "assert scan.readings['model.safetensors.index.json'].weight_map\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_runner_cross_checks_what_a_hf_worker_reports(tmp_path):
    """transformers runs in the worker: its report of the tensors read is still held against the parent's
    reading of the safetensors header (a worker that reports other tensors is WORKER_CRASH)."""
    from ckpt_stage.pipeline import expected_facts
    from ckpt_stage.sandbox.job import LoadResult
    from ckpt_stage.sandbox.runner import cross_check

    hf.gpt2_folder(tmp_path)
    rels = _rels(tmp_path)
    scan = scan_version(tmp_path, rels, Settings())
    job = LoadJob(root=str(tmp_path), files=(), expected=expected_facts(tmp_path, rels, scan))
    assert job.expected["tensors"]
    _, _, result = run(tmp_path)
    assert result is not None and cross_check(job, result) == []
    layers = dict(result.info["layers"])
    layers.pop(sorted(layers)[0])
    (f,) = cross_check(job, LoadResult(info={**result.info, "layers": layers}))
    assert f.code is R.WORKER_CRASH
