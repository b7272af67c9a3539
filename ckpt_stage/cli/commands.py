"""The ``ckpt-stage`` command line (docs/contract.md "Command line").

``--json`` prints exactly one JSON document on stdout; logs, progress and anything a library prints
go to stderr (stdout is redirected to stderr while the command works).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from ckpt_stage.config import Settings, parse_arch_kwargs
from ckpt_stage.domain import RERUNNABLE_STATUSES, ReasonCode, Report, Status, Verdict, VersionRef
from ckpt_stage.errors import CkptStageError, ConfigError, UsageError

EXIT_USAGE = 2
EXIT_ERROR = 3
VERDICT_COLOUR = {Verdict.PASS: "green", Verdict.QUARANTINE: "red", Verdict.ERROR: "yellow", Verdict.SKIP: "magenta"}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "urllib3", "boto3", "s3transfer", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[Any]:
    real = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield real


def _emit_json(real_stdout: Any, doc: Any) -> None:
    real_stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    real_stdout.flush()


def _fail(exc: CkptStageError, code: int) -> None:
    click.echo(f"ckpt-stage: error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"  hint: {exc.hint}", err=True)
    sys.exit(code)


def _run(fn: Callable[[], int]) -> None:
    """Run a command body; map the stage's errors to exit statuses with a clear message."""
    try:
        code = fn()
    except (UsageError, ConfigError) as exc:
        _fail(exc, EXIT_USAGE)
    except CkptStageError as exc:
        _fail(exc, EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code)


def _print_report(report: Report) -> None:
    from rich.console import Console

    console = Console(stderr=False)
    colour = VERDICT_COLOUR[report.verdict]
    title = f"{report.model.name} v{report.model.version}" if report.model else "inspect"
    console.print(f"[bold]{title}[/bold]: [{colour}]{report.verdict.value}[/{colour}]  {report.summary}")
    for f in report.reasons:
        where = f" ({f.file})" if f.file else ""
        console.print(f"  [{colour}]{f.code.value if f.code else '-'}[/{colour}]{where}: {f.message}")
        if f.hint:
            console.print(f"    hint: {f.hint}")
    for f in report.findings:
        if not f.blocking:
            console.print(f"  [dim]{f.severity.value}: {f.message}[/dim]")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
@click.version_option(package_name="ckpt-stage")
def main(verbose: bool) -> None:
    """Validate PyTorch checkpoints registered in MLflow before anyone deploys them."""
    _setup_logging(verbose)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--arch", help="Architecture for bare state_dicts: package.module:Class (allowed prefixes only).")
