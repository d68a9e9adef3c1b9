"""Tokenizer training on Accelerate (spec §5): one process, one GPU or many (``accelerate launch``).

Public entry point: :func:`train_tokenizer`. Output directory layout::

    OUT/config.yaml                 resolved config of the run
    OUT/checkpoints/step-0000100/   training state, safetensors + JSON (both models, both optimizers, schedulers,
                                    scaler, RNG states, EMA, LeCam, exact data position) — atomic, newest 2 kept
    OUT/last/  OUT/best/            xqtool tokenizer checkpoints (model.safetensors + ema.safetensors + config.yaml)
    OUT/recon/step-0000100.png      originals (top row) over reconstructions (bottom row)
    OUT/logs/                       tracker logs (tensorboard by default)
    OUT/summary.json                final summary

Generator objective (spec §5.1): w_rec·L_rec + w_p·LPIPS + λ·w_disc·L_adv + vq + commit + entropy + L_sem + L_detail.
Discriminator (spec §5.5): w_disc·(L_D + lecam_weight·R_LeCam), trained from ``disc_start`` on (the reference's
pre-start LeCam updates and weight decay on an untrained discriminator are skipped, spec §9.11). The adaptive
weight is only computed once the GAN weight is non-zero.

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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xqtool import distributed
from xqtool.config import TokenizerConfig, config_to_dict, save_config_yaml
from xqtool.ema import EMAModel, EMAState
from xqtool.errors import ConfigError, DataError, WeightsMissingError, XQError
from xqtool.fsutil import acquire_output_lock, atomic_path, atomic_write_text, check_run_dir, write_marker
from xqtool.stopping import StopFlag
from xqtool.checkpoints.training_state import (NonFiniteError, SampleBatches, apply_state, check_geometry, first_nonfinite,
                                   has_states, list_states, resolve_resume, save_state_atomic)

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
        return {
            "step": self.step,
            "epoch": self.epoch,
            "offset": self.offset,
            "samples": self.samples,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "last_val": dict(self.last_val),
            "last_val_step": self.last_val_step,
            "record_hit": self._counters(),
        }

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


# ============================================================================ schedules
def scaled_lr(lr: float, global_batch: int, rule: str) -> float:
    """Spec §5.6: ``batch/128`` → lr·global_batch/128; ``none`` → lr."""
    return lr * global_batch / 128.0 if rule == "batch/128" else lr


def lr_factor(step: int, *, total: int, warmup: int, kind: str, base: float, min_lr: float, start: int = 0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) for a schedule starting at `start`.

    Linear warm-up over `warmup` steps, then ``cosine`` (to `min_lr`, clamped to ≤ base) or ``constant``/``none``.
    """
    s = step - start
    if s < 0:
        return 0.0
    if warmup > 0 and s < warmup:
        return (s + 1) / warmup
    if kind != "cosine":
        return 1.0
    span = max(1, total - start - warmup)
    progress = min(1.0, (s - warmup) / span)
    floor = min(min_lr, base) / base if base > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ============================================================================ data helpers
def sample_photo_folder(root: Path, image_size: int) -> Tuple[Path, Path]:
    """Demo dataset of scikit-image photo crops under ``root/{train,val}`` (written once); returns both dirs.

    Used when ``data.data_path`` is null, so demos and tests run offline on real images.
    """
    from xqtool.data.samples import ensure_demo_images

    return ensure_demo_images(root, size=max(2 * image_size, 64))


def _num_files(source: Any) -> Optional[int]:
    try:
        from xqtool.data.sources import resolve_source

        spec = resolve_source(source)
    except XQError:
        raise
    except Exception:  # pragma: no cover
        return None
    return len(spec.items) if spec.kind == "files" else None


# ============================================================================ metrics / images
PLAIN_LOG_KEYS = ("train_loss", "rec_loss", "perceptual_loss", "codebook_loss", "commit_loss", "semantic_loss",
                  "gan_loss", "disc_loss", "lr", "images_per_sec")
PLAIN_VAL_KEYS = ("val/psnr", "val/ssim", "val/rfid", "val/codebook_usage")


GRID_MIN_TILE = 128  # px: small training images are upscaled (nearest) to at least this side
GRID_LABEL_H = 16
GRID_PAD = 2


