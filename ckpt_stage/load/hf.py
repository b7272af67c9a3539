"""Hugging Face folders in the worker: the architecture a ``config.json`` names, built with transformers.

What ``save_pretrained`` writes (and ``mlflow.transformers`` logs under ``model/``) is a ``config.json``
beside ``model.safetensors`` (or ``pytorch_model.bin``, or shards with an ``*.index.json``). The
weights are loaded by the loader like any bare checkpoint (the scan's reading, mmap'd safetensors,
torch's weights_only unpickler); this module only turns the config into an empty model to check them
against:

* the class comes from ``architectures[0]`` (else ``AutoModel`` for ``model_type``) and must be a
  ``PreTrainedModel`` defined in the ``transformers`` package itself: nothing is imported from the
  version, ``trust_remote_code`` is never passed, and a config with ``auto_map`` is refused here too
  (the scanner's ``UNSAFE_CODE`` comes first; this is the second lock on the same door);
* the model is built on the meta device (no memory for parameters), the weights are then adopted
  with ``load_state_dict(assign=True)``, tied weights are tied (``tie_weights``; GPT-2's ``lm_head``
  is not in its checkpoint), and only the non-persistent buffers (``position_ids``, rotary
  frequencies) are materialised and initialised, the way ``from_pretrained`` does;
* a forward pass runs on a small synthetic input (token ids within ``vocab_size``, or pixels).

transformers is optional (the ``hf`` extra): it is imported lazily, only for a version that has a
config, and its absence is a finding, not a crash. The scanner (parent) never imports it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_stage.domain import ReasonCode
from ckpt_stage.errors import HfError

#: The serving runtime needs transformers for a Hugging Face folder: said in the finding when it is absent.
HINT_INSTALL = ("install transformers in the serving runtime the stage validates with (the interpreter named by "
                "CKPT_STAGE_WORKER_PYTHON, or the stage's own): pip install 'ckpt-stage[hf]'")
HINT_CONFIG = ("save the model with save_pretrained (config.json names an architecture of transformers), or "
               "register the weights with the ckpt_stage.arch tag")
MAX_CONFIG_BYTES = 4 << 20
#: Synthetic input: batch 1, this many tokens (fewer when the model's positions are fewer).
SEQ_LEN = 8
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Built:
    model: torch.nn.Module
    arch: str
    """``transformers.<Class>``, for messages and the report."""
    config: Any
    transformers_version: str


def read_config(path: str, rel: str) -> dict[str, Any]:
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise HfError(ReasonCode.CORRUPT_ARCHIVE, f"{rel} is larger than {MAX_CONFIG_BYTES >> 20} MiB",
                          "keep Hugging Face configs small (save_pretrained writes a few KiB)")
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HfError(ReasonCode.CORRUPT_ARCHIVE, f"{rel} is not valid JSON ({str(exc)[:120]})",
                      "upload the config.json that save_pretrained wrote") from None
    if not isinstance(doc, dict):
        raise HfError(ReasonCode.CORRUPT_ARCHIVE, f"{rel} is not a JSON object",
                      "upload the config.json that save_pretrained wrote")
    return doc


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise HfError(ReasonCode.LIBRARY_VERSION_MISMATCH,
                      f"a Hugging Face model folder needs transformers to be built, and the serving runtime has none "
                      f"({exc})", HINT_INSTALL, library="transformers") from None
    return transformers


def build(doc: dict[str, Any], rel: str) -> Built:
    """The empty (meta-device) model ``doc`` describes. Raises ``HfError``."""
    if doc.get("auto_map") or doc.get("custom_pipelines"):
        raise HfError(ReasonCode.UNSAFE_CODE,
                      f"{rel} has auto_map: transformers would import the repository's own code "
                      "(trust_remote_code); the stage builds only architectures of transformers itself",
                      "register a model whose architecture ships with transformers (no auto_map)")
    transformers = _import_transformers()
    model_type = doc.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise HfError(ReasonCode.PARTIAL_CHECKPOINT, f"{rel} has no model_type, so no architecture to build",
                      HINT_CONFIG)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise HfError(ReasonCode.PARTIAL_CHECKPOINT,
                      f"{rel}: model_type {model_type!r} is not a model type of transformers "
                      f"{transformers.__version__}", "use an architecture that ships with transformers, or upgrade "
                      "transformers in the serving runtime", model_type=model_type[:100])
    config_cls = CONFIG_MAPPING[model_type]
    try:
        config = config_cls.from_dict({k: v for k, v in doc.items() if k != "transformers_version"})
    except Exception as exc:
        raise HfError(ReasonCode.CORRUPT_ARCHIVE, f"{rel}: transformers cannot read the {model_type} config: "
                      f"{type(exc).__name__}: {str(exc)[:300]}", "upload the config.json that save_pretrained wrote")
    cls: Any = _model_class(transformers, doc, config, rel)
    arch = f"transformers.{cls.__name__}"
    try:
        # from_pretrained's own init path (get_init_context): on meta, with weights tied later.
        with torch.device("meta"):
            model = cls._from_config(config)
    except Exception as exc:
        raise HfError(ReasonCode.PARTIAL_CHECKPOINT,
                      f"building {arch} from {rel} failed: {type(exc).__name__}: {str(exc)[:300]}",
                      "check the sizes in config.json (save_pretrained writes a consistent one)", arch=arch)
    return Built(model, arch, config, str(transformers.__version__))


def _model_class(transformers: Any, doc: dict[str, Any], config: Any, rel: str) -> Any:
    from transformers import PreTrainedModel

    archs = doc.get("architectures")
    if archs:
        name = archs[0] if isinstance(archs, list) else archs
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise HfError(ReasonCode.PARTIAL_CHECKPOINT, f"{rel}: architectures names {str(name)[:100]!r}, not a "
                          "class name", HINT_CONFIG)
        try:
            cls = getattr(transformers, name)
        except AttributeError:  # transformers' lazy module raises AttributeError for unknown names
            cls = None
        except Exception as exc:  # its import failed (an optional dependency of that model)
            raise HfError(ReasonCode.LIBRARY_VERSION_MISMATCH,
                          f"{rel}: transformers.{name} cannot be imported: {type(exc).__name__}: {str(exc)[:200]}",
                          HINT_INSTALL, architecture=name)
        # Only the package's own classes: getattr on the lazy module never reaches the version's files,
        # and the module check keeps a re-exported foreign class out too.
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)
                and (cls.__module__ or "").startswith("transformers.")):
            raise HfError(ReasonCode.PARTIAL_CHECKPOINT,
                          f"{rel}: architecture {name!r} is not a model class of transformers "
                          f"{transformers.__version__}", "use an architecture that ships with transformers "
                          "(auto_map remote code is not run), or register the weights with ckpt_stage.arch",
                          architecture=name)
        wants: Any = cls.config_class
        if isinstance(wants, type) and not isinstance(config, wants):
            raise HfError(ReasonCode.ARCHITECTURE_MISMATCH,
                          f"{rel}: architecture {name} takes a {wants.__name__}, but model_type "
                          f"{doc.get('model_type')!r} makes a {type(config).__name__}",
                          "upload the config.json that save_pretrained wrote for these weights", architecture=name)
        return cls
    from transformers import AutoModel

    try:
        found: Any = AutoModel._model_mapping[type(config)]
        # Some model types map to several classes (a tuple): the first is the base model.
        return next(c for c in (found if isinstance(found, tuple) else (found,)) if c is not None)
    except (KeyError, StopIteration):
        raise HfError(ReasonCode.PARTIAL_CHECKPOINT,
                      f"{rel} names no architectures and transformers has no base model for {doc.get('model_type')!r}",
                      HINT_CONFIG) from None


def tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict names filled by tying (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``): not in
    a checkpoint and not missing. transformers 5 resolves them per config (``all_tied_weights_keys``,
    target → source, empty when ``tie_word_embeddings`` is false); 4.x listed patterns."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        return {str(k) for k in tied}
    names = getattr(model, "_tied_weights_keys", None) or ()
    config = getattr(model, "config", None)
    if config is not None and not getattr(config, "tie_word_embeddings", True):
        return set()
    keys = set(model.state_dict())
    return {k for k in keys for pat in names if re.search(str(pat), k)}


def ignored_unexpected(model: torch.nn.Module, keys: list[str]) -> list[str]:
    """Checkpoint keys the model class declares harmless (``_keys_to_ignore_on_load_unexpected``: old
    checkpoints' ``position_ids``, per-layer ``rotary_emb.inv_freq``)."""
    pats = [str(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    pats += [r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"]
    own = set(model.state_dict())
    return [k for k in keys if k not in own and any(re.search(p, k) for p in pats)]


def finish(model: torch.nn.Module) -> list[str]:
    """After ``load_state_dict(assign=True)``: tie, materialise and initialise the non-persistent buffers
    (not in any checkpoint), and return what is still on the meta device (nothing, for a good fit)."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    buffers = []
    for mod_name, mod in model.named_modules():
        for name in list(getattr(mod, "_non_persistent_buffers_set", ())):
            buf = mod._buffers.get(name)
            if buf is not None and buf.device.type == "meta":
                mod._buffers[name] = torch.empty_like(buf, device="cpu")
                buffers.append(f"{mod_name}.{name}" if mod_name else name)
    init = getattr(model, "initialize_weights", None)
    if buffers and callable(init):
        # Everything loaded is marked initialised, so _init_weights only fills the fresh buffers (as in
        # from_pretrained's _initialize_missing_keys), never a weight adopted from the checkpoint.
        for t in list(model.parameters()) + list(model.buffers()):
            t._is_hf_initialized = True  # type: ignore[union-attr]
        for mod in model.modules():
            for name in getattr(mod, "_non_persistent_buffers_set", ()):
                buf = mod._buffers.get(name)
                if buf is not None:
                    buf._is_hf_initialized = False  # type: ignore[attr-defined]
        with torch.no_grad():
            init()
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]


def synthetic_input(model: torch.nn.Module, config: Any) -> tuple[dict[str, torch.Tensor], str] | None:
    """Keyword inputs for one forward pass and their description, or None when the model's input kind
    is not one the stage can make up."""
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        if vocab <= 0:
            return None
        limits = [int(v) for v in (getattr(config, a, None) for a in ("max_position_embeddings", "n_positions",
                                                                         "max_seq_len"))
                  if isinstance(v, int) and v > 0]
        seq = max(1, min([SEQ_LEN, *limits]))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, seq), generator=gen)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = ids[:, : max(1, seq // 2)]
        return kwargs, f"input_ids int64 [1, {seq}] within vocab_size {vocab}"
    if main == "pixel_values":
        size = getattr(config, "image_size", None)
        channels = getattr(config, "num_channels", 3)
        if isinstance(size, (list, tuple)):
            size = size[0] if size else None
        if not isinstance(size, int) or not isinstance(channels, int) or not 0 < size <= 1024:
            return None
        return ({"pixel_values": torch.zeros(1, channels, size, size)},
                f"pixel_values float32 [1, {channels}, {size}, {size}]")
    return None
