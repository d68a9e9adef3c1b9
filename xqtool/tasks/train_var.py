"""Train a class-conditional VAR on a frozen multi-scale product-quantised tokenizer (spec var.md §1, §3).

Data: a ``.npy`` token file written by ``xqtool encode`` (map-style, exact resume), a token-shard folder
(streamed), or an image source encoded on the fly by the frozen tokenizer. The tokens' manifest must match
the tokenizer (TokenError otherwise). Labels of -1 (unknown) become the unconditional class.

Teacher forcing: ``tokenizer.quantizer.var_input(tokens)`` (lookup, bicubic up, φ, accumulate, area down per
branch, fp32, outside autocast). Loss: mean cross-entropy over all tokens and branches (label smoothing
``train.label_smoothing``); per-scale loss and accuracy are logged.

Optimisation: AdamW (β = 0.9, 0.95) with the spec's no-weight-decay group, peak lr = tblr · global batch / 256,
linear warm-up from ``warmup_start`` then the ``lin0`` decay to ``final_lr_ratio`` (spec §1.3), cosine WD
schedule, grad-norm clipping, Accelerate for devices, precision, accumulation and multi-GPU.

Checkpoints: ``RUN/checkpoints/step-NNNNNNN`` via Accelerate ``save_state`` into a temp dir + rename (plus
``trainer_state.json``), and the plain model ``RUN/var-last`` (model.safetensors + config.yaml). ``resume="auto"``
continues from the newest checkpoint; with token files the data order is a pure function of (seed, step), so
a resumed run is identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xqtool.config import config_to_dict
from xqtool.config_var import VARConfig
from xqtool.errors import ConfigError, DataError
from xqtool.models.var import VAR
from xqtool.runtime import fast_adamw_kwargs
from xqtool.training_state import read_state, resolve_resume, save_state_atomic
from xqtool.var_checkpoint import save_var

log = logging.getLogger(__name__)

__all__ = ["train_var", "TrainVARResult", "lr_factor", "param_groups", "NO_WD_KEYS", "check_tokenizer_fit",
           "build_optimizer", "teacher_forcing_loss"]

NO_WD_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
              "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


@dataclass
class TrainVARResult:
    """Outcome of :func:`train_var`."""

    steps: int
    run_dir: Path
    model_dir: Optional[Path]
    history: List[Dict[str, float]] = field(default_factory=list)
    resumed_from: Optional[int] = None
    launch: str = ""  # world size, backend, device, precision (xqtool.distributed.describe)


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(it: int, warmup_it: int, max_it: int, schedule: str = "lin0", wp0: float = 0.005,
              wpe: float = 0.01) -> float:
    """LR multiplier at optimizer step `it` (spec §1.3)."""
    if it < warmup_it:
        return wp0 + (1 - wp0) * it / warmup_it
    if schedule == "constant":
        return 1.0
    denom = max(max_it - 1 - warmup_it, 1)
    p = min(max((it - warmup_it) / denom, 0.0), 1.0)
    if schedule == "lin0":
        return 1.0 if p < 0.05 else wpe + (1 - wpe) * (1 - p) / 0.95
    if schedule == "lin":
        return 1.0 if p < 0.15 else wpe + (1 - wpe) * (1 - p) / 0.85
    if schedule == "lin00":
        return wpe + (1 - wpe) * (1 - p)
    if schedule == "cos":
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * p))
    raise ConfigError(f"unknown schedule '{schedule}'")


def wd_value(it: int, max_it: int, wd: float, wd_end: float) -> float:
    """Weight decay at step `it`: cosine from `wd` to `wd_end` (wd_end 0 → constant `wd`)."""
    if wd_end <= 0:
        return wd
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * it / max(max_it - 1, 1)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decayed weights, and (wd_sc 0) 1-D params, biases and the spec's named tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_WD_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "wd_sc": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_sc": 0.0}]


def build_optimizer(model: torch.nn.Module, t: Any, device: torch.device, lr: Optional[float] = None
                    ) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (betas ``t.beta1``, ``t.beta2``; weight decay ``t.weight_decay``).

    Uses torch's fused AdamW kernel where it exists for `device` (CUDA, and the CPU since torch 2.4): one
    pass over all parameters instead of a dozen elementwise ops per tensor; the same update to float
    rounding (``tests/test_train_step_speed.py``). Falls back to the multi-tensor (foreach) kind elsewhere.
    """
    kw: Dict[str, Any] = {"lr": t.tblr if lr is None else lr, "betas": (t.beta1, t.beta2)}
    kw.update(fast_adamw_kwargs(device))
    return torch.optim.AdamW(param_groups(model, t.weight_decay), **kw)


