"""The one CLI vocabulary: shared options as reusable ``Annotated`` types, deprecated spellings, help examples.

Every command that takes a tokenizer, a VAR, an output path, a batch size ... uses the types below, so the
spelling and the help text of a concept are defined once (``tests/test_cli_vocabulary.py`` walks every command
and fails when a concept appears under another spelling). Defaults stay in the command signatures because the
right batch size differs between, say, FID feature extraction and VAR sampling; the help text says what the
default means.

Old spellings (``--ckpt``, ``--from``, ``--out``, ``--output-dir``, ``--cpu`` ...) keep working for one release:
:class:`AliasCommand` rewrites them before parsing and prints one warning line on stderr. They are not shown
in ``--help`` or in the shell completions.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import typer
from typer.core import TyperCommand, TyperOption
from typing_extensions import Annotated

T = TypeVar("T")


class Precision(str, enum.Enum):
    """Autocast precision of the forward passes (``fp32`` = no autocast)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class BadFilesPolicy(str, enum.Enum):
    """What to do with unreadable inputs."""

    skip = "skip"
    fail = "fail"


HELP_TOKENIZER = ("Tokenizer: xqtool checkpoint folder (run/best), official XQ-GAN .pt, registry name "
                  "(xqtool models) or hf://OWNER/NAME.")
HELP_VAR = ("VAR generator: xqtool checkpoint folder (run/var-last), official ar-ckpt-last.pth, registry name "
            "(xqtool models) or hf://OWNER/NAME.")
HELP_BATCH_SIZE = "Images per forward pass on each process."
HELP_NUM_WORKERS = "DataLoader worker processes per process (0 = load in the main process)."
HELP_DEVICE = "cpu, cuda, cuda:1, mps ... (default: cuda when available, else cpu; Accelerate's under a launcher)."
HELP_PRECISION = "Autocast precision of the forward passes (fp32 = none)."
HELP_SEED = "Random seed (runs with the same seed and inputs give the same outputs)."
HELP_OVERWRITE = ("Replace an existing output that xqtool made (recognised by its manifest or marker); anything "
                  "else is never replaced (default: refuse existing outputs).")
HELP_IGNORE_FINGERPRINT = ("Accept a tokenizer whose weights fingerprint differs from the one recorded with the tokens / "
                           "VAR (same config, other weights: results are likely noise).")
HELP_SET = "Override a config value, repeatable: --set train.lr=1e-4 --set quant.codebook_size=8192."
HELP_RESUME = "'auto' = continue from the newest complete checkpoint of the run (if any); or a state folder."
HELP_MAX_STEPS = "Stop after this many optimizer steps."
HELP_NO_PROGRESS = "No live progress bar (plain log lines are printed instead)."
HELP_BAD_FILES = "skip (count them, list them in the output's skipped.txt / report) | fail (stop at the first)."
HELP_CONFIG = "Tokenizer YAML, only for checkpoints that carry no config (default: the checkpoint's own)."

DEFAULT_NUM_WORKERS = min(4, os.cpu_count() or 1)

Tokenizer = Annotated[str, typer.Option("--tokenizer", "-t", help=HELP_TOKENIZER, metavar="TOKENIZER")]
OptTokenizer = Annotated[Optional[str], typer.Option("--tokenizer", "-t", help=HELP_TOKENIZER, metavar="TOKENIZER")]
Var = Annotated[str, typer.Option("--var", help=HELP_VAR, metavar="VAR")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help=HELP_BATCH_SIZE)]
NumWorkers = Annotated[int, typer.Option("--num-workers", "-j", help=HELP_NUM_WORKERS)]
Device = Annotated[Optional[str], typer.Option("--device", help=HELP_DEVICE)]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help=HELP_PRECISION, case_sensitive=False)]
OptPrecision = Annotated[Optional[Precision], typer.Option("--precision", help=HELP_PRECISION, case_sensitive=False)]
Seed = Annotated[int, typer.Option("--seed", help=HELP_SEED)]
OptSeed = Annotated[Optional[int], typer.Option("--seed", help=HELP_SEED)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help=HELP_OVERWRITE)]
IgnoreFingerprint = Annotated[bool, typer.Option("--ignore-fingerprint", help=HELP_IGNORE_FINGERPRINT)]
SetOverrides = Annotated[Optional[List[str]], typer.Option("--set", help=HELP_SET, metavar="KEY=VALUE")]
Resume = Annotated[Optional[str], typer.Option("--resume", help=HELP_RESUME)]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help=HELP_MAX_STEPS)]
NoProgress = Annotated[bool, typer.Option("--no-progress", help=HELP_NO_PROGRESS)]
BadFiles = Annotated[BadFilesPolicy, typer.Option("--bad-files", help=HELP_BAD_FILES)]
TokenizerConfigOpt = Annotated[Optional[Path], typer.Option("--config", help=HELP_CONFIG)]


