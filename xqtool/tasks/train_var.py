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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xqtool.config import VARConfig, config_to_dict
from xqtool.errors import ConfigError, DataError
from xqtool.models.var import VAR
from xqtool.runtime import fast_adamw_kwargs
from xqtool.stopping import StopFlag
from xqtool.checkpoints.training_state import (NonFiniteError, SampleBatches, apply_state, check_geometry, has_states,
                                     resolve_resume, save_state_atomic)
from xqtool.checkpoints import save_var

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
    status: str = "finished"  # "finished" | "interrupted" | "diverged"
    message: str = ""
    exit_code: int = 0  # 0 finished, 1 diverged, 130 SIGINT / 143 SIGTERM


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
        loss = var_loss(logits, tokens, raw.num_branches, label_smoothing)
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
    """Deterministic batches from a map-style token dataset (``.npy``).

    The sample stream is the concatenation of one permutation per epoch (order = f(seed, epoch)); a global
    micro-batch takes the next ``micro_global`` samples of that stream (rank r its r-th slice of
    ``local_batch``). The position is the number of samples consumed, so a resume continues exactly, also with
    another batch size or process count.
    """

    def __init__(self, dataset: Any, local_batch: int, rank: int, world: int, seed: int) -> None:
        self.ds, self.lb, self.rank, self.world, self.seed = dataset, local_batch, rank, world, seed
        self.n = len(dataset)
        if self.n < local_batch * world:
            raise DataError(f"{self.n} token rows are fewer than one batch ({local_batch * world}): "
                            "lower train.global_batch_size")
        self.samples_seen = 0
        self._perm: Dict[int, np.ndarray] = {}

    def _row(self, i: int) -> int:
        epoch, pos = divmod(i, self.n)
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perm[epoch][pos])

    def state_dict(self) -> Dict[str, int]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.samples_seen = int(state["samples_seen"])

    def next_batch(self) -> Tuple[Tensor, Tensor]:
        """The next micro-batch of this process → (tokens [b, P, L], labels [b])."""
        start = self.samples_seen + self.rank * self.lb
        rows = [self.ds[self._row(i)] for i in range(start, start + self.lb)]
        self.samples_seen += self.lb * self.world
        return torch.stack([r["tokens"] for r in rows]), torch.tensor([r["label"] for r in rows])


class _StreamBatches:
    """Batches from an iterable source (token shards or images encoded on the fly), resumable at any sample.

    The position (epoch, samples consumed in the epoch by this process) is kept by
    :class:`~xqtool.checkpoints.training_state.SampleBatches`; `encode` turns a raw batch into (tokens, labels).
    """

    def __init__(self, make_epoch: Any, local_batch: int, world: int, key: str, encode: Any = None) -> None:
        self.stream = SampleBatches(make_epoch, local_batch, (key, "label"))
        self.key, self.encode, self.world = key, encode, world

    @property
    def samples_seen(self) -> int:
        return self.stream.offset * self.world

    def state_dict(self) -> Dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.stream.epoch, self.stream.offset, self.stream._it = int(state["epoch"]), int(state["offset"]), None

    def next_batch(self) -> Tuple[Tensor, Tensor]:
        b = next(self.stream)
        x = b[self.key]
        return (self.encode(x) if self.encode is not None else x), b["label"]


