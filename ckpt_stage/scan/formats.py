"""Per-format checks: torch zip, TorchScript, torch.export ``.pt2``, legacy torch, plain pickle,
safetensors, legacy tar. Each reads bytes only (``Region``), reports into a ``FileScan`` and
returns the ``FileFormat`` it verified.
"""

from __future__ import annotations

import json
import posixpath
import struct
import tarfile
from dataclasses import dataclass
from typing import Any

from ckpt_stage.config import Settings
from ckpt_stage.domain import FileFormat, ReasonCode
from ckpt_stage.scan._common import HINT_CORRUPT, HINT_NOT_CKPT, FileScan, Region, human
from ckpt_stage.scan import budget
from ckpt_stage.scan import pt2 as pt2_grammar
from ckpt_stage.scan.archives import (
    DEFLATED,
    STORED,
    U32,
    ZipArchive,
    ZipEntry,
    gaps,
    inflate,
    read_entry,
    read_zip,
)
from ckpt_stage.scan.pickles import (
    LEGACY_TORCH_MAGIC,
    MAX_STREAMS,
    Anomaly,
    StreamReport,
    TensorDecl,
    scan_stream,
    str_items,
    torch_safe_problems,
)
from ckpt_stage.scan.safetensors import check_safetensors
from ckpt_stage.scan.sniff import Kind, claims_checkpoint, describe, extension, live_pickle, sniff

#: Nested archives: pt2 → sample inputs / pickled weights (torch zips) → nothing deeper is legit.
MAX_NESTING = 3
#: Archives scanned inside one file (pt2 sample inputs, pickled weights...).
MAX_NESTED_SCANS = 256
#: JSON configs inside pt2 archives are KBs; refuse to parse absurd ones.
MAX_JSON_BYTES = 64 * 2**20

HINT_UNSAFE_CODE = (
    "this pickle would run code when loaded; do not deploy it. Save only the weights "
    "(torch.save(model.state_dict(), path) or safetensors) and set the ckpt_stage.arch tag, or log the "
    "model with mlflow.pytorch.log_model(..., serialization_format='pt2'); if you did not write this "
    "file, treat it as compromised"
)
HINT_CLOUDPICKLE = (
    "the model class was pickled by value (cloudpickle turns classes defined in __main__ or a notebook "
    "into code): log a class importable from a package (mlflow.pytorch.log_model(..., code_paths=[...])), "
    "or use serialization_format='pt2', or log a state_dict with the ckpt_stage.arch tag"
)
HINT_THIRD_PARTY = (
    "save a state_dict instead (torch.save(model.state_dict(), path)) and set the ckpt_stage.arch tag, or "
    "use serialization_format='pt2'; if the class comes from a trusted package, an operator can allow its "
    "module prefix with CKPT_STAGE_PICKLE_MODULES"
)
HINT_MODELS_OFF = (
    "whole pickled models are disabled here (CKPT_STAGE_ALLOW_PICKLED_MODELS=false): log a state_dict with "
    "the ckpt_stage.arch tag, or serialization_format='pt2'"
)
HINT_CONFUSION = (
    "the pickle is built to confuse scanners, which no checkpoint writer does; do not deploy it. Re-save "
    "the weights with torch.save(model.state_dict(), path) or as safetensors"
)
HINT_TORCH_UNREADABLE = (
    "re-save it with torch.save's defaults (pickle protocol 2: do not pass pickle_protocol, and keep only "
    "tensors, dicts, lists, OrderedDict and Counter in it; turn a defaultdict into a dict first), e.g. "
    "torch.save(model.state_dict(), path), or save the weights as safetensors"
)
HINT_SCAN_DEADLINE = (
    "no checkpoint writer produces a file that takes this long to read (the file may be built to exhaust "
    "scanners); if it is a genuine, unusually large checkpoint, ask the operator to raise "
    "CKPT_STAGE_SCAN_DEADLINE_S, or re-save it as safetensors"
)
HINT_PICKLE_LIMIT = (
    "the pickle part of the checkpoint is larger than the scanner reads (CKPT_STAGE_MAX_PICKLE_BYTES): keep "
    "large non-tensor data out of the checkpoint, or ask the operator to raise the limit"
)

#: torch.export serde ``ScalarType`` enum → element size (torch/_export/serde/schema.py).
PT2_SCALAR_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2,
                       28: 2, 29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8}


@dataclass
class Ctx:
    settings: Settings
    fs: FileScan
    where: str = ""
    """Location inside the file for messages (``model/data/sample_inputs/model.pt``)."""
    nesting: int = 0

    def add(self, code: ReasonCode, message: str, hint: str, **detail: Any) -> None:
        self.fs.add(code, message, hint, where=self.where or self.fs.path, **detail)

    def inner(self, name: str) -> Ctx:
        where = f"{self.where or self.fs.path} › {name}"
        return Ctx(self.settings, self.fs, where, self.nesting + 1)


# -- pickles --------------------------------------------------------------------------------------


def _global_hint(reports: list[StreamReport]) -> str:
    unsafe = [g for r in reports for g in r.unsafe]
    if any(g.module.split(".")[0] in ("cloudpickle", "__main__") for g in unsafe):
        return HINT_CLOUDPICKLE
    if any(g.why == "denied" or g.why == "malformed" for g in unsafe):
        return HINT_UNSAFE_CODE
    if all(g.why == "pickled-models-disabled" for g in unsafe):
        return HINT_MODELS_OFF
    return HINT_THIRD_PARTY


