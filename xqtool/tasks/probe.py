"""Linear probing of frozen tokenizer features (spec tokenizer.md §7, with its defects fixed).

Features (tokenizer frozen, eval mode, no gradients), from ``tok.encode_features(images)`` ``[B, P, D, H, W]``
on the tokenizer's own latent grid (any P, any N):

* ``semantic``  — pre-quantization latents of the semantic (last) branch, mean over the H×W grid → ``[B, D]``;
* ``all``       — pre-quantization latents of all branches concatenated (branch 0 first) → ``[B, P·D]``;
* ``quantized`` — the semantic branch's final quantized map (cumulative f̂ over all scales) → ``[B, D]``.

Classifier: ``BatchNorm1d(F, affine=False, eps=1e-6) → Linear(F, C)``; cross-entropy; timm AdamW
(lr 1e-4, weight decay 1e-4), per-epoch multistep decay ×0.1 at 30/60/90 % of the epochs, 1 warmup epoch
(from timm's warmup lr 1e-5), min lr 1e-6 — all configurable. With ``cache_features`` (default) the encoder runs
once per image and epochs reuse the cached features (center-cropped train images, no augmentation); without it
every epoch re-encodes ADM random-resize-crop + flip train images.

Outputs in ``out_dir``: ``best.safetensors`` (classifier with the best val top-1, atomic), ``last.safetensors``,
``probe_report.json`` (per-epoch loss/lr/top-1/top-5, best, settings, checkpoint, config hash, version).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from xqtool import __version__
from xqtool.errors import ConfigError, DataError
from xqtool.fsutil import atomic_path, atomic_write_text, check_output, fresh_output_dir, has_marker, output_lock
from xqtool.tasks.injected import Injected

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FEATURE_KINDS = ("semantic", "all", "quantized")


@dataclass
class ProbeOptim:
    """Optimisation settings of the probe (defaults = spec §7); written into the report's ``settings``."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    decay_rate: float = 0.1
    milestones: Tuple[float, ...] = (0.3, 0.6, 0.9)
    seed: int = 42

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError("--epochs must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if self.lr <= 0:
            raise ConfigError("--lr must be > 0")
        if any(not 0 < m <= 1 for m in self.milestones):
            raise ConfigError("--milestones are fractions of the epochs in (0, 1], e.g. 0.3,0.6,0.9")


@dataclass(kw_only=True)
class ProbeSettings:
    """One ``xqtool probe`` run (see :func:`run_probe`).

    Attributes:
        ckpt: tokenizer checkpoint (xqtool dir or official ``.pt``; ``config`` optional YAML); not read when
            a tokenizer is injected. prefer_ema: use EMA weights when the checkpoint has them.
        train, val: labelled image sources (class-tree folders or WebDataset shards with ``cls``).
        features: ``semantic | all | quantized``; optim: the optimisation settings.
        cache_features: encode each image once and reuse the features every epoch.
        num_classes: default = 1 + the largest label seen in train/val (required without the cache).
        shuffle_labels: randomly permute the train labels (a control: val accuracy should fall to chance).
        out_dir: output folder (None = write nothing); overwrite: replace an earlier probe output.
    """

    train: PathLike
    val: PathLike
    ckpt: Optional[PathLike] = None
    config: Optional[PathLike] = None
    prefer_ema: bool = True
    features: str = "semantic"
    optim: ProbeOptim = field(default_factory=ProbeOptim)
    cache_features: bool = True
    num_classes: Optional[int] = None
    num_workers: int = 0
    device: str = "cpu"
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None
    bad_files: str = "skip"
    out_dir: Optional[PathLike] = "probe"
    shuffle_labels: bool = False
    overwrite: bool = False


class LinearProbe(nn.Module):
    """``BatchNorm1d(F, affine=False, eps=1e-6)`` then ``Linear(F, C)``: features ``[B, F]`` → logits ``[B, C]``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


@torch.inference_mode()
def probe_features(tok: Any, images: torch.Tensor, kind: str = "semantic") -> torch.Tensor:
    """Frozen features ``[B, F]`` of images ``[B, 3, S, S]`` in [-1, 1] (see module docstring for `kind`)."""
    if kind not in FEATURE_KINDS:
        raise ConfigError(f"unknown --features '{kind}': use one of {', '.join(FEATURE_KINDS)}")
    feats = tok.encode_features(images).float()  # [B, P, D, H, W]
    if kind == "semantic":
        return feats[:, -1].mean(dim=(-2, -1))
    if kind == "all":
        return feats.mean(dim=(-2, -1)).flatten(1)
    # quantized: final cumulative f_hat of the semantic branch
    tokens = tok.quantizer.quantize(list(feats.unbind(1)))
    fhat = tok.quantizer.tokens_to_fhat(tokens)  # [B, P*D, H, W]
    d = feats.shape[2]
    return fhat[:, -d:].float().mean(dim=(-2, -1))


def _labels_ok(labels: torch.Tensor, source: PathLike) -> None:
    if labels.numel() and int(labels.min()) < 0:
        raise DataError(f"{source} has images without class labels: use a class-tree folder (one folder per class) "
                        "or WebDataset shards with 'cls'")


def extract_dataset(
    tok: Any, source: PathLike, *, kind: str, batch_size: int, num_workers: int, device: str,
    max_images: Optional[int] = None, bad_files: str = "skip",
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Encode a labelled image source once → (features ``[N, F]`` float32 CPU, labels ``[N]`` long, n skipped)."""
    from xqtool.data.images import make_loader

    loader = make_loader(str(source), image_size=int(tok.image_size), batch_size=batch_size, train=False,
                         num_workers=num_workers, bad_files=bad_files)
    feats, labels, n = [], [], 0
    for batch in loader:
        x, y = batch["image"], batch["label"]
        if max_images:
            x, y = x[: max_images - n], y[: max_images - n]
        if x.shape[0] == 0:
            break
        _labels_ok(y, source)
        feats.append(probe_features(tok, x.to(device), kind).cpu())
        labels.append(y.long())
        n += x.shape[0]
        if max_images and n >= max_images:
            break
    if n == 0:
        raise DataError(f"no images in {source}")
    return torch.cat(feats), torch.cat(labels), len(loader.bad_files)


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int, gen: Optional[torch.Generator]) -> Iterator:
    order = torch.randperm(x.shape[0], generator=gen) if gen is not None else torch.arange(x.shape[0])
    for i in range(0, x.shape[0], bs):
        idx = order[i : i + bs]
        if gen is not None and idx.numel() < 2:
            continue  # BatchNorm in train mode needs >= 2 samples
        yield x[idx], y[idx]