def output_option(help: str) -> typer.models.OptionInfo:  # noqa: A002 - typer's own name
    """``-o/--output`` with a command-specific description of what is written there (use in ``Annotated``)."""
    return typer.Option("--output", "-o", help=help, metavar="PATH")


def resolve_device(device: Optional[str]) -> str:
    """`device` or the default: cuda when available, else cpu."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- deprecated spellings


def _warn(old: str, new: str) -> None:
    from xqtool.cli._common import err_console

    err_console.print(f"[yellow]warning:[/] {old} is deprecated and will be removed in the next release; use {new}",
                      highlight=False, soft_wrap=True)


def warn_deprecated(old: str, new: str) -> None:
    """Print the one-line deprecation warning (also used for deprecated positional forms)."""
    _warn(old, new)


def legacy_positional(legacy: Optional[T], value: Optional[T], thing: str, option: str) -> Optional[T]:
    """The value of an option that also has a deprecated positional form (e.g. ``thing="output folder"``,
    ``option="-o/--output DIR"``): the positional value prints the deprecation warning; ConfigError when both
    forms are given."""
    if legacy is None:
        return value
    if value is not None:
        from xqtool.errors import ConfigError

        raise ConfigError(f"give the {thing} once: {option}")
    warn_deprecated(f"the positional {thing}", option)
    return legacy


class AliasCommand(TyperCommand):
    """A Typer command that accepts deprecated option spellings.

    ``aliases`` maps an old option to the argv words that replace it: ``{"--ckpt": ("--tokenizer",)}`` or, for a
    flag that became an option value, ``{"--cpu": ("--device", "cpu")}``.
    """

    aliases: Dict[str, Tuple[str, ...]] = {}

    def parse_args(self, ctx: typer.Context, args: List[str]) -> List[str]:  # type: ignore[override]
        out: List[str] = []
        warned = set()
        for i, a in enumerate(args):
            if a == "--":
                out.extend(args[i:])
                break
            name, eq, value = a.partition("=")
            if name in self.aliases:
                new = self.aliases[name]
                if name not in warned:
                    _warn(name, " ".join(new))
                    warned.add(name)
                out.extend(new)
                if eq:
                    out.append(value)
                continue
            out.append(a)
        return super().parse_args(ctx, out)

    def collect_usage_pieces(self, ctx: typer.Context) -> List[str]:  # type: ignore[override]
        """The usage line without hidden (deprecated positional) arguments."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not getattr(param, "hidden", False):
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def alias_command(aliases: Dict[str, Sequence[str]]) -> Type[AliasCommand]:
    """A :class:`AliasCommand` subclass with these deprecated spellings."""
    return type("AliasCommand", (AliasCommand,), {"aliases": {k: tuple(v) for k, v in aliases.items()}})


def all_aliases(command: object) -> Dict[str, Tuple[str, ...]]:
    """The deprecated spellings a click command accepts (empty for plain commands)."""
    return dict(getattr(command, "aliases", {}) or {})


# ---------------------------------------------------------------- help rendering: flags are flags


def _patch_flag_metavar() -> None:
    """Boolean flags render as ``--full``, not ``--full <bool>`` (which suggests ``--full true``)."""
    if getattr(TyperOption, "_xq_flag_patch", False):
        return
    original = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> Optional[str]:
        if self.is_flag:
            return None
        return original(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
    TyperOption._xq_flag_patch = True  # type: ignore[attr-defined]


_patch_flag_metavar()
