"""Fine-tune a trained tokenizer (xqtool directory or official XQ-GAN ``.pt``) on new images (spec §6).

Entry point: :func:`finetune_tokenizer` (config + :class:`FinetuneSettings` +
:class:`~xqtool.training.options.TokenizerRunOptions` + :class:`~xqtool.training.options.TrainInjected`).
Flow: load the checkpoint (EMA weights preferred) → apply the encoder / decoder tuning methods
(``full`` | ``lora`` | ``frozen``) and optionally freeze the codebook → train with
:class:`xqtool.training.tokenizer_trainer.TokenizerTrainer` (its optimizer is built afterwards, from parameters
that require grad, so LoRA parameters are trained and frozen ones are not even in the optimizer) →
export ``OUT/export`` as a normal xqtool checkpoint with LoRA merged (raw + EMA weights) and each LoRA
adapter alone in ``OUT/export/adapter_{encoder,decoder}`` (peft ``save_pretrained``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from xqtool.config import TokenizerConfig
from xqtool.errors import CheckpointError
from xqtool.models.lora import DEFAULT_LORA_TARGETS, apply_tuning, freeze_codebook, has_lora, merge_lora, save_adapters
from xqtool.training.build import rfid_extractor
from xqtool.training.options import TokenizerRunOptions, TrainInjected
from xqtool.training.tokenizer_trainer import TokenizerTrainer, TrainResult

log = logging.getLogger(__name__)


def _load_base(path: os.PathLike, cfg: TokenizerConfig) -> Any:
    from xqtool.checkpoints import load_tokenizer

    try:
        return load_tokenizer(path, prefer_ema=True)
    except CheckpointError as exc:
        if "carries no config" not in str(exc):
            raise
        return load_tokenizer(path, config=cfg, prefer_ema=True)


def default_output_dir(from_path: os.PathLike) -> Path:
    """Fresh run directory next to the source, never the source's own run: ``runs/a/best`` →
    ``runs/a-best-finetune``; ``ckpts/x.pt`` → ``ckpts/x-finetune``. The same source always maps to the same
    directory, so ``--resume auto`` finds an interrupted fine-tune. A registry name or ``hf://`` reference →
    ``runs/NAME-finetune``."""
    if not Path(from_path).exists():  # a model name or hf:// reference
        import re

        return Path("runs") / (re.sub(r"[^A-Za-z0-9._-]+", "-", str(from_path).replace("hf:/", "")).strip("-.")
                               + "-finetune")
    src = Path(from_path).absolute()
    if src.is_dir() and src.parent.name and (src.parent / "config.yaml").is_file():  # a checkpoint inside a run
        return src.parent.parent / f"{src.parent.name}-{src.name}-finetune"
    return src.parent / f"{src.stem if src.is_file() else src.name}-finetune"


@dataclass
class FinetuneSettings:
    """What ``xqtool finetune`` tunes (see :func:`finetune_tokenizer`).

    Attributes:
        source: the tokenizer to start from: xqtool checkpoint directory, official ``.pt`` or model name.
        enc / dec: tuning method of the encoder / decoder, ``full`` | ``lora`` | ``frozen`` (default
            ``model.enc_tuning_method`` / ``model.dec_tuning_method`` of the config).
        freeze_codebook: keep codebooks, phi convs and quant_conv fixed so that token ids keep their meaning.
        lora_rank / lora_alpha / lora_targets: LoRA rank, alpha and the regex of adapted modules (default
            ``model.lora_*`` of the config, targets :data:`xqtool.models.lora.DEFAULT_LORA_TARGETS`).
    """

    source: os.PathLike
    enc: Optional[str] = None
    dec: Optional[str] = None
    freeze_codebook: bool = False
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_targets: Optional[str] = None


def finetune_tokenizer(cfg: TokenizerConfig, settings: FinetuneSettings, run: Optional[TokenizerRunOptions] = None,
                       injected: Optional[TrainInjected] = None) -> TrainResult:
    """Fine-tune the tokenizer at ``settings.source`` with the training settings of `cfg`; export at the end.

    The architecture (``model``/``quant`` sections) comes from the checkpoint; `cfg` supplies ``loss``, ``data``
    and ``train``. ``run.output_dir`` defaults to :func:`default_output_dir` (never the source's run, whatever
    ``train.results_dir`` says); ``run.resume="auto"`` continues an interrupted fine-tune there (LoRA, frozen
    parts, optimizer, EMA). `injected` as for :func:`xqtool.training.train_tokenizer` (``injected.tokenizer`` is
    not read: the tokenizer is the loaded source; an ``injected.on_finish`` runs after the export). Unless the
    run diverged, ``OUT/export`` gets the merged checkpoint and the adapters (``result.export_dir``,
    ``result.adapter_dirs``).
    """
    s = settings
    run = run or TokenizerRunOptions()
    run = dataclasses.replace(run, output_dir=Path(run.output_dir) if run.output_dir else default_output_dir(s.source))
    tok = _load_base(s.source, cfg)
    m = cfg.model
    enc = s.enc or m.enc_tuning_method
    dec = s.dec or m.dec_tuning_method
    rank = int(s.lora_rank or m.lora_rank)
    alpha = s.lora_alpha if s.lora_alpha is not None else m.lora_alpha
    targets = s.lora_targets or m.lora_targets or DEFAULT_LORA_TARGETS
    run_model = dataclasses.replace(tok.model_cfg, enc_tuning_method=enc, dec_tuning_method=dec, lora_rank=rank,
                                    lora_alpha=alpha, lora_targets=targets)
    run_cfg = dataclasses.replace(cfg, model=run_model, quant=tok.quant_cfg)
    if (m.image_size, cfg.quant.codebook_size) != (tok.model_cfg.image_size, tok.quant_cfg.codebook_size):
        log.warning("model/quant settings of the config differ from the checkpoint's: the checkpoint's are used")
    tok.train()
    torch.manual_seed(cfg.train.global_seed)  # LoRA init: the same fine-tune from the same source, every time
    apply_tuning(tok, "encoder", enc, rank=rank, alpha=alpha, targets=targets)
    apply_tuning(tok, "decoder", dec, rank=rank, alpha=alpha, targets=targets)
    if s.freeze_codebook:
        frozen = freeze_codebook(tok)
        log.info("frozen for stable token ids: %d tensors (codebooks, phi convs, quant_conv)", len(frozen))

    injected = injected or TrainInjected()
    then = injected.on_finish

    def on_finish(trainer: TokenizerTrainer, result: TrainResult) -> None:
        if result.status != "diverged":
            result.export_dir, result.adapter_dirs = export_finetuned(trainer, Path(trainer.out) / "export")
        if then is not None:
            then(trainer, result)

    extractor = injected.feature_extractor if injected.feature_extractor is not None else rfid_extractor(run_cfg)
    injected = dataclasses.replace(injected, tokenizer=tok, feature_extractor=extractor, on_finish=on_finish)
    return TokenizerTrainer(run_cfg, run, injected).run()


def export_finetuned(trainer: TokenizerTrainer, directory: Path) -> tuple:
    """Write the merged tokenizer (raw + EMA) as a normal xqtool checkpoint and the LoRA adapters alone."""
    from xqtool.checkpoints import save_model_dir

    adapters = []
    if trainer.acc.is_main_process:
        raw = trainer.unwrapped
        lora = has_lora(raw)
        merged = merge_lora(copy.deepcopy(raw)) if lora else raw
        ema_state = None
        if trainer.ema is not None:
            ema_mod = merge_lora(copy.deepcopy(trainer.ema.module)) if lora else trainer.ema.module
            ema_state = ema_mod.state_dict()
        cfg = trainer.cfg
        out_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, enc_tuning_method="full",
                                                                     dec_tuning_method="full"))
        save_model_dir(directory, merged.state_dict(), out_cfg, ema_state)
        if lora:
            adapters = save_adapters(raw, directory)
    trainer.acc.wait_for_everyone()
    return directory, adapters


__all__ = ["FinetuneSettings", "default_output_dir", "export_finetuned", "finetune_tokenizer"]