def recon_grid(originals: Tensor, recons: Tensor, step: Optional[int] = None) -> "np.ndarray":
    """uint8 [H, W, 3] preview: a labelled band, the originals ``[n,3,S,S]``, a band, the reconstructions.

    Tiles are upscaled by the integer factor ``ceil(128 / S)`` (nearest neighbour, so pixels stay visible); the
    bands read ``original`` / ``reconstruction, step N``. Inputs are in [-1, 1].
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from xqtool.metrics import to_uint8_hwc

    n, _, h, w = originals.shape
    f = max(1, math.ceil(GRID_MIN_TILE / max(1, min(h, w))))
    th, tw = h * f, w * f
    width = n * (tw + GRID_PAD) + GRID_PAD
    height = 2 * (GRID_LABEL_H + th + GRID_PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    labels = ("original", "reconstruction" + (f", step {step}" if step is not None else ""))
    for r, (images, label) in enumerate(zip((originals, recons), labels)):
        y0 = r * (GRID_LABEL_H + th + GRID_PAD)
        draw.text((GRID_PAD + 2, y0 + 2), label, fill=(0, 0, 0))
        u8 = to_uint8_hwc(images)
        for i in range(n):
            tile = Image.fromarray(u8[i]).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (GRID_PAD + i * (tw + GRID_PAD), y0 + GRID_LABEL_H))
    return np.asarray(canvas)


def _save_grid(path: Path, originals: Tensor, recons: Tensor, step: Optional[int] = None) -> None:
    """Write :func:`recon_grid` as a PNG (atomically)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(recon_grid(originals, recons, step)).save(tmp, format="PNG")


