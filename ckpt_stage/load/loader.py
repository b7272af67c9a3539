"""Child side of the worker: load one version's files safely and check them.

``load_and_check(job) -> LoadResult`` runs inside the isolated, throw-away worker (``child.py``)
and never raises: every problem is a Finding with a contract reason code, a message naming the
concrete problem, a hint for the model's owner and the file it concerns.

What is loaded, and how (see also ``safe_torch`` for the rules every unpickle follows):

* an MLflow model directory (``MLmodel``): ``data/model.pt2`` (torch.export, MLflow 3.17's default)
  through ``pt2.load``; ``data/model.pth`` (a whole module pickled by cloudpickle) only when pickled
  models are allowed, with ``weights_only=True`` plus allowlisted classes; then the logged input
  example is run through the model and its output checked against the signature;
* bare checkpoints: torch zip (mmap) or legacy files, safetensors, several shards merged; the
  weights (found inside training checkpoints when needed) are matched against ``job.arch``, built
  on the meta device and filled with ``load_state_dict(assign=True)``, so no second copy is made.

Importing this module runs no torch op: the fork server imports it before forking workers, and a
process that has run ops must not fork (docs/traps.md).
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import posixpath
import time
import traceback
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Before torch is imported anywhere in this process (safe_torch pops it too, at every load).
os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)

import torch  # noqa: E402

from ckpt_stage.domain import FileFormat, Finding, ReasonCode, Severity  # noqa: E402
from ckpt_stage.policy import NO_INPUT_EXAMPLE  # noqa: E402
from ckpt_stage.load import checks, mlflow_model, pt2, safe_torch  # noqa: E402
from ckpt_stage.scan import pt2 as pt2_grammar  # noqa: E402
from ckpt_stage.sandbox.job import LoadJob, LoadResult  # noqa: E402
from ckpt_stage.scan.reading import Reading, changed, stamp_of  # noqa: E402
from ckpt_stage.scan.safetensors import MAX_HEADER  # noqa: E402

_CHECKPOINT_FORMATS = {FileFormat.TORCH_ZIP, FileFormat.TORCH_LEGACY, FileFormat.SAFETENSORS,
                       FileFormat.TORCH_EXPORT, FileFormat.TORCHSCRIPT, FileFormat.PICKLE}
_PICKLED_MODELS_HINT = ("re-log the model with serialization_format='pt2' (MLflow's default) or log a "
                        "state_dict; an operator may allow pickled modules with "
                        "CKPT_STAGE_ALLOW_PICKLED_MODELS=true")
_CODE_PICKLE_HINT = ("classes defined in __main__ or a notebook are pickled as code: log with "
                     "serialization_format='pt2' (MLflow's default) or a state_dict, or define the model class "
                     "in a package installed in the serving runtime that the operator lists in "
                     "CKPT_STAGE_PICKLE_MODULES")


def preload() -> None:
    """Import (never run) what loading needs, for a fork server to call before it forks: torch's pt2
    package pulls in torch._inductor (~1.5 s here), paid once instead of per job. Imports only; a
    fork after this still gets a fresh intra-op thread pool (checked with torch 2.13)."""
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import yaml  # noqa: F401

    import torch.export.pt2_archive._package  # noqa: F401
    from ckpt_stage.scan import allowlist, pickles  # noqa: F401


def runtime_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from importlib.metadata import version

        out["mlflow"] = version("mlflow")  # no `import mlflow`: slow, and nothing else needs it here
    except Exception:
        pass
    return out


def _brief(exc: BaseException, limit: int = 400) -> str:
    """One readable line of an exception: torch's weights_only essays shrink to the refused global."""
    text = " ".join(str(exc).split())
    full = safe_torch.unsafe_global_in(text)
    built = safe_torch.unbuildable_class_in(text)
    if full and ("Weights only load failed" in text or "GLOBAL" in text):
        blocked = " (blocked module)" if "is blocked" in text else ""
        text = f"weights_only refuses GLOBAL {full}{blocked}"
    elif built and "Weights only load failed" in text:
        text = f"weights_only cannot build {built}"
    elif "Weights only load failed" in text:
        text = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0].strip()
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Run:
    def __init__(self, job: LoadJob):
        self.job = job
        self.findings: list[Finding] = []
        self.runtime: dict[str, str] = {}
        self.recorded: dict[str, str] = {}
        self.timings: dict[str, float] = {"load": 0.0, "inference": 0.0}
        self.info: dict[str, Any] = {}
        self.readings: dict[str, Reading] = {}
        """The scan's reading of each file (``_formats``): what the loaders obey."""
        self.stamps: dict[str, tuple[int, int, int, int]] = {}

    def add(self, code: ReasonCode | None, message: str, hint: str = "", file: str | None = None,
            severity: Severity = Severity.ERROR, **detail: Any) -> None:
        self.findings.append(Finding(code, message, hint, file, severity, detail))

    def extend(self, findings: list[Finding] | Finding | None) -> None:
        if isinstance(findings, Finding):
            self.findings.append(findings)
        elif findings:
            self.findings.extend(findings)

    @property
    def blocked(self) -> bool:
        return any(f.blocking for f in self.findings)

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def path(self, rel: str) -> str:
        return os.path.join(self.job.root, rel)

    def result(self) -> LoadResult:
        return LoadResult(findings=tuple(self.findings), runtime=dict(self.runtime),
                          recorded=dict(self.recorded), timings_s=dict(self.timings), info=dict(self.info))


def load_and_check(job: LoadJob) -> LoadResult:
    run = _Run(job)
    try:
        safe_torch.strip_force_env()
        run.runtime = runtime_versions()
        _check(run)
    except MemoryError:
        run.add(ReasonCode.RESOURCE_LIMIT, "the model needs more memory than this worker has",
                "reduce the model size or ask the operator for a larger worker class")
    except (Exception, SystemExit) as exc:  # SystemExit: an allowed architecture's code may call exit()
        tb = traceback.format_exc()
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        run.add(ReasonCode.INTERNAL_ERROR, f"the loader failed unexpectedly: {last[:400]}",
                "this is a bug in ckpt-stage, not in the model: report it with this report",
                traceback=tb[-4000:])
    return run.result()


# --------------------------------------------------------------------------------------------------
# formats


#: The current job's readings by absolute path, for callers that only hold a path (``format_of``). A
#: worker runs one job and is thrown away; in-process callers get it reset by every ``_formats``.
_READ_BY_PATH: dict[str, Reading] = {}


def format_of(path: str) -> FileFormat:
    """The format the scan's reading gives ``path``; UNKNOWN for a file no reading describes.

    The worker never decides a format itself (a second sniffer beside the scanner is the parser
    differential behind picklescan's CVE-2025-1944/1945/10156): it obeys the reading."""
    r = _READ_BY_PATH.get(os.path.abspath(path))
    return r.fmt if r is not None else FileFormat.UNKNOWN