def teacher_forcing_loss(model: torch.nn.Module, quantizer: Any, tokens: Tensor, labels: Tensor,
                         label_smoothing: float = 0.0, raw: Optional[VAR] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One teacher-forcing pass (spec var.md §3): → (mean CE loss, logits ``[B, L, P, K]``, targets ``[B, L, P]``).

    `tokens` ``[B, P, L]`` long, `labels` ``[B]`` (``num_classes`` = unconditional). The quantizer builds the
    inputs in fp32 without autograd; `model` may be wrapped (DDP, compile), `raw` is the bare :class:`VAR`.
    Condition dropout draws from the global RNG (upstream behaviour).
    """
    raw = raw if raw is not None else model
    with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
        x = quantizer.var_input(tokens).float()
    targets = tokens.transpose(1, 2)  # [B, L, P]
    logits = model(labels, x, drop_cond=True)
    logits4 = logits.view(logits.shape[0], raw.L, raw.num_branches, raw.codebook_size)
    with torch.autocast(tokens.device.type, enabled=False):  # fp32 logits, fp32 loss
        loss = F.cross_entropy(logits4.float().flatten(0, 2), targets.flatten(), label_smoothing=label_smoothing)
    return loss, logits4, targets


# ---------------------------------------------------------------------------------------------- data
def check_tokenizer_fit(model_cfg: Any, tokenizer: Any, *, trained: bool = False) -> None:
    """ConfigError when the VAR geometry does not match the tokenizer (scales, P, K, D).

    ``trained=False`` (train-var): the fix is a config override ``--set model.NAME=VALUE``. ``trained=True``
    (sample, a finished VAR whose geometry cannot change): the fix is the tokenizer the VAR was trained on.
    """
    pairs = [("patch_nums", tuple(model_cfg.patch_nums), tuple(int(s) for s in tokenizer.scales)),
             ("num_branches", model_cfg.num_branches, int(tokenizer.num_branches)),
             ("codebook_size", model_cfg.codebook_size, int(tokenizer.codebook_size)),
             ("branch_dim", model_cfg.branch_dim, int(tokenizer.embed_dim))]
    for name, ours, theirs in pairs:
        if ours != theirs:
            show = (lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v))
            if trained:
                raise ConfigError(f"the VAR has {name} {show(ours)} but the tokenizer has {show(theirs)}: "
                                  "pass the tokenizer the VAR was trained on (--tokenizer/-t)")
            raise ConfigError(f"model.{name} is {show(ours)} but the tokenizer has {show(theirs)}: "
                              f"--set model.{name}={show(theirs)}")


def _labels(raw: Tensor, num_classes: int) -> Tensor:
    lab = raw.long().clone()
    if bool((lab >= num_classes).any()):
        raise DataError(f"label {int(lab.max())} is out of range for model.num_classes={num_classes}")
    lab[lab < 0] = num_classes  # unknown label → unconditional class
    return lab


class _TokenArrayBatches:
    """Deterministic batches from a map-style token dataset: order = f(seed, epoch); position = f(step)."""

    def __init__(self, dataset: Any, micro_global: int, local_batch: int, rank: int, seed: int) -> None:
        self.ds, self.gb, self.lb, self.rank, self.seed = dataset, micro_global, local_batch, rank, seed
        self.per_epoch = len(dataset) // micro_global  # micro-batches (over all processes) per epoch
        if self.per_epoch < 1:
            raise DataError(f"{len(dataset)} token rows are fewer than one batch ({micro_global}): "
                            "lower train.global_batch_size")
        self._perm: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def batch(self, micro: int) -> Tuple[Tensor, Tensor]:
        """Micro-batch number `micro` (global count) → (tokens [b, P, L], labels [b])."""
        epoch, pos = divmod(micro, self.per_epoch)
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.ds)))
        perm = self._perm[1]
        start = pos * self.gb + self.rank * self.lb
        rows = [self.ds[int(i)] for i in perm[start:start + self.lb]]
        return torch.stack([r["tokens"] for r in rows]), torch.tensor([r["label"] for r in rows])


class _StreamBatches:
    """Batches from an iterable source (token shards or images encoded on the fly); restarts when exhausted."""

    def __init__(self, make_iter: Any, per_epoch: int) -> None:
        self.make_iter, self.per_epoch = make_iter, per_epoch
        self.it: Optional[Iterator] = None
        self.epoch = 0

    def batch(self, micro: int) -> Tuple[Tensor, Tensor]:
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.make_iter(self.epoch))
            try:
                return next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1
        raise DataError("the training data yielded no complete batch")


def _build_data(cfg: VARConfig, tokenizer: Any, global_batch: int, local_batch: int, rank: int, world: int,
                device: torch.device) -> Tuple[Any, int]:
    """→ (batch source with ``.batch(micro)``, optimizer steps per epoch)."""
    d = cfg.data
    if d.tokens:
        from xqtool.data.tokens import check_manifest, token_dataset

        # token shards: every process reads the whole (small) token stream and keeps its slice of each
        # global micro-batch, so batches do not depend on the number of processes or of shards
        ds = token_dataset(d.tokens, train=True, seed=cfg.train.seed, split_nodes=False)
        check_manifest(ds.manifest, tokenizer)
        if isinstance(ds, torch.utils.data.IterableDataset):
            per_epoch = max(int(ds.manifest.count) // global_batch, 1)
            lo = rank * local_batch

            def make(epoch: int) -> Iterator:
                loader = torch.utils.data.DataLoader(ds, batch_size=local_batch * world, num_workers=d.num_workers,
                                                     drop_last=True)
                return ((b["tokens"][lo:lo + local_batch], torch.as_tensor(b["label"])[lo:lo + local_batch])
                        for b in loader)
            return _StreamBatches(make, per_epoch), per_epoch
        src = _TokenArrayBatches(ds, local_batch * world, local_batch, rank, cfg.train.seed)
        return src, max(src.per_epoch // cfg.train.grad_accum, 1)
    if d.images:
        from xqtool.data.images import make_loader

        size = d.image_size or int(tokenizer.image_size)
        loader = make_loader(d.images, image_size=size, batch_size=local_batch, train=True,
                             num_workers=d.num_workers, bad_files=d.bad_files, seed=cfg.train.seed, drop_last=True)
        n = getattr(loader.dataset, "num_items", None)
        per_epoch = max(int(n) // global_batch, 1) if n else 1000

        def make_img(epoch: int) -> Iterator:
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)
            for b in loader:
                with torch.no_grad():
                    toks = tokenizer.encode(b["image"].to(device))
                yield toks, b["label"]
        return _StreamBatches(make_img, per_epoch), per_epoch
    raise ConfigError("no training data: pass --tokens (token file/shards from `xqtool encode`) or --images "
                      "(config keys data.tokens / data.images)")


def per_scale_metrics(logits: Tensor, targets: Tensor, begin_ends: List[Tuple[int, int]]) -> Dict[str, float]:
    """logits [B, L, P, K], targets [B, L, P] → {loss_s{i}, acc_s{i}} per scale, mean over batch and branches."""
    with torch.no_grad():
        ce = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), reduction="none").view(targets.shape)
        hit = (logits.argmax(-1) == targets).float()
        out: Dict[str, float] = {}
        for si, (b, e) in enumerate(begin_ends):
            out[f"loss_s{si}"] = float(ce[:, b:e].mean())
            out[f"acc_s{si}"] = float(hit[:, b:e].mean())
        out["acc"] = float(hit.mean())
        b, e = begin_ends[-1]
        out["loss_tail"], out["acc_tail"] = float(ce[:, b:e].mean()), float(hit[:, b:e].mean())
    return out


# ---------------------------------------------------------------------------------------------- classes
def _gather_classes(accelerator: Any, seen: set) -> List[int]:
    """Sorted union over all processes of the class ids that occurred in training batches."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        return sorted({int(c) for c in gather_object(sorted(seen))})
    return sorted(seen)


# ---------------------------------------------------------------------------------------------- main
def train_var(cfg: VARConfig, *, tokenizer: Optional[torch.nn.Module] = None, resume: Optional[str] = None,
              console: Any = None, cpu: bool = False) -> TrainVARResult:
    """Train VAR per `cfg`. `tokenizer` may be injected (tests); else loaded from ``cfg.data.tokenizer``.

    Returns a :class:`TrainVARResult` (history rows hold step, loss, lr, grad_norm and per-scale metrics).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from xqtool.runtime import configure_cpu_math

    configure_cpu_math()

    t = cfg.train
    run_dir = Path(t.results_dir)
    trackers = None if t.tracker == "none" else t.tracker
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum, log_with=trackers, cpu=cpu,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    from xqtool.distributed import check_launch, describe

    check_launch(accelerator.num_processes)
    if accelerator.is_main_process:
        log.info("train-var: %s", describe(accelerator))
    set_seed(t.seed, device_specific=True)
    device = accelerator.device
    if device.type == "cpu":
        from xqtool.runtime import configure_cpu_allocator

        configure_cpu_allocator()  # reuse big step buffers instead of page-faulting them in every step

    if tokenizer is None:
        if not cfg.data.tokenizer:
            raise ConfigError("no tokenizer: pass --tokenizer/-t (the frozen tokenizer the tokens come from; "
                              "config key data.tokenizer)")
        from xqtool.checkpoint import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer)
    tokenizer = tokenizer.to(device).eval().requires_grad_(False)
    check_tokenizer_fit(cfg.model, tokenizer)

    world = accelerator.num_processes
    local_batch = max(round(t.global_batch_size / t.grad_accum / world), 1)
    global_batch = local_batch * world * t.grad_accum
    data, iters_per_epoch = _build_data(cfg, tokenizer, global_batch, local_batch, accelerator.process_index,
                                        world, device)
    max_steps = t.max_steps or t.epochs * iters_per_epoch
    warmup = t.warmup_steps if t.warmup_steps is not None else round(
        (t.warmup_epochs if t.warmup_epochs is not None else t.epochs / 50) * iters_per_epoch)
    peak_lr = t.tblr * global_batch / 256

    model = VAR(cfg.model)
    optimizer = build_optimizer(model, t, device, lr=peak_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw: VAR = accelerator.unwrap_model(model)

    start_step, resumed_from = 0, None
    ckpt = resolve_resume(resume, run_dir)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        start_step = int(read_state(ckpt)["step"])
        resumed_from = start_step
    if trackers and accelerator.is_main_process:
        accelerator.init_trackers("var", config={k: str(v) for k, v in config_to_dict(cfg.train).items()})

    quantizer = tokenizer.quantizer
    K, P = raw.codebook_size, raw.num_branches
    history: List[Dict[str, float]] = []
    classes_seen = set(int(c) for c in read_state(ckpt).get("classes_seen", [])) if ckpt is not None else set()
    progress = None
    # Terminals get a live bar; piped output (files, cluster logs) gets one plain line every log_every steps.
    plain_log = console is not None and accelerator.is_main_process and not getattr(console, "is_terminal", False)
    if console is not None and accelerator.is_main_process and not plain_log:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]train-var"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
        progress.start()
        task = progress.add_task("train", total=max_steps, completed=start_step, info="")
    tok_info = {"tokenizer": {"path": str(cfg.data.tokenizer or ""),
                              "config_hash": getattr(tokenizer, "config_hash", lambda: "")()}}
    model.train()
    try:
        for step in range(start_step, max_steps):
            for g in optimizer.param_groups:
                g["lr"] = peak_lr * lr_factor(step, warmup, max_steps, t.schedule, t.warmup_start, t.final_lr_ratio)
                g["weight_decay"] = wd_value(step, max_steps, t.weight_decay, t.weight_decay_end) * g["wd_sc"]
            raw.p_drop_scale = max(1.0 - (step / iters_per_epoch) / max(t.epochs, 1), 0.0)
            loss_sum, metrics, grad_norm = 0.0, {}, float("nan")
            for a in range(t.grad_accum):
                tokens, labels = data.batch(step * t.grad_accum + a)
                classes_seen.update(int(c) for c in labels.reshape(-1).tolist() if 0 <= int(c) < raw.num_classes)
                tokens = tokens.to(device).long()
                labels = _labels(labels.to(device), raw.num_classes)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss, logits4, targets = teacher_forcing_loss(model, quantizer, tokens, labels,
                                                                      t.label_smoothing, raw)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        params = [p for p in model.parameters() if p.requires_grad]
                        if t.max_grad_norm > 0:
                            grad_norm = float(accelerator.clip_grad_norm_(params, t.max_grad_norm))
                        else:
                            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += float(loss.detach()) / t.grad_accum
                if a == t.grad_accum - 1 and (step % t.log_every == 0 or step == max_steps - 1):
                    metrics = per_scale_metrics(logits4.detach(), targets, raw.begin_ends)
            row = {"step": step + 1, "loss": loss_sum, "lr": max(g["lr"] for g in optimizer.param_groups),
                   "grad_norm": grad_norm, **metrics}
            history.append(row)
            if metrics and trackers:
                accelerator.log(row, step=step + 1)
            if progress is not None:
                progress.update(task, advance=1, info=f"loss {loss_sum:.4f} lr {row['lr']:.2e}")
            if plain_log and ((step + 1) % max(t.log_every, 1) == 0 or step + 1 == max_steps):
                extra = "".join(f" {k} {row[k]:.4f}" for k in ("acc", "loss_tail", "acc_tail") if k in row)
                console.print(f"train-var step {step + 1}/{max_steps} loss {loss_sum:.4f}{extra} lr {row['lr']:.3e} "
                              f"grad_norm {grad_norm:.3f}", highlight=False, soft_wrap=True)
            done = step + 1
            if (t.ckpt_every > 0 and done % t.ckpt_every == 0) or done == max_steps:
                seen_all = _gather_classes(accelerator, classes_seen)
                last = {k: v for k, v in row.items() if k in ("loss", "acc", "lr", "grad_norm")}
                save_state_atomic(accelerator, run_dir, done, {"step": done, "epoch_micro": iters_per_epoch,
                                                               "samples_seen": done * global_batch,
                                                               "world_size": world, "last_metrics": last,
                                                               "classes_seen": seen_all, "trainer": "var"}, t.keep_last)
                if accelerator.is_main_process:
                    save_var(run_dir / "var-last", raw, extra_config={**tok_info, "step": done,
                                                                     "classes_seen": seen_all,
                                                                     "train": config_to_dict(cfg.train)})
    finally:
        if progress is not None:
            progress.stop()
        if trackers:
            accelerator.end_training()
    model_dir = run_dir / "var-last" if (run_dir / "var-last").is_dir() else None
    return TrainVARResult(steps=max_steps, run_dir=run_dir, model_dir=model_dir, history=history,
                          resumed_from=resumed_from, launch=describe(accelerator))
