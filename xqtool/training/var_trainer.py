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

Checkpoints: ``RUN/checkpoints/step-NNNNNNN`` (:mod:`xqtool.checkpoints.training_state`: safetensors + JSON, never
pickles; model, optimizer, scaler, RNG and the exact data position in samples) and the plain model
``RUN/var-last`` (model.safetensors + config.yaml). ``resume="auto"`` continues from the newest intact state;
the batches after a resume are exactly the uninterrupted run's for ``.npy`` tokens, token shards and images
encoded on the fly. Robustness: non-finite steps are skipped (``train.nan_patience``), SIGINT/SIGTERM save
and stop (exit 130/143 in the CLI), a run directory is never overwritten without ``--resume``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from xqtool.checkpoints import save_var
from xqtool.checkpoints.training_state import (NonFiniteError, apply_state, check_geometry, has_states, resolve_resume,
                                               save_state_atomic)
from xqtool.config import VARConfig, config_to_dict
from xqtool.distributed import all_finite
from xqtool.errors import ConfigError
from xqtool.losses import softmax_cross_entropy
from xqtool.models.var import VAR
from xqtool.stopping import StopFlag
from xqtool.training.build import build_optimizer
from xqtool.training.options import TrainInjected, VARRunOptions
from xqtool.training.schedules import cond_drop_scale, var_lr_factor, wd_value
from xqtool.training.var_data import TokenArrayBatches, build_data, check_tokenizer_fit, class_labels

log = logging.getLogger(__name__)

__all__ = ["train_var", "TrainVARResult", "VARTrainer", "MAX_LOSS_SCALE", "cap_loss_scale", "teacher_forcing_loss", "var_loss"]


@dataclass
class TrainVARResult:
    """Outcome of :func:`train_var`."""

    steps: int
    run_dir: Path
    model_dir: Optional[Path]
    history: List[Dict[str, float]] = field(default_factory=list)
    resumed_from: Optional[int] = None
    launch: str = ""  # world size, backend, device, precision (xqtool.distributed.describe)
    status: str = "finished"  # "finished" | "interrupted" | "diverged"
    message: str = ""
    exit_code: int = 0  # 0 finished, 1 diverged, 130 SIGINT / 143 SIGTERM


# ---------------------------------------------------------------------------------------------- fp16 loss scale
# fp16 loss scaling (var.md §1.4): GradScaler from 2^11, growth every 1000 steps, never above 32768
INIT_LOSS_SCALE = 2.0**11
LOSS_SCALE_GROWTH_INTERVAL = 1000
MAX_LOSS_SCALE = 32768.0


def cap_loss_scale(scaler: Optional[Any]) -> None:
    """Force an fp16 loss scale above :data:`MAX_LOSS_SCALE` back to it (var.md §1.4).

    Call after each optimizer step (the scaler's update). No-op without a scaler (fp32, bf16) or when disabled.
    """
    if scaler is not None and scaler.is_enabled() and scaler.get_scale() > MAX_LOSS_SCALE:
        scaler.update(MAX_LOSS_SCALE)


# ---------------------------------------------------------------------------------------------- objective
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
        loss = var_loss(logits, tokens, raw.num_branches, label_smoothing)
    return loss, logits4, targets


class _Position:
    """Checkpointable position of a VAR run: optimizer step and the data source's position."""

    def __init__(self, data: Any) -> None:
        self.step, self.data = 0, data

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "data": self.data.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.data.load_state_dict(state["data"])


