"""Static checks on bytes, before anything is unpickled or imported (layer 1 of the security design).

Entry point: ``scan_version(root, paths, settings) -> ScanResult``. Pure with respect to the
outside world: reads the given files, runs no code from them, imports no torch.

Modules: ``reading`` (the one reading of each file that the worker obeys), ``sniff`` (format by content), ``archives`` (zip structure from raw bytes),
``pickles`` (pickle streams against ``allowlist``), ``safetensors`` (header rules),
``formats`` (per-format checks, tensor metadata), ``estimate`` (memory needed), ``mlflow_dir``
(code a serving host would execute: MLmodel loader and pickle modules, code folders, ``.py`` files,
custom pyfunc models, Hugging Face ``auto_map``), ``envspec`` (what serving would install from the
model's requirements/conda/python_env/uv files).

For the worker's loader (importable without torch): ``allowlist.check(module, name, settings,
factory=False) -> Ruling(allowed, why)``, ``allowlist.is_allowed``, ``allowlist.normalize``,
``allowlist.split_global``, ``allowlist.NUMPY_DTYPE_CLASSES``; ``pickles.pickle_globals(bytes)``
lists what a pickle imports.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_stage.config import Settings
from ckpt_stage.domain import FileFormat, Finding, ReasonCode
from ckpt_stage.scan._common import HINT_NOT_CKPT, FileScan, Region
from ckpt_stage.scan.estimate import estimate_bytes, resource_finding
from ckpt_stage.scan.formats import Ctx, scan_region
from ckpt_stage.policy import OTHER_FLAVOR
from ckpt_stage.scan.mlflow_dir import fold_pickle_findings, other_flavor, scan_code
from ckpt_stage.scan.reading import Reading, reading_of

__all__ = ["Reading", "ScanResult", "scan_file", "scan_version"]


@dataclass(frozen=True)
class ScanResult:
    formats: dict[str, FileFormat] = field(default_factory=dict)
    """Format of every scanned file, keyed by its path relative to root."""
    findings: tuple[Finding, ...] = ()
    estimated_bytes: int = 0
    """Memory a load needs, from tensor metadata (not file sizes where metadata is available)."""
    readings: dict[str, Reading] = field(default_factory=dict)
    """The scan's reading of every file it could open (``reading.Reading``): the worker loads each
    file only as its reading says, and refuses one that no longer matches it."""
    model_code: dict[str, list[str]] = field(default_factory=dict)
    """Code folders the operator allowed (``CKPT_STAGE_ALLOW_MODEL_CODE``) → their top-level modules;
    the worker alone may import them (``LoadJob.model_code``)."""
    recorded: dict[str, str] = field(default_factory=dict)
    """Library versions the version's MLmodel and requirements.txt recorded (``mlflow_dir.recorded_versions``),
    for the report when the worker did not run."""
    other_flavor: str = ""
    """The version is only of MLflow flavor(s) the stage does not validate (``sklearn``): its
    UNSUPPORTED_FORMAT finding carries ``detail["kind"] == OTHER_FLAVOR`` for the policy
    (``CKPT_STAGE_OTHER_FLAVORS``), and nothing is loaded."""


def scan_file(root: Path, rel: str, settings: Settings, *, mlflow_dir: bool = False) -> tuple[FileFormat, FileScan, bool]:
    """Scan one file: (format, what was found, counts as a checkpoint)."""
    fs = FileScan(rel)
    full = Path(root) / rel
    try:
        st = os.stat(full)
    except FileNotFoundError:
        fs.findings.append(Finding(ReasonCode.ARTIFACT_MISSING, f"{rel}: file does not exist",
                                   "upload the file the model version names, or fix its path", file=rel))
        return FileFormat.UNKNOWN, fs, False
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        fs.findings.append(Finding(ReasonCode.NOT_A_CHECKPOINT, f"{rel}: not a regular file", HINT_NOT_CKPT,
                                   file=rel))
        return FileFormat.UNKNOWN, fs, False
    try:
        fd = os.open(full, os.O_RDONLY)
    except OSError as exc:
        fs.findings.append(Finding(ReasonCode.INTERNAL_ERROR, f"{rel}: cannot open for scanning: {exc}",
                                   "check the stage's cache directory permissions", file=rel))
        return FileFormat.UNKNOWN, fs, False
    try:
        opened = os.fstat(fd)
        region = Region(fd, 0, opened.st_size, rel)
        fmt, counts = scan_region(region, Ctx(settings, fs), rel, mlflow_dir=mlflow_dir)
        fs.reading = reading_of(region, rel, fmt, fs, opened)
    except Exception as exc:  # a scanner bug must not pass a file, nor quarantine it as the model's fault
        fs.findings.append(Finding(ReasonCode.INTERNAL_ERROR,
                                   f"{rel}: the static scanner failed: {type(exc).__name__}: {str(exc)[:200]}",
                                   "report this to the stage's operators; the version stays eligible for a re-run",
                                   file=rel))
        return FileFormat.UNKNOWN, fs, True
    finally:
        os.close(fd)
    return fmt, fs, counts


def scan_version(root: Path, paths: Sequence[str], settings: Settings) -> ScanResult:
    """Scan every file of a version (``paths`` relative to ``root``).

    Never raises for hostile or broken input: every problem is a Finding (docs/contract.md codes)
    naming the file, the concrete problem and what the model owner should do.
    """
    root = Path(root)
    mlflow_dir = any(posixpath.basename(p) == "MLmodel" for p in paths)
    code = scan_code(root, paths, settings)
    # The version's own modules the operator allowed are, for this version only, allowed in its
    # pickles too (a code_paths model pickles its classes by reference).
    file_settings = settings
    if code.allowed_modules:
        file_settings = settings.replace(
            pickle_modules=tuple(dict.fromkeys(settings.pickle_modules + code.allowed_modules)))
    formats: dict[str, FileFormat] = {}
    readings: dict[str, Reading] = {}
    findings: list[Finding] = list(code.findings)
    scans: list[FileScan] = []
    checkpoints = 0
    for rel in paths:
        fmt, fs, counts = scan_file(root, rel, file_settings, mlflow_dir=mlflow_dir)
        formats[rel] = fmt
        if fs.reading is not None:
            readings[rel] = fs.reading
        findings.extend(fs.findings)
        scans.append(fs)
        checkpoints += counts
    findings = fold_pickle_findings(findings, code)
    flavor = other_flavor(code, paths)
    if flavor:
        findings = [dataclasses.replace(f, detail={**f.detail, "kind": OTHER_FLAVOR})
                    if f.file in code.other_flavors and f.code is ReasonCode.UNSUPPORTED_FORMAT else f
                    for f in findings]
    if not checkpoints and not any(f.blocking for f in findings):
        listing = ", ".join(f"{p} ({formats[p].value})" for p in list(paths)[:10]) or "no files"
        findings.append(Finding(ReasonCode.NOT_A_CHECKPOINT,
                                f"none of the {len(paths)} file(s) is a model checkpoint: {listing}",
                                HINT_NOT_CKPT))
    estimated = estimate_bytes(scans)
    too_big = resource_finding(estimated, settings)
    if too_big is not None:
        findings.append(too_big)
    return ScanResult(formats=formats, findings=tuple(findings), estimated_bytes=estimated, readings=readings,
                      model_code=dict(code.model_code), other_flavor=flavor,
                      recorded=dict(code.recorded))
