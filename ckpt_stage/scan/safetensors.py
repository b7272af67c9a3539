"""safetensors header checks, on bytes (the same rules the Rust reader enforces in
``SafeTensors::validate``, checked up front so the error names the tensor and the problem).

Layout: 8-byte little-endian header length N, N bytes of JSON object, then the data section.
Every tensor entry has ``dtype`` (known), ``shape`` (non-negative ints) and ``data_offsets``
``[begin, end]`` relative to the data section, with ``end - begin == numel * itemsize``; entries
cover the data section exactly, without overlaps or gaps. ``__metadata__`` is an optional
str → str map.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ckpt_stage.scan._common import Region, human

#: The Rust reader refuses headers above 100 MB (safetensors ``MAX_HEADER_SIZE``). The one limit of
#: the stage: the scanner's sniffing and header check, and the worker's load, all use this constant.
MAX_HEADER = 100_000_000

#: dtype → bits per element (safetensors ``Dtype``; sub-byte types pack).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass
class SafetensorsInfo:
    header_len: int = 0
    data_bytes: int = 0
    tensors: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    header_ok: bool = False
    """The header length fits the file and the header is a JSON object (tensor entries may still be
    wrong): the container is safetensors, even when its contents are broken."""


def looks_like_safetensors(head: bytes) -> bool:
    """8-byte LE length whose high bytes are zero (a header under 4 GiB; text never has NULs)
    followed by ``{``."""
    return len(head) >= 9 and head[4:8] == b"\x00\x00\x00\x00" and head[8:9] == b"{"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def check_safetensors(region: Region) -> SafetensorsInfo:  # noqa: C901 - one rule per branch
    info = SafetensorsInfo()
    p = info.problems
    size = region.size
    head = region.read(0, 8)
    if len(head) < 8:
        p.append(f"{size} bytes is too short for a safetensors file (8-byte header length missing)")
        return info
    n = int.from_bytes(head, "little")
    info.header_len = n
    if n > MAX_HEADER:
        p.append(f"header length {n:,} exceeds the 100 MB safetensors limit")
        return info
    if n > size - 8:
        p.append(f"header length {n:,} runs past the end of the file ({size - 8:,} bytes follow)")
        return info
    raw = region.read(8, n)
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        p.append("header JSON nests too deeply")
        return info
    except (UnicodeDecodeError, ValueError) as exc:
        p.append(f"header is not valid JSON ({str(exc)[:160]})")
        return info
    if not text.startswith("{") or not isinstance(header, dict):
        p.append(f"header is a JSON {type(header).__name__}, not an object")
        return info
    info.header_ok = True
    data_len = size - 8 - n
    info.data_bytes = data_len
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                p.append("__metadata__ must map strings to strings")
            else:
                info.metadata = entry
            continue
        if not isinstance(entry, dict):
            p.append(f"tensor {name!r}: entry is a {type(entry).__name__}, not an object")
            continue
        unknown = set(entry) - {"dtype", "shape", "data_offsets"}
        if unknown:
            p.append(f"tensor {name!r}: unexpected field(s) {sorted(unknown)}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BITS:
            p.append(f"tensor {name!r}: unknown dtype {dtype!r}")
            continue
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            p.append(f"tensor {name!r}: shape {str(shape)[:100]} is not a list of non-negative integers")
            continue
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            p.append(f"tensor {name!r}: data_offsets {str(offsets)[:100]} is not [begin, end]")
            continue
        begin, end = offsets
        numel = math.prod(shape)
        bits = numel * DTYPE_BITS[dtype]
        if bits % 8:
            p.append(f"tensor {name!r}: {numel:,} {dtype} elements do not fill whole bytes")
            continue
        if end < begin:
            p.append(f"tensor {name!r}: data_offsets end {end:,} is before begin {begin:,}")
            continue
        if end - begin != bits // 8:
            p.append(f"tensor {name!r}: shape {shape} of {dtype} needs {human(bits // 8)} ({bits // 8:,} bytes) "
                     f"but data_offsets span {end - begin:,} bytes")
            continue
        if end > data_len:
            p.append(f"tensor {name!r}: data_offsets [{begin:,}, {end:,}] run past the data section "
                     f"({data_len:,} bytes)")
            continue
        info.tensors[name] = (dtype, shape)
        spans.append((begin, end, name))
    if p:
        return info
    spans.sort()
    pos = 0
    prev = None
    for begin, end, name in spans:
        if begin < pos:
            p.append(f"tensor {name!r} [{begin:,}, {end:,}] overlaps tensor {prev!r} (ends at {pos:,})")
        elif begin > pos:
            p.append(f"{begin - pos:,} bytes at data offset {pos:,} before tensor {name!r} belong to no tensor (gap)")
        pos = max(pos, end)
        prev = name
    if not p and pos != data_len:
        p.append(f"{data_len - pos:,} bytes after the last tensor belong to no tensor (the data section is "
                 f"{data_len:,} bytes, tensors cover {pos:,})")
    return info