def report_pickle(ctx: Ctx, reports: list[StreamReport], *, label: str, torch_safe: bool = False) -> bool:
    """Turn stream reports into findings. Returns True when something unsafe was reported.

    Names and anomalies are listed first-N-and-a-count (the streams keep only the first ones).
    ``torch_safe``: the pickle is one that ``torch.load(weights_only=True)`` reads (a torch zip's
    ``data.pkl``, a legacy file's streams); benign content that torch's safe unpickler cannot read
    is then UNSUPPORTED_FORMAT (hostile content stays UNSAFE_PICKLE)."""
    unsafe: dict[str, Any] = {}
    for r in reports:
        for g in r.unsafe:
            unsafe.setdefault(g.full, g)
    unsafe_uses = sum(r.unsafe_count for r in reports)
    dropped = sum(r.globals_dropped for r in reports)
    if unsafe or unsafe_uses:
        names = list(unsafe)
        shown = ", ".join(f"{n} ({unsafe[n].opcode} at offset {unsafe[n].offset})" for n in names[:8])
        more = f" and {len(names) - 8 + dropped:,} more distinct names" if len(names) > 8 or dropped else ""
        uses = f" ({unsafe_uses:,} refused imports in all)" if unsafe_uses > len(names) else ""
        ctx.add(ReasonCode.UNSAFE_PICKLE,
                f"{label} imports {shown or 'names'}{more}{uses}, outside the pickle allowlist",
                _global_hint(reports), globals=names[:50], unsafe_imports=unsafe_uses)
    anomalies = [(r.start, a) for r in reports for a in r.anomalies]
    n_anomalies = sum(max(r.anomaly_count, len(r.anomalies)) for r in reports)
    if anomalies:
        shown = "; ".join(f"{a.message} (offset {a.offset})" for _, a in anomalies[:5])
        more = f"; and {n_anomalies - 5:,} more" if n_anomalies > 5 else ""
        ctx.add(ReasonCode.UNSAFE_PICKLE, f"{label} is built to confuse scanners: {shown}{more}", HINT_CONFUSION,
                anomalies=[a.message for _, a in anomalies[:20]], anomaly_count=n_anomalies)
    hostile = bool(unsafe or unsafe_uses or anomalies)
    for r in reports:
        if r.limit:
            ctx.add(ReasonCode.RESOURCE_LIMIT, f"{label}: the scanner stopped at its work limit: {r.limit}",
                    HINT_SCAN_DEADLINE if r.deadline else HINT_PICKLE_LIMIT)
        if r.error is None:
            continue
        if hostile:
            ctx.add(ReasonCode.UNSAFE_PICKLE,
                    f"{label} breaks off at offset {r.error.offset} ({r.error.message}) after the unsafe content "
                    "above: a payload before a deliberately broken stream still runs when loaded",
                    HINT_CONFUSION)
        else:
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"{label}: pickle stream starting at offset {r.start} is truncated or damaged at offset "
                    f"{r.error.offset}: {r.error.message}", HINT_CORRUPT)
    if torch_safe and not hostile:
        problems = torch_safe_problems(reports)
        if problems:
            ctx.add(ReasonCode.UNSUPPORTED_FORMAT,
                    f"{label} uses {'; '.join(problems[:3])}: torch's safe loader (torch.load(weights_only=True), "
                    "what this runtime loads with) cannot read it, although nothing in it is unsafe",
                    HINT_TORCH_UNREADABLE, problems=problems[:10])
    return hostile


class StreamCache:
    """Stream reports of one file by (buffer, offset): sniffing the prefix, recognising the legacy
    header and the full scan all start at offset 0, and each stream must be walked once, not three
    times (a stream that takes 20 s would otherwise take a minute)."""

    def __init__(self) -> None:
        self._done: dict[tuple[int, int], tuple[bytes, StreamReport]] = {}

    def scan(self, buf: bytes, pos: int, settings: Settings, extra_allow: Any = None) -> StreamReport:
        key = (id(buf), pos)
        hit = self._done.get(key)
        if hit is not None and hit[0] is buf:
            return hit[1]
        rep = scan_stream(buf, pos, settings, extra_allow=extra_allow)
        self._done[key] = (buf, rep)  # the buffer is kept alive, so its id cannot be reused
        return rep


def scan_pickle_bytes(buf: bytes, settings: Settings, *, extra_allow: Any = None,
                      all_streams: bool = True, cache: StreamCache | None = None,
                      ) -> tuple[list[StreamReport], int, str | None]:
    """Scan every stream in ``buf`` back to back. Returns (reports, end offset, trailing problem)."""
    cache = cache or StreamCache()
    reports: list[StreamReport] = []
    pos = 0
    trailing = None
    while pos < len(buf) and len(reports) < MAX_STREAMS:
        rep = cache.scan(buf, pos, settings, extra_allow)
        reports.append(rep)
        if rep.end is None:
            return reports, pos, None
        pos = rep.end
        if not all_streams:
            break
        nxt = buf[pos:pos + 1]
        if nxt and not (nxt == b"\x80" or nxt in (b"(", b"c", b"}", b"]", b")")):
            trailing = (f"{len(buf) - pos:,} byte(s) of data follow the STOP at offset {pos - 1} and are not "
                        "another pickle stream")
            break
    if len(reports) >= MAX_STREAMS and pos < len(buf):
        trailing = f"more than {MAX_STREAMS} pickle streams back to back"
    return reports, pos, trailing


def _check_tensors(ctx: Ctx, tensors: list[TensorDecl], storage_bytes: dict[str, int], label: str) -> None:
    """A tensor view must fit its storage: ``(offset + Σ(size-1)·stride + 1) · itemsize ≤ nbytes``."""
    bad = 0
    for t in tensors:
        if t.storage_key is None or not t.concrete() or t.itemsize is None:
            continue
        name = f"tensor {t.name!r}" if t.name else f"tensor at pickle offset {t.offset}"
        if len(t.size) != len(t.stride):
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"{label}: {name} has {len(t.size)} sizes but {len(t.stride)} strides", HINT_CORRUPT)
            bad += 1
        elif t.storage_offset < 0 or any(s < 0 for s in t.size) or any(s < 0 for s in t.stride):
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"{label}: {name} has negative size, stride or offset (size {list(t.size)}, stride "
                    f"{list(t.stride)}, offset {t.storage_offset})", HINT_CORRUPT)
            bad += 1
        elif t.storage_key in storage_bytes:
            need = t.needed_elements() * t.itemsize
            have = storage_bytes[t.storage_key]
            if need > have:
                ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                        f"{label}: {name} (shape {list(t.size)}, stride {list(t.stride)}, offset "
                        f"{t.storage_offset}) needs {human(need)} ({need:,} bytes) but its storage "
                        f"{t.storage_key!r} holds {have:,} bytes", HINT_CORRUPT)
                bad += 1
        if bad >= 5:
            return


# -- zip-based formats ----------------------------------------------------------------------------


def _archive_prefix(z: ZipArchive) -> str | None:
    """torch's PyTorchStreamReader takes the folder of the *first* central-directory entry."""
    if not z.entries or "/" not in z.entries[0].name:
        return None
    return z.entries[0].name.split("/", 1)[0]


def _zip_kind(z: ZipArchive, region: Region, prefix: str | None) -> FileFormat | None:
    if prefix is None:
        return None
    records = {e.name[len(prefix) + 1:] for e in z.entries if e.name.startswith(prefix + "/")}
    if "archive_format" in records:
        e = z.by_name()[f"{prefix}/archive_format"]
        if (read_entry(region, e, 64) or b"").strip() == b"pt2":
            return FileFormat.TORCH_EXPORT
    if "constants.pkl" in records:
        return FileFormat.TORCHSCRIPT
    if "data.pkl" in records and records & {"version", ".data/version", "byteorder"}:
        return FileFormat.TORCH_ZIP
    return None


#: Records torch looks up by a fixed name (PyTorchStreamReader, torch.load, torch.jit.load, torch.export.load).
TORCH_RECORDS = ("data.pkl", "constants.pkl", "version", ".data/version", "byteorder", "archive_format",
                 ".data/serialization_id", ".format_version", ".storage_alignment")


