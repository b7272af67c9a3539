"""Memory a load needs, from tensor metadata, and the RESOURCE_LIMIT check made before loading.

The estimate is the sum of tensor storage bytes the checkpoint declares (zip storage records,
the safetensors data section, pt2 weight records, legacy storages), falling back to the file size
for formats without metadata, plus a fixed allowance for the loader's own working memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ckpt_stage.config import Settings
from ckpt_stage.domain import Finding, ReasonCode
from ckpt_stage.scan._common import FileScan, human

#: Working memory of a load beyond the tensors themselves (unpickled containers, the smoke
#: inference's activations for a small input example). Tensor bytes dominate for real models.
OVERHEAD_BYTES = 64 * 2**20


def estimate_bytes(scans: Iterable[FileScan]) -> int:
    total = sum(max(0, s.storage_bytes) for s in scans)
    return total + OVERHEAD_BYTES if total else 0


def resource_finding(estimated: int, settings: Settings) -> Finding | None:
    largest = settings.largest_class
    if estimated <= largest.memory_bytes:
        return None
    return Finding(
        code=ReasonCode.RESOURCE_LIMIT,
        message=(
            f"loading needs about {human(estimated)} ({estimated:,} bytes: tensor storage declared by the "
            f"checkpoint plus {human(OVERHEAD_BYTES)} working memory), more than the largest worker class "
            f"{largest.name!r} allows ({human(largest.memory_bytes)})"
        ),
        hint=(
            "ask the operator for a larger worker class (CKPT_STAGE_WORKER_CLASSES, e.g. "
            f"'{largest.name}={human(largest.memory_bytes)},xl=<size>'), or make the model smaller: shard it "
            "into several safetensors files loaded separately, or quantize / save it in bfloat16"
        ),
        detail={"estimated_bytes": estimated, "limit_bytes": largest.memory_bytes, "worker_class": largest.name},
    )


def oversized_files(sizes: Mapping[str, int], settings: Settings) -> list[Finding]:
    """Files refused from their size alone (S3 listing, ``st_size``), before a byte is read or hashed.

    Every checkpoint format the worker loads holds its tensors as raw bytes in the file, so a file
    larger than the largest worker class needs more memory than any worker has, whatever its metadata
    says; deciding that from the listing keeps a sparse 1 TiB file from costing an hour of hashing
    (or a download, or a dense copy)."""
    largest = settings.largest_class
    out = []
    for rel, size in sizes.items():
        if size <= largest.memory_bytes:
            continue
        out.append(Finding(
            code=ReasonCode.RESOURCE_LIMIT,
            message=(f"{rel} is {human(size)} ({size:,} bytes), more than the largest worker class "
                     f"{largest.name!r} allows ({human(largest.memory_bytes)}): refused from its size, without "
                     "reading it"),
            hint=("shard the weights into several files (safetensors shards of a few GB each), or quantize / "
                  "save them in bfloat16; an operator can add a larger worker class (CKPT_STAGE_WORKER_CLASSES, "
                  f"e.g. '{largest.name}={human(largest.memory_bytes)},xl=<size>')"),
            file=rel,
            detail={"size_bytes": size, "limit_bytes": largest.memory_bytes, "worker_class": largest.name},
        ))
    return out
