"""The one reconstruction evaluator: images → tokens → images, scored batch by batch.

Used by the tokenizer trainer's validation (:meth:`xqtool.training.tokenizer_trainer.TokenizerTrainer.validate`)
and by ``eval-fid --rfid`` (:func:`xqtool.tasks.eval_fid.evaluate_rfid`). It owns the loop (image limit,
encode/decode), PSNR/SSIM per image, the exact code histogram (spec tokenizer.md §7: codebook usage over the whole
set) and the feature rows of originals and reconstructions for rFID. Callers add what only they need (grids,
LPIPS, PNGs, process reductions) on the :class:`ReconBatch` items it yields. Imports only metrics.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, List, Optional

import torch
from torch import Tensor

from xqtool.metrics import code_histogram, codebook_usage_metrics, from_uint8, image_features, psnr, ssim, to_uint8


@dataclass
class ReconBatch:
    """One evaluated batch: originals ``x`` and reconstructions ``recon`` ``[b,3,S,S]`` in [-1, 1] (device),
    their uint8 versions ``[b,3,S,S]``, token ids ``[b,P,L]`` and the reconstructions' features ``[b,F]`` (float32,
    CPU; None without an extractor)."""

    x: Tensor
    recon: Tensor
    x_u8: Tensor
    recon_u8: Tensor
    tokens: Tensor
    feats_fake: Optional[Tensor]


class ReconstructionEvaluator:
    """Reconstruct image batches through `model` (``encode``/``decode``) and accumulate the scores.

    Args:
        model: a tokenizer in eval mode (``encode`` ``[b,3,S,S]`` → ``[b,P,L]``, ``decode`` back).
        device: where images are encoded.
        uint8_metrics: score PSNR/SSIM on the uint8-quantised images (as if both were saved as PNG; on the CPU)
            instead of the float reconstructions (on `device`).
        extractor: feature extractor for rFID (through :func:`xqtool.metrics.image_features`); None: no features.
        autocast: mixed-precision context for encode/decode.
        limit: stop after this many images over all processes (None: the whole source).
        world: number of processes sharing the source (each sees 1/world of it).

    After iterating :meth:`batches`: ``psnr_sum``/``ssim_sum``/``count`` (float64 on `device`), ``psnr``/``ssim``
    (per-image values, CPU), ``hist`` (LongTensor ``[P,S,K]``, see :func:`xqtool.metrics.code_histogram`),
    ``feats_real``/``feats_fake`` (lists of float32 CPU features ``[b,F]``).
    """

    def __init__(self, model: Any, *, device: Any, uint8_metrics: bool = False,
                 extractor: Any = None,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, limit: Optional[int] = None,
                 world: int = 1) -> None:
        self.model, self.device, self.uint8_metrics = model, device, uint8_metrics
        self.extractor, self.autocast, self.limit, self.world = extractor, autocast, limit or None, world
        self.scales = getattr(model, "scales", None)  # None (toy tokenizers): all positions as one group
        self.psnr_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.ssim_sum = torch.zeros_like(self.psnr_sum)
        self.count = torch.zeros_like(self.psnr_sum)
        self.psnr: List[Tensor] = []
        self.ssim: List[Tensor] = []
        self.hist: Optional[Tensor] = None
        self.feats_real: List[Tensor] = []
        self.feats_fake: List[Tensor] = []
        self.seen = 0  # images of this process

    def batches(self, images: Iterable[Tensor]) -> Iterator[ReconBatch]:
        """Evaluate each image batch ``[b,3,S,S]`` in [-1, 1] of `images` (up to the limit); yield the results."""
        for x in images:
            if self.limit is not None:
                x = x[: max(0, self.limit - self.seen * self.world)]
            if x.shape[0] == 0:
                break
            yield self._evaluate(x.to(self.device))
            if self.limit is not None and self.seen * self.world >= self.limit:
                break

    @torch.no_grad()
    def _evaluate(self, x: Tensor) -> ReconBatch:
        with self.autocast():
            tokens = self.model.encode(x)
            recon = self.model.decode(tokens).float()
        self.seen += x.shape[0]
        x_u8, recon_u8 = to_uint8(x), to_uint8(recon)
        if self.uint8_metrics:
            x_u8, recon_u8 = x_u8.cpu(), recon_u8.cpu()
            a, b = from_uint8(x_u8), from_uint8(recon_u8)
        else:
            a, b = recon, x
        p, s = psnr(a, b), ssim(a, b)
        self.psnr.append(p.cpu())
        self.ssim.append(s.cpu())
        self.psnr_sum += p.double().sum().to(self.device)
        self.ssim_sum += s.double().sum().to(self.device)
        self.count += x.shape[0]
        h = code_histogram(tokens, int(self.model.codebook_size), self.scales).to(self.device)
        self.hist = h if self.hist is None else self.hist + h
        feats_fake = None
        if self.extractor is not None:
            feats_fake = image_features(self.extractor, recon_u8)
            self.feats_fake.append(feats_fake)
            self.feats_real.append(image_features(self.extractor, x_u8))
        return ReconBatch(x, recon, x_u8, recon_u8, tokens, feats_fake)

    def code_histogram(self) -> Tensor:
        """The code histogram ``[P,S,K]`` so far (zeros of the model's geometry before any batch)."""
        if self.hist is not None:
            return self.hist
        return torch.zeros(int(self.model.num_branches), len(self.scales or (0,)), int(self.model.codebook_size),
                           device=self.device, dtype=torch.long)

    def usage(self, hist: Optional[Tensor] = None) -> dict:
        """Codebook usage and perplexity (:func:`xqtool.metrics.codebook_usage_metrics`) of `hist` or this
        evaluator's histogram."""
        return codebook_usage_metrics(self.code_histogram() if hist is None else hist)


__all__ = ["ReconBatch", "ReconstructionEvaluator"]
