"""``ckpt-stage show --model M --version V``: one version, its attempts and reports, in the terminal.

Reads exactly what the dashboard's version page reads (``DashboardData.detail``), so ``--json``
prints the same document as ``GET /api/versions/{model}/{version}``. ``cli.py`` adds this command.
"""

from __future__ import annotations

from typing import Any

import click

from ckpt_stage.config import Settings
from ckpt_stage.errors import UsageError

STATUS_STYLE = {"quarantined": "bold red", "error": "bold yellow", "promoted": "bold green",
                "validating": "bold blue", "pending": "dim", "skipped": "bold magenta", None: "dim"}
VERDICT_STYLE = {"pass": "green", "quarantine": "red", "error": "yellow", "skip": "magenta"}
#: Below this width the findings are stacked (code line, then message and hint at full width) instead of
#: a five-column table whose message and hint columns would shrink to fragments.
WIDE = 120
SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "dim"}


@click.command()
@click.option("--model", required=True, help="Registered model name.")
@click.option("--version", "version", required=True, help="Model version number.")
@click.option("--attempts", "full", default=1, show_default=True, type=click.IntRange(min=0),
              help="How many attempts (newest first) to print in full; 0 prints every one.")
@click.option("--json", "as_json", is_flag=True, help="Print the version, attempts and reports as JSON on stdout.")
def show(model: str, version: str, full: int, as_json: bool) -> None:
    """Show one version: its status, every attempt, and the full report of the latest ones."""
    from ckpt_stage.cli import commands as cli

    def body() -> int:
        from ckpt_stage.dashboard.data import DashboardData

        with cli._stdout_to_stderr() as real:
            detail = DashboardData(Settings.from_env()).detail(model, str(version))
            if detail is None:
                raise UsageError(f"MLflow has no version {version} of model {model!r}",
                                 hint="list versions with `ckpt-stage ls --model NAME`")
            if as_json:
                cli._emit_json(real, detail)
        if not as_json:
            render(detail, full=full)
        return 0

    cli._run(body)


def render(detail: dict[str, Any], *, full: int = 1, console: Any = None) -> None:
    """Print a version's detail document (``DashboardData.detail``) as rich tables: the version's
    panel, its attempts, the full report of the ``full`` newest ones (0: all), then drift."""
    from rich.console import Console

    console = console or Console()
    wide = console.width >= WIDE
    console.print(_version_panel(detail))
    attempts = detail.get("attempts") or []
    _attempts_table(console, attempts, wide)
    for a in attempts if full == 0 else attempts[:full]:
        if a.get("report"):
            _attempt_report(console, a, wide)
    if detail.get("drift"):
        _drift(console, detail["drift"])