def _case_variants(ctx: Ctx, z: ZipArchive, prefix: str | None) -> None:
    """A record spelled ``Data.Pkl`` is ``data.pkl`` to torch (miniz looks names up ignoring ASCII case)
    but no record at all to a reader that compares names exactly: the archive has two readings."""
    if prefix is None:
        return
    exact = {e.name for e in z.entries}
    wanted = {f"{prefix}/{rec}".lower(): f"{prefix}/{rec}" for rec in TORCH_RECORDS}
    for e in z.entries:
        canon = wanted.get(e.name.encode("utf-8", "replace").lower().decode("utf-8", "replace"))
        if canon is not None and e.name != canon and canon not in exact:
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"entry {e.name!r} is the record {canon!r} to torch, whose zip reader finds records "
                    "case-insensitively, but not to a reader that compares names exactly: the archive reads two ways",
                    "no torch writer produces this; re-save the checkpoint with torch.save and upload the new file",
                    kind="case")
            return


def _ts_compressible(name: str, prefix: str) -> bool:
    # torch.jit.save deflates the TorchScript sources and their debug pickles (code/...).
    return name.startswith(f"{prefix}/code/")


def _torchscript_allow(module: str, name: str) -> bool:
    # TorchScript archives are read by torch.jit.load's C++ unpickler, which resolves __torch__.*
    # from the archive's compiled code and torch.jit._pickle.* helpers itself (no Python import).
    return module == "__torch__" or module.startswith("__torch__.") or module == "torch.jit._pickle"


def scan_zip(region: Region, ctx: Ctx, *, claimed: bool) -> tuple[FileFormat, bool]:  # noqa: C901
    """Returns (format, counts as a checkpoint)."""
    settings = ctx.settings
    z = read_zip(region, settings)
    grouped: dict[tuple[ReasonCode, str], list] = {}
    for p in z.problems:
        grouped.setdefault((p.code, p.kind), []).append(p)
    for (code, kind), problems in grouped.items():  # one finding per kind of problem
        hint = ("decrypt/unpack it and register the plain checkpoint" if code is ReasonCode.UNSUPPORTED_FORMAT
                else HINT_CORRUPT)
        more = f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else ""
        ctx.add(code, problems[0].message + more, hint, kind=kind)
    if not z.parsed:
        return FileFormat.UNKNOWN, True
    prefix = _archive_prefix(z)
    if ctx.nesting == 0:  # the file's own table travels to the worker in its reading
        ctx.fs.zip, ctx.fs.zip_prefix = z, prefix
    _case_variants(ctx, z, prefix)
    fmt = _zip_kind(z, region, prefix)
    by_name = z.by_name()
    if fmt is FileFormat.TORCH_EXPORT:
        # torch.load reads a zip's data.pkl (or hands one with constants.pkl to torch.jit.load)
        # without looking at archive_format, torch.export.load reads the pt2 records: the same bytes
        # would be a different model to each loader, and only one of them is validated.
        # (miniz finds records case-insensitively: DATA.PKL is data.pkl to torch.load)
        lowered = {n.lower() for n in by_name}
        other = [r for r in ("data.pkl", "constants.pkl") if f"{prefix}/{r}".lower() in lowered]
        if other:
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"the archive is a torch.export .pt2 and also holds {prefix}/{other[0]}, which torch.load reads "
                    "as a different checkpoint: a file with two meanings is not loaded",
                    "no torch writer produces this; re-export the model with torch.export.save (or "
                    "mlflow.pytorch.log_model) and upload the new file", content="pt2+torch-zip")
    if fmt is None:
        if claimed:
            ctx.add(ReasonCode.NOT_A_CHECKPOINT,
                    f"zip archive with {len(z.entries)} entries but none of the torch layouts (<folder>/data.pkl "
                    "with version/byteorder, TorchScript, or torch.export .pt2)", HINT_NOT_CKPT)
        # Still look inside: a pickle hidden in any zip is reported for what it is.
        for n, e in enumerate(z.entries):
            if not n % 256:
                budget.tick()
            _scan_nested_entry(region, ctx, e, require_known=True)
        return FileFormat.UNKNOWN, claimed or bool(ctx.fs.findings)
    assert prefix is not None
    # torch-family archives: one folder, STORED entries, no hidden bytes.
    for e in z.entries:
        if not e.name.startswith(prefix + "/"):
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"entry {e.name!r} lies outside the archive folder {prefix!r} that torch reads", HINT_CORRUPT)
        if e.method == DEFLATED and not (fmt is FileFormat.TORCHSCRIPT and _ts_compressible(e.name, prefix)):
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"entry {e.name!r} is deflate-compressed ({e.csize:,} → {e.usize:,} bytes); torch writes "
                    "stored entries only, so the archive was rewritten by another tool", HINT_CORRUPT)
    for start, end in gaps(z)[:3]:
        ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                f"{end - start:,} byte(s) at offset {start:,} belong to no entry (hidden data between entries)",
                HINT_CORRUPT)
    if fmt is FileFormat.TORCH_EXPORT:
        _scan_pt2(region, ctx, z, prefix, by_name)
        # _scan_pt2 sniffs every member but its raw payloads and its JSON; a binary pickle named
        # *.json is not JSON, whatever reads it.
        for e in z.entries:
            if e.name.endswith(".json") and _head(region, e, 2)[:1] == b"\x80":
                _scan_nested_entry(region, ctx, e, require_known=False)
        return fmt, True
    extra = _torchscript_allow if fmt is FileFormat.TORCHSCRIPT else None
    ctx.fs.has_metadata = True
    # Records grouped by folder once (a per-pickle search of all entries was quadratic).
    folders: dict[str, dict[str, ZipEntry]] = {}
    for x in z.entries:
        if x.readable:
            parent, _, leaf = x.name.rpartition("/")
            folders.setdefault(parent, {})[leaf] = x
    pkl_names = [e for e in z.entries if e.name.endswith((".pkl", "debug_pkl"))]
    raw: set[str] = set()
    """Storage records: declared by a pickle with a matching size; torch reads them as raw bytes."""
    for e in pkl_names:
        rel = e.name[len(prefix) + 1:]
        # Only torch.save's data.pkl is read by torch.load(weights_only=True) (TorchScript has its
        # own C++ unpickler), so only it is held to what torch's safe unpickler can read.
        reports = _scan_pickle_entry(region, ctx, e, extra, torch_safe=fmt is FileFormat.TORCH_ZIP and rel == "data.pkl")
        if "/" in rel or not rel.endswith(".pkl") or not e.name.startswith(prefix + "/"):
            continue
        # torch.save's data.pkl keeps its storages under data/; TorchScript's constants.pkl under
        # constants/, traced_inputs.pkl under traced_inputs/ (the pickle's stem).
        folder = f"{prefix}/{rel[:-len('.pkl')]}"
        records = {leaf: x.usize for leaf, x in folders.get(folder, {}).items()}
        ctx.fs.storage_bytes += sum(records.values())
        # torch.jit.trace writes traced_inputs/ records empty (observed with torch 2.13): only the
        # pickles torch reads at load time are held to their records.
        if reports is not None and rel in ("data.pkl", "constants.pkl"):
            _check_storages(ctx, reports, records, folder, label=e.name)
            if fmt is FileFormat.TORCH_ZIP and rel == "data.pkl":
                _check_computed_offsets(ctx, region, z, prefix, reports)
        for r in reports or ():
            for sd in r.storages:
                if sd.key in records and (sd.numel is None or sd.itemsize is None
                                          or sd.numel * sd.itemsize == records[sd.key]):
                    raw.add(f"{folder}/{sd.key}")
    # Every other member is sniffed by its bytes: a pickle hidden under any name (extra.bin,
    # .data/version, an undeclared data/0) is a pickle, and a loader other than torch.load may read it.
    scanned = {e.name for e in pkl_names}
    for n, e in enumerate(z.entries):
        if not n % 256:
            budget.tick()
        if e.name not in raw and e.name not in scanned:
            _scan_nested_entry(region, ctx, e, require_known=True, extra_allow=extra)
    return fmt, True


