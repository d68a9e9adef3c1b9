"""VAR commands: ``train-var`` and ``sample``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from xqtool.cli._common import add_command, console


def train_var_cmd(
    config: Path = typer.Argument(..., help="VAR YAML (configs/var/tiny.yaml, configs/var/d17-msvr10p2.yaml)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key, e.g. --set train.max_steps=100."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token file / shard folder from `xqtool encode`."),
    images: Optional[str] = typer.Option(None, "--images", help="Image source encoded on the fly (slower)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Frozen tokenizer checkpoint."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' (newest checkpoint of the run) or a step-* folder."),
    cpu: bool = typer.Option(False, "--cpu", help="Force CPU."),
) -> None:
    """Train a class-conditional VAR on tokenizer tokens.

    Example: xqtool train-var configs/var/tiny.yaml --tokens tok/train.npy --tokenizer runs/tiny-cnn/tokenizer-last
    """
    from xqtool.config_var import load_var_config
    from xqtool.tasks.train_var import train_var

    overrides = list(set_ or [])
    for key, value in (("data.tokens", tokens), ("data.images", images), ("data.tokenizer", tokenizer)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_var_config(config, overrides)
    result = train_var(cfg, resume=resume, console=console, cpu=cpu)
    last = result.history[-1] if result.history else {}
    console.print(f"[green]done[/] {result.steps} steps"
                  + (f", resumed from {result.resumed_from}" if result.resumed_from else "")
                  + (f", loss {last['loss']:.4f}" if "loss" in last else "")
                  + (f", acc {last['acc']:.3f}" if "acc" in last else ""))
    if result.model_dir is not None:
        console.print(f"model: {result.model_dir}")


def sample_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="VAR checkpoint: xqtool dir or official ar-ckpt-last.pth."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer checkpoint the VAR was trained on."),
    cfg: float = typer.Option(3.25, "--cfg", help="Guidance at the last scale (linear from 0 at scale 0)."),
    top_k: int = typer.Option(750, "--top-k", help="Keep the k largest logits per branch (0 = off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus threshold (0 = off)."),
    temperature: float = typer.Option(1.0, "--temperature"),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class ids, e.g. 1,207,980."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Images per class (all classes if no --classes)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="Total images (cycles over classes)."),
    seed: int = typer.Option(0, "--seed", help="Base seed; image i uses seed + i."),
    batch_size: int = typer.Option(25, "--batch-size", "-b"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder for PNGs {i:06d}.png."),
    npz: Optional[Path] = typer.Option(None, "--npz", help="Write uint8 arr_0 [N,H,W,3] for FID tools."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Preview grid PNG (first 64 images)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | fp16 (transformer autocast)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the prefix at every scale (slow; for checks)."),
    upstream_rng: bool = typer.Option(False, "--upstream-rng", help="One generator per batch (upstream order)."),
    cpu: bool = typer.Option(False, "--cpu", help="Force CPU."),
    no_pack: bool = typer.Option(False, "--no-pack",
                                 help="CPU: skip oneDNN weight packing (slower; saves one copy of the weights)."),
) -> None:
    """Sample class-conditional images with a VAR and its tokenizer.

    Example: xqtool sample --ckpt runs/var/var-last --tokenizer tok/ --per-class 50 --npz samples.npz --cfg 3.25
    """
    from xqtool.checkpoint import load_tokenizer
    from xqtool.tasks.sample import parse_classes, plan_labels, sample_images
    from xqtool.var_checkpoint import load_var

    var, _ = load_var(ckpt)
    tok = load_tokenizer(tokenizer)
    labels = plan_labels(var.num_classes, parse_classes(classes), per_class, num_samples)
    res = sample_images(var, tok, labels, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed,
                        batch_size=batch_size, out_dir=out, npz=npz, grid=grid, use_cache=not no_cache,
                        precision=precision, upstream_rng=upstream_rng, cpu=cpu, pack=not no_pack,
                        console=console)
    console.print(f"[green]done[/] {res.count} images in {res.seconds:.1f}s ({res.images_per_s:.2f} img/s)")
    for label, path in (("png", res.out_dir), ("npz", res.npz), ("grid", res.grid)):
        if path is not None:
            console.print(f"{label}: {path}")


def register(app: typer.Typer) -> None:
    """Add ``train-var`` and ``sample``."""
    add_command(app, train_var_cmd, "train-var", help="Train a class-conditional VAR on tokenizer tokens.")
    add_command(app, sample_cmd, "sample", help="Sample images with a VAR + tokenizer (PNG / npz / grid).")