def _version_panel(detail: dict[str, Any]) -> Any:
    """Status, aliases, summary, reasons and the version's facts, in one panel."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from ckpt_stage.dashboard.data import human_age

    st = detail["state"]
    status = st.get("status")
    head = Text()
    head.append(f"{detail['model']} v{detail['version']}  ", style="bold")
    head.append(status or "not validated", style=STATUS_STYLE.get(status, ""))
    for alias in st.get("aliases") or []:
        head.append(f"  @{alias}", style="bold green" if alias == detail.get("alias") else "green")
    lines: list[Any] = [head]
    if st.get("holds_alias") or (detail.get("promoted_version") and detail.get("promoted_version") == detail["version"]):
        lines.append(Text(f"holds @{detail.get('alias', 'validated')}: deployments of {detail['model']} get this "
                          "version", style="green"))
    if status == "skipped":
        lines.append(Text("not validated: a flavor the stage does not validate, left alone by "
                          "CKPT_STAGE_OTHER_FLAVORS=skip; never promoted", style="magenta"))
    if st.get("summary"):
        lines.append(Text(st["summary"]))
    if st.get("reasons"):
        lines.append(Text("reasons: ", style="dim") + Text(", ".join(st["reasons"]), style="bold"))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    facts.add_row("attempts", str(st.get("attempt", 0)))
    facts.add_row("validated at", f"{st.get('validated_at') or '—'} ({human_age(st.get('age_s'))} ago)")
    facts.add_row(f"@{detail.get('alias', 'validated')}", f"v{detail['promoted_version']}"
                  if detail.get("promoted_version") else "none")
    if st.get("lease_owner"):
        facts.add_row("being validated by", f"{st['lease_owner']} until {st.get('lease_until')}")
    for name, url in (detail.get("links") or {}).items():
        if url:
            facts.add_row(name.replace("_", " "), url)
    lines.append(facts)
    return Panel(Group(*lines), expand=False)


def _attempts_table(console: Any, attempts: list[dict[str, Any]], wide: bool) -> None:
    """One row per attempt, newest first."""
    from rich.table import Table
    from rich.text import Text

    from ckpt_stage.dashboard.data import human_seconds

    if not attempts:
        console.print("[dim]No validation attempt recorded yet.[/dim]")
        return
    # On a narrow terminal the run id (32 hex digits) leaves the table for each attempt's heading, and the
    # start time loses its seconds, so the columns that say what happened keep their room.
    cols = ["#", "started", "verdict", "reasons", "total"] + (["run"] if wide else [])
    table = Table(*cols, title="Attempts (newest first)", title_justify="left")
    for col in (table.columns[0], table.columns[1], table.columns[2], table.columns[4]):
        col.no_wrap = True
    # Codes wrap between codes, never inside one.
    table.columns[3].min_width = max([len(c) for a in attempts for c in a.get("reasons") or []] + [7])
    for a in attempts:
        total = ((a.get("report") or {}).get("timings_s") or {}).get("total", a.get("metrics", {}).get(
            "timings_s.total"))
        started = a.get("started_at") or ""
        cells: list[Any] = [str(a.get("attempt") or "?"), started if wide else started[:16].replace("T", " "),
                            Text(a.get("verdict") or "?", style=VERDICT_STYLE.get(a.get("verdict") or "", "")),
                            ", ".join(a.get("reasons") or []), human_seconds(total)]
        table.add_row(*cells, *([a.get("run_id") or ""] if wide else []))
    console.print(table)


def _attempt_report(console: Any, a: dict[str, Any], wide: bool) -> None:
    """One attempt's report in full: findings, files, library versions, times and resources."""
    report = a["report"]
    console.rule(f"Attempt {a.get('attempt')}: {report.get('verdict')}"
                 + ("" if wide or not a.get("run_id") else f" · run {a['run_id']}"))
    _findings(console, report.get("findings") or report.get("reasons") or [], wide)
    if report.get("files"):
        _files(console, report["files"], wide)
    _library_versions(console, report.get("recorded") or {}, report.get("runtime") or {})
    _resources(console, report)