def _own_readings(run: _Run) -> dict[str, Reading]:
    """Readings made here with the scanner's own code, for jobs that carry none (in-process callers:
    the pipeline always sends the parent's). The same code, so the same answer as the parent's scan."""
    from ckpt_stage.config import Settings
    from ckpt_stage.scan import scan_file

    job = run.job
    settings = Settings(pickle_modules=tuple(job.pickle_modules), allow_pickled_models=job.allow_pickled_models)
    mlflow_dir = any(posixpath.basename(rel) == "MLmodel" for rel, _ in job.files)
    out: dict[str, Reading] = {}
    for rel, _ in job.files:
        _fmt, fs, _counts = scan_file(Path(job.root), rel, settings, mlflow_dir=mlflow_dir)
        if fs.reading is not None:
            out[rel] = fs.reading
    return out


_CHANGED_HINT = ("the file was modified while it was being validated (or the stage's cache was touched): "
                 "validate it again once nothing writes to it; a re-run downloads it afresh")


def _formats(run: _Run) -> list[tuple[str, FileFormat]]:
    """Every file of the job with the format its reading gives, after checking that the file is still
    the one the scan read (size, sha256) and, for the zip archives torch loads, that torch's own reader
    sees the scan's member table. Any difference is a refusal (CORRUPT_ARCHIVE)."""
    job = run.job
    run.readings = _own_readings(run) if job.readings is None else {r.path: r for r in job.readings}
    _READ_BY_PATH.clear()
    _READ_BY_PATH.update({os.path.abspath(run.path(rel)): r for rel, r in run.readings.items()})
    out = []
    for rel, declared in job.files:
        r = run.readings.get(rel)
        if r is None:
            run.add(ReasonCode.INTERNAL_ERROR,
                    f"the static scan left no reading of {rel}; the worker loads only what the scan read",
                    "this is a bug in ckpt-stage, not in the model: report it with this report", rel)
            continue
        if declared not in (FileFormat.UNKNOWN.value, r.format):
            run.add(ReasonCode.INTERNAL_ERROR,
                    f"{rel}: the job says {declared} but the scan's reading says {r.format}",
                    "this is a bug in ckpt-stage, not in the model: report it with this report", rel)
            continue
        path = run.path(rel)
        try:
            run.stamps[rel] = stamp_of(os.stat(path))  # before hashing: see _unchanged_since_verified
        except OSError:
            pass
        # The parent pinned r.sha256 to the bytes its scan read under r.stamp (pipeline._pinned). The
        # same stamp now means the same bytes: any write or chmod since moved ctime, which no
        # unprivileged process can set back. Then re-hashing (~5 s/GiB) proves nothing more; a stamp
        # that differs (or none) falls back to the full digest.
        same = tuple(r.stamp) != (0, 0, 0, 0) and run.stamps.get(rel) == tuple(r.stamp)
        problem = changed(r, path, digest=not same)
        if problem:
            run.add(ReasonCode.CORRUPT_ARCHIVE, f"{rel} is not the file the static scan read: {problem}",
                    _CHANGED_HINT, rel, kind="changed-after-scan")
            continue
        # The runtime's own limit first: torch's reader refuses a too-new version record on opening.
        if r.fmt is FileFormat.UNKNOWN and r.container == "zip" and not r.members:
            # torch.load would try it as a zip (it checks the magic only); the scan could not read it.
            run.add(ReasonCode.CORRUPT_ARCHIVE,
                    f"{rel} starts like a zip archive but the static scan could not read its structure; not "
                    "loaded", "the file is truncated or damaged: upload it again from the original", rel)
            continue
        if r.fmt in (FileFormat.TORCH_ZIP, FileFormat.TORCH_EXPORT) and (
                _zip_version_problem(run, rel) or not _records_match(run, rel, r)):
            continue
        out.append((rel, r.fmt))
    return out


def _records_match(run: _Run, rel: str, r: Reading) -> bool:
    """torch's own zip reader (PyTorchStreamReader, what torch.load and torch.export.load use) must see
    exactly the records the scan checked, at the same offsets and sizes; otherwise the two parsers read
    different archives out of the same bytes and the scan's verdict says nothing about the load."""
    hint = ("the archive reads differently to torch than to a zip parser (crafted or damaged container): "
            "re-save the checkpoint with torch.save / torch.export.save and upload it again")
    expected = r.records()
    try:
        reader = torch._C.PyTorchFileReader(run.path(rel))
        names = list(reader.get_all_records())
        # get_record_offset is bound in torch 2.13 but missing from its type stubs.
        seen = {n: (int(reader.get_record_offset(n)), int(reader.get_record_size(n)))  # type: ignore[attr-defined]
                for n in names}
    except Exception as exc:
        run.add(ReasonCode.CORRUPT_ARCHIVE, f"{rel}: torch's zip reader cannot read the archive: {_brief(exc)}",
                hint, rel, kind="reader-differs")
        return False
    problems = []
    extra = sorted(set(seen) - set(expected))
    missing = sorted(set(expected) - set(seen))
    if extra:
        problems.append(f"torch sees {checks.count(len(extra), 'record')} the scan did not ({checks.listing(extra)})")
    if missing:
        problems.append(f"the scan read {checks.count(len(missing), 'record')} torch does not see "
                        f"({checks.listing(missing)})")
    moved = sorted(n for n in set(seen) & set(expected)
                   if seen[n] != (expected[n].data_offset, expected[n].usize))
    if moved:
        n = moved[0]
        problems.append(f"record {n!r} lies at offset {seen[n][0]:,} ({seen[n][1]:,} bytes) for torch but at "
                        f"{expected[n].data_offset:,} ({expected[n].usize:,} bytes) for the scan"
                        + (f", and {len(moved) - 1} more" if len(moved) > 1 else ""))
    if problems:
        run.add(ReasonCode.CORRUPT_ARCHIVE, f"{rel}: torch's zip reader and the static scan disagree: "
                + "; ".join(problems), hint, rel, kind="reader-differs")
        return False
    return True


def _unchanged_since_verified(run: _Run) -> None:
    """No file changed while it was hashed and loaded: a write moves ctime, which the file's owner
    cannot set back (an inspected file is a hard link to the user's own inode)."""
    for rel, before in run.stamps.items():
        try:
            now = stamp_of(os.stat(run.path(rel)))
        except OSError:
            continue
        if now != before:
            run.add(ReasonCode.CORRUPT_ARCHIVE, f"{rel} was modified while the worker loaded it",
                    _CHANGED_HINT, rel, kind="changed-during-load")


def _check(run: _Run) -> None:
    with run.timed("verify"):  # stamps; a full re-hash (~5 s/GiB) only when a stamp moved
        files = _formats(run)
    if run.blocked:
        return
    try:
        _check_files(run, files)
    finally:
        _unchanged_since_verified(run)


