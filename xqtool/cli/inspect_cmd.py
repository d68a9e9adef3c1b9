"""`xqtool inspect CONFIG_OR_CHECKPOINT`."""

from __future__ import annotations

from typing import List, Optional

import typer
import yaml
from rich.syntax import Syntax
from rich.table import Table

from xqtool.cli._common import add_command, console
from xqtool.config import config_to_dict


def inspect(
    target: str = typer.Argument(..., help="A tokenizer YAML config, an xqtool checkpoint directory or an official .pt."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key, e.g. quant.codebook_size=8192."),
    full: bool = typer.Option(False, "--full", help="Print all config sections (default: model and quant)."),
) -> None:
    """Show the resolved config, parameter counts per part, tokens per image, and warnings.

    Builds the model on the meta device: no weights are allocated, no teacher is built, nothing is downloaded.

    Example: [bold]xqtool inspect configs/tokenizer/MSVR10P2-4096.yaml[/]
    """
    from xqtool.tasks.inspect import inspect_target

    report = inspect_target(target, set_)
    tree = config_to_dict(report.config)
    shown = tree if full else {k: tree[k] for k in ("model", "quant")}
    console.rule(f"[bold]{report.source}[/] ({report.kind}, config hash {report.config_hash})")
    console.print(Syntax(yaml.safe_dump(shown, sort_keys=False), "yaml", theme="ansi_dark", background_color="default"))

    params = Table(title="Parameters (teachers excluded)")
    params.add_column("part")
    params.add_column("count", justify="right")
    for part, n in report.parameters.items():
        params.add_row(part, f"{n:,}")
    console.print(params)

    P = report.config.quant.product_quant
    tokens = Table(title=f"Tokens per image: {P} branch(es) x {report.config.tokens_per_branch} = "
                   f"{P * report.config.tokens_per_branch}")
    tokens.add_column("scale", justify="right")
    tokens.add_column("grid", justify="right")
    tokens.add_column("tokens / branch", justify="right")
    tokens.add_column("cumulative", justify="right")
    total = 0
    for row in report.tokens:
        total += row["tokens"]
        tokens.add_row(str(row["scale"]), f"{row['side']}x{row['side']}", str(row["tokens"]), str(total))
    console.print(tokens)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")


def register(app: typer.Typer) -> None:
    """Add `inspect` to `app`."""
    add_command(app, inspect, "inspect")