def _findings(console: Any, findings: list[dict[str, Any]], wide: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    if findings and wide:
        t = Table("severity", "code", "message", "hint", "file", title="Findings", title_justify="left")
        t.columns[0].no_wrap = t.columns[1].no_wrap = True
        t.columns[2].ratio, t.columns[3].ratio = 3, 2
        t.columns[4].overflow = "fold"
        for f in findings:
            sev = f.get("severity") or "error"
            t.add_row(Text(sev, style=SEVERITY_STYLE.get(sev, "")), f.get("code") or "—", f.get("message", ""),
                      f.get("hint") or "", f.get("file") or "")
        console.print(t)
    elif findings:
        _stacked_findings(console, findings)
    else:
        console.print("[green]No findings: every check passed.[/green]")


def _files(console: Any, files: list[dict[str, Any]], wide: bool) -> None:
    from rich.table import Table

    from ckpt_stage.dashboard.data import human_bytes

    t = Table("path", "format", "size", "sha256", title="Files", title_justify="left")
    t.columns[0].overflow = "fold"
    t.columns[1].no_wrap = t.columns[2].no_wrap = t.columns[3].no_wrap = True
    for f in files:
        digest = f.get("sha256", "") or ""
        t.add_row(f.get("path", ""), f.get("format", ""), human_bytes(f.get("size")),
                  digest if wide or len(digest) <= 16 else digest[:16] + "…")
    console.print(t)


def _library_versions(console: Any, recorded: dict[str, str], runtime: dict[str, str]) -> None:
    """What the model recorded beside what loaded it; a mismatch in yellow."""
    from rich.table import Table
    from rich.text import Text

    if not (recorded or runtime):
        return
    t = Table("", "recorded by the model", "serving runtime", title="Library versions", title_justify="left")
    for k in dict.fromkeys([*recorded, *runtime]):
        rec, run = recorded.get(k), runtime.get(k)
        style = "yellow" if rec and run and rec != run else ""
        t.add_row(k, Text(rec or "—", style=style), Text(run or "—", style=style))
    console.print(t)


def _resources(console: Any, report: dict[str, Any]) -> None:
    """Times, memory and the isolation measures in force."""
    from rich.table import Table

    from ckpt_stage.dashboard.data import human_bytes, human_seconds

    timings, res = report.get("timings_s") or {}, report.get("resources") or {}
    t = Table.grid(padding=(0, 2))
    t.add_column(style="dim")
    t.add_column(justify="right")
    for k in ("download", "scan", "load", "inference", "total"):
        t.add_row(f"{k} time", human_seconds(timings.get(k, 0)))
    t.add_row("peak memory (anon)", human_bytes(res.get("peak_anon_bytes", 0)))
    t.add_row("estimated memory", human_bytes(res.get("estimated_bytes", 0)))
    t.add_row("worker limit", human_bytes(res.get("limit_bytes", 0)))
    for k, v in (report.get("isolation") or {}).items():
        t.add_row(f"isolation: {k}", "yes" if v is True else "no" if v in (False, None) else str(v))
    console.print(t)


def _drift(console: Any, drift: dict[str, Any]) -> None:
    """Layer drift against the promoted version, then weight drift when it was measured."""
    from rich.table import Table
    from rich.text import Text

    console.rule(f"Architecture drift{' vs promoted v' + str(drift['against']) if drift.get('against') else ''}")
    for f in drift.get("findings") or []:
        console.print(f"[dim]{f.get('severity', 'info')}:[/dim] {f.get('message', '')}")
    if drift.get("added") or drift.get("removed") or drift.get("changed"):
        t = Table("", "layer", "promoted", "this version")
        for layer in drift.get("removed") or []:
            t.add_row(Text("−", style="red"), layer["name"], f"{layer.get('shape')} {layer.get('dtype')}", "—")
        for layer in drift.get("added") or []:
            t.add_row(Text("+", style="green"), layer["name"], "—", f"{layer.get('shape')} {layer.get('dtype')}")
        for c in drift.get("changed") or []:
            b, a = c.get("previous") or {}, c.get("current") or {}
            t.add_row(Text("~", style="yellow"), c["name"], f"{b.get('shape')} {b.get('dtype')}",
                      f"{a.get('shape')} {a.get('dtype')}")
        console.print(t)
    weights = drift.get("weights") or {}
    if weights.get("tensors"):
        console.rule(f"Weight drift vs v{weights.get('previous_version', '?')}")
        t = Table("tensor (largest change first)", "relative L2 change (≈ sampled)")
        for w in weights["tensors"]:
            rel = w.get("rel_l2")
            t.add_row(w.get("name", ""), "from zero" if rel is None else
                      f"{'' if w.get('exact') else '≈'}{rel:.2%}")
        console.print(t)


def _stacked_findings(console: Any, findings: list[dict[str, Any]]) -> None:
    """Findings for a narrow terminal: ``severity CODE file`` on one line, then the message and the hint
    wrapped at the full width, so no sentence is squeezed into a column a few characters wide."""
    from rich.padding import Padding
    from rich.text import Text

    console.print(Text("Findings", style="italic"))
    for f in findings:
        sev = f.get("severity") or "error"
        head = Text("  ")
        head.append(sev, style=SEVERITY_STYLE.get(sev, ""))
        head.append(f"  {f.get('code') or '—'}", style="bold")
        if f.get("file"):
            head.append(f"  {f['file']}", style="dim")
        console.print(head)
        console.print(Padding(Text(f.get("message", "")), (0, 0, 0, 4)))
        if f.get("hint"):
            console.print(Padding(Text.assemble(("hint: ", "dim"), f["hint"]), (0, 0, 0, 4)))

