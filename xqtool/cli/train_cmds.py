"""`xqtool train-tokenizer` and `xqtool finetune` (thin: parse, load config, call one task, print a summary)."""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional

from typing_extensions import Annotated

import typer
from rich.panel import Panel
from rich.table import Table

from xqtool.cli._common import add_command, console, err_console, run_facts
from xqtool.cli.options import (
    HELP_NUM_WORKERS,
    MaxSteps,
    NoProgress,
    Overwrite,
    OptPrecision,
    OptSeed,
    Precision,
    Resume,
    SetOverrides,
    Tokenizer,
    output_option,
)

if TYPE_CHECKING:
    from xqtool.training import TokenizerRunOptions

log = logging.getLogger(__name__)



def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)


@dataclass
class RunOptions:
    """The options both tokenizer training commands share (see :func:`with_run_options`)."""

    set_: Optional[List[str]]
    resume: Optional[str]
    output: Optional[Path]
    max_steps: Optional[int]
    num_workers: Optional[int]
    precision: Optional[Precision]
    seed: Optional[int]
    no_progress: bool
    overwrite: bool

    def load_config(self, config: Path) -> Any:
        """The tokenizer config YAML with ``--set`` and the shared options applied (CLI flags win)."""
        from xqtool.config import load_tokenizer_config

        overrides = config_overrides(self.set_, self.num_workers, self.precision, self.seed)
        return load_tokenizer_config(str(config), overrides=overrides)

    def trainer_options(self) -> TokenizerRunOptions:
        """The trainer's :class:`xqtool.training.TokenizerRunOptions` (the options that are not config keys)."""
        from xqtool.training import TokenizerRunOptions

        return TokenizerRunOptions(output_dir=self.output, resume=self.resume, max_steps=self.max_steps,
                                   overwrite=self.overwrite, progress=not self.no_progress)


