"""torch.export (``.pt2``) archives: read their versions, refuse what runs code, load them safely.

What ``torch.export.load`` in torch 2.13 deserializes (``torch/export/pt2_archive/_package.py`` and
``torch/_export/serde/serialize.py``), and what this module does about each:

* ``models/<name>.json``: the graph, JSON; node targets are resolved by ``getattr`` from ``torch``,
  ``_operator`` and ``math`` and then checked by the export verifier (only OpOverloads, higher-order
  ops and a fixed list of builtins pass; ``torch.os.system`` is rejected there).
* ``data/weights/*`` / ``data/constants/*``: raw tensor bytes described by JSON configs, unless a
  payload has ``use_pickle: true`` (``torch.load(weights_only=False)``), is a custom TorchBind object
  (``torch._C._pickle_load_obj``) or an opaque object (``pickle.loads``).
* ``data/sample_inputs/<name>.pt``: ``torch.save`` output, loaded with ``weights_only=True`` and, on
  failure, *retried with* ``weights_only=False``.
* ``data/aotinductor/``: compiled shared libraries, ``dlopen``-ed by ``load_pt2``.
* strings of ``models/<name>.json`` that torch turns into Python (guard code, names pasted into the
  generated forward, ``sympify``'d expressions): read under the scanner's strict grammar
  (``ckpt_stage.scan.pt2``) here too, so the worker never hands torch a program that grammar refuses.

The archive is inspected first (versions, AOTInductor code, opaque objects are refused with a
message), then loaded under ``safe_torch.forced_weights_only()``.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_stage.load.safe_torch import forced_weights_only
from ckpt_stage.scan import pt2 as grammar

MAX_FILE_FORMAT_VERSION = 10
"""``kMaxSupportedFileFormatVersion`` of caffe2/serialize/versions.h in torch 2.13: the highest
``version`` / ``.data/version`` record PyTorchStreamReader accepts (torch.save writes 3)."""

ARCHIVE_VERSION = "0"
"""``ARCHIVE_VERSION_VALUE`` of torch 2.13; ``load_pt2`` requires equality."""


def schema_version() -> tuple[int, int]:
    try:
        from torch._export.serde.schema import SCHEMA_VERSION

        return int(SCHEMA_VERSION[0]), int(SCHEMA_VERSION[1])
    except Exception:  # pragma: no cover - a future torch moved it
        return (0, 0)


@dataclass
class Pt2Facts:
    archive_version: str | None = None
    file_format_version: int | None = None
    schemas: dict[str, tuple[int, int]] = field(default_factory=dict)
    torch_version: str | None = None
    """``torch_version`` the exporter wrote into models/<name>.json (when present)."""
    compiled: list[str] = field(default_factory=list)
    """AOTInductor records (compiled shared libraries that load_pt2 would dlopen)."""
    code: list[str] = field(default_factory=list)
    """Payloads that are code rather than data (opaque pickled objects, TorchBind objects)."""
    pickled: list[str] = field(default_factory=list)
    """Payloads stored as pickles (loaded, but only with weights_only semantics)."""
    unsafe: list[str] = field(default_factory=list)
    """Strings of the program JSON outside the strict grammar (``UNSAFE_CODE``), as messages."""
    unsupported: list[str] = field(default_factory=list)
    """Programs of a schema the grammar does not cover (``UNSUPPORTED_FORMAT``)."""


def _read(z: zipfile.ZipFile, name: str, limit: int = 64 * 2**20) -> bytes | None:
    try:
        info = z.getinfo(name)
    except KeyError:
        return None
    if info.file_size > limit:
        return None
    return z.read(info)


def inspect(path: str) -> Pt2Facts:
    """Versions and code-bearing records of a pt2 archive, from its zip directory and JSON records."""
    facts = Pt2Facts()
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
        rel = {n[len(root):]: n for n in names if n.startswith(root)}
        raw = _read(z, rel.get("archive_version", ""))
        facts.archive_version = raw.decode(errors="replace").strip() if raw is not None else None
        for rec in ("version", ".data/version"):
            raw = _read(z, rel.get(rec, ""))
            if raw is not None and raw.strip().isdigit():
                facts.file_format_version = int(raw.strip())
                break
        for r, full in rel.items():
            if r.startswith("data/aotinductor/"):
                facts.compiled.append(r)
            elif grammar.is_program_record(r):  # every record under models/, as torch reads them
                odd = grammar.program_record_problem(r)
                _grammar(facts, r, [odd] if odd is not None else [])
                raw = _read(z, full)
                try:
                    doc = json.loads(raw) if raw else {}
                except (ValueError, RecursionError):
                    doc = {}
                _grammar(facts, r, grammar.read_program(doc).problems)
                sv = doc.get("schema_version") if isinstance(doc, dict) else None
                if isinstance(sv, dict):
                    facts.schemas[r] = (int(sv.get("major", 0)), int(sv.get("minor", 0)))
                if isinstance(doc, dict) and isinstance(doc.get("torch_version"), str):
                    facts.torch_version = facts.torch_version or doc["torch_version"]
            elif r.startswith(("data/weights/", "data/constants/")) and r.endswith("_config.json"):
                raw = _read(z, full)
                try:
                    whole = json.loads(raw) if raw else {}
                    cfg = whole.get("config", {})
                except (ValueError, AttributeError, RecursionError):
                    whole, cfg = {}, {}
                _grammar(facts, r, grammar.read_payload_config(whole))
                for fqn, meta in cfg.items() if isinstance(cfg, dict) else ():
                    if not isinstance(meta, dict):
                        continue
                    pname = str(meta.get("path_name", ""))
                    if pname.startswith("opaque_obj_"):
                        facts.code.append(f"{os.path.dirname(r)}/{pname} ({fqn}: opaque pickled object)")
                    elif pname.startswith("custom_obj_"):
                        facts.code.append(f"{os.path.dirname(r)}/{pname} ({fqn}: TorchBind object)")
                    elif meta.get("use_pickle"):
                        facts.pickled.append(f"{os.path.dirname(r)}/{pname}")
    return facts


def _grammar(facts: Pt2Facts, member: str, problems: list[grammar.Problem]) -> None:
    for p in problems:
        where = facts.unsupported if p.code.value == "UNSUPPORTED_FORMAT" else facts.unsafe
        if len(where) < grammar.MAX_PROBLEMS:
            where.append(f"{member}: {p.message}")


def load(path: str) -> tuple[Any, torch.nn.Module, list[str]]:
    """``(ExportedProgram, its module, refusals)``; raises what torch raises (refusals included)."""
    with forced_weights_only() as refusals:
        try:
            from torch.export.pt2_archive._package import load_pt2
        except ImportError:  # pragma: no cover - older/newer torch: the public entry point
            ep = torch.export.load(path)
        else:
            # load_pt2 directly: torch.export.load swallows its RuntimeError (the real reason) and
            # retries the pre-2.8 format, which only says "We ran into an error when deserializing".
            contents = load_pt2(path)
            found = contents.exported_programs.get("model")
            if found is None:
                names = ", ".join(contents.exported_programs) or "none"
                raise ValueError(f"the archive holds no exported program named 'model' (found: {names})")
            ep = found
        module = ep.module()
    return ep, module, refusals