@click.option("--arch-kwargs", help="JSON object of constructor arguments for --arch.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def inspect(paths: tuple[Path, ...], arch: str | None, arch_kwargs: str | None, as_json: bool) -> None:
    """Validate local checkpoint files or an MLflow model directory, offline."""

    def body() -> int:
        settings = Settings.from_env()
        _start_worker_early(settings)
        from ckpt_stage.pipeline import inspect_paths

        kwargs = parse_arch_kwargs(arch_kwargs, source="--arch-kwargs")
        with _stdout_to_stderr() as real:
            report = inspect_paths(list(paths), arch=arch, arch_kwargs=kwargs, settings=settings)
            if as_json:
                _emit_json(real, report.to_dict())
        if not as_json:
            _print_report(report)
        return report.verdict.exit_code

    _run(body)


@main.command()
@click.option("--model", required=True, help="Registered model name.")
@click.option("--version", "version", required=True, help="Model version number.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def validate(model: str, version: str, as_json: bool) -> None:
    """Validate one registered version end to end and record the verdict."""

    def body() -> int:
        settings = Settings.from_env()
        _start_worker_early(settings)
        from ckpt_stage.pipeline import validate_version_safely

        with _stdout_to_stderr() as real:
            ref = VersionRef(model, str(version))
            with _progress_bar(as_json, str(ref)) as progress:
                outcome = validate_version_safely(ref, settings=settings, progress=progress)
            if outcome.report is None:
                raise CkptStageError(outcome.skipped, code=ReasonCode.INTERNAL_ERROR,
                                     hint=f"a decided version gets a new attempt with `ckpt-stage rerun --model "
                                          f"{model} --version {version}`; a leased one is free when its lease ends")
            if as_json:
                _emit_json(real, outcome.report.to_dict())
        if not as_json:
            _print_report(outcome.report)
        return outcome.report.verdict.exit_code

    _run(body)


def _start_worker_early(settings: Settings) -> None:
    """Start the worker's fork server (``import torch`` and the loader: the largest part of a fresh
    process's fixed cost) before this process imports the pipeline, boto3 and MLflow, so the two
    import on both cores at once instead of one after the other."""
    from ckpt_stage.sandbox.runner import prewarm

    prewarm(settings)


@contextlib.contextmanager
def _progress_bar(as_json: bool, label: str = "download") -> Iterator[Callable[[int], None] | None]:
    """Download progress (bytes, rate, elapsed) on a terminal only: never with --json, never in logs.

    Yields the ``progress(n_bytes)`` callback ``validate_version`` passes to the parallel download
    (rich's ``advance`` is thread-safe). The total is unknown up front, so the bar pulses. Log records
    are routed through the live display while it runs, so they print above the bar instead of
    tearing it; the bar is transient and the per-version line stays.
    """
    if as_json or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    original = sys.stderr
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeElapsedColumn(), console=Console(file=original), transient=True)
    task = bar.add_task(label, total=None)
    with bar:
        handlers = [h for h in logging.getLogger().handlers
                    if type(h) is logging.StreamHandler and h.stream is original]
        for h in handlers:
            h.setStream(sys.stderr)  # rich's proxy while the live display runs
        try:
            yield lambda n: bar.advance(task, n)
        finally:
            for h in handlers:
                h.setStream(original)


def _batch_summary(outcomes: list, as_json: bool, real: Any, refs: list[VersionRef] | None = None,
                   **more: Any) -> int:
    """The exit status of a batch, and what it decided: one JSON document with ``--json`` (``more`` adds
    top-level keys), else a table on stdout (``refs``, one per outcome, name the versions that another
    worker held)."""
    rows = []
    for o in outcomes:
        if o.report is None:
            rows.append({"model": None, "verdict": None, "skipped": o.skipped})
            continue
        r = o.report
        rows.append({
            "model": r.model.name if r.model else None, "version": r.model.version if r.model else None,
            "verdict": r.verdict.value, "reasons": [c.value for c in sorted({f.code for f in r.reasons if f.code})],
            "attempt": r.attempt, "run_id": o.run_id, "summary": r.summary,
        })
    any_error = any(row.get("verdict") == Verdict.ERROR.value for row in rows)
    if as_json:
        _emit_json(real, {"results": rows, "count": len(rows), "errors": sum(
            1 for r in rows if r.get("verdict") == Verdict.ERROR.value), **more})
    else:
        _print_decisions(outcomes, real, refs)
    return EXIT_ERROR if any_error else 0


def _print_decisions(outcomes: list, out: Any, refs: list[VersionRef] | None = None) -> None:
    """The ``sweep`` / ``rerun`` table: model, version, verdict, the status recorded, reasons, summary.

    The summary wraps inside its column rather than being cut: it is the sentence that says what to do.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    # A terminal (or COLUMNS) decides the width; a pipe or log file gets 120 columns.
    console = Console(file=out, width=None if out.isatty() or os.environ.get("COLUMNS") else 120, highlight=False)
    if not outcomes:
        console.print("Nothing to validate: every version has a verdict (or is being validated).")
        return
    # One status column (what was recorded: the verdict's status), reasons wrapping between codes, never
    # inside one, and the summary taking the rest of the width, wrapped rather than cut.
    table = Table("model", "version", "status", "reasons", "summary", caption=_decided_caption(outcomes))
    table.columns[1].justify = "right"
    for col in table.columns[:3]:
        col.no_wrap = True
    table.columns[3].min_width = max([len(f.code.value) for o in outcomes if o.report for f in o.report.reasons
                                      if f.code] + [7])
    table.columns[4].ratio = 1
    table.columns[4].min_width = 24
    for i, o in enumerate(outcomes):
        r = o.report
        if r is None:
            ref = refs[i] if refs and i < len(refs) else None
            table.add_row(escape(ref.name) if ref else "?", ref.version if ref else "?",
                          Text("untouched", style="dim"), "", Text(o.skipped, style="dim"))
            continue
        colour = VERDICT_COLOUR[r.verdict]
        # attempt 0: the registry failed before anything could be recorded.
        status = Status.for_verdict(r.verdict).value if r.attempt else f"{r.verdict.value}, not recorded"
        table.add_row(escape(r.model.name) if r.model else "?", r.model.version if r.model else "?",
                      Text(status, style=colour),
                      Text(", ".join(sorted({f.code.value for f in r.reasons if f.code})), style="bold"),
                      Text(r.summary))
    console.print(table)


def _decided_caption(outcomes: list) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = Status.for_verdict(o.report.verdict).value if o.report is not None else "held by another worker"
        counts[key] = counts.get(key, 0) + 1
    return f"{len(outcomes)} version{'s' if len(outcomes) != 1 else ''}: " + ", ".join(
        f"{n} {k}" for k, n in counts.items())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def sweep(as_json: bool) -> None:
    """Re-check promoted versions (`recheck`), then validate every version without a verdict (or with an
    error, or an expired lease)."""

    def body() -> int:
        from ckpt_stage import integrity, pipeline

        settings = Settings.from_env()
        with _stdout_to_stderr() as real:
            # Promoted versions first: one whose files changed since its verdict loses the alias before
            # anything else happens in this sweep.
            try:
                rechecked = integrity.recheck_promoted(settings=settings, on_result=_recheck_line(as_json))
                refs: list[VersionRef] = []
                line = _line_per_version(as_json)

                def on_result(ref: VersionRef, outcome: Any) -> None:
                    refs.append(ref)
                    line(ref, outcome)

                outcomes = pipeline.sweep(settings=settings, on_result=on_result)
            except CkptStageError as exc:
                # Even when the versions cannot be listed (MLflow down), --json prints its one document.
                if as_json:
                    _emit_json(real, {"results": [], "count": 0, "errors": 1,
                                      "error": {"code": exc.code.value, "message": exc.message, "hint": exc.hint}})
                    logging.getLogger("ckpt_stage").error("sweep: %s", exc.message)
                    return EXIT_ERROR
                raise
            code = _batch_summary(outcomes, as_json, real, refs, integrity=_recheck_doc(rechecked))
        if any(r.outcome == "error" for r in rechecked):
            code = EXIT_ERROR
        return code

    _run(body)


@main.command()
@click.option("--model", help="Only this model's promoted versions.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def recheck(model: str | None, as_json: bool) -> None:
    """Compare every promoted version's S3 objects with what its verdict validated (no download);
    a version whose files changed loses the alias and is quarantined with INTEGRITY_MISMATCH.
    Every sweep runs this first."""

    def body() -> int:
        from ckpt_stage import integrity

        settings = Settings.from_env()
        with _stdout_to_stderr() as real:
            results = integrity.recheck_promoted(settings=settings, model=model, on_result=_recheck_line(as_json))
            if as_json:
                _emit_json(real, _recheck_doc(results))
        if any(r.outcome == "error" for r in results):
            return EXIT_ERROR
        return 1 if any(r.outcome == "quarantined" for r in results) else 0

    _run(body)


def _recheck_doc(results: list) -> dict[str, Any]:
    return {"checked": len(results), "results": [r.to_dict() for r in results],
            "quarantined": sum(1 for r in results if r.outcome == "quarantined"),
            "errors": sum(1 for r in results if r.outcome == "error")}


def _recheck_line(as_json: bool) -> Callable[[Any], None]:
    def on_result(result: Any) -> None:
        log = logging.getLogger("ckpt_stage")
        if result.outcome == "same":
            log.debug("%s: files unchanged since the verdict", result.ref)
        else:
            log.warning("%s: %s %s", result.ref, result.outcome, result.message)

    return on_result


@main.command()
@click.option("--model", required=True, help="Registered model name.")
@click.option("--version", "version", help="Model version number.")
@click.option("--alias", help="Model alias (for example validated) instead of a version.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def verify(model: str, version: str | None, alias: str | None, path: Path, as_json: bool) -> None:
    """Check a downloaded model folder against the files the verdict recorded (names, sizes, sha256).

    Run it on the serving host after `mlflow artifacts download` and before loading: exit 0 when the
    folder holds exactly the validated files of a promoted version, 1 when anything differs."""

    def body() -> int:
        from ckpt_stage.integrity import verify_download

        if bool(version) == bool(alias):
            raise UsageError("give either --version N or --alias A")
        with _stdout_to_stderr() as real:
            try:
                result = verify_download(path, model, version=version, alias=alias, settings=Settings.from_env())
            except (UsageError, ConfigError):
                raise
            except CkptStageError as exc:
                if as_json:
                    _emit_json(real, {"ok": False, "model": model, "version": version, "alias": alias,
                                      "path": str(path), "error": {"code": exc.code.value, "message": exc.message,
                                                                   "hint": exc.hint}})
                raise
            if as_json:
                _emit_json(real, {**result.to_dict(), "alias": alias})
        _print_verify(result)
        return 0 if result.ok else 1

    _run(body)


def _print_verify(result: Any) -> None:
    """One line for the outcome and one per differing file, on stderr (stdout belongs to --json)."""
    where = f"{result.ref.name} version {result.ref.version}"
    if result.ok:
        click.echo(f"ok: {result.path} holds exactly the {result.files} file(s) validated for {where} "
                   f"at {result.validated_at}", err=True)
        return
    if result.problem:
        click.echo(f"refused: {result.problem}", err=True)
    if result.differences:
        click.echo(f"differs: {result.path} is not what was validated for {where} at {result.validated_at}:",
                   err=True)
        for d in result.differences:
            click.echo(f"  {d.kind}: {d.path}" + (f" ({d.detail})" if d.detail else ""), err=True)
    click.echo("  hint: do not load it; download the version again, or run `ckpt-stage recheck` if its S3 "
               "files may have changed", err=True)


def _line_per_version(as_json: bool) -> Callable[[VersionRef, Any], None]:
    """One line per finished version: coloured on a terminal, a plain log record otherwise."""
    console = None
    if not as_json and sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True, highlight=False)
    marks = {Verdict.PASS: ("✓", "green"), Verdict.QUARANTINE: ("✗", "red"), Verdict.ERROR: ("!", "yellow"),
             Verdict.SKIP: ("–", "magenta")}

    def on_result(ref: VersionRef, outcome: Any) -> None:
        log = logging.getLogger("ckpt_stage")
        if outcome.report is None:
            if console:
                console.print(f"[dim]– {ref} skipped: {outcome.skipped}[/dim]")
            else:
                log.info("%s skipped: %s", ref, outcome.skipped)
            return
        r = outcome.report
        codes = ",".join(sorted({f.code.value for f in r.reasons if f.code}))
        if console is None:
            log.info("%s → %s %s", ref, r.verdict.value, codes)
            return
        from rich.markup import escape

        mark, colour = marks[r.verdict]
        total = float(r.timings_s.get("total", 0.0))
        console.print(f"[{colour}]{mark} {escape(str(ref))} {r.verdict.value}[/{colour}] "
                      f"[bold]{escape(codes)}[/bold] [dim]attempt {r.attempt} · {total:.1f} s[/dim]"
                      + (f"\n    [dim]{escape(r.summary)}[/dim]" if r.verdict is not Verdict.PASS else ""))

    return on_result


@main.command()
@click.option("--model", help="Registered model name.")
@click.option("--version", "version", help="Model version (with --model).")
@click.option("--status", type=click.Choice(RERUNNABLE_STATUSES),
              help="Re-run every version with this status (skipped: after changing CKPT_STAGE_OTHER_FLAVORS).")
@click.option("--reason", help="Only versions whose reasons include this code (with --status).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def rerun(model: str | None, version: str | None, status: str | None, reason: str | None, as_json: bool) -> None:
    """Re-run validations: each re-run is a new attempt; history is kept."""

    def body() -> int:
        from ckpt_stage import pipeline
        from ckpt_stage.registry import Registry

        from ckpt_stage.orchestrate import RerunSelection

        if version and not model:
            raise UsageError("--version needs --model")
        if bool(version) == bool(status):
            raise UsageError(f"give either --model NAME --version N, or --status {'|'.join(RERUNNABLE_STATUSES)}")
        selection = RerunSelection.parse({"model": model, "versions": [version] if version else [],
                                          "status": status, "reason": reason})
        settings = Settings.from_env()
        registry = Registry(settings)
        with _stdout_to_stderr() as real:
            refs = selection.matching(registry)
            outcomes = []
            line = _line_per_version(as_json)
            for i, ref in enumerate(refs, 1):
                with _progress_bar(as_json, f"[{i}/{len(refs)}] {ref}") as progress:
                    outcome = pipeline.validate_version_safely(ref, settings=settings, registry=registry, force=True,
                                                           progress=progress, batch=len(refs) > 1)
                line(ref, outcome)
                outcomes.append(outcome)
            code = _batch_summary(outcomes, as_json, real, refs)
        return code

    _run(body)


@main.command(name="ls")
@click.option("--status", type=click.Choice([s.value for s in Status] + ["none"]), help="Only this status.")
@click.option("--model", help="Only this model.")
@click.option("--reason", help="Only versions whose reasons include this code.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON on stdout.")
def ls_cmd(status: str | None, model: str | None, reason: str | None, as_json: bool) -> None:
    """List versions and their verdicts."""

    def body() -> int:
        from ckpt_stage.registry import RUN_ID, VALIDATED_AT, Registry

        registry = Registry(Settings.from_env())
        with _stdout_to_stderr() as real:
            states = list(registry.iter_versions(model=model, status=None if status == "none" else status,
                                                 reason=reason))
            if status == "none":
                states = [s for s in states if s.status is None]
            rows = [{
                "model": s.ref.name, "version": s.ref.version,
                "status": s.status.value if s.status else None,
                "reasons": list(s.reasons), "attempt": s.attempt,
                "summary": s.summary,
                "validated_at": s.tags.get(VALIDATED_AT),
                "run_id": s.tags.get(RUN_ID),
            } for s in sorted(states, key=lambda s: (s.ref.name, _int(s.ref.version)))]
            if as_json:
                _emit_json(real, rows)
        if not as_json:
            _print_versions(rows)
        return 0

    _run(body)


def _print_versions(rows: list[dict]) -> None:
    """The ``ls`` table: status in colour, reasons, attempts, age of the verdict, summary."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ckpt_stage.dashboard.data import human_age
    from ckpt_stage.registry import now_utc, parse_iso

    styles = {"quarantined": "bold red", "error": "bold yellow", "promoted": "green", "validating": "blue",
              "skipped": "magenta"}
    now = now_utc()
    table = Table("model", "version", "status", "reasons", "attempt", "age", "summary",
                  caption=f"{len(rows)} version{'s' if len(rows) != 1 else ''}")
    table.columns[1].justify = table.columns[4].justify = table.columns[5].justify = "right"
    # The summary says what to do; keep it to one line per version so the table stays scannable at any width
    # (`ckpt-stage show` and --json carry the whole text).
    table.columns[6].overflow = "ellipsis"
    table.columns[6].no_wrap = True
    table.columns[6].max_width = 90
    table.columns[0].min_width = max([len(r["model"]) for r in rows] + [5])
    table.columns[3].min_width = max([len(",".join(r["reasons"])) for r in rows] + [7])
    for r in rows:
        at = parse_iso(r["validated_at"] or "")
        table.add_row(r["model"], r["version"], Text(r["status"] or "-", style=styles.get(r["status"] or "", "dim")),
                      Text(",".join(r["reasons"]), style="bold"), str(r["attempt"]),
                      human_age((now - at).total_seconds()) if at else "—", r["summary"] or "")
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8321, show_default=True, type=int)
def dashboard(host: str, port: int) -> None:
    """Serve the web dashboard (the same app the Airflow plugin mounts)."""
    import uvicorn

    from ckpt_stage.dashboard.app import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level="info")


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".demo"), show_default=True,
              help="Folder for the demo's MLflow database, S3 data and Airflow home.")
@click.option("--keep-running", is_flag=True, help="Leave the servers up until Ctrl-C to browse the results.")
def demo(workdir: Path, keep_running: bool) -> None:
    """Run the whole stage on the embedded defaults with sample model versions."""
    from ckpt_stage.dev.demo import run_demo

    sys.exit(run_demo(workdir.resolve(), keep_running=keep_running))


def _add_optional_commands() -> None:
    """Commands that live beside their feature (``webhook`` with the receiver, ``show`` with the dashboard)."""
    import importlib

    for mod, attr in (("ckpt_stage.cli.webhook", "webhook"), ("ckpt_stage.cli.show", "show")):
        main.add_command(getattr(importlib.import_module(mod), attr))


_add_optional_commands()

if __name__ == "__main__":
    main()