def _build_data(cfg: VARConfig, tokenizer: Any, global_batch: int, local_batch: int, rank: int, world: int,
                device: torch.device, ignore_fingerprint: bool = False) -> Tuple[Any, int]:
    """→ (batch source with ``.next_batch()`` / ``state_dict()``, optimizer steps per epoch)."""
    d = cfg.data
    if d.tokens:
        from xqtool.data.tokens import check_manifest, token_dataset

        # token shards: every process reads the whole (small) token stream and keeps its slice of each
        # global micro-batch, so batches do not depend on the number of processes or of shards
        ds = token_dataset(d.tokens, train=True, seed=cfg.train.seed, split_nodes=False)
        check_manifest(ds.manifest, tokenizer, ignore_fingerprint=ignore_fingerprint, what=f"the tokens {d.tokens}")
        if isinstance(ds, torch.utils.data.IterableDataset):
            per_epoch = max(int(ds.manifest.count) // global_batch, 1)
            lo = rank * local_batch

            def make(epoch: int) -> Iterator:
                ds.set_epoch(epoch)
                # own generator: creating a loader iterator must not draw from the global RNG (exact resume)
                loader = torch.utils.data.DataLoader(ds, batch_size=local_batch * world, num_workers=d.num_workers,
                                                     drop_last=True, generator=torch.Generator().manual_seed(epoch))
                return ({"tokens": b["tokens"][lo:lo + local_batch], "label": torch.as_tensor(b["label"])[lo:lo + local_batch]}
                        for b in loader)
            return _StreamBatches(make, local_batch, world, "tokens"), per_epoch
        src = _TokenArrayBatches(ds, local_batch, rank, world, cfg.train.seed)
        return src, max(len(ds) // global_batch, 1)
    if d.images:
        from xqtool.data.images import make_loader
        from xqtool.data.transforms import var_train_transform

        size = d.image_size or int(tokenizer.image_size)
        loader = make_loader(d.images, image_size=size, batch_size=local_batch, train=True,
                             num_workers=d.num_workers, bad_files=d.bad_files, seed=cfg.train.seed, drop_last=False,
                             train_tf=var_train_transform(size, hflip=d.hflip))
        loader.generator = torch.Generator().manual_seed(cfg.train.seed)  # keep the global RNG untouched
        n = getattr(loader.dataset, "num_items", None)
        per_epoch = max(int(n) // global_batch, 1) if n else 1000

        def make_img(epoch: int) -> Iterator:
            loader._epoch = epoch  # the loader sets the stream's epoch (shuffle, augmentation RNG) from this
            return iter(loader)

        def encode(images: Tensor) -> Tensor:
            with torch.no_grad():
                return tokenizer.encode(images.to(device))
        return _StreamBatches(make_img, local_batch, world, "image", encode), per_epoch
    raise ConfigError("no training data: pass --tokens (token file/shards from `xqtool encode`) or --images "
                      "(config keys data.tokens / data.images)")


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
    return F.cross_entropy(logits.float().reshape(B, L, num_branches, K).flatten(0, 2),
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
        labels = _labels(torch.tensor([int(it["label"]) for it in items], device=device), model.num_classes)
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


def train_var(cfg: VARConfig, *, tokenizer: Optional[torch.nn.Module] = None, resume: Optional[str] = None,
              console: Any = None, cpu: bool = False,
              callbacks: Sequence[Callable[[Dict[str, Any]], None]] = (), overwrite: bool = False,
              ignore_fingerprint: bool = False) -> TrainVARResult:
    """Train VAR per `cfg`. `tokenizer` may be injected (tests); else loaded from ``cfg.data.tokenizer``.

    Non-finite steps are skipped; after ``train.nan_patience`` in a row the run stops with status
    ``diverged`` (nothing non-finite is ever saved). SIGINT/SIGTERM save a training state and return status
    ``interrupted`` (``result.exit_code`` 130/143). `callbacks` get each history row after its step.
    Returns a :class:`TrainVARResult` (history rows hold step, loss, lr, grad_norm and per-scale metrics).
    Raises ConfigError when `results_dir` holds a run and `resume` is not set, or on a refused batch change.

    The run folder is locked for the run (OutputError for a second writer) and checked first
    (:func:`xqtool.fsutil.check_run_dir`; ``overwrite`` deletes an earlier xqtool run there). Tokens, or a resumed
    run, made with other tokenizer weights raise TokenError unless ``ignore_fingerprint``.
    """
    from xqtool.distributed import is_launch_main_process

    from xqtool.fsutil import output_lock

    run_dir = Path(cfg.train.results_dir)
    with output_lock(run_dir, enabled=is_launch_main_process()):
        return _train_var(cfg, tokenizer=tokenizer, resume=resume, console=console, cpu=cpu, callbacks=callbacks,
                          overwrite=overwrite, ignore_fingerprint=ignore_fingerprint)


def _train_var(cfg: VARConfig, *, tokenizer: Optional[torch.nn.Module], resume: Optional[str], console: Any,
               cpu: bool, callbacks: Sequence[Callable[[Dict[str, Any]], None]], overwrite: bool,
               ignore_fingerprint: bool) -> TrainVARResult:
    from xqtool.distributed import is_launch_main_process

    from xqtool.checkpoints import weights_fingerprint
    from xqtool.fsutil import check_run_dir, write_marker
    from accelerate import Accelerator
    from accelerate.utils import GradScalerKwargs, ProjectConfiguration, set_seed

    from xqtool.runtime import configure_cpu_math

    configure_cpu_math()

    t = cfg.train
    run_dir = Path(t.results_dir)
    if is_launch_main_process():
        check_run_dir(run_dir, resume=bool(resume), overwrite=overwrite, has_states=has_states(run_dir))
    _refuse_rerun(run_dir, resume)
    if is_launch_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(run_dir, "run")
    trackers = None if t.tracker == "none" else t.tracker
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum, log_with=trackers, cpu=cpu,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=[GradScalerKwargs(init_scale=INIT_LOSS_SCALE, growth_interval=LOSS_SCALE_GROWTH_INTERVAL)],
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
        from xqtool.checkpoints import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer)
    tokenizer = tokenizer.to(device).eval().requires_grad_(False)
    check_tokenizer_fit(cfg.model, tokenizer)

    world = accelerator.num_processes
    local_batch = max(round(t.global_batch_size / t.grad_accum / world), 1)
    global_batch = local_batch * world * t.grad_accum
    data, iters_per_epoch = _build_data(cfg, tokenizer, global_batch, local_batch, accelerator.process_index,
                                        world, device, ignore_fingerprint)
    max_steps = t.max_steps or t.epochs * iters_per_epoch
    warmup = t.warmup_steps if t.warmup_steps is not None else round(
        (t.warmup_epochs if t.warmup_epochs is not None else t.epochs / 50) * iters_per_epoch)
    peak_lr = t.tblr * global_batch / 256

    model = VAR(cfg.model)
    optimizer = build_optimizer(model, t, device, lr=peak_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw: VAR = accelerator.unwrap_model(model)
    pos = _Position(data)
    components: Dict[str, Any] = {"model": model, "optimizer": optimizer, "position": pos}
    if accelerator.scaler is not None:
        components["scaler"] = accelerator.scaler

    resumed_from = None
    loaded = resolve_resume(resume, run_dir, accelerator.process_index)
    fingerprint = weights_fingerprint(tokenizer)
    if loaded is not None and (run_dir / "var-last" / "config.yaml").is_file():
        from xqtool.data.tokens import check_fingerprint
        from xqtool.checkpoints import read_var_config

        recorded = (read_var_config(run_dir / "var-last").get("tokenizer") or {}).get("weights_fingerprint", "")
        check_fingerprint(str(recorded or ""), tokenizer, f"the run {run_dir}", ignore_fingerprint)
    if loaded is not None:
        note = check_geometry(loaded, global_batch=global_batch, world=world, allow=t.allow_batch_change,
                              world_exact=isinstance(data, _TokenArrayBatches))
        apply_state(accelerator, loaded, components)
        resumed_from = pos.step
        if note:
            log.warning("%s", note)
    if trackers and accelerator.is_main_process:
        accelerator.init_trackers("var", config={k: str(v) for k, v in config_to_dict(cfg.train).items()})

    quantizer = tokenizer.quantizer
    val_ds, val_every = None, 0
    if cfg.data.val_tokens:
        from xqtool.data.tokens import check_manifest, token_dataset

        val_ds = token_dataset(cfg.data.val_tokens, train=False)
        check_manifest(val_ds.manifest, tokenizer)
        if isinstance(val_ds, torch.utils.data.IterableDataset):
            raise ConfigError("data.val_tokens must be a token .npy file (held-out rows), not token shards")
        val_every = max(int(t.val_every_epochs), 0) * iters_per_epoch
    val_batch = t.val_batch_size or max(round(1.5 * local_batch), 1)
    history: List[Dict[str, float]] = []
    classes_seen = set(int(c) for c in loaded.info.get("classes_seen", [])) if loaded is not None else set()
    progress = None
    # Terminals get a live bar; piped output (files, cluster logs) gets one plain line every log_every steps.
    plain_log = console is not None and accelerator.is_main_process and not getattr(console, "is_terminal", False)
    if console is not None and accelerator.is_main_process and not plain_log:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]train-var"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
        progress.start()
        task = progress.add_task("train", total=max_steps, completed=pos.step, info="")
    tok_info = {"tokenizer": {"path": str(cfg.data.tokenizer or ""),
                              "config_hash": getattr(tokenizer, "config_hash", lambda: "")(),
                              "weights_fingerprint": fingerprint}}
    status, message, stop = "finished", "", StopFlag()
    last_saved: Optional[Path] = None

    def save(done: int) -> Optional[Path]:
        """Training state + var-last at step `done`; a non-finite weight refuses both (None returned)."""
        seen_all = _gather_classes(accelerator, classes_seen)
        last = next(({k: v for k, v in r.items() if k in ("loss", "acc", "lr", "grad_norm")}
                     for r in reversed(history) if r["step"] == done), {})
        info = {"trainer": "var", "samples_seen": int(data.samples_seen), "global_batch": global_batch,
                "grad_accum": t.grad_accum, "epoch_micro": iters_per_epoch, "last_metrics": last,
                "classes_seen": seen_all}
        path = save_state_atomic(accelerator, run_dir, done, components, info, t.keep_last)
        if accelerator.is_main_process:
            save_var(run_dir / "var-last", raw, extra_config={**tok_info, "step": done, "classes_seen": seen_all,
                                                             "train": config_to_dict(cfg.train)})
        accelerator.wait_for_everyone()
        return path

    model.train()
    bad_streak = 0
    try:
        with stop:
            while pos.step < max_steps:
                step = pos.step
                for g in optimizer.param_groups:
                    g["lr"] = peak_lr * lr_factor(step, warmup, max_steps, t.schedule, t.warmup_start, t.final_lr_ratio)
                    g["weight_decay"] = wd_value(step, max_steps, t.weight_decay, t.weight_decay_end) * g["wd_sc"]
                raw.p_drop_scale = max(1.0 - (step / iters_per_epoch) / max(t.epochs, 1), 0.0)
                loss_sum, metrics, grad_norm, finite = 0.0, {}, float("nan"), True
                for a in range(t.grad_accum):
                    tokens, labels = data.next_batch()
                    classes_seen.update(int(c) for c in labels.reshape(-1).tolist() if 0 <= int(c) < raw.num_classes)
                    tokens = tokens.to(device).long()
                    labels = _labels(labels.to(device), raw.num_classes)
                    with accelerator.accumulate(model):
                        with accelerator.autocast():
                            loss, logits4, targets = teacher_forcing_loss(model, quantizer, tokens, labels,
                                                                          t.label_smoothing, raw)
                        finite = finite and _all_finite(accelerator, loss)
                        if finite:
                            accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            if finite:
                                params = [p for p in model.parameters() if p.requires_grad]
                                if t.max_grad_norm > 0:
                                    grad_norm = float(accelerator.clip_grad_norm_(params, t.max_grad_norm))
                                else:
                                    grad_norm = float(torch.norm(torch.stack(
                                        [p.grad.norm() for p in params if p.grad is not None])))
                                finite = math.isfinite(grad_norm) or accelerator.scaler is not None
                            if finite:
                                optimizer.step()
                                cap_loss_scale(accelerator.scaler)
                            optimizer.zero_grad(set_to_none=True)
                    loss_sum += float(loss.detach()) / t.grad_accum
                    if finite and a == t.grad_accum - 1 and (step % t.log_every == 0 or step == max_steps - 1):
                        metrics = per_scale_metrics(logits4.detach(), targets, raw.begin_ends)
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
                    if stop.any_rank(accelerator):
                        status = "interrupted"
                        try:  # the skipped steps consumed data: save the position after them
                            last_saved = save(pos.step)
                        except NonFiniteError:
                            pass
                        message = (f"stopped by {stop.requested} at step {pos.step}; saved {last_saved}; "
                                   "resume with --resume auto")
                        break
                    continue
                bad_streak = 0
                pos.step = done = step + 1
                row = {"step": done, "loss": loss_sum, "lr": max(g["lr"] for g in optimizer.param_groups),
                       "grad_norm": grad_norm, **metrics}
                if val_ds is not None and ((val_every and done % val_every == 0) or done == max_steps):
                    row.update(evaluate_var(raw, quantizer, val_ds, val_batch, device, raw.num_branches,
                                            accelerator.process_index, world,
                                            (lambda v: accelerator.reduce(v, reduction="sum")) if world > 1 else None))
                    metrics = metrics or row
                history.append(row)
                if metrics and trackers:
                    accelerator.log(row, step=done)
                if progress is not None:
                    progress.update(task, advance=1, info=f"loss {loss_sum:.4f} lr {row['lr']:.2e}")
                if plain_log and (done % max(t.log_every, 1) == 0 or done == max_steps):
                    extra = "".join(f" {k} {row[k]:.4f}" for k in ("acc", "loss_tail", "acc_tail") if k in row)
                    console.print(f"train-var step {done}/{max_steps} loss {loss_sum:.4f}{extra} lr {row['lr']:.3e} "
                                  f"grad_norm {grad_norm:.3f}", highlight=False, soft_wrap=True)
                for cb in callbacks:
                    cb(row)
                stopping = stop.any_rank(accelerator)
                if (t.ckpt_every > 0 and done % t.ckpt_every == 0) or done == max_steps or stopping:
                    try:
                        last_saved = save(done)
                    except NonFiniteError as exc:
                        status, message = "diverged", f"{exc}; last good state {last_saved or 'none'}"
                        break
                if stopping:
                    status = "interrupted"
                    message = f"stopped by {stop.requested} at step {done}; saved {last_saved}; resume with --resume auto"
                    break
    finally:
        if progress is not None:
            progress.stop()
        if trackers:
            accelerator.end_training()
    if status == "interrupted" and last_saved is None:
        message += "; nothing new was saved"
    model_dir = run_dir / "var-last" if (run_dir / "var-last").is_dir() else None
    return TrainVARResult(steps=pos.step, run_dir=run_dir, model_dir=model_dir, history=history,
                          resumed_from=resumed_from, status=status, message=message,
                          exit_code=stop.exit_code if status == "interrupted" else (1 if status == "diverged" else 0),
                          launch=describe(accelerator))


def _all_finite(accelerator: Any, loss: Tensor) -> bool:
    """True when the loss is finite on every process (all processes then take the same branch)."""
    flag = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return bool(flag.item() == 0)
