"""``validate_version(ref)``: claim → fetch → scan → estimate → load → decide → record.

The only module that wires adapters together. Airflow tasks, the CLI and the dashboard call these
functions and nothing below them. Model problems become findings (a verdict); infrastructure
problems become findings with infrastructure codes (verdict ``error``, never a quarantine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import stat
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_stage.config import PREFIX, Settings, parse_arch_kwargs
from ckpt_stage.domain import (
    Decision,
    FileFormat,
    FileInfo,
    Finding,
    ReasonCode,
    Report,
    VersionRef,
)
from ckpt_stage.errors import (
    CkptStageError,
    ConfigError,
    ObjectChanged,
    RegistryUnavailable,
    StorageMisconfigured,
    StorageUnavailable,
    UsageError,
    retry_detail,
)
from ckpt_stage.policy import decide, summarize
from ckpt_stage.registry import (
    ARCH,
    ARCH_KWARGS,
    ATTEMPT,
    LEASE_OWNER,
    REASONS,
    RUN_ID,
    Registry,
    VersionState,
    default_owner,
    now_utc,
)
from ckpt_stage.sandbox.job import LoadJob, LoadResult
from ckpt_stage.scan import ScanResult, scan_version
from ckpt_stage.scan.estimate import oversized_files
from ckpt_stage.scan.pickles import torch_legacy_tensors, torch_zip_tensors
from ckpt_stage.scan.reading import Reading, stamp_of
from ckpt_stage.storage import (
    Listing,
    LocalFile,
    RemoteFile,
    S3Location,
    S3Storage,
    resolve_artifact_uri,
    sha256_file,
    version_digest,
)

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Checked:
    """Everything the checks produced for one set of local files."""

    files: tuple[FileInfo, ...]
    findings: tuple[Finding, ...]
    scan: ScanResult
    load: LoadResult | None
    timings_s: dict[str, float]
    limit_bytes: int

    def replace(self, *, findings: tuple[Finding, ...], hashes: dict[str, str]) -> Checked:
        files = tuple(dataclasses.replace(f, sha256=hashes.get(f.path, f.sha256)) for f in self.files)
        return dataclasses.replace(self, files=files, findings=findings)


def _runtime_here() -> dict[str, str]:
    """The runtime a report names when no worker ran. From package metadata, never by importing:
    ``import torch`` costs seconds and the parent orchestrates without it (the wheel's metadata
    version carries the build label too, ``2.13.0+cpu``, as the worker's ``torch.__version__``)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "mlflow"):
        try:
            out[dist] = version(dist)
        except (PackageNotFoundError, ValueError):
            pass
    return out


def run_worker(job: LoadJob, settings: Settings) -> LoadResult:
    from ckpt_stage.sandbox.runner import run_job

    return run_job(job, settings)


def prewarm_worker(settings: Settings) -> None:
    """Start the worker's fork server in the background while the download runs (it costs about a
    second of imports); a no-op when ``run_worker`` was replaced (tests) or the server is up."""
    if run_worker is not _REAL_RUN_WORKER:
        return
    from ckpt_stage.sandbox.runner import prewarm

    prewarm(settings)


_REAL_RUN_WORKER = run_worker


def check_local(
    root: Path,
    rels: Sequence[str],
    settings: Settings,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    hashes: dict[str, str] | None = None,
    stamps: dict[str, tuple[int, int, int, int]] | None = None,
    extra_findings: Sequence[Finding] = (),
) -> Checked:
    """Sizes from metadata, static scan, estimate, then (only if nothing blocking was found) the
    isolated load, which gets the scan's reading of every file (``scan.reading``) and obeys it."""
    timings: dict[str, float] = {}
    hashes = dict(hashes or {})
    too_big = _oversized(root, rels, settings)
    if too_big is not None:  # decided from st_size: nothing read, nothing hashed
        return too_big.replace(findings=tuple(extra_findings) + too_big.findings, hashes=hashes)
    t0 = time.perf_counter()
    scan = scan_version(root, rels, settings)
    timings["scan"] = time.perf_counter() - t0
    files = tuple(
        FileInfo(rel, (root / rel).stat().st_size, hashes.get(rel) or sha256_file(root / rel),
                 scan.formats.get(rel, FileFormat.UNKNOWN))
        for rel in rels
    )
    findings = list(extra_findings) + list(scan.findings)  # RESOURCE_LIMIT over every class comes from the scan
    readings = tuple(_pinned(scan.readings[f.path], f.sha256, f.path in hashes, (stamps or {}).get(f.path))
                     for f in files if f.path in scan.readings)
    findings.extend(_changed_while_scanned(root, readings))
    limit = (settings.class_for(scan.estimated_bytes) or settings.largest_class).memory_bytes
    load: LoadResult | None = None
    if not any(f.blocking for f in findings):
        job = LoadJob(
            root=str(root),
            files=tuple((rel, scan.formats.get(rel, FileFormat.UNKNOWN).value) for rel in rels),
            readings=readings,
            arch=arch,
            arch_kwargs=dict(arch_kwargs or {}),
            arch_modules=settings.arch_modules,
            pickle_modules=settings.pickle_modules,
            allow_pickled_models=settings.allow_pickled_models,
            model_code=dict(scan.model_code),
            require_input_example=settings.require_input_example,
            timeout_s=settings.worker_timeout_s,
            cpu_s=settings.worker_cpu_s,
            memory_bytes=limit,
            expected=expected_facts(root, rels, scan),
        )
        load = run_worker(job, settings)
        findings.extend(load.findings)
        timings.update(load.timings_s)
    return Checked(files, tuple(findings), scan, load, timings, limit)


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16",
                       "U32": "uint32", "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
                       "F8_E5M2": "float8_e5m2"}