def _check_files(run: _Run, files: list[tuple[str, FileFormat]]) -> None:
    mlmodels = sorted((rel for rel, _ in files if posixpath.basename(rel) == "MLmodel"),
                      key=lambda r: (r.count("/"), r))
    if mlmodels:
        if len(mlmodels) > 1:
            run.add(None, f"{len(mlmodels)} MLmodel files; validating {mlmodels[0]}", file=mlmodels[0],
                    severity=Severity.INFO, others=mlmodels[1:])
        _check_mlflow(run, posixpath.dirname(mlmodels[0]), files)
        return
    ckpts = [(rel, f) for rel, f in files if f in _CHECKPOINT_FORMATS]
    if not ckpts:
        shown = checks.listing(sorted(rel for rel, _ in files))
        run.add(ReasonCode.NOT_A_CHECKPOINT,
                f"none of the {len(files)} files is a model checkpoint or an MLflow model ({shown or 'no files'})",
                "register the model's weights (.pt/.pth/.safetensors) or an MLflow model directory")
        return
    _check_bare(run, ckpts, files)


# --------------------------------------------------------------------------------------------------
# errors while loading


def _load_error(run: _Run, rel: str, exc: BaseException) -> None:
    if isinstance(exc, safe_torch.RefusedGlobals):
        whys = {why for _, why in exc.refused}
        if any(w.startswith("code") for w in whys):
            hint = _CODE_PICKLE_HINT
        elif whys == {"pickled models are disabled"}:
            hint = _PICKLED_MODELS_HINT
        else:
            hint = ("save only tensors and plain containers (a state_dict), or ask the operator to allow the "
                    "package in CKPT_STAGE_PICKLE_MODULES")
        run.add(ReasonCode.UNSAFE_PICKLE, f"{rel} {exc}", hint, rel, globals=[n for n, _ in exc.refused])
        return
    if isinstance(exc, safe_torch.RefusedUnsafeLoad):
        run.add(ReasonCode.UNSAFE_PICKLE, f"{rel} {exc}", "save only tensors in the archive", rel,
                globals=list(exc.globals))
        return
    text = " ".join(str(exc).split())
    if type(exc).__name__ == "SpecViolationError" and "not an allowed operator" in text:
        # torch.export's verifier: the graph calls something that is not an ATen/higher-order op.
        op = text.split("Operator ", 1)[-1].split(" is not", 1)[0]
        run.add(ReasonCode.UNSAFE_PICKLE, f"{rel}: the exported graph calls {op}, which is not an allowed operator",
                "export the model with torch.export.export; do not edit the archive's graph", rel)
        return
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported operand" in text:
        run.add(ReasonCode.UNSAFE_PICKLE,
                f"{rel} uses pickle opcodes that torch's weights_only unpickler refuses ({_brief(exc)})",
                "save only tensors and plain containers (a state_dict)", rel)
        return
    if isinstance(exc, pickle.UnpicklingError) and ("Weights only load failed" in text or "GLOBAL" in text):
        run.add(ReasonCode.UNSAFE_PICKLE, f"{rel} cannot be loaded with weights_only=True: {_brief(exc)}",
                "save only tensors and plain containers (a state_dict)", rel)
        return
    if isinstance(exc, MemoryError):
        raise exc
    low = text.lower()
    if ("protocol version" in low or "file format version" in low or "unsupported version" in low
            or ("version" in low and "max supported" in low)):
        run.add(ReasonCode.LIBRARY_VERSION_MISMATCH,
                f"{rel} was written in a format version torch {checks.public(torch.__version__)} cannot read: "
                f"{_brief(exc)}", "re-save the checkpoint with the serving runtime's torch", rel)
        return
    run.add(ReasonCode.CORRUPT_ARCHIVE, f"{rel} cannot be loaded: {_brief(exc)}",
            "the file is truncated or damaged: upload it again from the original", rel)


def _zip_version_problem(run: _Run, rel: str) -> bool:
    """A torch zip whose ``version`` record (as the scan read it) is newer than this torch reads."""
    r = run.readings.get(rel)
    for name, value in (r.version_records if r is not None else {}).items():
        if value > pt2.MAX_FILE_FORMAT_VERSION:
            run.add(ReasonCode.LIBRARY_VERSION_MISMATCH,
                    f"{rel} uses torch file format version {value} ({name} record); torch "
                    f"{checks.public(torch.__version__)} reads up to {pt2.MAX_FILE_FORMAT_VERSION}",
                    "re-save the checkpoint with the serving runtime's torch", rel,
                    recorded=value, supported=pt2.MAX_FILE_FORMAT_VERSION)
            return True
    return False


# --------------------------------------------------------------------------------------------------
# bare checkpoints


_INDEX_HINT = ("upload the shards and the index that one save_pretrained call wrote (the index must map every "
               "tensor to the shard that holds it)")


def _index_family(rel: str) -> frozenset[FileFormat]:
    """Formats of the shards an index describes: ``model.safetensors.index.json`` → safetensors,
    ``pytorch_model.bin.index.json`` → torch.save files."""
    if rel.endswith(".safetensors.index.json"):
        return frozenset({FileFormat.SAFETENSORS})
    return frozenset({FileFormat.TORCH_ZIP, FileFormat.TORCH_LEGACY})


def _indexes(run: _Run, files: list[tuple[str, FileFormat]]) -> list[Reading]:
    return [r for rel, _ in files if (r := run.readings.get(rel)) is not None and r.weight_map is not None]


def _check_indexes(run: _Run, files: list[tuple[str, FileFormat]], loaded: dict[str, set[str]]) -> set[str]:
    """``*.index.json`` of sharded checkpoints (as the scan read them) against the shards as loaded
    (``loaded``: file → tensor names): every shard it names is present (ARTIFACT_MISSING), and the index
    tells the truth (CORRUPT_ARCHIVE): each tensor in the shard it names, none named twice, no shard
    beside it that it does not name. A serving host trusts the index to find each tensor
    (``from_pretrained`` opens only the shard it names), so a lying index serves other weights than
    the ones checked, or fails at load. Returns the shard files the indexes cover."""
    present = {rel for rel, _ in files}
    covered: set[str] = set()
    for r in _indexes(run, files):
        rel = r.path
        pairs = r.weight_map or ()
        shards = sorted({f for _, f in pairs})
        covered.update(shards)
        missing = [s for s in shards if s not in present]
        if missing:
            run.add(ReasonCode.ARTIFACT_MISSING,
                    f"{rel} names {checks.count(len(missing), 'shard')} missing from the version: "
                    f"{checks.listing(missing)}", "upload every shard listed in the index", rel,
                    missing=missing)
        problems: list[str] = []
        seen: dict[str, list[str]] = {}
        for tensor, shard in pairs:
            seen.setdefault(tensor, []).append(shard)
        twice = sorted(t for t, where in seen.items() if len(where) > 1)
        if twice:
            problems.append(f"it maps {checks.count(len(twice), 'tensor')} more than once "
                            f"({checks.listing(twice)})")
        absent = [(t, s) for t, s in pairs if s in loaded and t not in loaded[s]]
        if absent:
            shown = checks.listing([f"{t} (in {posixpath.basename(s)})" for t, s in absent], 3)
            problems.append(f"{checks.count(len(absent), 'tensor')} it maps to a shard that does not hold "
                            f"{'it' if len(absent) == 1 else 'them'}: {shown}")
        where = {t: set(s) for t, s in seen.items()}
        for shard in shards:
            extra = sorted(t for t in loaded.get(shard, ()) if shard not in where.get(t, ()))
            if extra:
                problems.append(f"{posixpath.basename(shard)} holds {checks.count(len(extra), 'tensor')} the index "
                                f"does not map to it ({checks.listing(extra)})")
        base = posixpath.dirname(rel)
        family = _index_family(rel)
        unnamed = sorted(f for f, fmt in files if posixpath.dirname(f) == base and fmt in family
                         and f not in covered and not posixpath.basename(f).startswith(("model.", "pytorch_model.")))
        if unnamed:
            problems.append(f"{checks.count(len(unnamed), 'shard')} beside it {'is' if len(unnamed) == 1 else 'are'} "
                            f"not named by it ({checks.listing(unnamed)})")
        if problems:
            run.add(ReasonCode.CORRUPT_ARCHIVE, f"{rel} does not describe its shards: " + "; ".join(problems),
                    _INDEX_HINT, rel, kind="index-mismatch")
    return covered


