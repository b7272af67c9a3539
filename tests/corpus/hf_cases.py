"""Tiny Hugging Face models written the way teams write them, built from configs (no download), and their
broken variants: single-file and sharded ``save_pretrained`` folders, ``pytorch_model-*.bin`` shards,
``mlflow.transformers.save_model`` directories, lying indexes, missing shards, configs that do not fit
the weights, architectures outside transformers, ``auto_map`` remote code (with a canary).

Every builder takes an empty folder and returns it. transformers is imported lazily (the ``hf`` extra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def gpt2_model(**overrides):
    """GPT-2 with 2 layers of width 16: tied embeddings (``lm_head.weight`` is not in the checkpoint)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **overrides})).eval()


def bert_model():
    """BERT with non-persistent buffers (position_ids, token_type_ids) that no checkpoint holds."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32)).eval()


def gpt2_folder(d: Path) -> Path:
    gpt2_model().save_pretrained(d)
    return d


def bert_folder(d: Path) -> Path:
    bert_model().save_pretrained(d)
    return d


def gpt2_sharded(d: Path) -> Path:
    gpt2_model().save_pretrained(d, max_shard_size="20KB")
    assert (d / SAFE_INDEX).exists() and len(list(d.glob("model-*.safetensors"))) >= 2
    return d


def bert_sharded(d: Path) -> Path:
    bert_model().save_pretrained(d, max_shard_size="20KB")
    assert (d / SAFE_INDEX).exists()
    return d


def _bin_shards(d: Path, state: dict[str, torch.Tensor], n: int = 3) -> Path:
    """``pytorch_model-0000x-of-0000y.bin`` + ``pytorch_model.bin.index.json``, as transformers 4.x wrote
    with safe_serialization=False (transformers 5 writes safetensors only, so they are made here)."""
    keys = sorted(state)
    weight_map = {}
    for i in range(n):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = {k: state[k].contiguous().clone() for k in keys[i::n]}
        torch.save(part, d / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (d / BIN_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return d


def _config(m, d: Path) -> None:
    m.config.architectures = [type(m).__name__]  # what model.save_pretrained records
    m.config.save_pretrained(d)


def gpt2_bin_sharded(d: Path) -> Path:
    m = gpt2_model()
    _config(m, d)
    state = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}  # tied, as save_pretrained drops it
    return _bin_shards(d, state)


def gpt2_bin_single(d: Path) -> Path:
    m = gpt2_model()
    _config(m, d)
    torch.save({k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}, d / "pytorch_model.bin")
    return d


def tiny_tokenizer():
    """A word-level tokenizer made in memory: mlflow.transformers needs one for a text pipeline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(99)} | {"[UNK]": 99}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="w0", bos_token="w0")


def mlflow_transformers_dir(d: Path) -> Path:
    """``mlflow.transformers.save_model`` of a text-generation pipeline: MLmodel, model/, components/."""
    import mlflow

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target = d / "model"
    # pip_requirements: MLflow 3.17 otherwise pins torchvision for every torch pipeline, and fails without it.
    mlflow.transformers.save_model({"model": gpt2_model(), "tokenizer": tiny_tokenizer()}, str(target),
                                   task="text-generation", pip_requirements=["torch==2.13.0", "transformers"])
    return target


# -- broken variants --------------------------------------------------------------------------------


def _index(d: Path, name: str = SAFE_INDEX) -> dict:
    return json.loads((d / name).read_text())


def _write_index(d: Path, doc: dict, name: str = SAFE_INDEX) -> None:
    (d / name).write_text(json.dumps(doc, indent=2))


def _shards(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("model-*.safetensors"))


def missing_shard(d: Path) -> Path:
    gpt2_sharded(d)
    (d / _shards(d)[-1]).unlink()
    return d


def index_wrong_shard(d: Path) -> Path:
    """The index sends one tensor to the other shard than the one holding it."""
    gpt2_sharded(d)
    doc = _index(d)
    shards = _shards(d)
    key = next(k for k, v in doc["weight_map"].items() if v == shards[0])
    doc["weight_map"][key] = shards[1]
    _write_index(d, doc)
    return d


def index_missing_tensor(d: Path) -> Path:
    """The index forgets a tensor a shard holds."""
    gpt2_sharded(d)
    doc = _index(d)
    doc["weight_map"].pop(sorted(doc["weight_map"])[0])
    _write_index(d, doc)
    return d


def index_names_absent_tensor(d: Path) -> Path:
    """The index names a tensor no shard holds."""
    gpt2_sharded(d)
    doc = _index(d)
    doc["weight_map"]["transformer.h.9.attn.c_attn.weight"] = _shards(d)[0]
    _write_index(d, doc)
    return d


