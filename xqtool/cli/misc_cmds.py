"""`xqtool demo-images`: a small real-photo dataset for trying xqtool offline."""

from __future__ import annotations

from pathlib import Path

import typer

from xqtool.cli._common import add_command, console


def demo_images(
    out: Path = typer.Argument(Path("demo_images"), help="Folder to create (train/ and val/ class trees)."),
    per_class: int = typer.Option(48, help="Training images per class."),
    val_per_class: int = typer.Option(8, help="Validation images per class."),
    size: int = typer.Option(64, help="Side of the square PNG crops."),
    seed: int = typer.Option(0, help="Seed of the random crops."),
) -> None:
    """Write random crops of scikit-image's bundled photos as a class-tree dataset (no network).

    Example: [bold]xqtool demo-images demo_images && xqtool encode demo_images/val -o val.npy --ckpt CKPT[/]
    """
    from xqtool.data.samples import write_demo_images

    train, val = write_demo_images(out, per_class=per_class, val_per_class=val_per_class, size=size, seed=seed)
    n_train = sum(1 for _ in train.rglob("*.png"))
    n_val = sum(1 for _ in val.rglob("*.png"))
    console.print(f"wrote {n_train} training images to {train} and {n_val} validation images to {val}")


def register(app: typer.Typer) -> None:
    """Add `demo-images` to `app`."""
    add_command(app, demo_images, "demo-images")
