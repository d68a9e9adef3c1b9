"""`xqtool train-tokenizer` and `xqtool finetune` (thin: parse, load config, call one task, print a summary)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.panel import Panel
from rich.table import Table

from xqtool.cli._common import add_command, console, err_console

log = logging.getLogger(__name__)

_SET_HELP = "Override a config value, repeatable: --set train.lr=1e-4 --set quant.codebook_size=8192."
_RESUME_HELP = "'auto' = continue from the newest complete checkpoint in the output dir (if any); or a state dir."


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def _load_cfg(config: Path, overrides: Optional[List[str]], max_steps: Optional[int]) -> Any:
    from xqtool.config import load_tokenizer_config

    return load_tokenizer_config(str(config), overrides=list(overrides or []))


def _summary(result: Any, title: str) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # accelerate launch: only the main process prints
        return
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    colour = {"finished": "green", "interrupted": "yellow", "diverged": "red"}.get(result.status, "white")
    t.add_row("status", f"[{colour}]{result.status}[/] at step {result.step}/{result.total_steps}")
    if result.best_value is not None:
        t.add_row("best", f"{result.best_metric} = {result.best_value:.4f} (step {result.best_step})")
    for k in ("val/psnr", "val/ssim", "val/rfid"):
        if k in result.last_val:
            t.add_row(k, f"{result.last_val[k]:.4f}")
    for k in sorted(k for k in result.last_val if k.startswith("val/codebook_usage/b") and k.count("/") == 2):
        t.add_row(k, f"{result.last_val[k]:.4f}")  # distinct codes / K of one branch over the validation set
    t.add_row("images/s", f"{result.images_per_sec:.1f}")
    t.add_row("output", str(result.output_dir))
    for name, path in (("last", result.last_dir), ("best", result.best_dir), ("state", result.state_dir),
                       ("export", result.export_dir)):
        if path is not None:
            t.add_row(name, str(path))
    for d in result.adapter_dirs:
        t.add_row("adapter", str(d))
    t.add_row("bad images skipped", str(len(result.bad_files)))
    for name, reason in list(result.bad_files.items())[:5]:
        t.add_row("", f"{name}: {reason}")
    if result.message:
        t.add_row("note", result.message)
    console.print(Panel(t, title=title, expand=False))


def train_tokenizer_cmd(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Tokenizer YAML (xqtool or official XQ-GAN keys)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=_SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help=_RESUME_HELP),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run directory (default train.results_dir)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Train an XQ-GAN tokenizer.

    Example: [bold]xqtool train-tokenizer configs/tokenizer/tiny-cnn.yaml --set train.max_steps=200[/]
    Multi-GPU: [bold]accelerate launch -m xqtool train-tokenizer cfg.yaml --resume auto[/]
    """
    from xqtool.tasks.train_tokenizer import train_tokenizer

    _logging()
    cfg = _load_cfg(config, set_, max_steps)
    result = train_tokenizer(cfg, output_dir=output_dir, resume=resume, max_steps=max_steps,
                             progress=not no_progress, console=console)
    _summary(result, "train-tokenizer")
    if result.status == "diverged":
        err_console.print(f"[bold red]error:[/] {result.message}")
        raise typer.Exit(1)


def finetune_cmd(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="YAML with the loss/data/train settings."),
    from_: Path = typer.Option(..., "--from", help="xqtool checkpoint dir, official XQ-GAN .pt, registry name or hf:// reference."),
    enc: Optional[str] = typer.Option(None, "--enc", help="Encoder: full | lora | frozen (default from config)."),
    dec: Optional[str] = typer.Option(None, "--dec", help="Decoder: full | lora | frozen (default from config)."),
    freeze_codebook: bool = typer.Option(False, "--freeze-codebook", help="Keep codebooks, phi convs and quant_conv fixed so token ids keep their meaning."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="LoRA rank (default model.lora_rank = 8)."),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help=r"Regex of modules to adapt (default '.*\.mlp\.fc\d')."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=_SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help=_RESUME_HELP),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run directory (default train.results_dir)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Fine-tune a released or trained tokenizer on your images, then export merged weights.

    Example: [bold]xqtool finetune cfg.yaml --from runs/tiny-vit/best --enc lora --dec full --freeze-codebook[/]
    """
    from xqtool.errors import ConfigError
    from xqtool.tasks.finetune import finetune_tokenizer
    from xqtool.tasks.lora import TUNING_METHODS

    for name, value in (("--enc", enc), ("--dec", dec)):
        if value is not None and value not in TUNING_METHODS:
            raise ConfigError(f"{name} must be one of {', '.join(TUNING_METHODS)}, got {value!r}")
    _logging()
    cfg = _load_cfg(config, set_, max_steps)
    result = finetune_tokenizer(cfg, from_, enc=enc, dec=dec, freeze_codebook_ids=freeze_codebook,
                                lora_rank=lora_rank, lora_targets=lora_targets, output_dir=output_dir, resume=resume,
                                max_steps=max_steps, progress=not no_progress, console=console)
    _summary(result, "finetune")
    if result.status == "diverged":
        err_console.print(f"[bold red]error:[/] {result.message}")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `train-tokenizer` and `finetune`."""
    add_command(app, train_tokenizer_cmd, "train-tokenizer", help=train_tokenizer_cmd.__doc__)
    add_command(app, finetune_cmd, "finetune", help=finetune_cmd.__doc__)