def index_duplicate_key(d: Path) -> Path:
    """The same tensor twice in the index's JSON object, once per shard (``json.loads`` keeps the last)."""
    gpt2_sharded(d)
    doc = _index(d)
    shards = _shards(d)
    key, first = next(iter(doc["weight_map"].items()))
    other = shards[1] if first == shards[0] else shards[0]
    text = json.dumps(doc, indent=2)
    entry = f'"{key}": "{first}"'
    assert entry in text
    (d / SAFE_INDEX).write_text(text.replace(entry, f'"{key}": "{other}",\n    {entry}', 1))
    return d


def tensor_in_two_shards(d: Path) -> Path:
    """A second shard carries a copy (with other values) of a tensor the index maps to the first."""
    from safetensors.torch import load_file, save_file

    gpt2_sharded(d)
    shards = _shards(d)
    a, b = load_file(str(d / shards[0])), load_file(str(d / shards[1]))
    key = sorted(a)[0]
    b[key] = torch.zeros_like(a[key])
    save_file(b, str(d / shards[1]), metadata={"format": "pt"})
    return d


def unnamed_shard(d: Path) -> Path:
    """A shard beside the index that the index does not name (left over from another save)."""
    from safetensors.torch import save_file

    gpt2_sharded(d)
    save_file({"extra.weight": torch.zeros(2, 2)}, str(d / "model-00003-of-00003.safetensors"),
              metadata={"format": "pt"})
    return d


def bin_missing_shard(d: Path) -> Path:
    gpt2_bin_sharded(d)
    (d / "pytorch_model-00002-of-00003.bin").unlink()
    return d


def bin_index_wrong_shard(d: Path) -> Path:
    gpt2_bin_sharded(d)
    doc = _index(d, BIN_INDEX)
    key = next(k for k, v in doc["weight_map"].items() if v.startswith("pytorch_model-00001"))
    doc["weight_map"][key] = "pytorch_model-00002-of-00003.bin"
    _write_index(d, doc, BIN_INDEX)
    return d


def config_shape_mismatch(d: Path) -> Path:
    """config.json says vocab_size 120; the weights were trained with 100."""
    gpt2_folder(d)
    doc = json.loads((d / "config.json").read_text())
    doc["vocab_size"] = 120
    (d / "config.json").write_text(json.dumps(doc))
    return d


def config_foreign_architecture(d: Path) -> Path:
    """An architecture name that transformers does not define (a team's own class)."""
    gpt2_folder(d)
    doc = json.loads((d / "config.json").read_text())
    doc["architectures"] = ["AcmeGPT2ForProfit"]
    (d / "config.json").write_text(json.dumps(doc))
    return d


def config_non_model_attribute(d: Path) -> Path:
    """``architectures`` names something transformers exports that is not a model class."""
    gpt2_folder(d)
    doc = json.loads((d / "config.json").read_text())
    doc["architectures"] = ["pipeline"]
    (d / "config.json").write_text(json.dumps(doc))
    return d


def missing_tensor(d: Path) -> Path:
    """A weight the architecture needs is not in the checkpoint."""
    from safetensors.torch import load_file, save_file

    gpt2_folder(d)
    state = load_file(str(d / "model.safetensors"))
    state.pop("transformer.h.1.mlp.c_fc.weight")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def nan_weight(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    gpt2_folder(d)
    state = load_file(str(d / "model.safetensors"))
    state["transformer.h.0.ln_1.weight"][3] = float("nan")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def sharded_without_config(d: Path) -> Path:
    gpt2_sharded(d)
    for name in ("config.json", "generation_config.json"):
        (d / name).unlink()
    return d


def auto_map_factory(canary: Path) -> Callable[[Path], Path]:
    """A config with auto_map naming the version's own modeling file, which would create ``canary`` if
    transformers (trust_remote_code) or anything else imported it."""

    def build(d: Path) -> Path:
        gpt2_folder(d)
        doc = json.loads((d / "config.json").read_text())
        doc["auto_map"] = {"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"}
        doc["architectures"] = ["AcmeForCausalLM"]
        (d / "config.json").write_text(json.dumps(doc))
        (d / "modeling_acme.py").write_text(
            f"open({str(canary)!r}, 'w').write('remote code ran')\n"
            "from transformers import GPT2LMHeadModel as AcmeForCausalLM\n")
        return d

    return build


def auto_map_only_config_factory(canary: Path) -> Callable[[Path], Path]:
    """auto_map pointing at another Hub repository (``repo--module.Class``), no .py file in the version."""

    def build(d: Path) -> Path:
        gpt2_folder(d)
        doc = json.loads((d / "config.json").read_text())
        doc["auto_map"] = {"AutoModel": "evil/repo--modeling_evil.Evil"}
        (d / "config.json").write_text(json.dumps(doc))
        return d

    return build