def _scan_pickle_entry(region: Region, ctx: Ctx, e: ZipEntry, extra_allow: Any, *, torch_safe: bool = False,
                       hidden: bool = False) -> list[StreamReport] | None:
    """Scan a member as a pickle. ``hidden``: a member that is not named as one and merely starts
    like one; it is reported only if it turns out to be a pickle (``_is_pickle``)."""
    settings = ctx.settings
    if not e.readable or e.bomb or e.method not in (STORED, DEFLATED):
        return None  # a compression bomb is already CORRUPT_ARCHIVE: never inflate it
    window = e.usize
    if e.usize > settings.max_pickle_bytes:
        if not hidden:
            ctx.add(ReasonCode.RESOURCE_LIMIT,
                    f"pickle record {e.name!r} is {human(e.usize)}, above the scanner's limit of "
                    f"{human(settings.max_pickle_bytes)}", HINT_PICKLE_LIMIT)
            return None
        window = settings.max_pickle_bytes  # a big member that merely starts like a pickle: see below
    key = (region.base + e.data_offset, e.csize)
    if key in ctx.fs.seen:
        return None  # the same bytes under another name (overlap, already reported)
    ctx.fs.seen.add(key)
    # All pickles of one file together (TorchScript debug pickles, pt2 payloads, members that start
    # like pickles) get twice the single-pickle limit, so forged entry lists cannot multiply the work.
    if ctx.fs.pickle_bytes_scanned + window > 2 * settings.max_pickle_bytes:
        ctx.add(ReasonCode.RESOURCE_LIMIT,
                f"pickle records in this file add up to more than {human(2 * settings.max_pickle_bytes)}, twice "
                "the scanner's per-pickle limit", HINT_PICKLE_LIMIT)
        return None
    ctx.fs.pickle_bytes_scanned += window
    if window == e.usize:
        buf = read_entry(region, e, settings.max_pickle_bytes)
    elif e.method == STORED:
        buf = region.read(e.data_offset, window)
    else:
        got = inflate(region, e, limit=window, keep=True)
        buf = got[2][:window] if got else None
    if buf is None:
        return None  # damaged deflate data: already a CORRUPT_ARCHIVE from the CRC check
    reports, _end, trailing = scan_pickle_bytes(buf, settings, extra_allow=extra_allow)
    if hidden and not _is_pickle(reports):
        if window < e.usize and buf[:1] == b"\x80" and reports[-1].end is None:
            # A binary pickle larger than the scanner reads: what follows the window is unknown.
            ctx.add(ReasonCode.RESOURCE_LIMIT,
                    f"member {e.name!r} ({human(e.usize)}) is a pickle larger than the scanner's limit of "
                    f"{human(settings.max_pickle_bytes)}", HINT_PICKLE_LIMIT)
        return None
    if trailing:
        reports[-1].anomalies.append(Anomaly(len(buf), trailing))
    report_pickle(ctx, reports, label=f"pickle {e.name!r}", torch_safe=torch_safe)
    return reports


#: First bytes of a stream that CPython's unpickler can start on: PROTO, FRAME, MARK, GLOBAL, and
#: every opcode that pushes a value onto an empty stack (protocol 0/1 text and 2+ binary alike).
PICKLE_START = frozenset(b"(cNIJKMLFGSTUVXBC]})P" + bytes([0x80, 0x82, 0x83, 0x84, 0x88, 0x89, 0x8A, 0x8B, 0x8C,
                                                       0x8D, 0x8E, 0x8F, 0x95, 0x96, 0x97]))


def could_be_pickle(head: bytes) -> bool:
    """Whether an unpickler would get past the first opcode of ``head`` (cheap pre-filter)."""
    if not head or head[0] not in PICKLE_START:
        return False
    return head[0] != 0x80 or (len(head) > 1 and head[1] <= 5)


def _is_pickle(reports: list[StreamReport]) -> bool:
    """A member that starts like a pickle *is* one when a stream parsed to its STOP, called
    something (REDUCE/NEWOBJ/OBJ/INST run before any later break), or, after a PROTO opcode,
    imported a well-formed global. Text that merely begins with an opcode letter ("little", "def
    forward", "hello") breaks before any of that and is left alone."""
    for r in reports:
        if r.end is not None or r.calls:
            return True
        if "PROTO" in r.opcodes and (r.unsafe_count or r.globals):
            return True
    return False


def _head(region: Region, e: ZipEntry, n: int) -> bytes:
    """The first ``n`` bytes of a member's content (inflated if deflated)."""
    if not e.readable:
        return b""
    if e.method == STORED:
        return region.read(e.data_offset, min(n, e.csize))
    if e.method == DEFLATED:
        got = inflate(region, e, limit=n, keep=True)
        return got[2][:n] if got else b""
    return b""


def _check_storages(ctx: Ctx, reports: list[StreamReport], records: dict[str, int], prefix: str,
                    *, label: str) -> None:
    declared: dict[str, tuple[int | None, int | None, str]] = {}
    nbytes: dict[str, int] = {}
    missing = 0
    for r in reports:
        for s in r.storages:
            prev = declared.get(s.key)
            if prev is not None and prev != (s.numel, s.itemsize, s.storage_type):
                ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                        f"{label}: storage {s.key!r} is declared twice with different types or sizes "
                        f"({prev[2]} × {prev[0]} vs {s.storage_type} × {s.numel})", HINT_CORRUPT)
                continue
            declared[s.key] = (s.numel, s.itemsize, s.storage_type)
            if s.key not in records:
                if missing < 3:
                    ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                            f"{label}: storage {s.key!r} has no record {prefix}/{s.key} in the archive",
                            HINT_CORRUPT)
                missing += 1
                continue
            if s.numel is None or s.itemsize is None:
                continue
            want = s.numel * s.itemsize
            have = records[s.key]
            if want != have:
                ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                        f"{label}: storage {s.key!r} declares {s.numel:,} elements of {s.storage_type} "
                        f"({human(want)}) but its record {prefix}/{s.key} holds {have:,} bytes",
                        HINT_CORRUPT)
                continue
            nbytes[s.key] = want
    _check_tensors(ctx, [t for r in reports for t in r.tensors], nbytes, label)


