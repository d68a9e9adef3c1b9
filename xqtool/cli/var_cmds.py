"""VAR commands: ``train-var`` and ``sample``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from xqtool.cli._common import add_command, console, run_facts
from xqtool.cli.options import (
    HELP_NUM_WORKERS,
    BatchSize,
    Device,
    IgnoreFingerprint,
    MaxSteps,
    NoProgress,
    OptPrecision,
    OptSeed,
    OptTokenizer,
    Overwrite,
    Precision,
    PrecisionOpt,
    Resume,
    Seed,
    SetOverrides,
    Tokenizer,
    Var,
    output_option,
)
from xqtool.errors import ConfigError


def _cpu_flag(device: Optional[str]) -> bool:
    """Accelerate-driven commands pick cpu or the launcher's GPU; other device strings are refused."""
    if device is None or device.startswith("cuda"):
        if device not in (None, "cuda"):
            raise ConfigError(f"--device {device}: this command uses Accelerate's GPU; choose it with "
                              "CUDA_VISIBLE_DEVICES and pass --device cuda (or --device cpu)")
        return False
    if device != "cpu":
        raise ConfigError(f"--device must be cpu or cuda here, got '{device}'")
    return True


def train_var_cmd(
    config: Annotated[Path, typer.Argument(
                                           help="VAR YAML (configs/var/tiny.yaml, configs/var/d17-msvr10p2.yaml).")],
    tokenizer: OptTokenizer = None,
    tokens: Annotated[Optional[str], typer.Option("--tokens", help="Token file / shard folder from `xqtool encode`.")] = None,
    images: Annotated[Optional[str], typer.Option("--images", help="Image source encoded on the fly (slower).")] = None,
    output: Annotated[Optional[Path], output_option("Run folder (default: train.results_dir of the config).")] = None,
    set_: SetOverrides = None,
    resume: Resume = None,
    max_steps: MaxSteps = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", "-j", help=HELP_NUM_WORKERS)] = None,
    precision: OptPrecision = None,
    seed: OptSeed = None,
    device: Device = None,
    no_progress: NoProgress = False,
    overwrite: Overwrite = False,
    ignore_fingerprint: IgnoreFingerprint = False,
) -> None:
    """Train a class-conditional VAR on tokenizer tokens.

    Example: [bold]xqtool train-var configs/var/tiny.yaml --tokens tokens.npy -t runs/tiny-cnn/best -o runs/var-tiny --max-steps 100[/]
    """
    from xqtool.config import load_var_config
    from xqtool.training import TrainInjected, VARRunOptions, train_var

    cpu = _cpu_flag(device)
    overrides = list(set_ or [])
    for key, value in (("data.tokens", tokens), ("data.images", images), ("data.tokenizer", tokenizer),
                       ("train.results_dir", output), ("train.max_steps", max_steps),
                       ("data.num_workers", num_workers), ("train.seed", seed),
                       ("train.mixed_precision",
                        None if precision is None else "no" if precision.value == "fp32" else precision.value)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_var_config(config, overrides)
    if not cfg.data.tokenizer:
        raise ConfigError("train-var needs the frozen tokenizer the tokens come from: pass --tokenizer/-t CKPT")
    if not cfg.data.tokens and not cfg.data.images:
        raise ConfigError("train-var needs training data: pass --tokens TOKENS (from `xqtool encode`) or --images SRC")
    run = VARRunOptions(resume=resume, overwrite=overwrite, cpu=cpu, ignore_fingerprint=ignore_fingerprint)
    result = train_var(cfg, run, TrainInjected(console=None if no_progress else console))
    if int(os.environ.get("RANK", "0")) != 0:  # several processes: the main one reports
        return
    last = result.history[-1] if result.history else {}
    console.print((f"[green]done[/] {result.steps} steps" if result.status == "finished"
                   else f"{result.status} at step {result.steps}")
                  + (f", resumed from {result.resumed_from}" if result.resumed_from else "")
                  + (f", loss {last['loss']:.4f}" if "loss" in last else "")
                  + (f", acc {last['acc']:.3f}" if "acc" in last else ""))
    prec = cfg.train.mixed_precision
    console.print(f"ran on: {run_facts(prec)}")
    console.print(f"output: {cfg.train.results_dir}")
    if result.model_dir is not None:
        console.print(f"model: {result.model_dir}")
    if result.status != "finished":  # diverged → 1; SIGINT → 130, SIGTERM → 143 (after saving)
        from xqtool.cli._common import err_console

        err_console.print(f"[bold {'red' if result.status == 'diverged' else 'yellow'}]"
                          f"{'error' if result.status == 'diverged' else 'stopped'}:[/] {result.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(result.exit_code)


def sample_cmd(
    var_ckpt: Var,
    tokenizer: Tokenizer,
    output: Annotated[Optional[Path], output_option("Folder for PNGs named classCCCC_IIIIII.png (class, index).")] = None,
    cfg: Annotated[float, typer.Option("--cfg", help="Guidance at the last scale (linear from 0 at scale 0).")] = 3.25,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep the k largest logits per branch (0 = off).")] = 750,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus threshold (0 = off).")] = 0.95,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature of the logits.")] = 1.0,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Comma-separated class ids, e.g. 1,207,980.")] = None,
    per_class: Annotated[Optional[int], typer.Option("--per-class", help="Images per class (all classes if no --classes).")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", help="Total images (cycles over classes).")] = None,
    seed: Seed = 0,
    batch_size: BatchSize = 25,
    npz: Annotated[Optional[Path], typer.Option("--npz", help="Write uint8 arr_0 [N,H,W,3] for FID tools.")] = None,
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Preview grid PNG: one row per class (up to 16 classes x 16 images).")] = None,
    precision: PrecisionOpt = Precision.fp32,
    device: Device = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the prefix at every scale (slow; for checks).")] = False,
    upstream_rng: Annotated[bool, typer.Option("--upstream-rng", help="The original's pixels: one generator per batch "
                                               "(upstream order) and uint8 by truncation.")] = False,
    no_pack: Annotated[bool, typer.Option("--no-pack",
                                          help="CPU: skip oneDNN weight packing (slower; saves one copy of the weights).")] = False,
    overwrite: Overwrite = False,
    ignore_fingerprint: IgnoreFingerprint = False,
) -> None:
    """Sample class-conditional images with a VAR and its tokenizer.

    Image i uses seed + i, so a run is reproducible whatever the batch size or the number of processes.

    Example: [bold]xqtool sample --var runs/var-tiny/var-last -t runs/tiny-cnn/best --classes 0,1 --per-class 4 -o runs/samples --grid runs/samples/grid.png[/]
    """
    from xqtool.checkpoints import load_tokenizer, load_var
    from xqtool.tasks.injected import Injected
    from xqtool.tasks.sample import SampleSettings, parse_classes, plan_labels, sample_images, unseen_classes

    cpu = _cpu_flag(device)
    if output is None and npz is None and grid is None:
        raise ConfigError("nothing to write: give -o/--output DIR, --npz FILE and/or --grid FILE")
    var, info = load_var(var_ckpt)
    tok = load_tokenizer(tokenizer)
    labels = plan_labels(var.num_classes, parse_classes(classes), per_class, num_samples)
    unseen = unseen_classes(info, labels)
    if unseen:
        shown = ", ".join(map(str, unseen[:10])) + (" ..." if len(unseen) > 10 else "")
        console.print(f"[yellow]warning:[/] class(es) {shown} never occurred in this VAR's training data; "
                      "their images follow no learned class", highlight=False)
    settings = SampleSettings(labels=labels, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed,
                              batch_size=batch_size, out_dir=output, npz=npz, grid=grid, use_cache=not no_cache,
                              precision=precision.value, upstream_rng=upstream_rng, cpu=cpu, pack=not no_pack,
                              overwrite=overwrite, ignore_fingerprint=ignore_fingerprint)
    res = sample_images(settings, Injected(var=var, tokenizer=tok, var_info=info, console=console))
    if not res.is_main:  # several processes: the main one reports
        return
    console.print(f"[green]done[/] {res.count} images in {res.seconds:.1f}s ({res.images_per_s:.2f} img/s)")
    console.print(f"ran on: {run_facts(precision)}")
    for label, path in (("png", res.out_dir), ("npz", res.npz), ("grid", res.grid)):
        if path is not None:
            console.print(f"{label}: {path}")


def register(app: typer.Typer) -> None:
    """Add ``train-var`` and ``sample``."""
    add_command(app, train_var_cmd, "train-var", help=train_var_cmd.__doc__, aliases={"--cpu": ["--device", "cpu"]})
    add_command(app, sample_cmd, "sample", help=sample_cmd.__doc__,
                aliases={"--ckpt": ["--var"], "--out": ["--output"], "--cpu": ["--device", "cpu"]})