def with_run_options(output_help: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Append the shared options to a Typer command and hand them over as one ``run: RunOptions`` argument.

    Options, after the command's own and in this order (as ``--help`` lists them): ``--set``, ``--resume``,
    ``-o/--output`` (help `output_help`), ``--max-steps``, ``-j/--num-workers``, ``--precision``, ``--seed``,
    ``--no-progress``, ``--overwrite``. Typer reads the command's ``__signature__`` and annotations, so the
    declared parameters are the command's own ones (without ``run``) followed by these.
    """
    shared = [
        ("set_", SetOverrides, None),
        ("resume", Resume, None),
        ("output", Annotated[Optional[Path], output_option(output_help)], None),
        ("max_steps", MaxSteps, None),
        ("num_workers", Annotated[Optional[int], typer.Option("--num-workers", "-j", help=HELP_NUM_WORKERS)], None),
        ("precision", OptPrecision, None),
        ("seed", OptSeed, None),
        ("no_progress", NoProgress, False),
        ("overwrite", Overwrite, False),
    ]

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        hints = {k: v for k, v in typing.get_type_hints(fn, include_extras=True).items() if k != "run"}
        own = [p.replace(annotation=hints[name]) for name, p in inspect.signature(fn).parameters.items()
               if name != "run"]
        extra = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=a)
                 for n, a, d in shared]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            run = RunOptions(**{n: kwargs.pop(n) for n, _, _ in shared})
            fn(run=run, **kwargs)

        command.__signature__ = inspect.Signature(own + extra)  # type: ignore[attr-defined]
        command.__annotations__ = {**hints, **{n: a for n, a, _ in shared}}
        return command

    return decorate


def _summary(result: Any, title: str, cfg: Any) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # accelerate launch: only the main process prints
        return
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(overflow="fold")  # paths wrap, never cut
    colour = {"finished": "green", "interrupted": "yellow", "diverged": "red"}.get(result.status, "white")
    t.add_row("status", f"[{colour}]{result.status}[/] at step {result.step}/{result.total_steps}")
    if result.best_value is not None:
        t.add_row("best", f"{result.best_metric} = {result.best_value:.4f} (step {result.best_step})")
    for k in ("val/psnr", "val/ssim", "val/rfid"):
        if k in result.last_val:
            t.add_row(k, f"{result.last_val[k]:.4f}")
    for k in sorted(k for k in result.last_val if k.startswith("val/codebook_usage/b") and k.count("/") == 2):
        t.add_row(k, f"{result.last_val[k]:.4f}")  # distinct codes / K of one branch over the validation set
    if result.images_per_sec is not None:  # None: this invocation ran no step (e.g. resume of a finished run)
        t.add_row("images/s", f"{result.images_per_sec:.1f}")
    prec = cfg.train.mixed_precision
    t.add_row("ran on", run_facts(prec))
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


def config_overrides(overrides: Optional[List[str]], num_workers: Optional[int], precision: Optional[Precision],
                     seed: Optional[int], seed_key: str = "train.global_seed") -> List[str]:
    """`--set` values plus the shared options that map onto config keys (CLI flags win: they come last)."""
    out = list(overrides or [])
    if num_workers is not None:
        out.append(f"data.num_workers={num_workers}")
    if precision is not None:
        out.append(f"train.mixed_precision={'no' if precision.value == 'fp32' else precision.value}")
    if seed is not None:
        out.append(f"{seed_key}={seed}")
    return out


def _exit(result: Any) -> None:
    """Diverged → one error line, exit 1; stopped by SIGINT/SIGTERM (after saving) → exit 130/143."""
    if result.status == "diverged":
        err_console.print(f"[bold red]error:[/] {result.message}", highlight=False, soft_wrap=True)
    elif result.status == "interrupted":
        err_console.print(f"[bold yellow]stopped:[/] {result.message}", highlight=False, soft_wrap=True)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@with_run_options("Run folder (default: train.results_dir of the config).")
def train_tokenizer_cmd(
    config: Annotated[Path, typer.Argument(help="Tokenizer YAML (xqtool or official XQ-GAN keys).")],
    run: RunOptions,
) -> None:
    """Train an XQ-GAN tokenizer.

    Example: [bold]xqtool train-tokenizer configs/tokenizer/tiny-cnn.yaml -o runs/tiny-cnn --max-steps 200[/]

    Multi-GPU: [bold]accelerate launch -m xqtool train-tokenizer cfg.yaml --resume auto[/]
    """
    from xqtool.training import TrainInjected, train_tokenizer

    _logging()
    cfg = run.load_config(config)
    result = train_tokenizer(cfg, run.trainer_options(), TrainInjected(console=console))
    _summary(result, "train-tokenizer", cfg)
    _exit(result)


@with_run_options("Run folder (default: next to the source, runs/a/best -> runs/a-best-finetune).")
def finetune_cmd(
    config: Annotated[Path, typer.Argument(help="YAML with the loss/data/train settings.")],
    tokenizer: Tokenizer,
    enc: Annotated[Optional[str], typer.Option("--enc", help="Encoder: full | lora | frozen (default from config).")] = None,
    dec: Annotated[Optional[str], typer.Option("--dec", help="Decoder: full | lora | frozen (default from config).")] = None,
    freeze_codebook: Annotated[bool, typer.Option("--freeze-codebook", help="Keep codebooks, phi convs and quant_conv fixed so token ids keep their meaning.")] = False,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank (default model.lora_rank = 8).")] = None,
    lora_targets: Annotated[Optional[str], typer.Option("--lora-targets", help=r"Regex of modules to adapt (default '.*\.mlp\.fc\d').")] = None,
    *,
    run: RunOptions,
) -> None:
    """Fine-tune a released or trained tokenizer on your images, then export merged weights.

    Example: [bold]xqtool finetune configs/tokenizer/tiny-vit.yaml -t runs/tiny-vit/best -o runs/ft --enc lora --dec full --freeze-codebook[/]
    """
    from xqtool.errors import ConfigError
    from xqtool.tasks.finetune import FinetuneSettings, finetune_tokenizer
    from xqtool.models.lora import TUNING_METHODS
    from xqtool.training import TrainInjected

    for name, value in (("--enc", enc), ("--dec", dec)):
        if value is not None and value not in TUNING_METHODS:
            raise ConfigError(f"{name} must be one of {', '.join(TUNING_METHODS)}, got {value!r}")
    _logging()
    cfg = run.load_config(config)
    settings = FinetuneSettings(source=tokenizer, enc=enc, dec=dec, freeze_codebook=freeze_codebook,
                                lora_rank=lora_rank, lora_targets=lora_targets)
    result = finetune_tokenizer(cfg, settings, run.trainer_options(), TrainInjected(console=console))
    _summary(result, "finetune", cfg)
    _exit(result)


def register(app: typer.Typer) -> None:
    """Add `train-tokenizer` and `finetune`."""
    add_command(app, train_tokenizer_cmd, "train-tokenizer", help=train_tokenizer_cmd.__doc__,
                aliases={"--output-dir": ["--output"]})
    add_command(app, finetune_cmd, "finetune", help=finetune_cmd.__doc__,
                aliases={"--from": ["--tokenizer"], "--output-dir": ["--output"]})