def _flat_config(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_config(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


# ============================================================================ checkpoints on disk
# ============================================================================ the trainer
class TokenizerTrainer:
    """Builds everything from a config, then :meth:`run` trains. See :func:`train_tokenizer` for arguments."""

    def __init__(
        self,
        cfg: TokenizerConfig,
        *,
        output_dir: Optional[os.PathLike] = None,
        resume: Optional[str] = None,
        max_steps: Optional[int] = None,
        tokenizer: Optional[nn.Module] = None,
        feature_extractor: Optional[Callable[[Tensor], Tensor]] = None,
        disc_overrides: Optional[Dict[str, Any]] = None,
        teacher_overrides: Optional[Dict[str, Any]] = None,
        allow_random_weights: bool = False,
        progress: bool = True,
        console: Any = None,
        callbacks: Sequence[Callable[["TokenizerTrainer"], None]] = (),
        on_finish: Optional[Callable[["TokenizerTrainer", TrainResult], None]] = None,
        prepare_model: Optional[Callable[[nn.Module], None]] = None,
        overwrite: bool = False,
    ) -> None:
        self.cfg = cfg
        self.out = Path(output_dir or cfg.train.results_dir)
        self.resume_arg = resume
        self.max_steps_arg = max_steps
        self.feature_extractor = feature_extractor
        self.disc_overrides = disc_overrides
        self.teacher_overrides = teacher_overrides or {}
        self.allow_random = allow_random_weights
        self.show_progress = progress
        self.console = console
        self.callbacks = list(callbacks)
        self.on_finish = on_finish
        self.stop = StopFlag()
        self.history: List[Dict[str, float]] = []
        self.last_val: Dict[str, float] = {}
        self.pos = _Position()

        # one writer per run folder (OS lock, released on exit or death); never write into foreign folders
        self._lock = acquire_output_lock(self.out) if distributed.is_launch_main_process() else None
        try:
            if distributed.is_launch_main_process():
                check_run_dir(self.out, resume=bool(resume), overwrite=overwrite, has_states=has_states(self.out))
                self.out.mkdir(parents=True, exist_ok=True)
                write_marker(self.out, "run")
                from xqtool.config import ignored_settings

                for line in ignored_settings(cfg):
                    log.warning(line)
            self._check_weights_first()
            self._setup(tokenizer, prepare_model)
        except BaseException:
            self.release_lock()
            raise

    def release_lock(self) -> None:
        """Release the run folder's lock (at the end of :meth:`run`; also on a failed setup)."""
        if self._lock is not None:
            self._lock.release()  # type: ignore[attr-defined]
            self._lock = None

    # ------------------------------------------------------------------ setup
    def _load_pretrained_backbones(self, tok: nn.Module) -> None:
        """Start ViT encoder/decoder from DINOv2 weights when ``model.encoder_weights``/``decoder_weights`` are set."""
        m = self.cfg.model
        if m.enc_type != "dinov2":
            return
        from xqtool.checkpoints.pretrained import load_vit_tokenizer_weights

        for part, source, key in ((tok.encoder, m.encoder_weights, "model.encoder_weights"),
                                  (tok.decoder, m.decoder_weights, "model.decoder_weights")):
            if source:
                used = load_vit_tokenizer_weights(part, source, config_key=key)
                log.info("loaded %s from %s", key, used)

    def _check_weights_first(self) -> None:
        """Fail before anything heavy when a needed pretrained network is not available offline."""
        lc = self.cfg.loss
        if lc.detail_guide != "none" and lc.guide_type_2 != "patch":
            raise ConfigError(
                f"loss.detail_guide={lc.detail_guide} needs loss.guide_type_2=patch: the reference runs detail guidance "
                f"only on the CLIP patch tokens (spec §5.3); pass --set loss.guide_type_2=patch"
            )
        from xqtool.models.teachers import teacher_spec, teacher_weights_available

        for kind, weights, key in (
            (lc.semantic_guide, lc.semantic_weights, "loss.semantic_weights"),
            ("clip" if lc.detail_guide in ("sam", "clip") else "none", lc.detail_weights, "loss.detail_weights"),
        ):
            if kind == "none" or self.allow_random:
                continue
            if not teacher_weights_available(kind, weights):
                spec = teacher_spec(kind)
                raise WeightsMissingError(
                    f"{spec.label} teacher weights for {key.split('.')[1].split('_')[0]} guidance not found: pass "
                    f"--set {key}=PATH or set {spec.env_var}=PATH (a timm .pth/.safetensors of {spec.model_name}), "
                    f"or disable it with --set loss.{'semantic_guide' if 'semantic' in key else 'detail_guide'}=none"
                )

    def _setup(self, tokenizer: Optional[nn.Module], prepare_model: Optional[Callable[[nn.Module], None]]) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        from xqtool.runtime import configure_cpu_math

        configure_cpu_math()
        cfg, tc, lc = self.cfg, self.cfg.train, self.cfg.loss
        tracker = None if tc.tracker == "none" else tc.tracker
        try:
            self.acc = Accelerator(
                mixed_precision=tc.mixed_precision,
                gradient_accumulation_steps=max(1, tc.grad_accum),
                log_with=tracker,
                project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            )
        except ValueError as exc:
            raise ConfigError(f"train.mixed_precision={tc.mixed_precision!r} is not usable here: {exc}".splitlines()[0]) from None
        acc = self.acc
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

        # ---- data
        image_size = cfg.model.image_size
        train_src: Any = cfg.data.data_path
        val_src: Any = cfg.data.val_data_path
        if train_src is None:
            root = self.out / "demo_images"
            if acc.is_main_process:
                sample_photo_folder(root, image_size)
            acc.wait_for_everyone()
            train_src, default_val = sample_photo_folder(root, image_size)
            val_src = val_src or default_val
        if val_src is None:
            log.warning("data.val_data_path is not set: validating on the training source (not held out)")
            val_src = train_src
        from xqtool.data.images import make_loader

        self.train_loader = make_loader(
            train_src, image_size=image_size, batch_size=per_proc, train=True, num_workers=cfg.data.num_workers,
            bad_files=cfg.data.bad_files, seed=tc.global_seed, drop_last=True,
        )
        self.train_loader.generator = torch.Generator().manual_seed(tc.global_seed)  # keep the global RNG untouched
        self.val_loader = make_loader(
            val_src, image_size=image_size, batch_size=per_proc, train=False, num_workers=cfg.data.num_workers,
            bad_files=cfg.data.bad_files, seed=tc.global_seed,
        )
        self.val_loader.generator = torch.Generator().manual_seed(tc.global_seed)
        n_files = _num_files(train_src)
        self.steps_per_epoch: Optional[int] = None
        if n_files is not None:
            self.steps_per_epoch = max(1, n_files // tc.global_batch_size)
            if n_files < tc.global_batch_size:
                raise DataError(
                    f"the training source has {n_files} images, fewer than train.global_batch_size={tc.global_batch_size}"
                )
        max_steps = self.max_steps_arg if self.max_steps_arg else tc.max_steps
        if not max_steps:
            if self.steps_per_epoch is None:
                raise ConfigError("the number of images in shards is unknown: pass --max-steps N (config key train.max_steps)")
            max_steps = tc.epochs * self.steps_per_epoch
        self.total_steps = int(max_steps)
        if lc.disc_start >= 0:
            self.disc_start = lc.disc_start
        elif self.steps_per_epoch is not None:
            self.disc_start = lc.disc_epoch_start * self.steps_per_epoch
        else:
            raise ConfigError("loss.disc_epoch_start needs a known epoch length: set loss.disc_start (steps) for shards")
        warmup = tc.warmup_steps if tc.warmup_steps >= 0 else (self.steps_per_epoch or 0)
        self.warmup = int(warmup)

        # ---- models
        from xqtool.models.discriminators import build_discriminator
        from xqtool.models.tokenizer import build_tokenizer

        if tokenizer is None:
            tok = build_tokenizer(cfg)
            self._load_pretrained_backbones(tok)
        else:
            tok = tokenizer
        if prepare_model is not None:
            prepare_model(tok)
        tok.train()
        self.ema: Optional[EMAModel] = None  # created after acc.prepare, from the weights DDP synchronised
        disc = None
        if lc.disc_type != "none" and lc.disc_weight > 0:
            disc = build_discriminator(
                lc.disc_type, image_size, disc_weights=lc.disc_weights, allow_random=self.allow_random,
                overrides=self.disc_overrides,
            )
        from xqtool.losses import DiffAug, LeCam, SemanticDistillLoss, disc_loss_fn, gen_loss_fn

        self.diffaug = DiffAug(prob=lc.aug_prob) if lc.disc_type == "dinodisc" else None
        self.lecam = LeCam() if lc.lecam_loss_weight > 0 and disc is not None else None
        self.d_loss_fn = disc_loss_fn(lc.disc_loss)
        self.g_loss_fn = gen_loss_fn(lc.gen_loss)
        self.lpips = None
        if lc.perceptual_weight > 0:
            from xqtool.losses.lpips import LPIPS

            self.lpips = LPIPS(weights=lc.lpips_weights, allow_random=self.allow_random).to(acc.device)

        # ---- teachers (frozen, outside the model and the EMA)
        self.aux = nn.ModuleDict()  # trainable loss-side parameters (own teacher projections)
        self.teachers: Dict[str, Tuple[nn.Module, SemanticDistillLoss, str]] = {}
        D = cfg.quant.codebook_embed_dim
        for role, kind, weights, guide in (
            ("semantic", lc.semantic_guide, lc.semantic_weights, lc.guide_type_1),
            ("detail", "clip" if lc.detail_guide in ("sam", "clip") else "none", lc.detail_weights, lc.guide_type_2),
        ):
            if kind == "none":
                continue
            from xqtool.models.teachers import SemanticTeacher

            ov = dict(self.teacher_overrides)
            patch = int(ov.pop("patch_size", 16 if image_size >= 64 else max(1, image_size // 4)))
            teacher = SemanticTeacher(kind, image_size=image_size, patch_size=patch, weights=weights,
                                      allow_random=self.allow_random, **ov).to(acc.device)
            E = teacher.embed_dim
            own = SemanticDistillLoss.needs_own_projection(getattr(tok, "quant_conv", None), E, D)
            loss_mod = SemanticDistillLoss(E, D, own_projection=own, normalize=lc.clip_norm)
            self.aux[role] = loss_mod
            self.teachers[role] = (teacher, loss_mod, "patches" if guide == "patch" else "cls")

        # ---- optimizers (built from parameters that require grad, AFTER any tuning method was applied)
        b = tc.global_batch_size
        gen_params = [p for p in tok.parameters() if p.requires_grad] + [p for p in self.aux.parameters()]
        if not gen_params:
            raise ConfigError("no trainable tokenizer parameters (everything is frozen)")
        self.g_lr = scaled_lr(tc.lr, b, tc.lr_scale_rule)
        self.d_lr = scaled_lr(tc.disc_lr, b, tc.lr_scale_rule)
        from xqtool.runtime import fast_adamw_kwargs

        fast = fast_adamw_kwargs(acc.device)  # fused AdamW kernel where torch has one (CPU and CUDA)
        opt_g = torch.optim.AdamW(gen_params, lr=self.g_lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay,
                                  **fast)
        total, warm = self.total_steps, self.warmup
        per_epoch = self._per_epoch_lr()
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(
            opt_g, per_epoch[0] if per_epoch else
            (lambda s: lr_factor(s, total=total, warmup=warm, kind=tc.lr_scheduler, base=self.g_lr, min_lr=tc.min_lr))
        )
        self.opt_d = self.sched_d = None
        if disc is not None:
            opt_d = torch.optim.AdamW(disc.parameters(), lr=self.d_lr, betas=(tc.beta1, tc.beta2),
                                      weight_decay=tc.disc_weight_decay, **fast)
            d_warm = max(1, int(0.02 * max(1, total - self.disc_start)))
            dstart = self.disc_start
            # the disc scheduler counts discriminator steps, which begin at disc_start
            self.sched_d = torch.optim.lr_scheduler.LambdaLR(
                opt_d, per_epoch[1] if per_epoch else
                (lambda s: lr_factor(s, total=max(1, total - dstart), warmup=d_warm, kind=tc.lr_scheduler,
                                     base=self.d_lr, min_lr=tc.min_lr))
            )
            self.opt_d = opt_d

        # ---- accelerate
        if disc is not None:
            self.tok, self.disc, self.opt_g, self.opt_d = acc.prepare(tok, disc, opt_g, self.opt_d)
        else:
            self.tok, self.opt_g = acc.prepare(tok, opt_g)
            self.disc = None
        self.aux.to(acc.device)
        self.pos.model = self.unwrapped
        # every rank drew its own random init above: modules outside DDP take rank 0's weights, and the
        # EMA starts from the weights DDP broadcast from rank 0 (not from this rank's own init)
        distributed.broadcast_modules([self.aux, self.lpips, *(t for t, _, _ in self.teachers.values())])
        if tc.ema:
            self.ema = EMAModel(self.unwrapped, tc.ema_decay)
        self.components: Dict[str, Any] = {"model": self.tok, "opt_g": self.opt_g, "sched_g": self.sched_g,
                                           "position": self.pos}
        if self.disc is not None:
            self.components.update(disc=self.disc, opt_d=self.opt_d, sched_d=self.sched_d)
        if self.ema is not None:
            self.ema.to(acc.device)
            self.components["ema"] = EMAState(self.ema)
        if self.lecam is not None:
            self.lecam.to(acc.device)
            self.components["lecam"] = self.lecam
        if len(self.aux):
            self.components["aux"] = self.aux
        if acc.scaler is not None:
            self.components["scaler"] = acc.scaler

        # ---- output dir, config, resume, trackers
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", save_config_yaml(cfg))
        loaded = resolve_resume(self.resume_arg, self.out, acc.process_index)
        self.resumed_from: Optional[Path] = None
        if loaded is not None:
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
        if tracker is not None:
            try:
                acc.init_trackers("xqtool", config=_flat_config(config_to_dict(cfg)))
            except ImportError as exc:
                raise ConfigError(f"train.tracker={tc.tracker!r} needs a package that is not installed: {exc}") from None

    # ------------------------------------------------------------------ helpers
    def _per_epoch_lr(self) -> Optional[Tuple[Any, Any]]:
        """LambdaLR factors of the reference's per-epoch schedules (spec §5.6), None for the per-step ones."""
        from xqtool.lr_schedule import per_epoch_factors

        tc = self.cfg.train
        if tc.lr_schedule != "epoch":
            return None
        if not self.steps_per_epoch:
            log.warning("train.lr_schedule=epoch needs a known epoch length (shards without a count): "
                        "using the per-step schedule")
            return None
        return per_epoch_factors(tc, self.steps_per_epoch, self.g_lr, self.d_lr, self.disc_start)

    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.tok)

    def _rec_loss(self, x: Tensor, recon: Tensor) -> Tensor:
        if self.cfg.loss.reconstruction_loss == "l1":
            return (recon - x).abs().mean()
        return F.mse_loss(recon, x)

    def _disc_input(self, images: Tensor, blur: float) -> Tensor:
        return self.diffaug(images, blur=blur) if self.diffaug is not None else images

    def _blur(self, step: int) -> float:
        from xqtool.losses import fade_blur_schedule

        return fade_blur_schedule(step, self.disc_start, self.cfg.loss.aug_fade_steps) if self.diffaug is not None else 0.0

    def _epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch if self.steps_per_epoch else 0

    # ------------------------------------------------------------------ one micro-step
    def _micro_step(self, x: Tensor, step: int) -> Tuple[Dict[str, float], bool]:
        """Forward/backward for the generator and the discriminator on a batch ``x [b,3,S,S]``.

        `step` is the 1-based optimizer step this micro-batch contributes to. Returns (logs, finite).
        """
        from xqtool.losses import adaptive_weight, adaptive_weight_at_output, disc_weight_at, semantic_scale

        acc, lc = self.acc, self.cfg.loss
        logs: Dict[str, float] = {}
        w_disc = disc_weight_at(step, self.disc_start, lc.disc_weight) if self.disc is not None else 0.0
        blur = self._blur(step)
        raw_disc = acc.unwrap_model(self.disc) if self.disc is not None else None
        with acc.accumulate(*( (self.tok, self.disc) if self.disc is not None else (self.tok,) )):
            # ---------------- generator
            with acc.autocast():
                out = self.tok(x, epoch=self._epoch_of(step))
            recon = out.recon.float()
            rec = self._rec_loss(x, recon)
            nll = lc.reconstruction_weight * rec
            logs["rec_loss"] = rec.detach().item()
            if self.lpips is not None:
                with acc.autocast():
                    p = self.lpips(recon, x).mean().float()
                nll = nll + lc.perceptual_weight * p
                logs["perceptual_loss"] = p.detach().item()
            q = out.loss
            rest = q["vq"] + q["commit"] + q["entropy"]  # the generator loss terms that do not go through recon
            for k in ("vq", "commit", "entropy"):
                logs[f"{k}_loss"] = float(q[k].detach())
            for role, (teacher, loss_mod, which) in self.teachers.items():
                feats = teacher(x)[which]
                scale_base = lc.sem_loss_scale if role == "semantic" else lc.detail_loss_scale
                scale = semantic_scale(self._epoch_of(step), lc.clip_norm, scale_base)
                student = out.semantic if role == "semantic" else out.detail
                s_loss = loss_mod(student, feats, quant_conv=getattr(self.unwrapped, "quant_conv", None),
                                  n_drop=int(out.n_drop), scale=scale)
                weight = lc.sem_loss_weight if role == "semantic" else lc.detail_loss_weight
                rest = rest + weight * s_loss
                logs[f"{'sem' if role == 'semantic' else 'detail'}_loss"] = s_loss.detach().item()
            loss = nll + rest
            to_backward: Optional[Tensor] = None  # None: differentiate `loss` itself
            if w_disc > 0 and raw_disc is not None:
                raw_disc.requires_grad_(False)
                with acc.autocast():
                    logits_fake = raw_disc(self._disc_input(recon, blur)).float()
                raw_disc.requires_grad_(True)
                g_adv = self.g_loss_fn(logits_fake)
                if lc.disc_adaptive_weight and acc.scaler is None:
                    # LPIPS and discriminator backwards once each (down to recon), shared by λ and the step
                    lam, g_nll, g_g = adaptive_weight_at_output(nll, g_adv, recon, self.unwrapped.last_layer,
                                                                reduce_grads=distributed.mean_across)
                    to_backward = (recon * (g_nll + (lam * w_disc) * g_g)).sum() + rest
                elif lc.disc_adaptive_weight:  # fp16 loss scaling: differentiate the whole loss (scaled)
                    lam = adaptive_weight(nll, g_adv, self.unwrapped.last_layer, reduce_grads=distributed.mean_across)
                else:
                    lam = torch.ones((), device=x.device)
                loss = loss + lam * w_disc * g_adv
                logs["generator_adv_loss"] = g_adv.detach().item()
                logs["disc_adaptive_weight"] = lam.item()
            logs["disc_weight"] = w_disc
            finite = self._all_finite(loss)
            logs["train_loss"] = loss.detach().item()
            if finite:
                acc.backward(loss if to_backward is None else to_backward)
                if acc.sync_gradients and acc.num_processes > 1 and len(self.aux):
                    # loss-side projections are not DDP-wrapped: average their gradients by hand
                    for prm in self.aux.parameters():
                        if prm.grad is not None:
                            prm.grad = acc.reduce(prm.grad, reduction="mean")
                if acc.sync_gradients and self.cfg.train.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.tok.parameters(), self.cfg.train.max_grad_norm)
                self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)

            # ---------------- discriminator
            if w_disc > 0 and self.disc is not None and finite:
                with acc.autocast():
                    lr_ = self.disc(self._disc_input(x, blur)).float()
                    lf_ = self.disc(self._disc_input(recon.detach(), blur)).float()
                d_loss = self.d_loss_fn(lr_, lf_)
                logs["discriminator_adv_loss"] = d_loss.detach().item()
                if self.lecam is not None:
                    # EMA of the GLOBAL batch means: identical on every rank (so the rank-0 save restores all ranks)
                    self.lecam.update(*distributed.mean_across(lr_.detach().float().mean(), lf_.detach().float().mean()))
                    reg = self.lecam(lr_, lf_)
                    d_loss = d_loss + lc.lecam_loss_weight * reg
                    logs["lecam_loss"] = reg.detach().item()
                d_loss = w_disc * d_loss
                logs["logits_real"] = lr_.detach().mean().item()
                logs["logits_fake"] = lf_.detach().mean().item()
                d_ok = self._all_finite(d_loss)
                if d_ok:
                    acc.backward(d_loss)
                    if acc.sync_gradients and self.cfg.train.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.disc.parameters(), self.cfg.train.max_grad_norm)
                    self.opt_d.step()
                    if acc.sync_gradients:
                        self.sched_d.step()
                self.opt_d.zero_grad(set_to_none=True)
                if not d_ok:
                    logs["disc_nonfinite"] = 1.0
        for k, v in out.stats.items():
            logs[f"codebook_{k}"] = float(v.float().mean())
        return logs, finite

    def _all_finite(self, loss: Tensor) -> bool:
        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.acc.device)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        return bool(flag.item() == 0)

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
        """PSNR/SSIM/rFID and codebook usage on the held-out set (EMA weights when EMA is on); saves a grid PNG."""
        from xqtool.metrics import (code_histogram, codebook_usage_metrics, fid_from_features, image_features, psnr,
                                    ssim, to_uint8)

        acc, cfg = self.acc, self.cfg
        model = self.ema.module if self.ema is not None else self.unwrapped
        was_training = model.training
        model.eval()
        psnr_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
        ssim_sum = torch.zeros_like(psnr_sum)
        count = torch.zeros_like(psnr_sum)
        P, K = cfg.quant.product_quant, cfg.quant.codebook_size
        scales = tuple(cfg.quant.v_patch_nums)
        hist = torch.zeros(P, len(scales), K, device=acc.device, dtype=torch.long)
        feats_r: List[Tensor] = []
        feats_o: List[Tensor] = []
        grid: Optional[Tuple[Tensor, Tensor]] = None
        limit = cfg.data.max_val_images or None
        seen = 0
        for batch in self.val_loader:
            x = batch["image"].to(acc.device)
            if limit is not None:
                x = x[: max(0, limit - seen * acc.num_processes)] if seen * acc.num_processes < limit else x[:0]
            if x.shape[0] == 0:
                break
            seen += x.shape[0]
            with acc.autocast():
                tokens = model.encode(x)
                recon = model.decode(tokens).float()
            psnr_sum += psnr(recon, x).double().sum()
            ssim_sum += ssim(recon, x).double().sum()
            count += x.shape[0]
            hist += code_histogram(tokens, K, scales).to(hist.device)
            if self.feature_extractor is not None:
                feats_r.append(image_features(self.feature_extractor, to_uint8(recon)))
                feats_o.append(image_features(self.feature_extractor, to_uint8(x)))
            if grid is None:
                grid = (x[:8].cpu(), recon[:8].cpu())
        if was_training:
            model.train()
        psnr_sum, ssim_sum, count, hist = (acc.reduce(t, reduction="sum") if acc.num_processes > 1 else t
                                           for t in (psnr_sum, ssim_sum, count, hist))
        n = max(1.0, float(count.item()))
        metrics: Dict[str, float] = {"val/psnr": float(psnr_sum.item()) / n, "val/ssim": float(ssim_sum.item()) / n,
                                     "val/images": float(count.item())}
        if self.feature_extractor is not None and feats_r:
            fr, fo = torch.cat(feats_r), torch.cat(feats_o)
            if acc.num_processes > 1:
                fr, fo = self._gather_rows(fr), self._gather_rows(fo)
            if fr.shape[0] >= 2:
                metrics["val/rfid"] = float(fid_from_features(fo.numpy(), fr.numpy()))
        # report-side usage: exact distinct codes over the validation set (same numbers as eval-fid --rfid)
        usage = codebook_usage_metrics(hist)
        for b in range(P):
            metrics[f"val/codebook_usage/b{b}"] = usage["codebook_usage"][b]
            metrics[f"val/codebook_perplexity/b{b}"] = usage["codebook_perplexity"][b]
            for si in range(len(scales)):
                metrics[f"val/codebook_usage/b{b}/s{si}"] = usage["codebook_usage_per_scale"][b][si]
                metrics[f"val/codebook_perplexity/b{b}/s{si}"] = usage["codebook_perplexity_per_scale"][b][si]
        if acc.is_main_process and grid is not None:
            path = self.out / "recon" / f"step-{step:07d}.png"
            _save_grid(path, *grid, step=step)
            self._log_image(grid, step)
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

    def _log_image(self, grid: Tuple[Tensor, Tensor], step: int) -> None:
        if self.cfg.train.tracker != "tensorboard":
            return
        try:
            from torchvision.utils import make_grid

            tb = self.acc.get_tracker("tensorboard", unwrap=True)
            img = make_grid(torch.cat(grid).clamp(-1, 1) * 0.5 + 0.5, nrow=grid[0].shape[0])
            tb.add_image("val/reconstructions", img, step)
        except Exception as exc:  # pragma: no cover - logging must never stop training
            log.debug("could not log image: %s", exc)

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
        metric_key = f"val/{tc.best_metric}"
        if tc.best_metric == "rfid" and self.feature_extractor is None:
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
                logs_acc: Dict[str, float] = {}
                ok_all = True
                for _ in range(max(1, tc.grad_accum)):
                    x = next(batches).to(acc.device, non_blocking=True)
                    logs, ok = self._micro_step(x, step)
                    images += x.shape[0] * acc.num_processes
                    self.pos.samples += x.shape[0] * acc.num_processes
                    ok_all = ok_all and ok
                    for k, v in logs.items():
                        logs_acc[k] = logs_acc.get(k, 0.0) + v / max(1, tc.grad_accum)
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
                if step % max(1, tc.log_every) == 0 or step == 1 or step == self.total_steps:
                    elapsed = max(1e-9, time.perf_counter() - t0)
                    logs_acc["images_per_sec"] = images / elapsed
                    self.history.append({"step": step, **logs_acc})
                    acc.log(logs_acc, step=step)
                if self._plain_log() and (step % max(1, tc.log_every) == 0 or step == 1 or step == self.total_steps):
                    self.console.print(
                        f"step {step}/{self.total_steps} " + " ".join(
                            f"{k} {v:.4g}" for k, v in logs_acc.items() if k in PLAIN_LOG_KEYS),
                        highlight=False, soft_wrap=True)
                if task is not None:
                    elapsed = max(1e-9, time.perf_counter() - t0)
                    info = f"rec {logs_acc.get('rec_loss', float('nan')):.4f} loss {logs_acc['train_loss']:.4f} {images / elapsed:.1f} img/s"
                    progress.update(task, completed=step, info=info)
                try:
                    if step % max(1, tc.eval_every) == 0 or step == self.total_steps:
                        val = self.validate(step)
                        acc.log(val, step=step)
                        if acc.is_main_process and self.console is not None:
                            shown = " ".join(f"{k[4:]} {v:.4f}" for k, v in val.items() if k in PLAIN_VAL_KEYS)
                            (progress.console if progress is not None else self.console).print(
                                f"validation at step {step}: {shown}", highlight=False, soft_wrap=True)
                        value = val.get(metric_key)
                        if value is not None and tc.save_best and self._is_better(value):
                            self.export_model(self.out / "best")
                            self.pos.best_value, self.pos.best_step = value, step
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
        if self.on_finish is not None:
            self.on_finish(self, result)
        if acc.is_main_process:
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()
                       if k != "history"}
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1, default=str))
        acc.end_training()
        return result

    def _plain_log(self) -> bool:
        """Plain log lines (main process) when the output is not a terminal or the bar is switched off."""
        return bool(self.acc.is_main_process and self.console is not None
                    and (not self.show_progress or not getattr(self.console, "is_terminal", False)))

    def _progress(self) -> Any:
        if not self.show_progress or not self.acc.is_main_process or self._plain_log():
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )


def train_tokenizer(
    cfg: TokenizerConfig,
    *,
    output_dir: Optional[os.PathLike] = None,
    resume: Optional[str] = None,
    max_steps: Optional[int] = None,
    feature_extractor: Optional[Callable[[Tensor], Tensor]] = None,
    disc_overrides: Optional[Dict[str, Any]] = None,
    teacher_overrides: Optional[Dict[str, Any]] = None,
    allow_random_weights: bool = False,
    progress: bool = True,
    console: Any = None,
    callbacks: Sequence[Callable[[TokenizerTrainer], None]] = (),
    tokenizer: Optional[nn.Module] = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train an XQ-GAN tokenizer from `cfg` (see the module docstring for what is written where).

    Args:
        cfg: the resolved config.
        output_dir: run directory (default ``cfg.train.results_dir``).
        resume: ``None``, ``"auto"`` (newest complete state in `output_dir`, if any) or a state directory.
        max_steps: overrides ``train.max_steps``.
        feature_extractor: images uint8 ``[B,3,H,W]`` → features ``[B,F]`` for rFID; default: clean-fid Inception
            from ``train.inception_weights`` / cache when available (rFID skipped otherwise unless best_metric=rfid).
        disc_overrides / teacher_overrides: size overrides for tests (tiny discriminator / teacher).
        allow_random_weights: tests only: keep random init for LPIPS / teachers / DINO disc when weights are missing.
        progress / console: rich progress bar on the main process.
        callbacks: called after every optimizer step with the trainer.
        tokenizer: start from this (already loaded / tuned) tokenizer instead of a random one.
        overwrite: delete an earlier xqtool run in `output_dir` first (a foreign non-empty folder is always
            refused, see :func:`xqtool.fsutil.check_run_dir`).
    """
    if feature_extractor is None:
        feature_extractor = _default_extractor(cfg)
    trainer = TokenizerTrainer(
        cfg, output_dir=output_dir, resume=resume, max_steps=max_steps, tokenizer=tokenizer,
        feature_extractor=feature_extractor, disc_overrides=disc_overrides, teacher_overrides=teacher_overrides,
        allow_random_weights=allow_random_weights, progress=progress, console=console, callbacks=callbacks,
        overwrite=overwrite,
    )
    return trainer.run()


def _default_extractor(cfg: TokenizerConfig) -> Optional[Callable[[Tensor], Tensor]]:
    """clean-fid Inception when its weights are available offline; None (rFID skipped) otherwise."""
    from xqtool.metrics import inception_extractor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return inception_extractor(cfg.train.inception_weights, device=device)
    except WeightsMissingError:
        if cfg.train.best_metric == "rfid":
            raise WeightsMissingError(
                "train.best_metric=rfid needs the clean-fid Inception weights (inception-2015-12-05.pt) offline: "
                "--set train.inception_weights=PATH (or $XQTOOL_INCEPTION_WEIGHTS), or --set train.best_metric=psnr"
            ) from None
        log.warning("Inception weights not found: rFID is skipped (--set train.inception_weights=PATH to enable it)")
        return None


__all__ = ["TokenizerTrainer", "TrainResult", "list_states", "lr_factor", "resolve_resume", "sample_photo_folder",
           "scaled_lr", "train_tokenizer"]