def no_read_offset(cursor: int, name_len: int, size: int, alignment: int) -> int:
    """Where torch expects the data of a record whose local header starts at ``cursor``
    (``PyTorchStreamReader.get_record_offset_no_read``: miniz's header, torch's ``FB`` padding field up to
    ``alignment``, zip64 fields when the size or offset needs them)."""
    start = cursor + 30 + name_len + 4
    if size >= U32 or cursor >= U32:
        start += 4 + (16 if size >= U32 else 0) + (8 if cursor >= U32 else 0)
    return start + (-start % alignment)


def _check_computed_offsets(ctx: Ctx, region: Region, z: ZipArchive, prefix: str,
                            reports: list[StreamReport]) -> None:
    """``torch.load(mmap=True)`` with ``torch.utils.serialization.config.load.calculate_storage_offsets``
    (a documented speed-up) does not ask the central directory where a storage lies: it computes each
    offset from the previous storage's, in the order ``data.pkl`` first uses them (serialization.py
    ``_get_offset``), assuming torch.save's layout. A record moved (storages written in another order,
    another padding, no data descriptor) is then other bytes to such a host than to every other reader:
    the offsets must be the ones torch computes."""
    by_name = z.by_name()
    version = by_name.get(f"{prefix}/.format_version")
    raw = read_entry(region, version, 64) if version is not None else None
    if raw is None or raw < b"1":  # torch: ``version >= b"1"`` (bytes), else it reads the directory
        return
    alignment = 64
    align = by_name.get(f"{prefix}/.storage_alignment")
    if align is not None:
        try:
            alignment = int(read_entry(region, align, 64) or b"")
        except ValueError:
            alignment = 0
        if alignment < 1:
            ctx.add(ReasonCode.CORRUPT_ARCHIVE, f"record {prefix}/.storage_alignment is not a positive number",
                    "re-save the checkpoint with torch.save and upload the new file")
            return
    cursor: int | None = None
    for key in dict.fromkeys(s.key for r in reports for s in r.storages):
        e = by_name.get(f"{prefix}/data/{key}")
        if e is None or not e.readable or (cursor is None and key != "0"):
            return  # reported elsewhere, or torch refuses to compute (its first storage must be "0")
        if cursor is None:
            header, expected = e.header_offset, e.data_offset
        else:
            header, expected = cursor, no_read_offset(cursor, len(e.raw_name), e.usize, alignment)
        if expected != e.data_offset:
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"storage record {e.name!r} lies at offset {e.data_offset:,}, but torch.load(mmap=True) with "
                    f"calculate_storage_offsets computes {expected:,} from the order data.pkl uses its storages: a "
                    "serving host with that setting reads other bytes for its tensor",
                    "re-save the checkpoint with torch.save (it writes storages in the order its pickle uses them) "
                    "and upload the new file", kind="computed-offsets")
            return
        cursor = expected + e.usize
        if e.usize > 0:
            cursor += 24 if header >= U32 or e.usize >= U32 else 16


def _scan_nested_entry(region: Region, ctx: Ctx, e: ZipEntry, *, require_known: bool,
                       extra_allow: Any = None) -> None:
    """Sniff one archive entry by its bytes and scan it as what it is (nested zip, native code, or,
    whatever its name and compression, a pickle)."""
    if not e.readable or e.csize == 0 or e.method not in (STORED, DEFLATED):
        return
    key = (region.base + e.data_offset, e.csize)
    if key in ctx.fs.seen:
        return
    if e.method == DEFLATED:
        if could_be_pickle(_head(region, e, 2)):
            _scan_pickle_entry(region, ctx, e, extra_allow, hidden=True)
        return
    sub = region.sub(e.data_offset, e.csize, e.name)
    kind, head = sniff(sub)
    inner = ctx.inner(e.name)
    if kind is Kind.ZIP:
        ctx.fs.seen.add(key)
        if ctx.nesting + 1 >= MAX_NESTING:
            inner.add(ReasonCode.CORRUPT_ARCHIVE, f"archives nested more than {MAX_NESTING} deep", HINT_CORRUPT)
            return
        ctx.fs.nested_scans += 1
        if ctx.fs.nested_scans > MAX_NESTED_SCANS:
            if ctx.fs.nested_scans == MAX_NESTED_SCANS + 1:
                inner.add(ReasonCode.CORRUPT_ARCHIVE, f"more than {MAX_NESTED_SCANS} archives inside one file",
                          HINT_CORRUPT)
            return
        scan_zip(sub, inner, claimed=not require_known)
    elif kind is Kind.NATIVE:
        inner.add(ReasonCode.UNSUPPORTED_FORMAT,
                  f"archive holds {describe(kind, head)} (native code, e.g. an AOTInductor package)",
                  "export with torch.export.save / mlflow.pytorch.log_model(serialization_format='pt2') without "
                  "AOTInductor compilation; compiled code cannot be validated")
    elif could_be_pickle(head):
        _scan_pickle_entry(region, ctx, e, extra_allow, hidden=True)


def _json_entry(region: Region, ctx: Ctx, e: ZipEntry) -> Any:
    data = read_entry(region, e, MAX_JSON_BYTES)
    if data is None:
        ctx.add(ReasonCode.CORRUPT_ARCHIVE, f"{e.name!r} is unreadable or larger than {human(MAX_JSON_BYTES)}",
                HINT_CORRUPT)
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        ctx.add(ReasonCode.CORRUPT_ARCHIVE, f"{e.name!r} is not valid JSON ({str(exc)[:120]})", HINT_CORRUPT)
        return None


def _pt2_int(v: Any) -> int | None:
    if isinstance(v, dict) and isinstance(v.get("as_int"), int) and not isinstance(v.get("as_int"), bool):
        return v["as_int"]
    return None


def report_pt2_reading(ctx: Ctx, reading: pt2_grammar.Reading, member: str) -> None:
    """One finding per reason code of a strict pt2 read (the first problems named, then a count)."""
    by_code: dict[ReasonCode, list[pt2_grammar.Problem]] = {}
    for p in reading.problems:
        by_code.setdefault(p.code, []).append(p)
    for code, problems in by_code.items():
        one = pt2_grammar.Reading(problems=problems[:8], more=max(0, len(problems) - 8) + reading.more)
        hint = pt2_grammar.HINT_SCHEMA if code is ReasonCode.UNSUPPORTED_FORMAT else pt2_grammar.HINT
        ctx.add(code, f"pt2 program {one.summary(member)}", hint, fields=[p.field for p in problems[:20]])