def _load_safetensors(run: _Run, rel: str) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    r = run.readings.get(rel)
    if r is None or r.header_len is None or r.header_len > MAX_HEADER:
        # The pipeline's scan refuses such a file before any load; an in-process job can get here.
        run.add(ReasonCode.CORRUPT_ARCHIVE, f"{rel}: the static scan found no valid safetensors header",
                "the file is truncated or damaged: upload it again from the original", rel)
        return None
    try:
        state: dict[str, torch.Tensor] = {}
        with safe_open(run.path(rel), framework="pt", device="cpu") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                state[key] = fh.get_tensor(key)
        return state
    except MemoryError:
        raise
    except Exception as exc:
        _load_error(run, rel, exc)
        return None


def _load_torch(run: _Run, rel: str, fmt: FileFormat) -> Any:
    if fmt is FileFormat.TORCH_ZIP and _zip_version_problem(run, rel):
        return None
    policy = safe_torch.PicklePolicy(allow_pickled_models=run.job.allow_pickled_models,
                                     pickle_modules=tuple(run.job.pickle_modules))
    try:
        return safe_torch.load_allowlisted(run.path(rel), zip_format=fmt is FileFormat.TORCH_ZIP, policy=policy)
    except MemoryError:
        raise
    except Exception as exc:
        _load_error(run, rel, exc)
        return None


_COPIES_HINT = ("keep one copy of the weights in the version (delete the other file), or write every copy from the "
                "same model in one save (save_pretrained, safetensors' convert)")


def _merge(run: _Run, found: list[tuple[str, checks.Weights]],
           indexed: set[str] | frozenset[str] = frozenset()) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Shards of one state_dict merge; a second copy of the same weights (``model.safetensors`` next to
    ``pytorch_model.bin``) is not merged, the first (safetensors sorts first) is used. Every copy is
    still finite-checked here (the merged state is checked by the caller): a serving host may load
    the other file, or the EMA copy of a training checkpoint, and a NaN there is as fatal."""
    merged: dict[str, torch.Tensor] = {}
    used: list[str] = []
    for rel, w in found:
        assert w.state is not None
        for key, copy in w.copies.items():
            run.extend(checks.nonfinite({f"{key}.{k}": v for k, v in copy.items()}, file=rel))
        overlap = merged.keys() & w.state.keys()
        if overlap and set(w.state) <= set(merged):
            run.extend(checks.nonfinite(w.state, file=rel))
            other = checks.differing(merged, w.state)
            if other:
                run.add(ReasonCode.CORRUPT_ARCHIVE,
                        f"{rel} holds another copy of the weights read from {checks.listing(used)}, but "
                        f"{checks.count(len(other), 'tensor')} {'differs' if len(other) == 1 else 'differ'} ({checks.listing(sorted(other))}): serving "
                        "hosts choose one copy by their own rules (from_pretrained prefers model.safetensors to "
                        "sharded weights, use_safetensors=False loads pytorch_model.bin, variant= a variant), so "
                        "the copy validated need not be the copy served", _COPIES_HINT, rel, kind="copies-differ",
                        tensors=sorted(other)[:50])
                continue
            run.add(None, f"{rel} repeats weights already read from {checks.listing(used)}; not merged",
                    file=rel, severity=Severity.INFO)
            continue
        if overlap and not (rel in indexed and set(used) <= indexed):  # an index's shards: _check_indexes says it
            run.add(ReasonCode.ARCHITECTURE_MISMATCH,
                    f"{rel} and {checks.listing(used)} both define {len(overlap)} keys "
                    f"({checks.listing(sorted(overlap))}); the shards do not form one state_dict",
                    "upload the shards of a single checkpoint only", rel)
        merged.update({k: v for k, v in w.state.items() if k not in merged})
        used.append(rel)
    return merged, used


def _check_bare(run: _Run, ckpts: list[tuple[str, FileFormat]], files: list[tuple[str, FileFormat]]) -> None:
    order = {FileFormat.SAFETENSORS: 0, FileFormat.TORCH_ZIP: 1, FileFormat.TORCH_LEGACY: 2}
    found: list[tuple[str, checks.Weights]] = []
    without: list[tuple[str, checks.Weights]] = []
    exported: list[tuple[str, Any, torch.nn.Module]] = []
    with run.timed("load"):
        for rel, fmt in sorted(ckpts, key=lambda x: (order.get(x[1], 9), x[0])):
            if fmt is FileFormat.TORCHSCRIPT:
                run.add(ReasonCode.UNSUPPORTED_FORMAT,
                        f"{rel} is a TorchScript archive; this stage does not run TorchScript code",
                        "register a state_dict (with ckpt_stage.arch) or a torch.export / MLflow pt2 model", rel)
                continue
            if fmt is FileFormat.PICKLE:
                run.add(ReasonCode.UNSUPPORTED_FORMAT,
                        f"{rel} is a plain pickle, not a torch.save checkpoint",
                        "save the weights with torch.save(model.state_dict()) or safetensors", rel)
                continue
            if fmt is FileFormat.TORCH_EXPORT:
                got = _load_pt2(run, rel)
                if got is not None:
                    exported.append((rel, *got))
                continue
            if fmt is FileFormat.SAFETENSORS:
                state = _load_safetensors(run, rel)
                if state is None:
                    continue
                w = checks.Weights(state) if state else checks.Weights(None, problem="holds no tensors")
            else:
                obj = _load_torch(run, rel, fmt)
                if obj is None:
                    continue
                w = checks.find_weights(obj)
            (found if w.state is not None else without).append((rel, w))
            if w.key is not None:
                others = f" (also holds: {checks.listing(sorted(w.other_keys), 8)})" if w.other_keys else ""
                run.add(None, f"{rel} is a training checkpoint; using the model weights under "
                              f"{w.key!r}{others}", file=rel, severity=Severity.INFO, key=w.key)
                run.info["weights_key"] = w.key
            elif w.state is not None and w.other_keys:
                run.add(None, f"{rel}: ignoring non-tensor entries {checks.listing(sorted(w.other_keys))}",
                        file=rel, severity=Severity.INFO)

    indexed = _check_indexes(run, files, {rel: set(w.state or ()) for rel, w in found})
    for rel, ep, module in exported:
        _finish_module(run, module, dict(ep.state_dict), rel, kind="torch-export")
        _smoke_exported(run, ep, module, rel)
    if not found:
        for rel, w in without:
            run.add(ReasonCode.PARTIAL_CHECKPOINT, f"{rel} {w.problem}",
                    "upload the model weights (model_state_dict) together with or instead of the optimizer "
                    "state", rel, keys=list(w.other_keys))
        return
    for rel, w in without:
        run.add(None, f"{rel} {w.problem}; not needed for validation", file=rel, severity=Severity.INFO)
    state, used = _merge(run, found, indexed)
    file = used[0] if len(used) == 1 else None
    modules = [w.module for _, w in found if w.module is not None]
    if modules:
        _finish_module(run, modules[0], state, file, kind="pickled-module")
        _no_example(run, file, "a pickled module file carries no input example")
        return
    _check_values(run, state, file)
    run.info["model_kind"] = "state_dict"
    config = None if run.job.arch else _hf_config(run, files, used)
    if config is not None:
        if not run.blocked:  # a lying index or a missing shard: not a state_dict worth building
            _check_hf(run, state, file, config)
        return
    if not run.job.arch:
        run.add(ReasonCode.PARTIAL_CHECKPOINT,
                f"{_what_holds(run, files, used)} a bare state_dict ({checks.count(len(state), 'tensor')}) "
                "and no architecture was declared to load it into (no config.json beside the weights, no "
                "ckpt_stage.arch tag)", "save the model with save_pretrained (config.json next to the weights), "
                "or " + checks.ARCH_TAG_HINT, file)
        return
    with run.timed("load"):
        model = _build_arch(run, state, file)
    if model is not None:
        _no_example(run, file, f"bare weights loaded into {run.job.arch} have no input example")


def _what_holds(run: _Run, files: list[tuple[str, FileFormat]], used: list[str]) -> str:
    """Subject of a sentence about the weights read from ``used``: "model.safetensors holds", "the 3
    shards of model.safetensors.index.json hold", "a.pt and b.pt hold"."""
    if len(used) == 1:
        return f"{used[0]} holds"
    for r in _indexes(run, files):
        if set(used) <= set(r.shards or ()):
            return f"the {len(used)} shards of {r.path} hold"
    return f"the {len(used)} files {checks.listing(used)} hold"


