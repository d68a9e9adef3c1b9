"""Evaluation commands: `xqtool eval-fid`, `xqtool make-fid-stats`, `xqtool probe`.

``xqtool eval-fid make-stats DIR --name NAME`` is accepted as an alias of ``xqtool make-fid-stats DIR --name NAME``
(Typer cannot make a command that is also a group, so the first positional word is checked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import typer
from typing_extensions import Annotated
from rich.table import Table

from xqtool.cli._common import add_command, console, run_facts
from xqtool.cli.options import (
    BadFiles,
    BadFilesPolicy,
    HELP_BATCH_SIZE,
    BatchSize,
    Device,
    NumWorkers,
    OptTokenizer,
    Overwrite,
    Seed,
    TokenizerConfigOpt,
    output_option,
    resolve_device,
    legacy_positional,
)
from xqtool.errors import ConfigError

_MODE_HELP = "clean-fid mode: clean (PIL bicubic to 299, recommended) | legacy_tensorflow (ADM/TF-like) | legacy_pytorch."
_WEIGHTS_HELP = (
    "Inception file (inception-2015-12-05.pt; legacy_pytorch: pt_inception-2015-12-05-6726825d.pth) or its folder. "
    "Default: $XQTOOL_INCEPTION_WEIGHTS, /tmp, ~/.cache/torch/hub/checkpoints, ~/.cache/xqtool. Never downloaded."
)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _print_report(report: Dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in report["metrics"].items():
        table.add_row(k, _fmt(v))
    console.print(table)
    info = Table(show_header=False, box=None)
    info.add_column(style="dim")
    info.add_column()
    backend = report.get("backend", {})
    info.add_row("backend", f"{backend.get('library')} / {backend.get('feature_extractor')}")
    info.add_row("images", ", ".join(f"{k} {v}" for k, v in report.get("image_counts", {}).items()))
    info.add_row("preprocessing", str(report.get("preprocessing", "")))
    if report.get("config_hash"):
        info.add_row("config hash", str(report["config_hash"]))
    dev = report.get("device") or (report.get("settings") or {}).get("device")
    info.add_row("ran on", run_facts("fp32", dev))
    if report.get("report_path"):
        info.add_row("report", str(report["report_path"]))
    console.print(info)
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _print_stats(summary: Dict[str, Any]) -> None:
    console.print(
        f"[green]saved[/] FID statistics '{summary['name']}' ({summary['count']} images, mode {summary['mode']}, "
        f"{summary['extractor']}) to {summary['stats_path']}"
    )


def eval_fid(
    gen: str = typer.Argument(..., help="Generated images: folder, images .npz (arr_0) or stats .npz (mu/sigma). "
                              "With --rfid: the DATA to reconstruct. 'make-stats' = alias of make-fid-stats."),
    ref: Optional[str] = typer.Argument(None, help="Reference: folder, images .npz or stats .npz (or use --ref-stats)."),
    ref_stats: Optional[str] = typer.Option(None, "--ref-stats", help="Custom statistics NAME (see make-fid-stats)."),
    stats_dir: Optional[Path] = typer.Option(None, "--stats-dir", help="Folder of custom stats (default: "
                                             "$XQTOOL_FID_STATS_DIR, else clean-fid's stats folder)."),
    mode: str = typer.Option("clean", "--mode", help=_MODE_HELP),
    batch_size: BatchSize = 64,
    num_workers: NumWorkers = 0,
    device: Device = None,
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help=_WEIGHTS_HELP),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use only the first N images per side."),
    image_size: Optional[int] = typer.Option(None, "--image-size",
                                             help="ADM center crop to SxS first (default: native resolution)."),
    use_npz_stats: bool = typer.Option(False, "--use-npz-stats", help="For .npz with both images and mu/sigma "
                                       "(ADM reference batch): use the stored statistics instead of the images."),
    kid: bool = typer.Option(True, "--kid/--no-kid", help="Also compute KID."),
    isc: bool = typer.Option(True, "--is/--no-is", help="Also compute the Inception Score of GEN."),
    seed: Seed = 0,
    output: Annotated[Optional[Path], output_option("JSON report path (default fid_report.json / rfid_report.json "
                                                    "in the current folder).")] = None,
    rfid: bool = typer.Option(False, "--rfid", help="Reconstruction FID of a tokenizer: reconstruct GEN (=DATA)."),
    tokenizer: OptTokenizer = None,
    config: TokenizerConfigOpt = None,
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use EMA weights when the checkpoint has them."),
    lpips: str = typer.Option("auto", "--lpips", help="auto (when weights are found) | on | off."),
    lpips_weights: Optional[Path] = typer.Option(None, "--lpips-weights", help="LPIPS weights (else "
                                                 "$XQTOOL_LPIPS_WEIGHTS / ~/.cache/xqtool/lpips)."),
    save_recon: Optional[Path] = typer.Option(None, "--save-recon", help="Write reconstructions as PNG here."),
    bad_files: BadFiles = BadFilesPolicy.skip,
    name: Optional[str] = typer.Option(None, "--name", help="Only with 'eval-fid make-stats DIR': stats name."),
    overwrite: Overwrite = False,
) -> None:
    """FID / KID / Inception Score between two image sets, or rFID + PSNR + SSIM + LPIPS of a tokenizer.

    Examples:

      [bold]xqtool eval-fid samples.npz VIRTUAL_imagenet256_labeled.npz --mode legacy_tensorflow[/]

      [bold]xqtool eval-fid samples/ --ref-stats imagenet256-val[/]

      [bold]xqtool eval-fid --rfid -t runs/tok/best imagenet/val --max-images 5000[/]

      [bold]xqtool eval-fid make-stats imagenet/val --name imagenet256-val --image-size 256[/]
    """
    from xqtool.tasks.eval_fid import (FidSettings, FidStatsSettings, RfidSettings, evaluate_fid, evaluate_rfid,
                                        make_fid_stats)
    from xqtool.distributed import main_process_only

    if not main_process_only("eval-fid"):
        return

    device = resolve_device(device)
    features = dict(mode=mode, batch_size=batch_size, num_workers=num_workers, device=device,
                    inception_weights=inception_weights, max_images=max_images, image_size=image_size,
                    stats_dir=stats_dir)
    if gen == "make-stats":
        if ref is None or not name:
            raise ConfigError("usage: xqtool eval-fid make-stats DIR --name NAME")
        _print_stats(make_fid_stats(FidStatsSettings(source=ref, name=name, overwrite=overwrite, **features)))
        return
    report = output
    if rfid:
        if tokenizer is None:
            raise ConfigError("--rfid needs --tokenizer/-t CKPT (the tokenizer to evaluate)")
        if ref is not None or ref_stats is not None:
            raise ConfigError("--rfid scores DATA against its own reconstructions: give only DATA, no REF/--ref-stats")
        out = evaluate_rfid(RfidSettings(
            tokenizer=tokenizer, data=gen, config=config, prefer_ema=ema, lpips=lpips, lpips_weights=lpips_weights,
            bad_files=bad_files.value, kid=kid, seed=seed, save_recon=save_recon, overwrite=overwrite,
            report_path=report if report is not None else "rfid_report.json", **features))
        _print_report(out, f"Reconstruction metrics ({out['image_counts']['originals']} images)")
        return
    if tokenizer is not None:
        raise ConfigError("--tokenizer is only used with --rfid")
    out = evaluate_fid(FidSettings(gen=gen, ref=ref, ref_stats=ref_stats, use_npz_stats=use_npz_stats, kid=kid,
                                   inception_score=isc, seed=seed, overwrite=overwrite,
                                   report_path=report if report is not None else "fid_report.json", **features))
    _print_report(out, "FID")


def make_fid_stats_cmd(
    source: str = typer.Argument(..., help="Folder of images or images .npz (arr_0)."),
    name: str = typer.Option(..., "--name", help="Statistics name, used later as --ref-stats NAME."),
    mode: str = typer.Option("clean", "--mode", help=_MODE_HELP),
    stats_dir: Optional[Path] = typer.Option(None, "--stats-dir", help="Where to write (default: "
                                             "$XQTOOL_FID_STATS_DIR, else clean-fid's stats folder)."),
    batch_size: BatchSize = 64,
    num_workers: NumWorkers = 0,
    device: Device = None,
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help=_WEIGHTS_HELP),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use only the first N images of the source."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="ADM center crop to SxS first."),
    overwrite: Overwrite = False,
) -> None:
    """Save clean-fid custom statistics (mu, sigma, KID features) of an image set under NAME.

    Same files as clean-fid's make_custom_stats, so either tool can read them.

    Example: [bold]xqtool make-fid-stats imagenet/val --name imagenet256-val --image-size 256[/]
    """
    from xqtool.tasks.eval_fid import FidStatsSettings, make_fid_stats
    from xqtool.distributed import main_process_only

    if not main_process_only("make-fid-stats"):
        return

    _print_stats(make_fid_stats(FidStatsSettings(
        source=source, name=name, mode=mode, stats_dir=stats_dir, batch_size=batch_size, num_workers=num_workers,
        device=resolve_device(device), inception_weights=inception_weights, max_images=max_images,
        image_size=image_size, overwrite=overwrite)))


def probe(
    legacy_tokenizer: Annotated[Optional[str], typer.Argument(hidden=True, help="Deprecated: use -t/--tokenizer.")] = None,
    tokenizer: OptTokenizer = None,
    train: str = typer.Option(..., "--train", help="Labelled train images: class-tree folder or WebDataset shards."),
    val: str = typer.Option(..., "--val", help="Labelled validation images (same label ids as --train)."),
    features: str = typer.Option("semantic", "--features", help="semantic | all | quantized."),
    config: TokenizerConfigOpt = None,
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use EMA weights when the checkpoint has them."),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs of the linear probe."),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help=HELP_BATCH_SIZE)] = 64,
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="AdamW weight decay."),
    warmup_epochs: int = typer.Option(1, "--warmup-epochs", help="Linear warm-up epochs from --warmup-lr to --lr."),
    warmup_lr: float = typer.Option(1e-5, "--warmup-lr", help="Learning rate at the start of the warm-up."),
    min_lr: float = typer.Option(1e-6, "--min-lr", help="Floor of the learning rate after the decays."),
    decay_rate: float = typer.Option(0.1, "--decay-rate", help="Factor applied at each of --milestones."),
    milestones: str = typer.Option("0.3,0.6,0.9", "--milestones", help="LR decay points as fractions of --epochs."),
    cache_features: bool = typer.Option(True, "--cache-features/--no-cache-features",
                                        help="Encode once and reuse features (no train augmentation)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Default: 1 + largest label."),
    max_train_images: Optional[int] = typer.Option(None, "--max-train-images", help="Use only the first N training images."),
    max_val_images: Optional[int] = typer.Option(None, "--max-val-images", help="Use only the first N validation images."),
    output: Annotated[Path, output_option("Output folder (best.safetensors, probe_report.json).")] = Path("runs/probe"),
    device: Device = None,
    num_workers: NumWorkers = 0,
    seed: Seed = 0,
    bad_files: BadFiles = BadFilesPolicy.skip,
    overwrite: Overwrite = False,
) -> None:
    """Linear probing of frozen tokenizer features (BatchNorm1d + Linear), top-1/top-5 per epoch.

    Example: [bold]xqtool probe -t runs/tok/best --train imagenet/train --val imagenet/val --epochs 10 -o runs/probe[/]
    """
    from xqtool.tasks.injected import Injected
    from xqtool.tasks.probe import ProbeOptim, ProbeSettings, run_probe

    tokenizer = legacy_positional(legacy_tokenizer, tokenizer, "tokenizer", "-t/--tokenizer CKPT")
    if tokenizer is None:
        raise ConfigError("missing -t/--tokenizer CKPT (the tokenizer whose features are probed)")
    device = resolve_device(device)

    try:
        ms = tuple(float(m) for m in milestones.split(",") if m.strip())
    except ValueError:
        raise ConfigError(f"--milestones must be comma-separated fractions, got '{milestones}'") from None
    optim = ProbeOptim(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr, decay_rate=decay_rate,
                       milestones=ms, seed=seed)
    table = Table(title=f"Linear probe ({features} features)")
    for col in ("epoch", "lr", "train loss", "train top-1", "val top-1", "val top-5"):
        table.add_column(col, justify="right")

    def row(rec: Dict[str, Any]) -> None:
        table.add_row(str(rec["epoch"]), f"{rec['lr']:.2e}", f"{rec['train_loss']:.4f}",
                      f"{100 * rec['train_top1']:.2f}", f"{100 * rec['val_top1']:.2f}", f"{100 * rec['val_top5']:.2f}")

    from xqtool.distributed import main_process_only

    if not main_process_only("probe"):
        return
    settings = ProbeSettings(ckpt=tokenizer, train=train, val=val, features=features, optim=optim, config=config,
                             prefer_ema=ema, cache_features=cache_features, num_classes=num_classes,
                             num_workers=num_workers, device=device, max_train_images=max_train_images,
                             max_val_images=max_val_images, bad_files=bad_files.value, out_dir=output,
                             overwrite=overwrite)
    rep = run_probe(settings, Injected(on_epoch=row))
    console.print(table)
    console.print(f"best val top-1 [bold]{100 * rep['best_top1']:.2f}%[/] at epoch {rep['best_epoch']} "
                  f"({rep['image_counts']['train']} train / {rep['image_counts']['val']} val images, "
                  f"{rep['num_classes']} classes, feature dim {rep['feature_dim']})")
    console.print(f"classifier: {rep['best_path']}\nreport: {rep['report_path']}")
    console.print(f"ran on: {run_facts('fp32', device)}")


def register(app: typer.Typer) -> None:
    """Add `eval-fid`, `make-fid-stats` and `probe` to `app`."""
    add_command(app, eval_fid, "eval-fid", aliases={"--ckpt": ["--tokenizer"], "--report": ["--output"],
                                                      "--force": ["--overwrite"]})
    add_command(app, make_fid_stats_cmd, "make-fid-stats", aliases={"--force": ["--overwrite"]})
    add_command(app, probe, "probe", aliases={"--out": ["--output"]})