def _scan_pt2(region: Region, ctx: Ctx, z: ZipArchive, prefix: str, by_name: dict[str, ZipEntry]) -> None:  # noqa: C901
    """torch.export archives: JSON graph + payload configs + raw weights. Payloads marked
    ``use_pickle`` and the sample inputs are torch.save archives that torch.export.load unpickles
    with ``weights_only=False`` (torch/export/pt2_archive/_package.py; sample inputs fall back to it
    after a failed safe load), so they get the full pickle scan."""
    ctx.fs.has_metadata = True
    # Every record under models/ is a program to torch, whatever its extension (pt2_grammar.MODELS_DIR).
    models = [e for e in z.entries if pt2_grammar.is_program_record(e.name[len(prefix) + 1:])]
    if not models:
        ctx.add(ReasonCode.CORRUPT_ARCHIVE, f"pt2 archive has no {prefix}/models/*.json (no exported program)",
                HINT_CORRUPT)
    for e in models:
        odd = pt2_grammar.program_record_problem(e.name[len(prefix) + 1:])
        if odd is not None:
            report_pt2_reading(ctx, pt2_grammar.Reading(problems=[odd]), e.name)
        # The program's strings become Python that torch runs (guards, generated forward, sympify):
        # read under a strict grammar first (scan/pt2.py says which fields and why).
        doc = _json_entry(region, ctx, e)
        if doc is not None:
            report_pt2_reading(ctx, pt2_grammar.read_program(doc), e.name)
    raw_payloads: set[str] = set()
    pickled: set[str] = set()
    counted: set[str] = set()
    for e in z.entries:
        rel = e.name[len(prefix) + 1:]
        is_weights = rel.startswith("data/weights/") and rel.endswith("_weights_config.json")
        is_consts = rel.startswith("data/constants/") and rel.endswith("_constants_config.json")
        if not (is_weights or is_consts):
            continue
        base = "data/weights/" if is_weights else "data/constants/"
        cfg = _json_entry(region, ctx, e)
        if cfg is None:
            continue
        config = cfg.get("config") if isinstance(cfg, dict) else None
        if not isinstance(config, dict):
            ctx.add(ReasonCode.CORRUPT_ARCHIVE, f"{e.name!r} has no 'config' object", HINT_CORRUPT)
            continue
        names = pt2_grammar.Reading(problems=pt2_grammar.read_payload_config(cfg))
        report_pt2_reading(ctx, names, e.name)
        for fqn, meta in list(config.items())[:1_000_000]:
            if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
                ctx.add(ReasonCode.CORRUPT_ARCHIVE, f"{e.name!r}: payload {fqn!r} has no path_name", HINT_CORRUPT)
                continue
            path_name = meta["path_name"]
            if "/" in path_name or path_name in ("", ".", ".."):
                ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                        f"{e.name!r}: payload {fqn!r} points outside {base} ({path_name!r})", HINT_CORRUPT)
                continue
            record = f"{prefix}/{base}{path_name}"
            entry = by_name.get(record)
            if entry is None:
                ctx.add(ReasonCode.CORRUPT_ARCHIVE, f"{e.name!r}: payload {fqn!r} has no record {record}",
                        HINT_CORRUPT)
                continue
            if meta.get("use_pickle"):
                pickled.add(record)
                continue  # a torch.save archive: scanned (and counted) below like every non-raw record
            if record not in counted:
                counted.add(record)
                ctx.fs.storage_bytes += entry.usize
            raw_payloads.add(record)
            tm = meta.get("tensor_meta")
            if not isinstance(tm, dict):
                ctx.add(ReasonCode.CORRUPT_ARCHIVE, f"{e.name!r}: payload {fqn!r} has no tensor_meta", HINT_CORRUPT)
                continue
            dtype = tm.get("dtype")
            itemsize = PT2_SCALAR_ITEMSIZE.get(dtype) if isinstance(dtype, int) else None
            raw_sizes, raw_strides = tm.get("sizes"), tm.get("strides")
            if not isinstance(raw_sizes, list) or not isinstance(raw_strides, list):
                ctx.add(ReasonCode.CORRUPT_ARCHIVE, f"{e.name!r}: payload {fqn!r} has no sizes/strides lists",
                        HINT_CORRUPT)
                continue
            sizes = [_pt2_int(s) for s in raw_sizes]
            strides = [_pt2_int(s) for s in raw_strides]
            offset = _pt2_int(tm.get("storage_offset")) if "storage_offset" in tm else 0
            if itemsize is None or None in sizes or None in strides or offset is None or len(sizes) != len(strides):
                continue  # symbolic or unknown: torch.export.load validates these itself
            t = TensorDecl(record, offset, tuple(sizes), tuple(strides), itemsize, "pt2", 0, name=fqn)
            # torch.export.load turns a 0-byte record into torch.zeros(sizes): a tiny file could
            # declare terabytes, so an empty record is held to the declared size like any other.
            if entry.usize % itemsize:
                ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                        f"payload {fqn!r}: record {record} holds {entry.usize:,} bytes, not a whole number of "
                        f"{itemsize}-byte elements", HINT_CORRUPT)
                continue
            _check_tensors(ctx, [t], {record: entry.usize}, f"pt2 {e.name!r}")
    programs = {e.name for e in models}
    # A record that any payload loads with use_pickle is unpickled by torch (weights_only=False), even
    # when another FQN names the same record as raw bytes: it is never skipped as a raw payload.
    raw_payloads -= pickled
    for e in z.entries:
        if e.name in raw_payloads or e.name in programs or e.name.endswith(".json"):
            continue
        _scan_nested_entry(region, ctx, e, require_known=False)


# -- legacy torch, plain pickles --------------------------------------------------------------------


#: A legacy torch file's pickles are KBs followed by gigabytes of raw storage: read this much first.
PICKLE_PREFIX = 4 * 2**20


def _pickle_prefix(region: Region, settings: Settings, cache: StreamCache) -> bytes:
    """The bytes holding the file's pickle streams: a small prefix when the streams (at most the
    five of a legacy file) end inside it, else up to ``max_pickle_bytes``."""
    limit = min(region.size, settings.max_pickle_bytes)
    small = region.read(0, min(limit, PICKLE_PREFIX))
    if len(small) >= limit:
        return small
    pos = 0
    for _ in range(5):
        rep = cache.scan(small, pos, settings)
        if rep.end is None:
            return region.read(0, limit)  # ran out of prefix (or broken): decide on the full window
        pos = rep.end
        if pos >= len(small):
            return small if len(small) == region.size else region.read(0, limit)
        if small[pos:pos + 1] != b"\x80":
            break
    return small


def scan_pickle_file(region: Region, ctx: Ctx, kind: Kind, *, claimed: bool) -> tuple[FileFormat | None, bool]:
    """A file that starts like a pickle: legacy torch (five streams + raw storages) or plain."""
    settings = ctx.settings
    limit = settings.max_pickle_bytes
    cache = StreamCache()
    buf = _pickle_prefix(region, settings, cache)
    first = cache.scan(buf, 0, settings)
    if kind is Kind.PICKLE_TEXT and not first.looks_like_pickle:
        return None, False  # text that merely starts with an opcode letter
    if first.end is not None and first.result == LEGACY_TORCH_MAGIC and not first.hostile:
        return _scan_legacy(region, ctx, buf, first, cache)
    reports, end, trailing = scan_pickle_bytes(buf, settings, cache=cache)
    truncated_by_limit = region.size > len(buf) and (reports[-1].end is None or end >= len(buf))
    if truncated_by_limit:
        reports[-1].error = None
        ctx.add(ReasonCode.RESOURCE_LIMIT,
                f"pickle of {human(region.size)} is larger than the scanner's limit of {human(limit)}",
                HINT_PICKLE_LIMIT)
    elif trailing:
        reports[-1].anomalies.append(Anomaly(end, trailing))
    before = len(ctx.fs.findings)
    report_pickle(ctx, reports, label="pickle")
    if len(ctx.fs.findings) > before or truncated_by_limit:
        ctx.fs.storage_bytes += region.size
        return FileFormat.PICKLE, True
    # A clean pickle without torch's legacy header: torch.load cannot read it (it checks the magic
    # number first), and loading it any other way would be plain pickle.load.
    if claimed:
        ctx.add(ReasonCode.NOT_A_CHECKPOINT,
                "a plain Python pickle without torch's header (no magic number): torch.load cannot read it",
                "save the weights with torch.save(model.state_dict(), path) (or as safetensors) instead of "
                "pickle.dump / joblib")
    return FileFormat.PICKLE, False


