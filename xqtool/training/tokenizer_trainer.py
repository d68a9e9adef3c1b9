"""Tokenizer training on Accelerate (spec §5): one process, one GPU or many (``accelerate launch``).

Public entry point: :func:`train_tokenizer` (config + :class:`~xqtool.training.options.TokenizerRunOptions` +
:class:`~xqtool.training.options.TrainInjected`). Output directory layout::

    OUT/config.yaml                 resolved config of the run
    OUT/checkpoints/step-0000100/   training state, safetensors + JSON (both models, both optimizers, schedulers,
                                    scaler, RNG states, EMA, LeCam, exact data position) — atomic, newest 2 kept
    OUT/last/  OUT/best/            xqtool tokenizer checkpoints (model.safetensors + ema.safetensors + config.yaml)
    OUT/recon/step-0000100.png      originals (top row) over reconstructions (bottom row)
    OUT/logs/                       tracker logs (tensorboard by default)
    OUT/summary.json                final summary

One optimizer step (:meth:`TokenizerTrainer._micro_step`, per micro-batch): tokenizer forward, generator
objective, backward, clip, AdamW; then the discriminator objective and its step (losses in
:mod:`xqtool.training.objective`; models, data and optimizers from :mod:`xqtool.training.build`; validation by
:class:`xqtool.evaluation.ReconstructionEvaluator`).

Robustness: non-finite steps are skipped and ``train.nan_patience`` in a row stop the run (status ``diverged``);
no save ever writes NaN/Inf weights (EMA included); SIGINT/SIGTERM save, then stop (CLI exit 130/143);
``--resume auto`` continues bit-exactly (see :mod:`xqtool.checkpoints.training_state`), and a batch-size change on resume
needs ``train.allow_batch_change``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from xqtool import distributed
from xqtool.checkpoints.training_state import (NonFiniteError, SampleBatches, apply_state, check_geometry,
                                               first_nonfinite, has_states, list_states, resolve_resume,
                                               save_state_atomic)
from xqtool.config import TokenizerConfig, config_to_dict, save_config_yaml
from xqtool.ema import EMAModel, EMAState
from xqtool.errors import ConfigError, DataError
from xqtool.evaluation import ReconstructionEvaluator
from xqtool.fsutil import acquire_output_lock, atomic_write_text, check_run_dir, write_marker
from xqtool.losses import LeCam
from xqtool.metrics import fid_from_features
from xqtool.stopping import StopFlag
from xqtool.training import build
from xqtool.training.objective import TokenizerObjective
from xqtool.training.options import TokenizerRunOptions, TrainInjected
from xqtool.training.reporting import flat_config, log_grid, save_grid

log = logging.getLogger(__name__)

KEEP_STATES = 2
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "rfid": False}


# ============================================================================ results / small state objects
@dataclass
class TrainResult:
    """What a training run did (returned by :func:`train_tokenizer`, printed by the CLI)."""

    output_dir: Path
    status: str  # "finished" | "interrupted" | "diverged"
    step: int
    total_steps: int
    best_metric: str
    best_value: Optional[float]
    best_step: Optional[int]
    last_dir: Optional[Path]
    best_dir: Optional[Path]
    state_dir: Optional[Path]
    last_val: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, float]] = field(default_factory=list)
    bad_files: Dict[str, str] = field(default_factory=dict)
    images_per_sec: Optional[float] = None  # None when this invocation ran no step
    message: str = ""
    exit_code: int = 0  # 0 finished, 1 diverged, 130 SIGINT / 143 SIGTERM
    export_dir: Optional[Path] = None
    adapter_dirs: List[Path] = field(default_factory=list)
    launch: str = ""  # world size, backend, device, precision (xqtool.distributed.describe)


class _Position:
    """Checkpointable trainer position: optimizer step, data position (epoch, samples of this process consumed in
    the epoch), best metric, the last validation, and the plain-attribute counters of the model
    (``record_hit`` of the codebook-usage EMA, so ``ema_vocab_hit_SV`` continues exactly)."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.offset = 0
        self.samples = 0
        self.best_value: Optional[float] = None
        self.best_step: Optional[int] = None
        self.last_val: Dict[str, float] = {}
        self.last_val_step: Optional[int] = None
        self.model: Optional[nn.Module] = None

    def _counters(self) -> Dict[str, int]:
        if self.model is None:
            return {}
        return {n: int(m.record_hit) for n, m in self.model.named_modules() if hasattr(m, "record_hit")}

    def state_dict(self) -> Dict[str, Any]:
        plain = ("step", "epoch", "offset", "samples", "best_value", "best_step", "last_val_step")
        return {**{k: getattr(self, k) for k in plain}, "last_val": dict(self.last_val),
                "record_hit": self._counters()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self.samples = int(state["samples"])
        self.best_value = state.get("best_value")
        self.best_step = state.get("best_step")
        self.last_val = dict(state.get("last_val") or {})
        self.last_val_step = state.get("last_val_step")
        if self.model is not None:
            modules = dict(self.model.named_modules())
            for name, value in (state.get("record_hit") or {}).items():
                if name in modules:
                    modules[name].record_hit = int(value)


# what plain (non-terminal) log lines show
PLAIN_LOG_KEYS = ("train_loss", "rec_loss", "perceptual_loss", "commit_loss", "lr", "images_per_sec")
PLAIN_VAL_KEYS = ("val/psnr", "val/ssim", "val/rfid")


# ============================================================================ the trainer
class TokenizerTrainer:
    """Builds everything from a config, then :meth:`run` trains.

    Args:
        cfg: the resolved config.
        run: run directory, resume, step count, overwrite, progress bar (:class:`TokenizerRunOptions`; default: all
            from the config, a fresh run).
        injected: pre-built tokenizer, feature extractor (None: no rFID), tiny discriminator / teacher sizes,
            random-weight permission, console, step callbacks (called with the trainer after every optimizer step)
            and ``on_finish`` (see :class:`TrainInjected`).
    Raises ConfigError / DataError / WeightsMissingError / OutputError before any step when the run cannot start.
    """

    def __init__(self, cfg: TokenizerConfig, run: Optional[TokenizerRunOptions] = None,
                 injected: Optional[TrainInjected] = None) -> None:
        run, injected = run or TokenizerRunOptions(), injected or TrainInjected()
        self.cfg = cfg
        self.run_options = run
        self.out = Path(run.output_dir or cfg.train.results_dir)
        self.injected = injected
        self.console = injected.console
        self.callbacks = list(injected.callbacks)
        self.stop = StopFlag()
        self.history: List[Dict[str, float]] = []
        self.last_val: Dict[str, float] = {}
        self.pos = _Position()

        # one writer per run folder (OS lock, released on exit or death); never write into foreign folders
        self._lock = acquire_output_lock(self.out) if distributed.is_launch_main_process() else None
        try:
            if distributed.is_launch_main_process():
                check_run_dir(self.out, resume=bool(run.resume), overwrite=run.overwrite,
                              has_states=has_states(self.out))
                self.out.mkdir(parents=True, exist_ok=True)
                write_marker(self.out, "run")
                from xqtool.config import ignored_settings

                for line in ignored_settings(cfg):
                    log.warning(line)
            self._setup()
        except BaseException:
            self.release_lock()
            raise

    def release_lock(self) -> None:
        """Release the run folder's lock (at the end of :meth:`run`; also on a failed setup)."""
        if self._lock is not None:
            self._lock.release()  # type: ignore[attr-defined]
            self._lock = None

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        """Accelerator, data, models, objective, optimizers, resume, trackers (in this order: bit-exact runs
        depend on the order in which random weights are drawn)."""
        from xqtool.runtime import configure_cpu_math

        build.check_weights_available(self.cfg, self.injected.allow_random_weights)  # fail before anything heavy
        configure_cpu_math()
        acc = self.acc = self._accelerator()
        self._build_data()
        tok = build.generator_model(self.cfg, self.injected.tokenizer)
        self._build_models(tok)
        self._build_state()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", save_config_yaml(self.cfg))
        self._resume()
        if self.cfg.train.tracker != "none":
            try:
                acc.init_trackers("xqtool", config=flat_config(config_to_dict(self.cfg)))
            except ImportError as exc:
                raise ConfigError(f"train.tracker={self.cfg.train.tracker!r} needs a package that is not installed: "
                                  f"{exc}") from None

    def _accelerator(self) -> Any:
        """The Accelerator of the run (precision, accumulation, tracker), the per-process batch and the seed."""
        from accelerate.utils import ProjectConfiguration, set_seed

        tc = self.cfg.train
        acc = distributed.make_accelerator(
            tc.mixed_precision,
            gradient_accumulation_steps=max(1, tc.grad_accum),
            log_with=None if tc.tracker == "none" else tc.tracker,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        if acc.device.type == "cpu":
            from xqtool.runtime import configure_cpu_allocator

            configure_cpu_allocator()  # reuse big step buffers instead of page-faulting them in every step
        distributed.check_launch(acc.num_processes)
        self.launch = distributed.describe(acc)
        if acc.is_main_process:
            log.info("train-tokenizer: %s", self.launch)
        world = acc.num_processes
        per_proc = tc.global_batch_size // (world * max(1, tc.grad_accum))
        if per_proc < 1 or per_proc * world * max(1, tc.grad_accum) != tc.global_batch_size:
            raise ConfigError(
                f"train.global_batch_size={tc.global_batch_size} must be a multiple of processes ({world}) x "
                f"train.grad_accum ({tc.grad_accum})"
            )
        self.per_proc_batch = per_proc
        set_seed(tc.global_seed * world + acc.process_index)  # spec §5.6 per-rank seed
        return acc

    def _build_data(self) -> None:
        train_src, val_src = build.data_sources(self.cfg, self.out, self.acc)
        self.train_loader, self.val_loader = build.tokenizer_loaders(self.cfg, train_src, val_src, self.per_proc_batch)
        self.length = build.run_length(self.cfg, train_src, self.run_options.max_steps)
        self.total_steps = self.length.total_steps

    def _build_models(self, tok: nn.Module) -> None:
        """Discriminator, LeCam, LPIPS, teachers, optimizers, ``acc.prepare``, EMA and the objective."""
        acc, cfg, lc, inj = self.acc, self.cfg, self.cfg.loss, self.injected
        self.ema: Optional[EMAModel] = None  # created after acc.prepare, from the weights DDP synchronised
        disc = build.discriminator(cfg, inj.allow_random_weights, inj.disc_overrides)
        self.lecam = LeCam() if lc.lecam_loss_weight > 0 and disc is not None else None
        self.lpips = build.perceptual_loss(cfg, inj.allow_random_weights, acc.device)
        # frozen teachers and the trainable loss-side projections (aux), outside the model and the EMA
        self.aux, self.teachers = build.teachers(cfg, tok, acc.device, inj.teacher_overrides or {},
                                                  inj.allow_random_weights)
        opts = build.tokenizer_optimizers(cfg, tok, self.aux, disc, self.length, acc.device)
        self.sched_g, self.sched_d = opts.sched_g, opts.sched_d
        if disc is not None:
            self.tok, self.disc, self.opt_g, self.opt_d = acc.prepare(tok, disc, opts.opt_g, opts.opt_d)
        else:
            self.tok, self.opt_g = acc.prepare(tok, opts.opt_g)
            self.disc, self.opt_d = None, None
        self.aux.to(acc.device)
        self.pos.model = self.unwrapped
        # every rank drew its own random init above: modules outside DDP take rank 0's weights, and the
        # EMA starts from the weights DDP broadcast from rank 0 (not from this rank's own init)
        distributed.broadcast_modules([self.aux, self.lpips, *(t for t, _, _ in self.teachers.values())])
        if cfg.train.ema:
            self.ema = EMAModel(self.unwrapped, cfg.train.ema_decay)
        if self.lecam is not None:
            self.lecam.to(acc.device)
        self.objective = TokenizerObjective(
            cfg, model=self.unwrapped, disc=self.disc,
            raw_disc=acc.unwrap_model(self.disc) if self.disc is not None else None, lpips=self.lpips,
            teachers=self.teachers, lecam=self.lecam, disc_start=self.length.disc_start,
            steps_per_epoch=self.length.steps_per_epoch, autocast=acc.autocast, exact_adaptive=acc.scaler is None,
            reduce_grads=distributed.mean_across, mean_across=distributed.mean_across)

    def _build_state(self) -> None:
        """The checkpointed components (see :mod:`xqtool.checkpoints.training_state`)."""
        self.components: Dict[str, Any] = {"model": self.tok, "opt_g": self.opt_g, "sched_g": self.sched_g,
                                           "position": self.pos}
        if self.disc is not None:
            self.components.update(disc=self.disc, opt_d=self.opt_d, sched_d=self.sched_d)
        if self.ema is not None:
            self.ema.to(self.acc.device)
            self.components["ema"] = EMAState(self.ema)
        if self.lecam is not None:
            self.components["lecam"] = self.lecam
        if len(self.aux):
            self.components["aux"] = self.aux
        if self.acc.scaler is not None:
            self.components["scaler"] = self.acc.scaler

    def _resume(self) -> None:
        acc, tc, world = self.acc, self.cfg.train, self.acc.num_processes
        loaded = resolve_resume(self.run_options.resume, self.out, acc.process_index)
        self.resumed_from: Optional[Path] = None
        if loaded is None:
            return
        note = check_geometry(loaded, global_batch=tc.global_batch_size, world=world,
                              allow=tc.allow_batch_change, world_exact=False)
        apply_state(acc, loaded, self.components)
        old_world = int(loaded.info.get("world_size", world))
        if old_world != world:  # per-process streams differ: keep the epoch's share of samples seen
            self.pos.offset = self.pos.offset * old_world // world
        self.last_val = dict(self.pos.last_val)
        self.resumed_from = loaded.path
        log.info("resumed from %s at step %d", loaded.path, self.pos.step)
        if note:
            log.warning("%s", note)

    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.tok)

    # ------------------------------------------------------------------ one micro-step
    def _micro_step(self, x: Tensor, step: int) -> Tuple[Dict[str, float], bool]:
        """Generator step, then discriminator step, on a batch ``x [b,3,S,S]`` (spec §5).

        `step` is the 1-based optimizer step this micro-batch contributes to. Returns (logs, finite).
        """
        acc, obj = self.acc, self.objective
        with acc.accumulate(*((self.tok, self.disc) if self.disc is not None else (self.tok,))):
            with acc.autocast():
                out = self.tok(x, perturbation=obj.perturbation(step))
            loss, logs = obj.generator(x, out, step)
            finite = distributed.all_finite(acc, logs["train_loss"])
            if finite:
                acc.backward(loss)
                self._average_aux_grads()
                self._clip(self.tok)
                self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)

            if finite and obj.disc_weight(step) > 0:
                d_loss, d_logs = obj.discriminator(x, out.recon.float().detach(), step)
                logs.update(d_logs)
                d_ok = distributed.all_finite(acc, d_loss)
                if d_ok:
                    acc.backward(d_loss)
                    self._clip(self.disc)
                    self.opt_d.step()
                    if acc.sync_gradients:
                        self.sched_d.step()
                self.opt_d.zero_grad(set_to_none=True)
                if not d_ok:
                    logs["disc_nonfinite"] = 1.0
        for k, v in out.stats.items():
            logs[f"codebook_{k}"] = float(v.float().mean())
        return logs, finite

    def _average_aux_grads(self) -> None:
        """Loss-side projections are not DDP-wrapped: average their gradients by hand (several processes)."""
        if self.acc.sync_gradients and self.acc.num_processes > 1 and len(self.aux):
            for prm in self.aux.parameters():
                if prm.grad is not None:
                    prm.grad = self.acc.reduce(prm.grad, reduction="mean")

    def _clip(self, module: nn.Module) -> None:
        if self.acc.sync_gradients and self.cfg.train.max_grad_norm > 0:
            self.acc.clip_grad_norm_(module.parameters(), self.cfg.train.max_grad_norm)

    # ------------------------------------------------------------------ batches with position
    def _batches(self) -> Iterator[Tensor]:
        """Endless training batches, starting exactly at the saved (epoch, samples consumed) position."""
        loader = self.train_loader

        def epoch_batches(epoch: int) -> Iterator[Dict[str, Any]]:
            loader._epoch = epoch  # type: ignore[attr-defined]
            return iter(loader)

        stream = SampleBatches(epoch_batches, self.per_proc_batch, ("image",), self.pos.epoch, self.pos.offset)
        try:
            for batch in stream:
                self.pos.epoch, self.pos.offset = stream.epoch, stream.offset
                yield batch["image"]
        except DataError:
            raise DataError("the training source produced no batch (all images bad, or fewer than one batch)") from None

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, step: int) -> Dict[str, float]:
        """PSNR/SSIM/rFID and codebook usage on the held-out set (EMA weights when EMA is on); saves a grid PNG.

        Keys ``val/psnr`` (dB), ``val/ssim``, ``val/images``, ``val/rfid`` (with a feature extractor and ≥ 2
        images), ``val/codebook_usage/bP[/sS]`` and ``val/codebook_perplexity/bP[/sS]`` (exact counts over the
        set, the same numbers as ``eval-fid --rfid``).
        """
        acc, cfg = self.acc, self.cfg
        model = self.ema.module if self.ema is not None else self.unwrapped
        was_training = model.training
        model.eval()
        ev = ReconstructionEvaluator(model, device=acc.device, autocast=acc.autocast,
                                     extractor=self.injected.feature_extractor,
                                     limit=cfg.data.max_val_images or None, world=acc.num_processes)
        grid: Optional[Tuple[Tensor, Tensor]] = None
        for b in ev.batches(batch["image"] for batch in self.val_loader):
            if grid is None:
                grid = (b.x[:8].cpu(), b.recon[:8].cpu())
        if was_training:
            model.train()
        psnr_sum, ssim_sum, count, hist = (acc.reduce(t, reduction="sum") if acc.num_processes > 1 else t
                                           for t in (ev.psnr_sum, ev.ssim_sum, ev.count, ev.code_histogram()))
        n = max(1.0, float(count.item()))
        metrics: Dict[str, float] = {"val/psnr": float(psnr_sum.item()) / n, "val/ssim": float(ssim_sum.item()) / n,
                                     "val/images": float(count.item())}
        if ev.feats_fake:
            fr, fo = torch.cat(ev.feats_fake), torch.cat(ev.feats_real)
            if acc.num_processes > 1:
                fr, fo = self._gather_rows(fr), self._gather_rows(fo)
            if fr.shape[0] >= 2:
                metrics["val/rfid"] = float(fid_from_features(fo.numpy(), fr.numpy()))
        usage = ev.usage(hist)
        for b in range(len(usage["codebook_usage"])):
            metrics[f"val/codebook_usage/b{b}"] = usage["codebook_usage"][b]
            metrics[f"val/codebook_perplexity/b{b}"] = usage["codebook_perplexity"][b]
            for si in range(len(usage["codebook_usage_per_scale"][b])):
                metrics[f"val/codebook_usage/b{b}/s{si}"] = usage["codebook_usage_per_scale"][b][si]
                metrics[f"val/codebook_perplexity/b{b}/s{si}"] = usage["codebook_perplexity_per_scale"][b][si]
        if acc.is_main_process and grid is not None:
            save_grid(self.out / "recon" / f"step-{step:07d}.png", *grid, step=step)
            log_grid(acc, cfg.train.tracker, grid, step)
        self.last_val = metrics
        self.pos.last_val_step = step
        return metrics

    def _gather_rows(self, t: Tensor) -> Tensor:
        t = t.to(self.acc.device)
        n = torch.tensor([t.shape[0]], device=self.acc.device)
        ns = self.acc.gather(n)
        m = int(ns.max())
        pad = torch.zeros(m - t.shape[0], *t.shape[1:], device=t.device, dtype=t.dtype)
        g = self.acc.gather(torch.cat([t, pad]))
        parts = [g[i * m : i * m + int(k)] for i, k in enumerate(ns.tolist())]
        return torch.cat(parts).cpu()

    # ------------------------------------------------------------------ saving
    def save_state(self) -> Optional[Path]:
        """Training state at the current step (safetensors + JSON), written atomically; keeps the newest few."""
        self.pos.last_val = dict(self.last_val)
        info = {"trainer": "tokenizer", "samples_seen": self.samples_seen, "global_batch": self.cfg.train.global_batch_size,
                "grad_accum": self.cfg.train.grad_accum, "epoch": self.pos.epoch, "best_value": self.pos.best_value,
                "best_step": self.pos.best_step, "val_step": self.pos.last_val_step, "val": dict(self.last_val)}
        return save_state_atomic(self.acc, self.out, self.pos.step, self.components, info, KEEP_STATES)

    def export_model(self, directory: Path) -> Path:
        """xqtool tokenizer checkpoint (raw weights + EMA + config) of the current model."""
        from xqtool.checkpoints import save_tokenizer

        ema_state = self.ema.state_dict() if self.ema is not None else None
        bad = first_nonfinite(list(self.unwrapped.state_dict().items()) + [("ema." + k, v) for k, v in (ema_state or {}).items()])
        if bad is not None:
            raise NonFiniteError(f"refusing to save {directory} at step {self.pos.step}: {bad} holds NaN/Inf values")
        if self.acc.is_main_process:
            last_train = next((h for h in reversed(self.history) if h.get("step") == self.pos.step), {})
            doc = {"step": self.pos.step, "val_step": self.pos.last_val_step, "val": self.last_val,
                   "train": {k: v for k, v in last_train.items() if k != "step"}}
            extra = {"train_state.json": json.dumps(doc, indent=1)}
            save_tokenizer(directory, self.unwrapped, ema_state=ema_state, extra_files=extra, config=self.cfg)
        self.acc.wait_for_everyone()
        return directory

    def _is_better(self, value: float) -> bool:
        best = self.pos.best_value
        if best is None:
            return True
        return value >= best if HIGHER_IS_BETTER[self.cfg.train.best_metric] else value <= best

    @property
    def stop_requested(self) -> Optional[str]:
        """Name of the signal that asked this run to stop (SIGINT / SIGTERM), else None."""
        return self.stop.any_rank(self.acc)

    @property
    def samples_seen(self) -> int:
        """Training samples consumed over all processes (skipped non-finite steps included)."""
        return self.pos.samples

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        """Train to the end (or a stop); the run folder stays locked until this returns."""
        try:
            return self._run()
        finally:
            self.release_lock()

    def _run(self) -> TrainResult:
        acc, tc = self.acc, self.cfg.train
        if tc.best_metric == "rfid" and self.injected.feature_extractor is None:
            raise ConfigError("train.best_metric=rfid needs Inception weights: --set train.inception_weights=PATH or --set train.best_metric=psnr")
        self.stop.__enter__()
        progress = self._progress()
        status, message = "finished", ""
        bad_streak = 0
        last_good_state: Optional[Path] = None
        t0 = time.perf_counter()
        images = 0
        start_step = self.pos.step
        batches = self._batches()
        task = None
        try:
            if progress is not None:
                progress.start()
                task = progress.add_task("train", total=self.total_steps, completed=self.pos.step, info="")
            while self.pos.step < self.total_steps:
                step = self.pos.step + 1
                logs_acc, ok_all, n_images = self._optimizer_step(step, batches)
                images += n_images
                if not ok_all:
                    bad_streak += 1
                    log.warning("step %d: non-finite loss (%s); step skipped (%d/%d)", step,
                                {k: v for k, v in logs_acc.items() if not math.isfinite(v)}, bad_streak, tc.nan_patience)
                    if bad_streak >= max(1, tc.nan_patience):
                        status = "diverged"
                        message = (f"{bad_streak} consecutive steps with a NaN/Inf loss (train.nan_patience="
                                   f"{tc.nan_patience}); stopped at step {step}; last good checkpoint kept"
                                   + (f" in {last_good_state}" if last_good_state else ""))
                        break
                    if self.stop_requested:
                        status = "interrupted"
                        try:  # the skipped steps consumed data: save the position after them
                            self.export_model(self.out / "last")
                            last_good_state = self.save_state()
                        except NonFiniteError:
                            pass
                        message = (f"stopped by {self.stop.requested} at step {self.pos.step}; saved {last_good_state}; "
                                   "resume with --resume auto")
                        break
                    continue
                bad_streak = 0
                self.pos.step = step
                logs_acc = distributed.mean_logs(logs_acc, acc.device)  # global-batch values on every rank
                self.sched_g.step()
                if self.ema is not None:
                    self.ema.update(self.unwrapped)
                logs_acc["lr"] = self.opt_g.param_groups[0]["lr"]
                self._log_step(step, logs_acc, images, t0, progress, task)
                try:
                    if step % max(1, tc.eval_every) == 0 or step == self.total_steps:
                        self._validate_and_keep_best(step, progress)
                    for cb in self.callbacks:
                        cb(self)
                    # a signal seen by any rank stops every rank at this same step (they save together)
                    stopping = self.stop_requested
                    if step % max(1, tc.ckpt_every) == 0 or step == self.total_steps or stopping:
                        self.export_model(self.out / "last")
                        last_good_state = self.save_state()
                except NonFiniteError as exc:
                    status = "diverged"
                    message = f"{exc}; last good checkpoint kept" + (f" in {last_good_state}" if last_good_state else "")
                    break
                if stopping:
                    status = "interrupted"
                    message = f"stopped by {stopping} at step {step}; saved {last_good_state}; resume with --resume auto"
                    break
        except (RuntimeError, OSError) as exc:
            distributed.raise_if_peer_lost(exc, "train-tokenizer")
            raise
        finally:
            if progress is not None:
                progress.stop()
            self.stop.__exit__(None, None, None)
        elapsed = max(1e-9, time.perf_counter() - t0)
        states = list_states(self.out)
        result = TrainResult(
            output_dir=self.out,
            status=status,
            step=self.pos.step,
            total_steps=self.total_steps,
            best_metric=tc.best_metric,
            best_value=self.pos.best_value,
            best_step=self.pos.best_step,
            last_dir=self.out / "last" if (self.out / "last").is_dir() else None,
            best_dir=self.out / "best" if (self.out / "best").is_dir() else None,
            state_dir=states[-1] if states else None,
            last_val=dict(self.last_val),
            history=self.history,
            bad_files=dict(getattr(self.train_loader, "bad_files", {}) or {}) | dict(getattr(self.val_loader, "bad_files", {}) or {}),
            images_per_sec=images / elapsed if images else None,
            message=message or ("" if self.pos.step > start_step else f"already finished at step {self.pos.step}: nothing to do"),
            exit_code={"interrupted": self.stop.exit_code, "diverged": 1}.get(status, 0),
            launch=self.launch,
        )
        if self.injected.on_finish is not None:
            self.injected.on_finish(self, result)
        if acc.is_main_process:
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()
                       if k != "history"}
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1, default=str))
        acc.end_training()
        return result

    def _optimizer_step(self, step: int, batches: Iterator[Tensor]) -> Tuple[Dict[str, float], bool, int]:
        """The ``train.grad_accum`` micro-steps of optimizer step `step` → (logs averaged over them, all finite,
        images consumed over all processes)."""
        acc, n = self.acc, max(1, self.cfg.train.grad_accum)
        logs_acc: Dict[str, float] = {}
        ok_all, images = True, 0
        for _ in range(n):
            x = next(batches).to(acc.device, non_blocking=True)
            logs, ok = self._micro_step(x, step)
            images += x.shape[0] * acc.num_processes
            self.pos.samples += x.shape[0] * acc.num_processes
            ok_all = ok_all and ok
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v / n
        return logs_acc, ok_all, images

    def _log_step(self, step: int, logs: Dict[str, float], images: int, t0: float, progress: Any, task: Any) -> None:
        """History row, tracker, plain log line and progress bar of a finished step (`images` since `t0`)."""
        tc = self.cfg.train
        due = step % max(1, tc.log_every) == 0 or step == 1 or step == self.total_steps
        if due:
            elapsed = max(1e-9, time.perf_counter() - t0)
            logs["images_per_sec"] = images / elapsed
            self.history.append({"step": step, **logs})
            self.acc.log(logs, step=step)
        if self._plain_log() and due:
            self.console.print(
                f"step {step}/{self.total_steps} " + " ".join(f"{k} {v:.4g}" for k, v in logs.items() if k in PLAIN_LOG_KEYS),
                highlight=False, soft_wrap=True)
        if task is not None:
            elapsed = max(1e-9, time.perf_counter() - t0)
            info = f"rec {logs.get('rec_loss', float('nan')):.4f} loss {logs['train_loss']:.4f} {images / elapsed:.1f} img/s"
            progress.update(task, completed=step, info=info)

    def _validate_and_keep_best(self, step: int, progress: Any) -> None:
        """Validation at `step` (tracker + one printed line), then ``OUT/best`` when ``train.best_metric`` improved."""
        acc, tc = self.acc, self.cfg.train
        val = self.validate(step)
        acc.log(val, step=step)
        if acc.is_main_process and self.console is not None:
            shown = " ".join(f"{k[4:]} {v:.4f}" for k, v in val.items() if k in PLAIN_VAL_KEYS)
            (progress.console if progress is not None else self.console).print(
                f"validation at step {step}: {shown}", highlight=False, soft_wrap=True)
        value = val.get(f"val/{tc.best_metric}")
        if value is not None and tc.save_best and self._is_better(value):
            self.export_model(self.out / "best")
            self.pos.best_value, self.pos.best_step = value, step

    def _plain_log(self) -> bool:
        """Plain log lines (main process) when the output is not a terminal or the bar is switched off."""
        return bool(self.acc.is_main_process and self.console is not None
                    and (not self.run_options.progress or not getattr(self.console, "is_terminal", False)))

    def _progress(self) -> Any:
        if not self.run_options.progress or not self.acc.is_main_process or self._plain_log():
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )


def train_tokenizer(cfg: TokenizerConfig, run: Optional[TokenizerRunOptions] = None,
                    injected: Optional[TrainInjected] = None) -> TrainResult:
    """Train an XQ-GAN tokenizer from `cfg` (see the module docstring for what is written where).

    `run` and `injected` as :class:`TokenizerTrainer`'s; without ``injected.feature_extractor`` the clean-fid
    Inception of :func:`xqtool.training.build.rfid_extractor` scores validation rFID (skipped when its weights are
    missing, unless ``train.best_metric=rfid``, which raises WeightsMissingError).
    """
    injected = injected or TrainInjected()
    if injected.feature_extractor is None:
        injected = dataclasses.replace(injected, feature_extractor=build.rfid_extractor(cfg))
    return TokenizerTrainer(cfg, run, injected).run()


__all__ = ["TokenizerTrainer", "TrainResult", "train_tokenizer"]