def _topk(logits: torch.Tensor, y: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == y[:, None]).any(1).sum())


def _save_classifier(path: Path, model: LinearProbe, meta: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    from xqtool.checkpoints import check_finite

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    check_finite(state, f"refusing to save {path}")
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def run_probe(settings: ProbeSettings, injected: Optional[Injected] = None) -> Dict[str, Any]:
    """Train a linear probe on frozen tokenizer features; returns (and writes) the report.

    ``settings.out_dir`` is checked before any work: OutputError when it exists and is not empty (``overwrite``
    replaces only an earlier probe output), lies inside / contains the train or val data, or is locked by another
    process. Reads ``injected.tokenizer`` (used instead of loading ``settings.ckpt``) and ``injected.on_epoch``
    (called with each epoch's record; the CLI prints a row).

    Returns:
        Report dict: ``history`` (epoch, lr, train_loss, train_top1, val_top1, val_top5), ``best_top1``,
        ``best_epoch``, ``best_path``, ``feature_dim``, ``num_classes``, counts, settings, checkpoint, config_hash.
    Raises:
        ConfigError: bad features kind or optimisation settings, ``--no-cache-features`` without num_classes,
            labels beyond num_classes. DataError: unlabelled images, fewer than 2 classes, no training batches.
    """
    injected = injected or Injected()
    if settings.out_dir is None:
        return _run_probe(settings, injected, None)
    out = Path(settings.out_dir)
    replace = check_output(out, kind="probe", is_dir=True, overwrite=settings.overwrite,
                           sources=[settings.train, settings.val],
                           ours=lambda p: has_marker(p, "probe") or (p / "probe_report.json").is_file())
    with output_lock(out), fresh_output_dir(out, "probe", replace=replace):
        return _run_probe(settings, injected, out)


def _run_probe(r: ProbeSettings, injected: Injected, out: Optional[Path]) -> Dict[str, Any]:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from xqtool.checkpoints import load_tokenizer

    s = r.optim
    s.validate()
    features, device, num_classes = r.features, r.device, r.num_classes
    if features not in FEATURE_KINDS:
        raise ConfigError(f"unknown --features '{features}': use one of {', '.join(FEATURE_KINDS)}")
    if not r.cache_features and num_classes is None:
        raise ConfigError("--no-cache-features needs --num-classes C")
    torch.manual_seed(s.seed)
    tok = injected.tokenizer
    if tok is None:
        tok = load_tokenizer(r.ckpt, config=r.config, map_location=device, prefer_ema=r.prefer_ema)
    tok = tok.to(device).eval()
    tok.requires_grad_(False)
    common = dict(kind=features, batch_size=s.batch_size, num_workers=r.num_workers, device=device,
                  bad_files=r.bad_files)
    xv, yv, bad_v = extract_dataset(tok, r.val, max_images=r.max_val_images, **common)
    bad_t = 0
    if r.cache_features:
        xt, yt, bad_t = extract_dataset(tok, r.train, max_images=r.max_train_images, **common)
    else:
        xt = yt = None
    if num_classes is None:
        num_classes = int(max(int(yt.max()), int(yv.max()))) + 1  # type: ignore[union-attr]
    if num_classes < 2:
        raise DataError("linear probing needs at least 2 classes")
    if int(yv.max()) >= num_classes or (yt is not None and int(yt.max()) >= num_classes):
        raise ConfigError(f"labels go beyond --num-classes {num_classes}")
    gen = torch.Generator().manual_seed(s.seed)
    if r.shuffle_labels and yt is not None:
        yt = yt[torch.randperm(yt.shape[0], generator=gen)]

    dim = int(xv.shape[1])
    model = LinearProbe(dim, num_classes).to(device)
    opt = create_optimizer_v2(model, "adamw", lr=s.lr, weight_decay=s.weight_decay)
    # epoch index (0-based) from which each decay applies: after round(f * epochs) full epochs
    milestones = sorted({max(1, round(m * s.epochs)) for m in s.milestones})
    # timm's multistep convention applies milestone m at t == m - 1, hence the + 1
    sched, _ = create_scheduler_v2(opt, sched="multistep", num_epochs=s.epochs,
                                   decay_milestones=[m + 1 for m in milestones],
                                   decay_rate=s.decay_rate, warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
                                   min_lr=s.min_lr)
    meta = {"features": features, "feature_dim": str(dim), "num_classes": str(num_classes),
            "xqtool_version": __version__}
    history: List[Dict[str, Any]] = []
    best_top1, best_epoch = -1.0, -1
    n_train = 0
    for epoch in range(s.epochs):
        model.train()
        lr = opt.param_groups[0]["lr"]
        tot_loss, tot_correct, n_train = 0.0, 0, 0
        for xb, yb in _train_batches(tok, r, xt, yt, gen, epoch):
            xb, yb = xb.to(device), yb.to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += float(loss.detach()) * xb.shape[0]
            tot_correct += _topk(logits.detach(), yb, 1)
            n_train += xb.shape[0]
        sched.step(epoch + 1)
        for group in opt.param_groups:  # timm's multistep schedule has no floor; the spec's min_lr is one
            group["lr"] = max(group["lr"], s.min_lr)
        if n_train == 0:
            raise DataError(f"no training batches from {r.train} (need >= 2 images)")
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(xb.to(device)).cpu() for xb, _ in _batches(xv, yv, 1024, None)])
        top1 = _topk(logits, yv, 1) / yv.shape[0]
        top5 = _topk(logits, yv, 5) / yv.shape[0]
        rec = {"epoch": epoch + 1, "lr": lr, "train_loss": tot_loss / n_train, "train_top1": tot_correct / n_train,
               "val_top1": top1, "val_top5": top5}
        history.append(rec)
        if top1 > best_top1:
            best_top1, best_epoch = top1, epoch + 1
            if out is not None:
                _save_classifier(out / "best.safetensors", model, {**meta, "epoch": str(epoch + 1),
                                                                    "val_top1": f"{top1:.6f}"})
        if injected.on_epoch is not None:
            injected.on_epoch(rec)
    if out is not None:
        _save_classifier(out / "last.safetensors", model, {**meta, "epoch": str(s.epochs)})
    try:
        chash = tok.config_hash()
    except Exception:  # noqa: BLE001 - injected toy tokenizers
        chash = None
    report = {
        "task": "probe",
        "best_top1": best_top1,
        "best_epoch": best_epoch,
        "final_top1": history[-1]["val_top1"],
        "final_top5": history[-1]["val_top5"],
        "history": history,
        "features": features,
        "feature_dim": dim,
        "num_classes": num_classes,
        "image_counts": {"train": int(xt.shape[0]) if xt is not None else n_train, "val": int(yv.shape[0]),
                         "skipped_bad_files": bad_t + bad_v},
        "checkpoint": str(Path(r.ckpt).resolve()) if r.ckpt is not None and injected.tokenizer is None else (
            str(r.ckpt) if r.ckpt is not None else None),
        "config_hash": chash,
        "prefer_ema": r.prefer_ema,
        "train": str(r.train),
        "val": str(r.val),
        "cache_features": r.cache_features,
        "shuffle_labels": r.shuffle_labels,
        "settings": {**asdict(s), "decay_from_epoch_index": milestones, "optimizer": "timm adamw",
                     "scheduler": "timm multistep (per epoch)", "device": str(device)},
        "best_path": str((out / "best.safetensors").resolve()) if out is not None else None,
        "xqtool_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if out is not None:
        report["report_path"] = str((out / "probe_report.json").resolve())
        atomic_write_text(out / "probe_report.json", json.dumps(report, indent=2) + "\n")
    return report


def _train_batches(tok: Any, r: ProbeSettings, xt: Optional[torch.Tensor], yt: Optional[torch.Tensor],
                   gen: torch.Generator, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Cached: shuffled feature batches. Uncached: augmented images encoded on the fly."""
    s = r.optim
    if xt is not None:
        yield from _batches(xt, yt, s.batch_size, gen)
        return
    from xqtool.data.images import make_loader

    train, max_images = r.train, r.max_train_images
    loader = make_loader(str(train), image_size=int(tok.image_size), batch_size=s.batch_size, train=True,
                         num_workers=r.num_workers, bad_files=r.bad_files, seed=s.seed + epoch)
    n = 0
    for batch in loader:
        x, y = batch["image"], batch["label"]
        if max_images:
            x, y = x[: max_images - n], y[: max_images - n]
        if x.shape[0] < 2:
            break
        _labels_ok(y, train)
        if r.shuffle_labels:
            y = y[torch.randperm(y.shape[0], generator=gen)]
        n += x.shape[0]
        yield probe_features(tok, x.to(r.device), r.features).clone(), y.long()
        if max_images and n >= max_images:
            break


__all__ = ["FEATURE_KINDS", "LinearProbe", "ProbeOptim", "ProbeSettings", "probe_features", "extract_dataset", "run_probe"]