# --------------------------------------------------------------------------------------------------
# Hugging Face folders (config.json beside the weights)


def _hf_config(run: _Run, files: list[tuple[str, FileFormat]], used: list[str]) -> str | None:
    """The ``config.json`` of the folder the weights were read from (None: not a Hugging Face folder)."""
    folders = {posixpath.dirname(rel) for rel in used}
    if len(folders) != 1:
        return None
    (folder,) = folders
    rel = posixpath.join(folder, "config.json") if folder else "config.json"
    return rel if any(f == rel for f, _ in files) else None


def _check_hf(run: _Run, state: dict[str, torch.Tensor], file: str | None, config_rel: str) -> None:
    from ckpt_stage.load import hf

    with run.timed("load"):
        try:
            built = hf.build(hf.read_config(run.path(config_rel), config_rel), config_rel)
        except hf.HfError as exc:
            run.add(exc.code, exc.message, exc.hint, config_rel, **exc.detail)
            return
        model, arch = built.model, built.arch
        run.info["arch"] = arch
        run.info["model_kind"] = "hf-folder"
        run.runtime.setdefault("transformers", built.transformers_version)
        tied = hf.tied_keys(model)
        ignored = set(hf.ignored_unexpected(model, list(state)))
        if ignored:
            run.add(None, f"ignoring {checks.count(len(ignored), 'tensor')} {arch} no longer uses "
                    f"({checks.listing(sorted(ignored))})", file=file, severity=Severity.INFO)
        ckpt = {k: v for k, v in checks.metas(state).items() if k not in ignored}
        wanted = {k: v for k, v in checks.metas(model.state_dict()).items() if k not in tied or k in ckpt}
        found = checks.compare_state(ckpt, wanted, file=file or config_rel, arch=arch)
        for f in found:  # the hint of compare_state speaks of ckpt_stage.arch_kwargs; here it is config.json
            if f.code in (ReasonCode.SHAPE_MISMATCH, ReasonCode.ARCHITECTURE_MISMATCH):
                f = Finding(f.code, f.message, f"{config_rel} does not describe these weights: upload the config.json "
                            "that save_pretrained wrote with them", f.file, f.severity, f.detail)
            run.extend(f)
        if any(f.blocking for f in found):
            return
        try:
            model.load_state_dict({k: v for k, v in state.items() if k not in ignored}, strict=False, assign=True)
            left = hf.finish(model)
        except Exception as exc:
            run.add(ReasonCode.ARCHITECTURE_MISMATCH, f"{arch}.load_state_dict refused the weights: {_brief(exc)}",
                    "upload the config.json that save_pretrained wrote with these weights", file or config_rel)
            return
        if left:
            run.add(ReasonCode.ARCHITECTURE_MISMATCH,
                    f"{checks.count(len(left), 'tensor')} of {arch} got no value from the checkpoint: "
                    f"{checks.listing(left)}", "upload every shard and the config.json save_pretrained wrote",
                    file or config_rel, missing=left[:50])
            return
        model.eval()
    made = hf.synthetic_input(model, built.config)
    if made is None:
        _no_example(run, file or config_rel, f"the stage cannot make up an input for {arch} "
                    f"(main input {getattr(model, 'main_input_name', '?')!r})")
        return
    kwargs, described = made
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model(**kwargs)
    except Exception as exc:
        run.add(ReasonCode.SMOKE_INFERENCE_FAILED,
                f"forward pass of {arch} on a synthetic input ({described}) raised {_brief(exc)}",
                "the weights load but the model does not run on this runtime: check config.json and the "
                "transformers version the model was saved with", file or config_rel, example="synthetic")
        return
    finally:
        run.timings["inference"] += time.perf_counter() - t0
    run.info["forward"] = f"synthetic {described}"
    _check_smoke_output(run, out, file or config_rel, f"a synthetic input ({described})")


def _check_values(run: _Run, state: dict[str, Any], file: str | None) -> None:
    """Finite values, then the layer table with each tensor's fingerprint for drift (one pass for both)."""
    norms: dict[str, float] = {}
    run.extend(checks.nonfinite(state, file=file, norms=norms))
    layers, count = checks.layers_info(state, norms)
    run.info["layers"] = layers
    run.info["param_count"] = count


