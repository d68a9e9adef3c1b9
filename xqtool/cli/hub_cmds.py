"""`xqtool models` (the model registry) and `xqtool push` (publish a checkpoint directory to the Hub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from xqtool.cli._common import add_command, console


def models(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as a JSON list (with 'cached')."),
    registry: Optional[Path] = typer.Option(None, "--registry", help="Extra registry YAML (a 'models:' mapping; "
                                            "also $XQTOOL_REGISTRY)."),
) -> None:
    """List the published checkpoints usable by name, e.g. [bold]--tokenizer MSVR10P2-4096[/] or [bold]--var VAR-d17[/].

    'cached' says whether the file is already in the local Hugging Face cache (HF_HOME); with HF_HUB_OFFLINE=1 only
    cached models load. Example: [bold]xqtool models --json[/]
    """
    from xqtool.hub import hub_cache_dir, is_cached, list_models

    entries = list_models(registry)
    if as_json:
        rows = [dict(e.to_dict(), cached=is_cached(e)) for e in entries]
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table(title=f"xqtool models (Hub cache: {hub_cache_dir()})", title_justify="left")
    for col in ("name", "kind", "tokens/image", "codebook", "published", "licence", "cached", "training data"):
        table.add_column(col, justify="right" if col in ("tokens/image", "codebook") else "left",
                         no_wrap=col != "training data")
    for e in entries:
        table.add_row(e.name, e.kind, str(e.tokens_per_image or "?"), str(e.codebook or "?"), e.metric_text(),
                      e.licence, "yes" if is_cached(e) else "no", e.data)
    console.print(table)


def push(
    ckpt_dir: Path = typer.Argument(..., help="xqtool checkpoint directory (config.yaml + model.safetensors)."),
    repo_id: str = typer.Argument(..., help="Hub model repository OWNER/NAME (created when absent)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Evaluation report for the model card (default: the "
                                          "newest *report*.json / train_state.json in CKPT_DIR)."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (default main)."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
    license: Optional[str] = typer.Option(None, "--license", help="Licence id for the model card (e.g. apache-2.0)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the directory and print the model card; upload nothing."),
) -> None:
    """Publish a checkpoint directory to the Hugging Face Hub (safetensors only, with a generated model card).

    Needs a login ([bold]hf auth login[/] or HF_TOKEN). Load it back anywhere with [bold]--tokenizer hf://OWNER/NAME[/].

    Example: [bold]xqtool push runs/tok/best me/my-tokenizer --report rfid_report.json[/]
    """
    from xqtool.tasks.push import push_checkpoint

    res = push_checkpoint(ckpt_dir, repo_id, report=report, private=private, revision=revision,
                          commit_message=message, license=license, dry_run=dry_run)
    if dry_run:
        typer.echo(res.card)
        console.print(f"[yellow]dry run[/]: would upload {', '.join(res.files)} to {repo_id}")
        return
    console.print(f"[green]pushed[/] {ckpt_dir} ({res.kind}) to {repo_id}: {', '.join(res.files)}")
    console.print(f"commit: {res.commit_url}; load it with --{'tokenizer' if res.kind == 'tokenizer' else 'var'} "
                  f"hf://{repo_id}")


def register(app: typer.Typer) -> None:
    add_command(app, models, "models")
    add_command(app, push, "push")