def _scan_legacy(region: Region, ctx: Ctx, buf: bytes, first: StreamReport,  # noqa: C901
                 cache: StreamCache | None = None) -> tuple[FileFormat, bool]:
    """torch.save(..., _use_new_zipfile_serialization=False): magic, protocol version, sys_info,
    the object, the storage keys, then for each key an int64 element count and the raw bytes."""
    settings = ctx.settings
    reports = [first]
    pos = first.end or 0
    for _ in range(4):
        if pos >= len(buf):
            break
        rep = cache.scan(buf, pos, settings) if cache else scan_stream(buf, pos, settings)
        reports.append(rep)
        if rep.end is None:
            break
        pos = rep.end
    if region.size > len(buf):
        for r in reports:
            if r.end is None:
                r.error = None  # cut by the scanner's own limit, reported as RESOURCE_LIMIT below
    # torch.load reads all five streams with its weights_only unpickler.
    hostile = report_pickle(ctx, reports, label="legacy torch pickle", torch_safe=True)
    ctx.fs.has_metadata = True
    if len(reports) < 5 or any(r.end is None for r in reports):
        if region.size > len(buf):
            ctx.add(ReasonCode.RESOURCE_LIMIT,
                    f"legacy torch pickles run past the scanner's limit of {human(settings.max_pickle_bytes)}",
                    HINT_PICKLE_LIMIT)
        elif not any(r.error for r in reports):
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"legacy torch file ends after {len(reports)} of its 5 pickle streams (truncated)", HINT_CORRUPT)
        ctx.fs.storage_bytes += region.size
        return FileFormat.TORCH_LEGACY, True
    if hostile:
        ctx.fs.storage_bytes += region.size
        return FileFormat.TORCH_LEGACY, True
    keys = str_items(reports[4].result)
    if keys is None:
        ctx.add(ReasonCode.CORRUPT_ARCHIVE, "legacy torch file: the fifth stream is not the list of storage keys",
                HINT_CORRUPT)
        ctx.fs.storage_bytes += region.size
        return FileFormat.TORCH_LEGACY, True
    decls: dict[Any, Any] = {}
    for s in reports[3].storages:
        decls.setdefault(s.key, s)
    off = pos
    nbytes: dict[str, int] = {}
    for key in keys:
        d = decls.get(key)
        if d is None or d.itemsize is None:
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"legacy torch file: storage key {key!r} is listed but never declared by the pickle", HINT_CORRUPT)
            return FileFormat.TORCH_LEGACY, True
        head = region.read(off, 8)
        if len(head) < 8:
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"legacy torch file: truncated before storage {key!r} (offset {off:,})", HINT_CORRUPT)
            return FileFormat.TORCH_LEGACY, True
        (numel,) = struct.unpack("<q", head)
        size = numel * d.itemsize
        if numel < 0 or (d.numel is not None and numel != d.numel):
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"legacy torch file: storage {key!r} at offset {off:,} records {numel:,} elements of "
                    f"{d.storage_type} but the pickle declares {d.numel}", HINT_CORRUPT)
            return FileFormat.TORCH_LEGACY, True
        if off + 8 + size > region.size:
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"legacy torch file: storage {key!r} needs {size:,} bytes at offset {off + 8:,} but only "
                    f"{max(region.size - off - 8, 0):,} remain (truncated)", HINT_CORRUPT)
            return FileFormat.TORCH_LEGACY, True
        nbytes[key] = size
        ctx.fs.storage_bytes += size
        off += 8 + size
    if off != region.size:
        rest = region.read(off, min(region.size - off, settings.max_pickle_bytes))
        tail, _, _ = scan_pickle_bytes(rest, settings)
        if any(t.hostile for t in tail):
            report_pickle(ctx, tail, label=f"data after the last storage (offset {off:,})")
        else:
            ctx.add(ReasonCode.UNSAFE_PICKLE,
                    f"legacy torch file: {region.size - off:,} byte(s) after the last storage (offset {off:,}) "
                    "belong to nothing torch reads (hidden data)", HINT_CONFUSION)
    _check_tensors(ctx, reports[3].tensors, nbytes, "legacy torch pickle")
    return FileFormat.TORCH_LEGACY, True


# -- tar, safetensors -------------------------------------------------------------------------------


def _tar_names(region: Region, limit: int = 64) -> list[str]:
    names: list[str] = []
    off = 0
    while len(names) < limit and off + 512 <= region.size:
        h = region.read(off, 512)
        if h == b"\x00" * 512:
            break
        name = h[:100].split(b"\x00", 1)[0].decode("utf-8", "replace")
        try:
            size = int(h[124:136].split(b"\x00", 1)[0].strip() or b"0", 8)
        except ValueError:
            break
        names.append(name)
        off += 512 + (size + 511) // 512 * 512
    return names


def scan_tar(region: Region, ctx: Ctx, *, claimed: bool) -> tuple[FileFormat, bool]:
    names = {posixpath.basename(n.rstrip("/")) for n in _tar_names(region)}
    if {"storages", "tensors", "pickle"} <= names or {"sys_info", "pickle"} <= names:
        ctx.add(ReasonCode.UNSUPPORTED_FORMAT,
                "legacy tar-format torch checkpoint (torch < 0.4): this runtime does not load it",
                "load it with an old torch in a trusted environment and re-save: torch.save(model.state_dict(), "
                "path) with a current torch, or as safetensors")
        return FileFormat.TORCH_LEGACY, True
    if claimed:
        ctx.add(ReasonCode.NOT_A_CHECKPOINT, "a tar archive, not a model checkpoint",
                "unpack it and register the checkpoint file itself")
    return FileFormat.UNKNOWN, claimed


def scan_safetensors(region: Region, ctx: Ctx) -> tuple[FileFormat, bool]:
    info = check_safetensors(region)
    for p in info.problems[:10]:
        ctx.add(ReasonCode.CORRUPT_ARCHIVE, f"safetensors header: {p}", HINT_CORRUPT)
    ctx.fs.storage_bytes += info.data_bytes if not info.problems else region.size
    ctx.fs.has_metadata = not info.problems
    if not info.problems and ctx.nesting == 0:
        ctx.fs.st_header_len = info.header_len
    return FileFormat.SAFETENSORS, True


