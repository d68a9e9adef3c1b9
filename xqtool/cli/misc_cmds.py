"""`xqtool demo-images`: a small real-photo dataset for trying xqtool offline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from xqtool.cli._common import add_command, console
from xqtool.cli.options import Overwrite, Seed, legacy_positional, output_option

DEFAULT_DEMO_DIR = Path("runs/demo_images")


def demo_images(
    legacy_out: Annotated[Optional[Path], typer.Argument(hidden=True, help="Deprecated: use -o/--output.")] = None,
    output: Annotated[Optional[Path], output_option(f"Folder to create (train/ and val/ class trees; default {DEFAULT_DEMO_DIR}).")] = None,
    per_class: Annotated[int, typer.Option("--per-class", help="Training images per class.")] = 48,
    val_per_class: Annotated[int, typer.Option("--val-per-class", help="Validation images per class.")] = 8,
    size: Annotated[int, typer.Option("--size", help="Side of the square PNG crops.")] = 64,
    seed: Seed = 0,
    overwrite: Overwrite = False,
) -> None:
    """Write random crops of scikit-image's bundled photos as a class-tree dataset (no network).

    Example: [bold]xqtool demo-images -o runs/demo_images --per-class 8[/]
    """
    from xqtool.cli.data_cmds import _progress
    from xqtool.data.samples import DEMO_CLASSES, write_demo_images

    output = legacy_positional(legacy_out, output, "output folder", "-o/--output DIR")
    out = output if output is not None else DEFAULT_DEMO_DIR
    with _progress("demo images") as (on_start, advance):
        on_start((per_class + val_per_class) * len(DEMO_CLASSES))
        train, val = write_demo_images(out, per_class=per_class, val_per_class=val_per_class, size=size, seed=seed,
                                       progress=advance, overwrite=overwrite)
    n_train = sum(1 for _ in train.rglob("*.png"))
    n_val = sum(1 for _ in val.rglob("*.png"))
    console.print(f"wrote {n_train} training images to {train} and {n_val} validation images to {val}")


def register(app: typer.Typer) -> None:
    """Add `demo-images` to `app`."""
    add_command(app, demo_images, "demo-images")