_MODEL_FORMATS = {FileFormat.TORCH_ZIP, FileFormat.TORCH_LEGACY, FileFormat.SAFETENSORS, FileFormat.TORCH_EXPORT,
                  FileFormat.TORCHSCRIPT, FileFormat.PICKLE}


def expected_facts(root: Path, rels: Sequence[str], scan: ScanResult) -> dict[str, Any]:
    """What the worker must report having loaded, read here from bytes the scan already accepted, for
    the runner's cross-check (``runner.cross_check``). Only where it is unambiguous: one safetensors
    file is the whole state_dict, its header names every tensor, shape and dtype."""
    ckpts = [rel for rel in rels if scan.formats.get(rel) in _MODEL_FORMATS]
    if len(ckpts) != 1:
        return {}
    if scan.formats.get(ckpts[0]) is FileFormat.TORCH_ZIP:
        # A torch.save'd state_dict: its data.pkl names every tensor, shape and storage type.
        tensors = torch_zip_tensors(root / ckpts[0], scan.readings.get(ckpts[0]))
        return {"tensors": tensors} if tensors else {}
    if scan.formats.get(ckpts[0]) is FileFormat.TORCH_LEGACY:
        tensors = torch_legacy_tensors(root / ckpts[0])
        return {"tensors": tensors} if tensors else {}
    if scan.formats.get(ckpts[0]) is not FileFormat.SAFETENSORS:
        return {}
    try:
        with open(root / ckpts[0], "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n <= 100 * 2**20 else {}
        tensors = {name: {"shape": [int(d) for d in t["shape"]], "dtype": _SAFETENSORS_DTYPES[t["dtype"]]}
                   for name, t in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # the scan judged the header; an expectation is only a cross-check
    return {"tensors": tensors} if tensors else {}


def _oversized(root: Path, rels: Sequence[str], settings: Settings,
               sizes: dict[str, int] | None = None) -> Checked | None:
    """The outcome for files too big for every worker, decided from their sizes (``sizes``, or
    ``st_size``) before anything is read, hashed, copied or downloaded; None when all fit."""
    if sizes is None:
        sizes = {rel: (root / rel).stat().st_size for rel in rels}
    findings = oversized_files(sizes, settings)
    if not findings:
        return None
    files = tuple(FileInfo(rel, sizes.get(rel, 0), "", FileFormat.UNKNOWN) for rel in rels)
    return Checked(files, tuple(findings), ScanResult(findings=tuple(findings)), None, {"scan": 0.0},
                   settings.largest_class.memory_bytes)


def _pinned(reading: Reading, sha256: str, hashed_before: bool,
            stamp: tuple[int, int, int, int] | None) -> Reading:
    """The reading the worker obeys, with the digest of the scanned bytes.

    The worker trusts the digest without hashing again when the file's stamp is still the scan's
    (``loader._formats``). That holds only if the digest was made of the bytes the scan read: true
    for a digest made here after the scan (``_changed_while_scanned`` proves nothing wrote in
    between), and for the download's digest when the file's stamp right after the download equals
    the scan's. Otherwise the stamp is cleared and the worker hashes the whole file again.
    """
    if hashed_before and (stamp is None or tuple(stamp) != tuple(reading.stamp)):
        return dataclasses.replace(reading, sha256=sha256, stamp=(0, 0, 0, 0))
    return dataclasses.replace(reading, sha256=sha256)


def _changed_while_scanned(root: Path, readings: Sequence[Reading]) -> list[Finding]:
    """The digest the worker will check covers the bytes the scan read only if nothing wrote to the
    file from the scan's open to the end of hashing: a write moves ctime, which its owner cannot reset."""
    out = []
    for r in readings:
        try:
            now = stamp_of((root / r.path).stat())
        except OSError:
            now = (0, 0, 0, 0)
        if now != r.stamp:
            out.append(Finding(ReasonCode.CORRUPT_ARCHIVE, f"{r.path} was modified while it was being scanned",
                               "validate it again once nothing writes to the file", file=r.path))
    return out


def build_report(
    checked: Checked | None,
    decision: Decision,
    *,
    model: VersionRef | None,
    attempt: int,
    findings: Sequence[Finding],
    timings: dict[str, float],
    files: Sequence[FileInfo] = (),
) -> Report:
    load = checked.load if checked else None
    info = dict(load.info) if load else {}
    return Report(
        verdict=decision.verdict,
        reasons=decision.reasons,
        model=model,
        files=tuple(checked.files if checked else files),
        runtime=dict(load.runtime) if load and load.runtime else _runtime_here(),
        # What the worker read wins; what the scan read from MLmodel fills in when it did not run.
        recorded={**(checked.scan.recorded if checked else {}), **(load.recorded if load else {})},
        timings_s=timings,
        resources={
            "peak_anon_bytes": load.peak_anon_bytes if load else 0,
            "estimated_bytes": checked.scan.estimated_bytes if checked else 0,
            "limit_bytes": checked.limit_bytes if checked else 0,
        },
        attempt=attempt,
        findings=tuple(findings),
        summary=summarize(decision),
        isolation=dict(load.isolation) if load else {},
        extra={"model_info": info} if info else {},
    )


def _internal(exc: BaseException) -> Finding:
    return Finding(
        ReasonCode.INTERNAL_ERROR,
        f"the stage failed: {type(exc).__name__}: {exc}",
        "this is a bug in ckpt-stage; the version stays eligible for a re-run",
        detail={"traceback": traceback.format_exc()[-4000:]},
    )


def _finding_from_error(exc: CkptStageError) -> Finding:
    return Finding(exc.code, exc.message, exc.hint, file=exc.fields.get("file"), detail=retry_detail(exc, exc.code))


# -- inspect ---------------------------------------------------------------------------------------
_PSEUDO_FS = ("/proc", "/sys", "/dev")
_LINK_HINT = ("copy the file into the folder (or pass it as its own argument) instead of linking to it; "
              "inspect follows a symlink only to a regular file inside the inspected folder")


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _invoker() -> tuple[int, set[int]]:
    """Who asked: the real user (under sudo, the user who ran sudo), and their groups."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0 and os.environ.get("SUDO_UID", "").isdigit():
        uid, gid = int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", gid) or gid)
        try:
            import pwd

            groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
        except (KeyError, OSError):
            groups = {gid}
        return uid, groups
    return uid, {gid, *os.getgroups()}


def _mode_allows(st: os.stat_result, uid: int, groups: set[int], bit_user: int) -> bool:
    # Permission bits as the kernel checks them for an ordinary user: no DAC override, even for root,
    # so a root stage never stages what the file's modes keep from the person who asked.
    if st.st_uid == uid:
        return bool(st.st_mode & bit_user)
    if st.st_gid in groups:
        return bool(st.st_mode & (bit_user >> 3))
    return bool(st.st_mode & (bit_user >> 6))


def _readable_by_invoker(path: str, st: os.stat_result | None = None) -> bool:
    uid, groups = _invoker()
    try:
        if not _mode_allows(st or os.stat(path), uid, groups, stat.S_IRUSR):
            return False
        parent = os.path.dirname(path)
        while True:
            if not _mode_allows(os.stat(parent), uid, groups, stat.S_IXUSR):
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _usable_file(path: Path, shown: str) -> None:
    """A file ``inspect`` may hand to the worker: a regular file, not on /proc, /sys or /dev, that the
    invoking user could read themselves. Anything else is a usage error naming it."""
    real = os.path.realpath(path)
    if any(_inside(real, fs) for fs in _PSEUDO_FS):
        raise UsageError(f"{shown} is {real}, not a checkpoint file",
                         hint="give the path of a checkpoint file or model directory")
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{shown} is not a regular file (a FIFO, device or socket)",
                         hint="give the path of a checkpoint file or model directory")
    if not _readable_by_invoker(real):
        raise UsageError(f"{shown}: you cannot read this file yourself (its permissions do not allow it)",
                         hint="inspect only files your own user can read; copy it with the owner's consent")


def collect_paths(paths: Sequence[Path]) -> tuple[Path, list[str]]:
    """Local files or one MLflow model directory → (root, paths relative to root).

    Inside a directory only regular files count; a symlink is followed only to a regular file inside
    the directory: a link out of it (``/proc/self/environ``, another user's file, the stage's own
    config) is a usage error naming the link, as is a FIFO, socket or device."""
    given = [Path(os.path.abspath(p)) for p in paths]
    for p in given:
        if not os.path.lexists(p) or not p.exists():
            raise ConfigError(f"no such file or directory: {p}")
    resolved = [p.resolve() for p in given]
    if len(resolved) == 1 and resolved[0].is_dir():
        root = resolved[0]
        rels = []
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames):  # a symlinked directory is not walked into
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    raise UsageError(f"{Path(full).relative_to(root)} is a symlink to a directory "
                                     f"({os.path.realpath(full)})", hint=_LINK_HINT)
            for name in filenames:
                full = os.path.join(dirpath, name)
                rel = Path(full).relative_to(root).as_posix()
                if os.path.islink(full):
                    target = os.path.realpath(full)
                    if not _inside(target, str(root)) or not os.path.isfile(target) or os.path.islink(target):
                        raise UsageError(f"{rel} is a symlink to {target}, outside {root} or not a regular file",
                                         hint=_LINK_HINT)
                _usable_file(Path(full), rel)
                rels.append(rel)
        rels.sort()
        if not rels:
            raise ConfigError(f"{root} holds no files")
        return root, rels
    if any(p.is_dir() for p in resolved):
        raise ConfigError("give either one model directory or checkpoint files, not a mix")
    for g in given:
        _usable_file(g, str(g))
    root = Path(_common_dir(resolved))
    return root, [p.relative_to(root).as_posix() for p in resolved]


def _copy_sparse(src_fd: int, dst: Path, size: int) -> None:
    """Copy only the data extents (SEEK_DATA/SEEK_HOLE): a sparse file (1 TiB of holes) stays sparse
    instead of filling the cache disk."""
    with open(dst, "wb") as out:
        off = 0
        while off < size:
            try:
                data = os.lseek(src_fd, off, os.SEEK_DATA)
            except OSError:
                break  # no data after off (ENXIO): the rest is a hole
            hole = os.lseek(src_fd, data, os.SEEK_HOLE)
            out.seek(data)
            pos = data
            while pos < hole:
                chunk = os.pread(src_fd, min(8 * 2**20, hole - pos), pos)
                if not chunk:
                    break
                out.write(chunk)
                pos += len(chunk)
            off = hole
        out.truncate(size)


def _stage(src_root: Path, rels: Sequence[str], dest: Path) -> None:
    """Hard-link (world-readable files, same filesystem) or copy ``rels`` under ``dest``; the user's
    files keep their permissions because only links to already-readable inodes are shared. A symlink
    (inside the folder, checked by ``collect_paths``) is staged as a copy of its target's bytes."""
    dest.mkdir(parents=True, exist_ok=False)
    os.chmod(dest, 0o700)
    top = os.path.realpath(src_root)
    for rel in rels:
        src, dst = src_root / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        real = os.path.realpath(src)
        # O_NONBLOCK: a file swapped for a FIFO since collect_paths cannot hang the stage.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"{rel} is not a regular file", hint="give the path of a checkpoint file")
            # collect_paths checked names, and a name can be swapped for a link (to /proc/self/environ,
            # to a file the user cannot read) before this open: check again what was opened.
            opened = os.readlink(f"/proc/self/fd/{fd}")
            if not _inside(opened, top) or any(_inside(opened, fs) for fs in _PSEUDO_FS):
                raise UsageError(f"{rel} changed while it was being staged: it is now {opened}, outside {top}",
                                 hint=_LINK_HINT)
            if not _readable_by_invoker(opened, st):
                raise UsageError(f"{rel} changed while it was being staged: you cannot read it yourself",
                                 hint="inspect only files your own user can read, and leave them unchanged "
                                      "while inspect runs")
            if st.st_mode & 0o444 == 0o444:
                try:
                    os.link(f"/proc/self/fd/{fd}", dst, follow_symlinks=True)
                    continue
                except OSError:
                    pass  # another filesystem, or links not allowed: copy
            _copy_sparse(fd, dst, st.st_size)
        finally:
            os.close(fd)


def _common_dir(files: Sequence[Path]) -> str:
    return os.path.commonpath([str(f.parent) for f in files])


def inspect_paths(
    paths: Sequence[Path],
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    settings: Settings,
) -> Report:
    """Validate local files offline: no registry, no S3, nothing recorded, nothing of the user's changed.

    The files are staged into a private folder first: the unprivileged worker must be able to read what
    it loads, and the runner grants that by adding read bits to the job's folder, which must never be
    the user's own (``inspect ~/model.pt`` would otherwise open up the whole home directory).
    """
    src_root, rels = collect_paths(paths)
    t0 = time.perf_counter()
    staging = settings.cache_dir / "inspect" / uuid.uuid4().hex[:12]
    try:
        # Sizes first, from the user's own files: a too-big (or sparse) file is refused before the
        # staging step could link or copy it, and before a byte of it is read.
        too_big = _oversized(src_root, rels, settings)
        if too_big is not None:
            checked = too_big
        else:
            _stage(src_root, rels, staging)
            checked = check_local(staging, rels, settings, arch=arch, arch_kwargs=arch_kwargs)
        findings = list(checked.findings)
    except Exception as exc:  # noqa: BLE001 - the parent always writes a report
        checked, findings = None, [_internal(exc)]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    decision = decide(findings, settings)
    timings = dict(checked.timings_s if checked else {})
    timings["download"] = 0.0
    timings["total"] = time.perf_counter() - t0
    return build_report(checked, decision, model=None, attempt=1, findings=findings, timings=timings)


# -- validate --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    report: Report | None
    run_id: str | None = None
    skipped: str = ""
    """Why nothing was done (another owner holds the lease), when ``report`` is None."""
    recorded: bool = True
    """False when the verdict could not be written to MLflow (the report says why; the version stays eligible)."""


def _arch_from_tags(state: VersionState) -> tuple[str | None, dict, list[Finding]]:
    arch = state.tags.get(ARCH) or None
    try:
        kwargs = parse_arch_kwargs(state.tags.get(ARCH_KWARGS), source=f"version tag {ARCH_KWARGS}")
    except ConfigError as exc:
        return arch, {}, [Finding(ReasonCode.PARTIAL_CHECKPOINT, exc.message,
                                  f"set the {ARCH_KWARGS} tag to a JSON object of constructor arguments")]
    return arch, kwargs, []


def validate_version(
    ref: VersionRef,
    *,
    settings: Settings,
    registry: Registry | None = None,
    storage: S3Storage | None = None,
    force: bool = False,
    owner: str | None = None,
    progress: Progress | None = None,
    origin: dict[str, Any] | None = None,
    listing: Listing | None = None,
) -> Outcome:
    """Validate one registered version end to end and record the verdict in MLflow.

    Never raises for an infrastructure failure: every exception is classified once (the error taxonomy)
    and ends in the outcome. A verdict that could not be recorded becomes an ``error`` outcome with the
    infrastructure code that stopped it (``recorded`` False), and the version is left eligible: ``error``
    when that much could still be written, else ``validating`` under a lease that runs out within
    ``lease_s``. Only bad input (an unknown version: ``UsageError``; a broken setting: ``ConfigError``)
    raises. ``origin`` says who ran the attempt (``{"airflow": {dag_id, run_id, task_id, map_index,
    try_number}}``); it goes into the report and the attempt's run tags. ``listing``: the version's objects
    as the DAG's plan task listed them, used instead of listing again while it is at most
    ``PLANNED_LISTING_MAX_AGE_S`` old (the download still gets exactly the listed objects, and lists again
    when one changed since).
    """
    registry = registry or Registry(settings)
    storage = storage or S3Storage(settings)
    owner = owner or settings.owner or default_owner()
    t0 = time.perf_counter()

    try:
        state = registry.claim(ref, owner, force=force)
        if state is None:
            return Outcome(None, skipped=f"{ref} needs no claim: decided meanwhile, or another worker holds the lease")
    except (UsageError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 - classified below; the claim wrote nothing that strands the version
        return _unrecorded(ref, exc, attempt=0, what="claiming the version")
    prewarm_worker(settings)
    workdir = settings.cache_dir / "versions" / f"{_safe(ref.name)}-v{_safe(ref.version)}-{uuid.uuid4().hex[:8]}"
    timings: dict[str, float] = {}
    checked: Checked | None = None
    findings: list[Finding] = []
    files: list[FileInfo] = []
    hashes: dict[str, str] = {}
    stamps: dict[str, tuple[int, int, int, int]] = {}
    listed: dict[str, RemoteFile] = {}
    where: dict[str, Any] = {}
    with registry.heartbeat(ref, owner):
        try:
            arch, arch_kwargs, tag_findings = _arch_from_tags(state)
            t = time.perf_counter()
            try:
                if listing is not None and 0 <= listing.age_s() <= PLANNED_LISTING_MAX_AGE_S:
                    loc, remote = resolve_artifact_uri(listing.uri, settings), list(listing.files)
                else:
                    loc = resolve_artifact_uri(_download_uri(registry, state), settings)
                    remote = storage.list_files(loc)
                # Sizes from the listing first: a file too big for every worker is never downloaded.
                too_big = _oversized(workdir, [f.rel for f in remote], settings, {f.rel: f.size for f in remote})
                if too_big is not None:
                    checked = too_big
                    files = list(too_big.files)
                    findings.extend(too_big.findings)
                else:
                    remote, local = fetch_listed(storage, loc, workdir, progress=progress, listing=remote)
                    listed = {rf.rel: rf for rf in remote}
                    where = {"uri": loc.uri, "bucket": loc.bucket, "prefix": loc.prefix,
                             "versioned": storage.bucket_versioned(loc.bucket)}
                    hashes = {lf.rel: lf.sha256 for lf in local}
                    stamps = {lf.rel: lf.stamp for lf in local}
                    files = [_with_origin(FileInfo(lf.rel, lf.size, lf.sha256), listed) for lf in local]
            except CkptStageError as exc:
                findings.append(_finding_from_error(exc))
            timings["download"] = time.perf_counter() - t
            if not findings:
                checked = check_local(workdir, sorted(hashes), settings, arch=arch, arch_kwargs=arch_kwargs,
                                      hashes=hashes, stamps=stamps, extra_findings=tag_findings)
                checked = dataclasses.replace(checked, files=tuple(_with_origin(f, listed) for f in checked.files))
                findings = list(checked.findings)
                timings.update(checked.timings_s)
                findings.extend(_drift(registry, ref, checked, settings))
        except (RegistryUnavailable, StorageMisconfigured, StorageUnavailable) as exc:
            findings.append(_finding_from_error(exc))
        except Exception as exc:  # noqa: BLE001 - always end with a recorded verdict
            log.exception("validating %s failed", ref)
            findings.append(_internal(exc))
        finally:
            if not settings.keep_cache:
                shutil.rmtree(workdir, ignore_errors=True)

    decision = decide(findings, settings)
    attempt = 0
    try:
        # Re-read before recording: a rival that took the lease over (a lost race between claims, or a
        # lease that ran out while this attempt was cut off from MLflow) records its own complete verdict;
        # this attempt then records nothing. The attempt number is taken now, from every recorded run, so
        # overlapping attempts do not share one.
        now, runs = registry.state_and_attempts(ref)
        rival = now.tags.get(LEASE_OWNER, "")
        if rival not in ("", owner) and (now.lease_until or now_utc()) > now_utc():
            log.warning("%s: %s took the lease over while this attempt ran; leaving the verdict to it", ref, rival)
            return Outcome(None, skipped=f"{ref}: another worker ({rival}) took the lease over; its verdict stands")
        attempt = registry.next_attempt(ref, now, runs=runs)
        if ReasonCode.WORKER_LOST in decision.codes:
            findings = worker_lost_in_a_row(findings, runs, settings.worker_lost_limit)
            decision = decide(findings, settings)
        timings["total"] = time.perf_counter() - t0
        report = build_report(checked, decision, model=ref, attempt=attempt, findings=findings, timings=timings,
                              files=files)
        if origin:
            report = report.replace(extra={**report.extra, **origin})
        if where:
            # Where the manifest's keys live: the promoted-version re-check lists exactly this location.
            report = report.replace(extra={**report.extra, "storage": where})
        digest = version_digest([(f.path, f.sha256) for f in report.files])
        run_id = registry.record(report, decision, digest=digest, owner=owner)
    except (UsageError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 - classified; the version must stay eligible, never half-recorded
        log.error("recording the verdict of %s failed: %s", ref, exc)
        outcome = _unrecorded(ref, exc, attempt=attempt, what=f"recording the {decision.verdict.value} verdict")
        try:
            registry.record_error_status(ref, outcome.report.summary if outcome.report else str(exc), owner=owner)
        except Exception as again:  # noqa: BLE001 - the lease runs out and the version is eligible again
            log.error("%s: could not even record status error (%s); its lease expires within %.0f s", ref, again,
                      settings.lease_s)
        return outcome
    return Outcome(report, run_id)


def worker_lost_in_a_row(findings: Sequence[Finding], runs: Sequence[dict[str, Any]], limit: int) -> list[Finding]:
    """WORKER_LOST is retried, but not forever: when this attempt is the ``limit``-th in a row of one version
    to end in WORKER_LOST alone (``runs``: its recorded attempts), the worker's death is taken for the
    model's own doing (code that kills its process, which the kernel does not tell apart from an outside
    kill) and becomes WORKER_CRASH, a quarantine. ``limit`` 0 turns the rule off."""
    lost = [f for f in findings if f.code is ReasonCode.WORKER_LOST]
    if not lost or limit <= 0:
        return list(findings)
    before = 0
    for run in sorted(runs, key=lambda r: _int(r["tags"].get(ATTEMPT)), reverse=True):
        if run["tags"].get(REASONS) != ReasonCode.WORKER_LOST.value:
            break
        before += 1
    if before + 1 < limit:
        return list(findings)
    crash = Finding(
        ReasonCode.WORKER_CRASH,
        f"the worker was lost in {before + 1} attempts in a row ({lost[0].message}); the stage stops retrying: "
        "a worker that dies this way every time is taken to be killed by the model's own code",
        "load the version with the serving runtime to see what kills the process; if the host or an operator "
        f"killed the workers, re-run it (ckpt-stage rerun); {PREFIX}WORKER_LOST_LIMIT sets how many losses "
        "in a row quarantine",
        detail={**lost[0].detail, "worker_lost_in_a_row": before + 1})
    return [f for f in findings if f.code is not ReasonCode.WORKER_LOST] + [crash]


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _classified(exc: BaseException) -> CkptStageError:
    """Any exception → the stage's taxonomy (the adapters classify their libraries' errors at their edge;
    what reaches here unclassified is a bug: INTERNAL_ERROR)."""
    if isinstance(exc, CkptStageError):
        return exc
    from ckpt_stage.storage import classify_s3_error, is_storage_error

    if is_storage_error(exc):
        err = classify_s3_error(exc, what="S3")
        if isinstance(err, CkptStageError):
            return err
    return CkptStageError(f"the stage failed: {type(exc).__name__}: {exc}", code=ReasonCode.INTERNAL_ERROR,
                          hint="this is a bug in ckpt-stage; the version stays eligible for a re-run")


def _unrecorded(ref: VersionRef, exc: BaseException, *, attempt: int, what: str) -> Outcome:
    """An ``error`` outcome for a version whose verdict could not be recorded."""
    err = _classified(exc)
    finding = Finding(err.code, f"{what} failed: {err.message}",
                      err.hint or "the version stays eligible: the next sweep or a re-run picks it up again",
                      detail=retry_detail(err, err.code))
    decision = decide([finding])
    report = build_report(None, decision, model=ref, attempt=attempt, findings=[finding], timings={})
    return Outcome(report, recorded=False)


PLANNED_LISTING_MAX_AGE_S = 300.0
"""A listing handed along by the plan task is used up to this old; a task that waited longer in its
queue lists again (a file added to a version's location later is then part of its verdict)."""

# A version whose objects keep changing while it is downloaded is being written to: give up after a few
# fresh listings with a retryable error (the next sweep tries again), never a verdict on mixed bytes.
LISTING_ATTEMPTS = 3


def fetch_listed(
    storage: S3Storage, loc: S3Location, dest: Path, *, progress: Progress | None = None,
    attempts: int = LISTING_ATTEMPTS, listing: list[RemoteFile] | None = None,
) -> tuple[list[RemoteFile], list[LocalFile]]:
    """List the version, then download exactly what was listed (by VersionId, or If-Match on the ETag).

    An object that changed or vanished after the listing (``ObjectChanged``) makes the whole listing
    stale: the folder is emptied and the version listed and downloaded again, so every file of one
    verdict comes from one listing. ``listing`` is a first listing the caller already made (to decide
    sizes before downloading); it is used for the first try only.
    """
    for n in range(1, attempts + 1):
        remote = listing if (n == 1 and listing is not None) else storage.list_files(loc)
        try:
            return remote, storage.download(loc, dest, files=remote, progress=progress)
        except ObjectChanged as exc:
            log.warning("%s (listing %d of %d)", exc.message, n, attempts)
            shutil.rmtree(dest, ignore_errors=True)
            last = exc
    raise StorageUnavailable(
        f"the files at {loc.uri} kept changing while they were downloaded ({attempts} listings): {last.message}",
        hint="stop writing to a registered version's location; the next sweep validates it again",
        file=last.fields.get("file"),
    )


_S3_SCHEMES = ("s3://", "s3a://", "s3n://")


def _download_uri(registry: Registry, state: VersionState) -> str:
    """Where the version's files are. MLflow's registry answers a version's own source when that is a
    storage URI (it resolves only ``models:/`` sources to another location), so an S3 source, read with
    the claim, is used as it is; any other asks the registry."""
    if state.source.startswith(_S3_SCHEMES):
        return state.source
    return registry.download_uri(state.ref)


def _with_origin(info: FileInfo, listed: dict[str, RemoteFile]) -> FileInfo:
    rf = listed.get(info.path)
    if rf is None:
        return info
    return dataclasses.replace(info, key=rf.key, etag=rf.etag, version_id=rf.version_id)


def _drift(registry: Registry, ref: VersionRef, checked: Checked, settings: Settings) -> list[Finding]:
    """Drift against the version that holds the alias (``ckpt_stage.drift``): information, unless the
    operator set ``drift_max_change``."""
    current = (checked.load.info if checked.load else {}).get("layers")
    if not current:
        return []
    from ckpt_stage import drift

    try:
        held = registry.alias_state(ref.name)  # the holder's tags come with it: no second read
        if held is None or held.ref.version == ref.version:
            return []
        promoted = held.ref.version
        run_id = held.tags.get(RUN_ID)
        prev = registry.report_of(run_id) if run_id else None
        layers = ((prev or {}).get("model_info") or {}).get("layers")
        return drift.compare(layers, current, promoted, max_change=settings.drift_max_change)
    except Exception as exc:  # noqa: BLE001 - drift is informational; never fail a validation on it
        log.warning("drift comparison for %s skipped: %s", ref, exc)
        return []


def sweep(
    *,
    settings: Settings,
    registry: Registry | None = None,
    storage: S3Storage | None = None,
    on_result: Callable[[VersionRef, Outcome], None] | None = None,
    owner: str | None = None,
) -> list[Outcome]:
    """Validate every version that needs a verdict, then repair the aliases (``Registry.reconcile``).

    One version's failure never ends the sweep: each one's outcome is classified on its own. Only the
    initial listing can fail the whole sweep (MLflow unreachable), as the stage's ``TransientError``.
    """
    registry = registry or Registry(settings)
    storage = storage or S3Storage(settings)
    owner = owner or settings.owner or default_owner()
    listing = list(registry.iter_versions())
    at = now_utc()
    todo = sorted((v for v in listing if v.needs_validation(at)),
                  key=lambda v: (v.ref.name, int(v.ref.version) if v.ref.version.isdigit() else 0))
    outcomes = run_many([s.ref for s in todo], settings=settings, registry=registry, storage=storage,
                        owner=owner, on_result=on_result)
    touched = {ref.name for ref, o in zip((s.ref for s in todo), outcomes, strict=True) if o.report is not None}
    # Also repairs an alias that concurrent verdicts of one model left on a lower promoted version (each
    # verdict moves the alias from its own search of the promoted versions; two can interleave).
    registry.reconcile(listing, touched=touched)
    return outcomes


def run_many(
    refs: Sequence[VersionRef],
    *,
    settings: Settings,
    on_result: Callable[[VersionRef, Outcome], None] | None = None,
    **kwargs: Any,
) -> list[Outcome]:
    """``validate_version_safely`` for each of ``refs``, ``settings.sweep_concurrency`` at a time, outcomes
    in the order of ``refs``. The threads share the registry and storage clients (thread-safe) and the
    one fork server (``runner.run_job`` is thread-safe); ``on_result`` is called under a lock, in the
    order the verdicts come."""
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()

    def one(ref: VersionRef) -> Outcome:
        outcome = validate_version_safely(ref, settings=settings, batch=True, **kwargs)
        if on_result:
            with lock:
                on_result(ref, outcome)
        return outcome

    workers = max(1, min(settings.sweep_concurrency, len(refs)))
    if workers == 1:
        return [one(ref) for ref in refs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-sweep") as pool:
        return list(pool.map(one, refs))


def validate_version_safely(ref: VersionRef, *, batch: bool = False, **kwargs) -> Outcome:
    """``validate_version`` for callers that want an outcome in any case. Bad input (an unknown version, a
    broken setting) still raises for the caller to report as such, except in a ``batch`` (a sweep, a
    re-run of many), where it becomes that version's outcome and the batch goes on."""
    try:
        return validate_version(ref, **kwargs)
    except UsageError as exc:
        if not batch:
            raise
        return Outcome(None, skipped=f"{ref}: {exc.message}")
    except Exception as exc:  # noqa: BLE001 - a ConfigError, or a bug: this version's outcome, not the batch's
        if not batch and isinstance(exc, ConfigError):
            raise
        log.exception("validating %s failed outside the pipeline's own handling", ref)
        return _unrecorded(ref, exc, attempt=0, what="validating the version")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


__all__ = ["Outcome", "check_local", "inspect_paths", "sweep", "validate_version", "validate_version_safely"]