# -- one file --------------------------------------------------------------------------------------


def scan_region(region: Region, ctx: Ctx, path: str, *, mlflow_dir: bool) -> tuple[FileFormat, bool]:
    """Scan one file under its deadline; returns (format, counts as a checkpoint).

    Past the deadline the file is quarantined RESOURCE_LIMIT (model-caused, so never retried in a
    loop and never passed): every loop over the file's own data ticks the budget, so only input
    built to exhaust the scanner (or a file far beyond what the settings expect) gets there. Not
    UNSAFE_PICKLE: a slow scan proves no intent, and the owner of a genuine giant gets a hint."""
    seconds = budget.allowance(ctx.settings.scan_deadline_s, region.size) if ctx.settings.scan_deadline_s else 0
    try:
        with budget.deadline(seconds):
            fmt, counts = _scan_region(region, ctx, path, mlflow_dir=mlflow_dir)
            _name_and_content(ctx, path, fmt)
            return fmt, counts
    except budget.ScanDeadline as exc:
        ctx.add(ReasonCode.RESOURCE_LIMIT,
                f"{exc} ({human(region.size)} file, CKPT_STAGE_SCAN_DEADLINE_S={ctx.settings.scan_deadline_s:g} "
                f"plus 1 s per {human(budget.BYTES_PER_SECOND)}); what was found before it is listed",
                HINT_SCAN_DEADLINE)
        return FileFormat.UNKNOWN, True


#: Formats torch.load reads by content: a file of one of these named ``*.safetensors`` is another file to it.
_TORCH_LOAD_FORMATS = frozenset({FileFormat.TORCH_ZIP, FileFormat.TORCH_LEGACY, FileFormat.PICKLE,
                                 FileFormat.TORCHSCRIPT, FileFormat.TORCH_EXPORT})


def _name_and_content(ctx: Ctx, path: str, fmt: FileFormat) -> None:
    """torch.load (2.13, ``serialization.load``) hands a path ending in ``.safetensors`` to the safetensors
    reader whatever it holds, and reads any other path by its content; transformers picks its reader by the
    same suffix. The stage reads by content, so the name and the content must agree."""
    named = path.endswith(".safetensors")
    if named and fmt in _TORCH_LOAD_FORMATS:
        ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                f"the file is named .safetensors but holds a {fmt.value} file: torch.load and transformers read "
                "a .safetensors path with the safetensors reader, the stage reads the content, so the two "
                "would load different things (here: nothing, on a serving host)",
                "name the file for what it holds (torch.save output: .pt or .bin), or write it with "
                "safetensors.torch.save_file", kind="name-content")
    elif fmt is FileFormat.SAFETENSORS and not named:
        ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                f"the file holds safetensors but is named {posixpath.basename(path)!r}: torch.load and "
                "transformers read a path that does not end in .safetensors as a torch.save file (a pickle), "
                "so a serving host would not load what the stage validated",
                "rename the file to end in .safetensors (model.safetensors for Hugging Face folders)",
                kind="name-content")


def _tar_header(region: Region) -> bool:
    """The first 512 bytes are a tar header that Python's tarfile accepts (checksum included)."""
    block = region.read(0, 512)
    if len(block) < 512:
        return False
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except (tarfile.TarError, ValueError, UnicodeError):
        return False
    return True


def _scan_region(region: Region, ctx: Ctx, path: str, *, mlflow_dir: bool) -> tuple[FileFormat, bool]:
    claimed = claims_checkpoint(path, mlflow_dir=mlflow_dir)
    kind, head = sniff(region)
    ctx.fs.container = kind.value
    if kind not in (Kind.ZIP, Kind.TAR) and not path.endswith(".safetensors") and _tar_header(region):
        # torch.load tries a non-zip file as a legacy tar checkpoint before its pickle streams
        # (serialization.py legacy_load): with weights_only=False (MLflow's pickle flavor) it unpickles the
        # tar's members, wherever they lie (inside a string, inside a storage's raw bytes).
        ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                f"the file reads as {describe(kind, head)} to the scan but its first 512 bytes are also a valid tar "
                "header: torch.load reads it as a legacy tar checkpoint first and unpickles the tar's members, "
                "which are not the pickle streams the scan read: a file with two meanings is not loaded",
                "no torch writer produces this; re-save the weights with torch.save(model.state_dict(), path) or "
                "as safetensors and upload the new file", content="tar-polyglot")
    if kind is Kind.SAFETENSORS:
        polyglot = live_pickle(region, ctx.settings)
        if polyglot is not None:
            # torch.load would read this file as a pickle: scan it as one (its globals are reported),
            # and refuse the double meaning itself even when the pickle is harmless.
            what = ("imports globals" if polyglot.globals
                    else "starts like a legacy torch file" if polyglot.end is not None and not polyglot.limit
                    else "is too long to decide within the scanner's limits")
            ctx.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"the file is a well-formed safetensors file and also a pickle stream that {what} "
                    "(torch.load reads it as a pickle): a file with two meanings is not loaded",
                    "no safetensors writer produces this; re-save the weights with "
                    "safetensors.torch.save_file and upload the new file", content="safetensors+pickle")
            kind = Kind.PICKLE
    if kind is Kind.ZIP:
        return scan_zip(region, ctx, claimed=claimed)
    if kind in (Kind.PICKLE, Kind.PICKLE_TEXT) or (kind is Kind.BINARY and could_be_pickle(head)):
        # BINARY: CPython's unpickler needs no PROTO opcode, so a stream may start with FRAME,
        # SHORT_BINUNICODE...; it is a pickle if the walker confirms it (as for protocol 0/1 text).
        fmt, counts = scan_pickle_file(region, ctx, Kind.PICKLE if kind is Kind.PICKLE else Kind.PICKLE_TEXT,
                                       claimed=claimed)
        if fmt is not None:
            return fmt, counts
        kind = Kind.TEXT if head and b"\x00" not in head else Kind.BINARY
    if kind is Kind.SAFETENSORS or (extension(path) == ".safetensors" and kind in (Kind.BINARY, Kind.TEXT)):
        return scan_safetensors(region, ctx)
    if kind is Kind.TAR:
        return scan_tar(region, ctx, claimed=claimed)
    if kind is Kind.SEVEN_ZIP:
        ctx.add(ReasonCode.UNSUPPORTED_FORMAT, "a 7-Zip archive: its content cannot be scanned or loaded",
                "unpack it and register the checkpoint file itself")
        return FileFormat.UNKNOWN, True
    if posixpath.basename(path) == "MLmodel" and kind is Kind.TEXT:
        return FileFormat.MLFLOW_MODEL, False
    if claimed:
        what = describe(kind, head)
        ctx.add(ReasonCode.NOT_A_CHECKPOINT,
                f"{what}{f' ({region.size:,} bytes)' if kind is not Kind.EMPTY else ' (0 bytes)'}, not a model "
                "checkpoint", HINT_NOT_CKPT, content=kind.value)
    return FileFormat.UNKNOWN, False