def var_loss(logits: Tensor, tokens: Tensor, num_branches: int, label_smoothing: float = 0.0) -> Tensor:
    """Training objective (var.md §3): mean over images, positions and branches of each branch's K-way CE.

    logits [B, L, P·K] (columns p·K … (p+1)·K − 1 belong to branch p), tokens [B, P, L] → fp32 scalar.
    """
    B, L, V = logits.shape
    K = V // num_branches
    return softmax_cross_entropy(logits.float().reshape(B, L, num_branches, K).flatten(0, 2),
                                 tokens.transpose(1, 2).flatten(), label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate_var(model: torch.nn.Module, quantizer: Any, dataset: Any, batch_size: int, device: torch.device,
                 num_branches: int, rank: int = 0, world: int = 1, reduce: Any = None) -> Dict[str, float]:
    """Validation pass (var.md §3): teacher-forcing CE and argmax accuracy on held-out token rows, eval mode,
    no condition dropout. Rank r takes rows r, r + world, …; ``reduce(tensor)`` sums over ranks when given.

    Returns ``val/loss`` (mean CE over rows, positions and branches, as :func:`var_loss`), ``val/acc``, and
    ``val/loss_tail`` / ``val/acc_tail`` over the last scale's positions only.
    """
    was_training = model.training
    model.eval()
    L = model.L
    b_tail = model.begin_ends[-1][0]
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # ce, hits, n, ce_tail, hits_tail
    rows = list(range(rank, len(dataset), max(world, 1)))
    for start in range(0, len(rows), max(batch_size, 1)):
        items = [dataset[i] for i in rows[start:start + batch_size]]
        tokens = torch.stack([it["tokens"] for it in items]).to(device).long()
        labels = class_labels(torch.tensor([int(it["label"]) for it in items], device=device), model.num_classes)
        logits = model(labels, quantizer.var_input(tokens).float(), drop_cond=False).float()
        B = logits.shape[0]
        lp = logits.view(B, L, num_branches, -1).log_softmax(-1)
        target = tokens.transpose(1, 2)  # [B, L, P]
        ce = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        hit = (lp.argmax(-1) == target).double()
        sums += torch.stack([ce.double().sum(), hit.sum(), torch.tensor(float(ce.numel()), device=device),
                             ce[:, b_tail:].double().sum(), hit[:, b_tail:].sum()])
    if reduce is not None:
        sums = reduce(sums)
    model.train(was_training)
    n, n_tail = max(float(sums[2]), 1.0), max(float(sums[2]) * (L - b_tail) / L, 1.0)
    return {"val/loss": float(sums[0]) / n, "val/acc": float(sums[1]) / n,
            "val/loss_tail": float(sums[3]) / n_tail, "val/acc_tail": float(sums[4]) / n_tail}


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
def _refuse_rerun(run_dir: Path, resume: Optional[str]) -> None:
    """A run directory that already holds a run is only continued with --resume (never overwritten)."""
    if resume:
        return
    if has_states(run_dir) or (run_dir / "var-last").exists():
        raise ConfigError(f"{run_dir} already holds a VAR run: pass --resume auto to continue it, or choose another "
                          "output folder (-o/--output DIR)")


def train_var(cfg: VARConfig, run: Optional[VARRunOptions] = None,
              injected: Optional[TrainInjected] = None) -> TrainVARResult:
    """Train VAR per `cfg` into ``train.results_dir``, for ``train.max_steps`` (or ``train.epochs``) steps.

    `run`: resume, overwrite, CPU, fingerprint check (:class:`VARRunOptions`; default: a fresh run). `injected`
    (:class:`TrainInjected`) fields read: ``tokenizer`` (the frozen tokenizer; else loaded from
    ``cfg.data.tokenizer``), ``console`` (progress bar or plain log lines; none without one) and ``callbacks``
    (each gets the step's history row after its step).

    Non-finite steps are skipped; after ``train.nan_patience`` in a row the run stops with status
    ``diverged`` (nothing non-finite is ever saved). SIGINT/SIGTERM save a training state and return status
    ``interrupted`` (``result.exit_code`` 130/143).
    Returns a :class:`TrainVARResult` (history rows hold step, loss, lr, grad_norm and per-scale metrics).
    Raises ConfigError when `results_dir` holds a run and ``run.resume`` is not set, or on a refused batch change.

    The run folder is locked for the run (OutputError for a second writer) and checked first
    (:func:`xqtool.fsutil.check_run_dir`; ``run.overwrite`` deletes an earlier xqtool run there). Tokens, or a
    resumed run, made with other tokenizer weights raise TokenError unless ``run.ignore_fingerprint``.
    """
    from xqtool.distributed import is_launch_main_process

    from xqtool.fsutil import output_lock

    run_dir = Path(cfg.train.results_dir)
    with output_lock(run_dir, enabled=is_launch_main_process()):
        return VARTrainer(cfg, run or VARRunOptions(), injected or TrainInjected()).run()


class VARTrainer:
    """One VAR run: :meth:`__init__` builds everything (accelerator, frozen tokenizer, data, model, optimizer,
    resume, trackers), :meth:`run` trains. Arguments as :func:`train_var`."""

    def __init__(self, cfg: VARConfig, run: VARRunOptions, injected: TrainInjected) -> None:
        from xqtool.runtime import configure_cpu_math

        configure_cpu_math()
        self.cfg, self.t, self.console, self.callbacks = cfg, cfg.train, injected.console, injected.callbacks
        self.run_dir = Path(self.t.results_dir)
        self._claim_run_dir(run.resume, run.overwrite)
        acc = self.acc = self._accelerator(run.cpu)
        self.tokenizer = self._frozen_tokenizer(injected.tokenizer)
        self.quantizer = self.tokenizer.quantizer
        t, world = self.t, acc.num_processes
        self.local_batch = local_batch = max(round(t.global_batch_size / t.grad_accum / world), 1)
        self.global_batch = local_batch * world * t.grad_accum
        self.data, self.iters_per_epoch = build_data(cfg, self.tokenizer, self.global_batch, local_batch,
                                                      acc.process_index, world, acc.device, run.ignore_fingerprint)
        self.max_steps = t.max_steps or t.epochs * self.iters_per_epoch
        self.warmup = t.warmup_steps if t.warmup_steps is not None else round(
            (t.warmup_epochs if t.warmup_epochs is not None else t.epochs / 50) * self.iters_per_epoch)
        self.peak_lr = t.tblr * self.global_batch / 256
        model = VAR(cfg.model)
        optimizer = build_optimizer(model, t, acc.device, lr=self.peak_lr)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.raw: VAR = acc.unwrap_model(self.model)
        self.pos = _Position(self.data)
        self.components: Dict[str, Any] = {"model": self.model, "optimizer": self.optimizer, "position": self.pos}
        if acc.scaler is not None:
            self.components["scaler"] = acc.scaler
        self._resume(run.resume, run.ignore_fingerprint)
        self.trackers = None if t.tracker == "none" else t.tracker
        if self.trackers and acc.is_main_process:
            acc.init_trackers("var", config={k: str(v) for k, v in config_to_dict(t).items()})
        self._validation_set()
        self.history: List[Dict[str, float]] = []
        self.tok_info = {"tokenizer": {"path": str(cfg.data.tokenizer or ""),
                                       "config_hash": getattr(self.tokenizer, "config_hash", lambda: "")(),
                                       "weights_fingerprint": self.fingerprint}}

    # ------------------------------------------------------------------ setup
    def _claim_run_dir(self, resume: Optional[str], overwrite: bool) -> None:
        from xqtool.distributed import is_launch_main_process
        from xqtool.fsutil import check_run_dir, write_marker

        if is_launch_main_process():
            check_run_dir(self.run_dir, resume=bool(resume), overwrite=overwrite, has_states=has_states(self.run_dir))
        _refuse_rerun(self.run_dir, resume)
        if is_launch_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_marker(self.run_dir, "run")

    def _accelerator(self, cpu: bool) -> Any:
        from accelerate.utils import GradScalerKwargs, ProjectConfiguration, set_seed

        from xqtool.distributed import check_launch, describe, make_accelerator

        t = self.t
        acc = make_accelerator(
            t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
            log_with=None if t.tracker == "none" else t.tracker, cpu=cpu,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            kwargs_handlers=[GradScalerKwargs(init_scale=INIT_LOSS_SCALE, growth_interval=LOSS_SCALE_GROWTH_INTERVAL)],
        )
        check_launch(acc.num_processes)
        if acc.is_main_process:
            log.info("train-var: %s", describe(acc))
        set_seed(t.seed, device_specific=True)
        if acc.device.type == "cpu":
            from xqtool.runtime import configure_cpu_allocator

            configure_cpu_allocator()  # reuse big step buffers instead of page-faulting them in every step
        return acc

    def _frozen_tokenizer(self, tokenizer: Optional[torch.nn.Module]) -> torch.nn.Module:
        """The injected tokenizer or ``data.tokenizer``, frozen in eval mode; its geometry must fit the VAR."""
        from xqtool.checkpoints import weights_fingerprint

        if tokenizer is None:
            if not self.cfg.data.tokenizer:
                raise ConfigError("no tokenizer: pass --tokenizer/-t (the frozen tokenizer the tokens come from; "
                                  "config key data.tokenizer)")
            from xqtool.checkpoints import load_tokenizer

            tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        tokenizer = tokenizer.to(self.acc.device).eval().requires_grad_(False)
        check_tokenizer_fit(self.cfg.model, tokenizer)
        self.fingerprint = weights_fingerprint(tokenizer)
        return tokenizer

    def _resume(self, resume: Optional[str], ignore_fingerprint: bool) -> None:
        acc, t, run_dir = self.acc, self.t, self.run_dir
        self.resumed_from: Optional[int] = None
        loaded = resolve_resume(resume, run_dir, acc.process_index)
        if loaded is not None and (run_dir / "var-last" / "config.yaml").is_file():
            from xqtool.data.tokens import check_fingerprint
            from xqtool.checkpoints import read_var_config

            recorded = (read_var_config(run_dir / "var-last").get("tokenizer") or {}).get("weights_fingerprint", "")
            check_fingerprint(str(recorded or ""), self.tokenizer, f"the run {run_dir}", ignore_fingerprint)
        self.classes_seen = set(int(c) for c in loaded.info.get("classes_seen", [])) if loaded is not None else set()
        if loaded is None:
            return
        note = check_geometry(loaded, global_batch=self.global_batch, world=acc.num_processes,
                              allow=t.allow_batch_change, world_exact=isinstance(self.data, TokenArrayBatches))
        apply_state(acc, loaded, self.components)
        self.resumed_from = self.pos.step
        if note:
            log.warning("%s", note)

    def _validation_set(self) -> None:
        t = self.t
        self.val_ds, self.val_every = None, 0
        if self.cfg.data.val_tokens:
            from xqtool.data.tokens import check_manifest, token_dataset

            self.val_ds = token_dataset(self.cfg.data.val_tokens, train=False)
            check_manifest(self.val_ds.manifest, self.tokenizer)
            if isinstance(self.val_ds, torch.utils.data.IterableDataset):
                raise ConfigError("data.val_tokens must be a token .npy file (held-out rows), not token shards")
            self.val_every = max(int(t.val_every_epochs), 0) * self.iters_per_epoch
        self.val_batch = t.val_batch_size or max(round(1.5 * self.local_batch), 1)

    # ------------------------------------------------------------------ one optimizer step
    def _set_schedules(self, step: int) -> None:
        """lr and weight decay of step `step` (spec var.md §1.3) and the condition-dropout annealing."""
        t = self.t
        for g in self.optimizer.param_groups:
            g["lr"] = self.peak_lr * var_lr_factor(step, self.warmup, self.max_steps, t.schedule, t.warmup_start,
                                                   t.final_lr_ratio)
            g["weight_decay"] = wd_value(step, self.max_steps, t.weight_decay, t.weight_decay_end) * g["wd_sc"]
        self.raw.p_drop_scale = cond_drop_scale(step, self.iters_per_epoch, t.epochs)

    def _next_batch(self) -> Tuple[Tensor, Tensor]:
        """The next micro-batch on the device → (tokens [b, P, L] long, labels [b] with -1 → unconditional)."""
        tokens, labels = self.data.next_batch()
        n_cls = self.raw.num_classes
        self.classes_seen.update(int(c) for c in labels.reshape(-1).tolist() if 0 <= int(c) < n_cls)
        return tokens.to(self.acc.device).long(), class_labels(labels.to(self.acc.device), n_cls)

    def _step(self, step: int) -> Tuple[float, Dict[str, float], float, bool]:
        """Optimizer step `step` (0-based) over ``grad_accum`` micro-batches → (loss, metrics, grad norm, finite)."""
        acc, t = self.acc, self.t
        self._set_schedules(step)
        loss_sum, metrics, grad_norm, finite = 0.0, {}, float("nan"), True
        for a in range(t.grad_accum):
            tokens, labels = self._next_batch()
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss, logits4, targets = teacher_forcing_loss(self.model, self.quantizer, tokens, labels,
                                                                  t.label_smoothing, self.raw)
                finite = finite and all_finite(acc, loss)
                if finite:
                    acc.backward(loss)
                if acc.sync_gradients:
                    if finite:
                        grad_norm = self._clip_grad_norm()
                        finite = math.isfinite(grad_norm) or acc.scaler is not None
                    if finite:
                        self.optimizer.step()
                        cap_loss_scale(acc.scaler)
                    self.optimizer.zero_grad(set_to_none=True)
            loss_sum += float(loss.detach()) / t.grad_accum
            if finite and a == t.grad_accum - 1 and (step % t.log_every == 0 or step == self.max_steps - 1):
                metrics = per_scale_metrics(logits4.detach(), targets, self.raw.begin_ends)
        return loss_sum, metrics, grad_norm, finite

    def _clip_grad_norm(self) -> float:
        """Clip to ``train.max_grad_norm`` (when > 0) and return the total gradient norm before clipping."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.t.max_grad_norm > 0:
            return float(self.acc.clip_grad_norm_(params, self.t.max_grad_norm))
        return float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))

    def _record(self, done: int, loss: float, metrics: Dict[str, float], grad_norm: float) -> Dict[str, float]:
        """History row of finished step `done` (validation metrics on validation steps), logged to the tracker
        when it carries metrics."""
        acc, world = self.acc, self.acc.num_processes
        row = {"step": done, "loss": loss, "lr": max(g["lr"] for g in self.optimizer.param_groups),
               "grad_norm": grad_norm, **metrics}
        if self.val_ds is not None and ((self.val_every and done % self.val_every == 0) or done == self.max_steps):
            row.update(evaluate_var(self.raw, self.quantizer, self.val_ds, self.val_batch, acc.device,
                                    self.raw.num_branches, acc.process_index, world,
                                    (lambda v: acc.reduce(v, reduction="sum")) if world > 1 else None))
            metrics = metrics or row
        self.history.append(row)
        if metrics and self.trackers:
            acc.log(row, step=done)
        return row

    # ------------------------------------------------------------------ saving
    def save(self, done: int) -> Optional[Path]:
        """Training state + var-last at step `done`; a non-finite weight refuses both (NonFiniteError)."""
        acc, t = self.acc, self.t
        seen_all = _gather_classes(acc, self.classes_seen)
        last = next(({k: v for k, v in r.items() if k in ("loss", "acc", "lr", "grad_norm")}
                     for r in reversed(self.history) if r["step"] == done), {})
        info = {"trainer": "var", "samples_seen": int(self.data.samples_seen), "global_batch": self.global_batch,
                "grad_accum": t.grad_accum, "epoch_micro": self.iters_per_epoch, "last_metrics": last,
                "classes_seen": seen_all}
        path = save_state_atomic(acc, self.run_dir, done, self.components, info, t.keep_last)
        if acc.is_main_process:
            save_var(self.run_dir / "var-last", self.raw,
                     extra_config={**self.tok_info, "step": done, "classes_seen": seen_all,
                                   "train": config_to_dict(self.cfg.train)})
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainVARResult:
        """Train to ``max_steps`` (or a stop, or divergence); returns what happened."""
        from xqtool.distributed import describe

        acc, t, console, max_steps = self.acc, self.t, self.console, self.max_steps
        progress = task = None
        # Terminals get a live bar; piped output (files, cluster logs) gets one plain line every log_every steps.
        plain_log = console is not None and acc.is_main_process and not getattr(console, "is_terminal", False)
        if console is not None and acc.is_main_process and not plain_log:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            progress = Progress(TextColumn("[bold]train-var"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
            progress.start()
            task = progress.add_task("train", total=max_steps, completed=self.pos.step, info="")
        status, message, stop = "finished", "", StopFlag()
        last_saved: Optional[Path] = None
        self.model.train()
        bad_streak = 0
        try:
            with stop:
                while self.pos.step < max_steps:
                    step = self.pos.step
                    loss_sum, metrics, grad_norm, finite = self._step(step)
                    if not finite:
                        bad_streak += 1
                        log.warning("step %d: non-finite loss or gradient (loss %s); step skipped (%d/%d)", step + 1,
                                    loss_sum, bad_streak, t.nan_patience)
                        if bad_streak >= max(1, t.nan_patience):
                            status = "diverged"
                            message = (f"{bad_streak} consecutive steps with a NaN/Inf loss or gradient "
                                       f"(train.nan_patience={t.nan_patience}); stopped at step {step + 1}; "
                                       + (f"last good state {last_saved}" if last_saved else "no state was saved")
                                       + "; lower train.tblr")
                            break
                        if stop.any_rank(acc):
                            status = "interrupted"
                            try:  # the skipped steps consumed data: save the position after them
                                last_saved = self.save(self.pos.step)
                            except NonFiniteError:
                                pass
                            message = (f"stopped by {stop.requested} at step {self.pos.step}; saved {last_saved}; "
                                       "resume with --resume auto")
                            break
                        continue
                    bad_streak = 0
                    self.pos.step = done = step + 1
                    row = self._record(done, loss_sum, metrics, grad_norm)
                    if progress is not None:
                        progress.update(task, advance=1, info=f"loss {loss_sum:.4f} lr {row['lr']:.2e}")
                    if plain_log and (done % max(t.log_every, 1) == 0 or done == max_steps):
                        extra = "".join(f" {k} {row[k]:.4f}" for k in ("acc", "loss_tail", "acc_tail") if k in row)
                        console.print(f"train-var step {done}/{max_steps} loss {loss_sum:.4f}{extra} "
                                      f"lr {row['lr']:.3e} grad_norm {grad_norm:.3f}", highlight=False, soft_wrap=True)
                    for cb in self.callbacks:
                        cb(row)
                    stopping = stop.any_rank(acc)
                    if (t.ckpt_every > 0 and done % t.ckpt_every == 0) or done == max_steps or stopping:
                        try:
                            last_saved = self.save(done)
                        except NonFiniteError as exc:
                            status, message = "diverged", f"{exc}; last good state {last_saved or 'none'}"
                            break
                    if stopping:
                        status = "interrupted"
                        message = (f"stopped by {stop.requested} at step {done}; saved {last_saved}; "
                                   "resume with --resume auto")
                        break
        finally:
            if progress is not None:
                progress.stop()
            if self.trackers:
                acc.end_training()
        if status == "interrupted" and last_saved is None:
            message += "; nothing new was saved"
        model_dir = self.run_dir / "var-last" if (self.run_dir / "var-last").is_dir() else None
        return TrainVARResult(steps=self.pos.step, run_dir=self.run_dir, model_dir=model_dir, history=self.history,
                              resumed_from=self.resumed_from, status=status, message=message,
                              exit_code=stop.exit_code if status == "interrupted" else (1 if status == "diverged" else 0),
                              launch=describe(acc))