def _build_arch(run: _Run, state: dict[str, torch.Tensor], file: str | None) -> torch.nn.Module | None:
    job = run.job
    arch = job.arch or ""
    try:
        cls = checks.resolve_arch(arch, job.arch_modules)
    except checks.ArchError as exc:
        run.add(ReasonCode.PARTIAL_CHECKPOINT, exc.message, exc.hint, file, arch=arch)
        return None
    except Exception as exc:  # importing the module itself failed (SyntaxError, its own imports…)
        run.add(ReasonCode.PARTIAL_CHECKPOINT, f"architecture {arch!r}: importing it failed: {_brief(exc)}",
                "fix the package that defines the architecture", file, arch=arch)
        return None
    kwargs = dict(job.arch_kwargs or {})
    try:
        # Built on the meta device: no memory for parameters; load_state_dict(assign=True) then
        # adopts the checkpoint's (mmap-backed) tensors instead of copying into fresh ones.
        with torch.device("meta"):
            model = cls(**kwargs)
    except Exception as exc:
        run.add(ReasonCode.PARTIAL_CHECKPOINT,
                f"constructing {arch}(**{json.dumps(kwargs)[:200]}) failed: {_brief(exc)}",
                "fix ckpt_stage.arch_kwargs (a JSON object of constructor arguments)", file, arch=arch)
        return None
    run.info["arch"] = arch
    found = checks.compare_state(checks.metas(state), checks.metas(model.state_dict()), file=file, arch=arch)
    run.extend(found)
    if any(f.blocking for f in found):
        return None
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except Exception as exc:
        run.add(ReasonCode.ARCHITECTURE_MISMATCH, f"{arch}.load_state_dict refused the weights: {_brief(exc)}",
                "check that ckpt_stage.arch names the architecture these weights were trained with", file)
        return None
    model.eval()
    return model


def _finish_module(run: _Run, module: torch.nn.Module, state: dict[str, Any], file: str | None,
                   *, kind: str) -> None:
    run.info["model_kind"] = kind
    _check_values(run, state, file)


def _no_example(run: _Run, file: str | None, why: str) -> None:
    run.add(None, f"no forward pass was run: {why}",
            "log the model with MLflow and input_example=... so the stage can run a forward pass",
            file, Severity.WARNING, kind=NO_INPUT_EXAMPLE)


# --------------------------------------------------------------------------------------------------
# torch.export archives


