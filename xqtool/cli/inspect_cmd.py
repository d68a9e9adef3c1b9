"""`xqtool inspect PATH`: what any artefact xqtool reads or writes describes."""

from __future__ import annotations

import json
from typing import Any, Dict

import typer
import yaml
from rich.syntax import Syntax
from rich.table import Table
from typing_extensions import Annotated

from xqtool.cli._common import add_command, console
from xqtool.cli.options import SetOverrides


def _value(v: Any) -> str:
    if v is None:
        return "not set"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def print_report(report: Dict[str, Any]) -> None:
    """Human-readable form of an :func:`xqtool.tasks.inspect.inspect_any` report."""
    console.rule(f"[bold]{report['source']}[/] ({report['kind']})")
    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column()
    for k, v in report.get("facts", {}).items():
        facts.add_row(k, _value(v))
    console.print(facts)
    if report.get("config"):
        console.print(Syntax(yaml.safe_dump(report["config"], sort_keys=False, default_flow_style=None), "yaml", theme="ansi_dark",
                             background_color="default"))
    if report.get("parameters"):
        params = Table(title="Parameters" + (" (teachers excluded)" if "tokenizer" in report["kind"] else ""))
        params.add_column("part")
        params.add_column("count", justify="right")
        for part, n in report["parameters"].items():
            params.add_row(part, f"{n:,}")
        console.print(params)
    if report.get("tokens"):
        tokens = Table(title="Tokens per branch and scale")
        for col in ("scale", "grid", "tokens / branch", "cumulative"):
            tokens.add_column(col, justify="right")
        total = 0
        for row in report["tokens"]:
            total += row["tokens"]
            tokens.add_row(str(row["scale"]), f"{row['side']}x{row['side']}", str(row["tokens"]), str(total))
        console.print(tokens)
    hist = report.get("histogram")
    if hist:
        names = report.get("class_names") or {}
        table = Table(title=f"Class histogram ({len(hist)} classes)")
        table.add_column("class", justify="right")
        if names:
            table.add_column("name")
        table.add_column("images" if report.get("kind") == "image source" else "rows", justify="right")
        items = list(hist.items())
        for k, v in items[:20]:
            table.add_row(k, *([names.get(k, "")] if names else []), f"{v:,}")
        if len(items) > 20:
            table.add_row("...", *([""] if names else []),
                          f"{sum(v for _, v in items[20:]):,} more in {len(items) - 20} classes")
        console.print(table)
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


def inspect(
    target: Annotated[str, typer.Argument(help="Any xqtool artefact: tokenizer or VAR config (.yaml) or checkpoint "
                                               "(folder, official .pt/.pth), token file (.npy) or shard folder, "
                                               "training-state folder (run or run/checkpoints/step-N), image source, registry name or hf://.")],
    set_: SetOverrides = None,
    full: Annotated[bool, typer.Option("--full", help="Print all config sections (default: the model sections).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (machine-readable) instead of tables.")] = False,
) -> None:
    """Recognise and summarise an artefact: parameters per part, tokens, rows and classes, training progress.

    Builds models on the meta device: no weights are allocated, no teacher is built, nothing is downloaded.

    Examples:

      [bold]xqtool inspect configs/var/d17-msvr10p2.yaml[/]

      [bold]xqtool inspect configs/tokenizer/MSVR10P2-4096.yaml --json[/]
    """
    from xqtool.tasks.inspect import inspect_any

    report = inspect_any(target, set_, full=full)
    if as_json:
        typer.echo(json.dumps(report, indent=1, default=str))
        return
    print_report(report)


def register(app: typer.Typer) -> None:
    """Add `inspect` to `app`."""
    add_command(app, inspect, "inspect")