def _load_pt2(run: _Run, rel: str, facts_out: list[pt2.Pt2Facts] | None = None) -> tuple[Any, torch.nn.Module] | None:
    path = run.path(rel)
    try:
        facts = pt2.inspect(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        run.add(ReasonCode.CORRUPT_ARCHIVE, f"{rel} is not a readable torch.export archive: {_brief(exc)}",
                "re-export the model with torch.export.save / mlflow.pytorch.log_model", rel)
        return None
    if facts_out is not None:
        facts_out.append(facts)
    run.info.setdefault("pt2", {}).update({"archive_version": facts.archive_version,
                                            "file_format_version": facts.file_format_version,
                                            "schema": {k: list(v) for k, v in facts.schemas.items()}})
    runtime_torch = checks.public(torch.__version__)
    ok = True
    if facts.archive_version is not None and facts.archive_version != pt2.ARCHIVE_VERSION:
        run.add(ReasonCode.LIBRARY_VERSION_MISMATCH,
                f"{rel} has pt2 archive version {facts.archive_version}; torch {runtime_torch} reads "
                f"archive version {pt2.ARCHIVE_VERSION} only", "re-export the model with the serving runtime's torch",
                rel, recorded=facts.archive_version)
        ok = False
    if facts.file_format_version is not None and facts.file_format_version > pt2.MAX_FILE_FORMAT_VERSION:
        run.add(ReasonCode.LIBRARY_VERSION_MISMATCH,
                f"{rel} uses torch file format version {facts.file_format_version}; torch {runtime_torch} "
                f"reads up to {pt2.MAX_FILE_FORMAT_VERSION}", "re-export the model with the serving runtime's torch", rel)
        ok = False
    ours = pt2.schema_version()
    for name, (major, minor) in facts.schemas.items():
        if (major, minor) == (0, 0) or ours == (0, 0):
            continue
        if major != ours[0]:
            run.add(ReasonCode.LIBRARY_VERSION_MISMATCH,
                    f"{rel}: {name} uses torch.export schema {major}.{minor}; torch {runtime_torch} reads "
                    f"schema {ours[0]}.x (it has {ours[0]}.{ours[1]})",
                    "re-export the model with the serving runtime's torch", rel, schema=[major, minor])
            ok = False
        elif minor > ours[1]:
            run.add(ReasonCode.LIBRARY_VERSION_MISMATCH,
                    f"{rel}: {name} uses torch.export schema {major}.{minor}, newer than torch "
                    f"{runtime_torch}'s {ours[0]}.{ours[1]}; newer fields may be ignored",
                    "re-export the model with the serving runtime's torch", rel, Severity.WARNING)
    if facts.compiled:
        run.add(ReasonCode.UNSUPPORTED_FORMAT,
                f"{rel} is an AOTInductor package with compiled code ({checks.listing(facts.compiled)}); the "
                "stage does not load native libraries from a model", "register the torch.export program "
                "(torch.export.save / mlflow.pytorch.log_model), not the AOTInductor-compiled package", rel,
                records=facts.compiled)
        ok = False
    if facts.code:
        run.add(ReasonCode.UNSAFE_PICKLE,
                f"{rel} carries code, not just weights: {checks.listing(facts.code)}",
                "export a model whose constants are tensors only (no opaque or TorchBind objects)", rel,
                records=facts.code)
        ok = False
    if facts.unsupported:
        run.add(ReasonCode.UNSUPPORTED_FORMAT, f"{rel}: {'; '.join(facts.unsupported[:3])}",
                pt2_grammar.HINT_SCHEMA, rel)
        ok = False
    if facts.unsafe:
        # The scanner refuses the same strings first; this keeps torch from ever seeing them even
        # when the worker is handed a file the scan did not describe.
        more = f"; and {len(facts.unsafe) - 3} more" if len(facts.unsafe) > 3 else ""
        run.add(ReasonCode.UNSAFE_CODE, f"{rel}: {'; '.join(facts.unsafe[:3])}{more}", pt2_grammar.HINT, rel,
                fields=facts.unsafe[:20])
        ok = False
    if not ok:
        return None
    try:
        ep, module, refusals = pt2.load(path)
    except MemoryError:
        raise
    except Exception as exc:
        _load_error(run, rel, exc)
        return None
    if refusals:  # torch swallowed our refusal and went on: still unsafe content
        run.add(ReasonCode.UNSAFE_PICKLE, f"{rel}: {refusals[0][:300]}", "save only tensors in the archive", rel)
        return None
    _check_pt2_constants(run, ep, rel)
    return ep, module


def _check_pt2_constants(run: _Run, ep: Any, rel: str) -> None:
    """Tensors the program uses that are not in ``ep.state_dict``: lifted tensor constants
    (``self.const = torch.tensor(...)``) and non-persistent buffers live in ``ep.constants``, and
    a NaN there poisons every output as surely as one in a weight."""
    constants = getattr(ep, "constants", None) or {}
    state = getattr(ep, "state_dict", None) or {}
    extra = {f"{k} (constant)": v for k, v in constants.items() if isinstance(v, torch.Tensor) and k not in state}
    if extra:
        run.extend(checks.nonfinite(extra, file=rel))


def _smoke_exported(run: _Run, ep: Any, module: torch.nn.Module, rel: str) -> None:
    """A bare .pt2 has no MLflow example, but the exporter stored the example it traced with."""
    example = getattr(ep, "example_inputs", None)
    if not (isinstance(example, tuple) and len(example) == 2):
        _no_example(run, rel, "the archive stores no example inputs")
        return
    args, kwargs = example
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = module(*args, **kwargs)
    except Exception as exc:
        run.add(ReasonCode.SMOKE_INFERENCE_FAILED,
                f"forward pass on the archive's own example inputs raised {_brief(exc)}",
                "the exported program does not run on this runtime; re-export it", rel)
        return
    finally:
        run.timings["inference"] += time.perf_counter() - t0
    _check_smoke_output(run, out, rel, "the archive's own example inputs")


def _check_smoke_output(run: _Run, out: Any, rel: str, example: str) -> None:
    """NaN/Inf in what a forward pass returned. Reported as ``SMOKE_INFERENCE_FAILED``, not
    ``NONFINITE_WEIGHTS``: the weights may well be finite (a log of a negative, a 0/0 in the graph,
    an overflow); what is certain is that the forward pass on the example produced no usable output.
    Non-finite weights are reported on their own by the weight check."""
    leaves: dict[str, torch.Tensor] = {}

    def walk(o: Any, name: str, depth: int) -> None:
        if len(leaves) >= 1000 or depth > 8:
            return
        if isinstance(o, torch.Tensor):
            leaves[name] = o
        elif isinstance(o, (tuple, list)):
            for i, v in enumerate(o):
                walk(v, f"{name}[{i}]", depth + 1)
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{name}[{k!r}]", depth + 1)

    walk(out, "output", 0)
    found = checks.nonfinite(leaves, file=rel) if leaves else None
    if found is None:
        return
    run.add(ReasonCode.SMOKE_INFERENCE_FAILED,
            f"the forward pass on {example} returned non-finite values: "
            f"{found.message.split(': ', 1)[-1]}",
            "the model produces NaN/Inf on its own example: check the weights, the exported graph "
            "(a log or a division of the example's values) and the example itself", rel,
            tensors=found.detail.get("tensors", []))


# --------------------------------------------------------------------------------------------------
# MLflow models


def _check_mlflow(run: _Run, rel_dir: str, files: list[tuple[str, FileFormat]]) -> None:
    root = run.path(rel_dir) if rel_dir else run.job.root
    mlmodel_rel = posixpath.join(rel_dir, "MLmodel") if rel_dir else "MLmodel"
    try:
        model = mlflow_model.read(root, rel_dir)
    except mlflow_model.ModelDirError as exc:
        run.add(ReasonCode.CORRUPT_ARCHIVE, exc.message, exc.hint, mlmodel_rel)
        return
    run.recorded.update(model.recorded)
    _compare_versions(run, model, mlmodel_rel)
    with mlflow_model.model_code_on_path(run.job.root, dict(run.job.model_code or {})) as code:
        _check_mlflow_model(run, model, mlmodel_rel, tuple(code.modules), files)
    if code.folders:
        run.info["model_code_ran"] = list(code.ran)
        if code.ran:
            run.add(None, f"the version's own code ran in the isolated worker: {checks.listing(code.ran)} "
                    "(allowed by CKPT_STAGE_ALLOW_MODEL_CODE); it runs on every serving host too",
                    "review that code like any dependency of the serving runtime", mlmodel_rel,
                    Severity.INFO, modules=list(code.ran))


def _check_mlflow_model(run: _Run, model: mlflow_model.MlflowModel, mlmodel_rel: str,
                        code_modules: tuple[str, ...], files: list[tuple[str, FileFormat]]) -> None:
    flavors = model.mlmodel.get("flavors")
    transformers_flavor = flavors.get("transformers") if isinstance(flavors, dict) else None
    if model.pytorch is None and isinstance(transformers_flavor, dict):
        _check_mlflow_transformers(run, model, transformers_flavor, mlmodel_rel, files)
        return
    if model.pytorch is None:
        flavors = model.mlmodel.get("flavors")
        names = ", ".join(flavors) if isinstance(flavors, dict) else "none"
        run.add(ReasonCode.UNSUPPORTED_FORMAT, f"the MLflow model has no pytorch flavor (flavors: {names})",
                "log the model with mlflow.pytorch.log_model", mlmodel_rel)
        return
    data_dir = str(model.pytorch.get("model_data") or "data")
    try:
        pt2_path = model.inside(posixpath.join(data_dir, "model.pt2"))
        pth_path = model.inside(posixpath.join(data_dir, "model.pth"))
    except mlflow_model.ModelDirError as exc:
        run.add(ReasonCode.CORRUPT_ARCHIVE, exc.message, exc.hint, mlmodel_rel)
        return
    module: torch.nn.Module | None = None
    state: dict[str, Any] = {}
    # mlflow.pytorch._load_model's order: model.pth wins when both exist, so that is what serving loads.
    if os.path.isfile(pth_path):
        rel = model.relpath(data_dir, "model.pth")
        with run.timed("load"):
            module = _load_pickled_module(run, rel, pth_path, code_modules)
        if module is None:
            return
        state = dict(module.state_dict())
        kind = "mlflow-pickle"
    elif os.path.isfile(pt2_path):
        rel = model.relpath(data_dir, "model.pt2")
        facts: list[pt2.Pt2Facts] = []
        with run.timed("load"):
            got = _load_pt2(run, rel, facts)
        if facts and facts[0].torch_version:
            _compare_archive_torch(run, model, facts[0].torch_version, rel)
        if got is None:
            return
        ep, module = got
        state = dict(ep.state_dict)
        kind = "mlflow-pt2"
    else:
        run.add(ReasonCode.ARTIFACT_MISSING,
                f"the MLflow model's pytorch flavor names {data_dir}/ but it holds neither model.pt2 nor "
                "model.pth", "upload the whole model directory that mlflow.pytorch.log_model wrote",
                mlmodel_rel)
        return
    _finish_module(run, module, state, rel, kind=kind)
    _smoke_mlflow(run, model, module, rel)


def _check_mlflow_transformers(run: _Run, model: mlflow_model.MlflowModel, flavor: dict[str, Any], mlmodel_rel: str,
                               files: list[tuple[str, FileFormat]]) -> None:
    """``mlflow.transformers.log_model``: the pipeline's model is a save_pretrained folder under
    ``flavors.transformers.model_binary`` (``model/``), its tokenizer and processors under ``components/``
    (configs the scanner checked for auto_map). The folder is validated as a Hugging Face folder; the
    forward pass uses a synthetic input (the pipeline's example is text, which needs the tokenizer)."""
    binary = str(flavor.get("model_binary") or "model")
    try:
        model.inside(binary)
    except mlflow_model.ModelDirError as exc:
        run.add(ReasonCode.CORRUPT_ARCHIVE, exc.message, exc.hint, mlmodel_rel)
        return
    folder = model.relpath(posixpath.normpath(binary))
    inside = [(rel, f) for rel, f in files if posixpath.dirname(rel) == folder]
    ckpts = [(rel, f) for rel, f in inside if f in _CHECKPOINT_FORMATS]
    recorded = flavor.get("transformers_version")
    if isinstance(recorded, str) and recorded:
        run.recorded.setdefault("transformers", recorded)
        try:
            from importlib.metadata import PackageNotFoundError, version

            runtime = version("transformers")
        except PackageNotFoundError:
            runtime = None
        run.extend(checks.compare_library("transformers", recorded, runtime, file=mlmodel_rel, newer_blocks=True,
                                          source="MLmodel flavors.transformers.transformers_version"))
    if not ckpts:
        where = flavor.get("source_model_name") or flavor.get("source_model_revision")
        ref = f" (it refers to {str(where)[:120]!r})" if where else ""
        run.add(ReasonCode.ARTIFACT_MISSING,
                f"the MLflow transformers model holds no weights under {folder}/{ref}: it was logged with "
                "save_pretrained=False, or the folder was not uploaded",
                "log the model with mlflow.transformers.log_model(..., save_pretrained=True) (the default), so the "
                "weights the stage validates are the ones served", mlmodel_rel)
        return
    run.info["flavor"] = "transformers"
    _check_bare(run, ckpts, inside)


def _compare_versions(run: _Run, model: mlflow_model.MlflowModel, file: str) -> None:
    rt = run.runtime
    run.extend(checks.compare_library("torch", model.recorded.get("torch"), rt.get("torch"), file=file,
                                      newer_blocks=True, source=model.sources.get("torch", "")))
    rec_mlflow, run_mlflow = checks.major_minor(model.recorded.get("mlflow")), checks.major_minor(rt.get("mlflow"))
    # MLflow reads models of older versions; a newer major may have changed the MLmodel format.
    if rec_mlflow and run_mlflow and rec_mlflow > run_mlflow:
        run.extend(checks.compare_library("mlflow", model.recorded.get("mlflow"), rt.get("mlflow"), file=file,
                                          newer_blocks=rec_mlflow[0] > run_mlflow[0],
                                          source=model.sources.get("mlflow", "")))
    run.extend(checks.compare_library("python", model.recorded.get("python"), rt.get("python"), file=file,
                                      newer_blocks=False, source=model.sources.get("python", "")))


def _compare_archive_torch(run: _Run, model: mlflow_model.MlflowModel, archived: str, rel: str) -> None:
    """The torch version inside the pt2 archive, when it disagrees with the MLmodel's."""
    if checks.major_minor(archived) == checks.major_minor(model.recorded.get("torch")):
        return
    run.recorded.setdefault("torch", archived)
    run.extend(checks.compare_library("torch", archived, run.runtime.get("torch"), file=rel, newer_blocks=True,
                                      source="models/model.json in the pt2 archive"))


def _load_pickled_module(run: _Run, rel: str, path: str, code_modules: tuple[str, ...] = ()) -> torch.nn.Module | None:
    """A whole pickled module; ``code_modules`` are the version's own allowed top-level modules (on
    sys.path now), whose classes this job's allowlist accepts like CKPT_STAGE_PICKLE_MODULES'."""
    if not run.job.allow_pickled_models:
        run.add(ReasonCode.UNSAFE_PICKLE,
                f"{rel} is a whole pickled nn.Module (MLflow serialization_format='pickle') and pickled "
                "models are disabled on this stage", _PICKLED_MODELS_HINT, rel)
        return None
    fmt = format_of(path)
    if fmt is FileFormat.TORCH_ZIP and _zip_version_problem(run, rel):
        return None
    policy = safe_torch.PicklePolicy(allow_pickled_models=True,
                                     pickle_modules=tuple(dict.fromkeys((*run.job.pickle_modules, *code_modules))))
    try:
        obj = safe_torch.load_allowlisted(path, zip_format=fmt is FileFormat.TORCH_ZIP, policy=policy)
    except MemoryError:
        raise
    except Exception as exc:
        _load_error(run, rel, exc)
        return None
    if isinstance(obj, torch.nn.Module):
        obj.eval()
        return obj
    w = checks.find_weights(obj)
    what = "a state_dict" if w.state is not None else f"a {type(obj).__name__}"
    run.add(ReasonCode.PARTIAL_CHECKPOINT,
            f"{rel} holds {what} where MLflow expects a whole nn.Module",
            "log the module itself (mlflow.pytorch.log_model(model, ...)), or register the state_dict as a "
            "bare checkpoint with ckpt_stage.arch", rel)
    return None


def _smoke_mlflow(run: _Run, model: mlflow_model.MlflowModel, module: torch.nn.Module, rel: str) -> None:
    if not model.example_info:
        _no_example(run, model.relpath("MLmodel"), "the MLflow model was logged without an input example")
        return
    try:
        inputs, used = mlflow_model.read_example(model)
    except FileNotFoundError as exc:
        run.add(ReasonCode.ARTIFACT_MISSING, f"MLmodel names the input example {exc.args[0]}, which is missing",
                "upload the whole model directory that MLflow wrote", model.relpath("MLmodel"))
        return
    except (mlflow_model.ExampleError, mlflow_model.ModelDirError) as exc:
        msg = getattr(exc, "message", None) or str(exc)
        run.add(ReasonCode.SMOKE_INFERENCE_FAILED, f"the input example cannot be fed to the model: {msg}",
                "log a numeric input example (numpy array, dict of arrays or a numeric DataFrame)",
                model.relpath("MLmodel"))
        return
    used_rel = model.relpath(used)
    described = ", ".join(f"{checks.dtype_name(t.dtype)} {checks.shape_str(t.shape)}" for t in inputs)
    sig_notes = []
    for i, (t, spec) in enumerate(zip(inputs, model.inputs or [], strict=False)):
        if not checks.shape_ok(spec.shape, tuple(t.shape)):
            label = spec.name or f"input {i}"
            sig_notes.append(f"{label} is {checks.shape_str(t.shape)} but the input signature says "
                             f"{checks.shape_str(spec.shape)}")
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = module(*inputs)
    except Exception as exc:
        note = f" ({'; '.join(sig_notes)})" if sig_notes else ""
        run.add(ReasonCode.SMOKE_INFERENCE_FAILED,
                f"forward pass on the input example {used} ({described}) raised {_brief(exc)}{note}",
                "make the logged input example match what the model takes (shape, dtype), or fix the model",
                used_rel, example=used)
        return
    finally:
        run.timings["inference"] += time.perf_counter() - t0
    _check_smoke_output(run, out, used_rel, f"the input example {used}")
    if sig_notes:
        run.add(None, "the input example disagrees with the input signature: " + "; ".join(sig_notes),
                "log the signature inferred from the example", used_rel, Severity.WARNING)
    if model.outputs:
        problem = checks.check_output(model.outputs, out)
        if problem:
            run.add(ReasonCode.SMOKE_INFERENCE_FAILED,
                    f"the output on the input example breaks the logged signature: {problem}",
                    "re-log the model with the signature it really has (infer_signature on a real output), "
                    "or fix the model's head", model.relpath("MLmodel"), problem=problem)
