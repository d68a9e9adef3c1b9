"""Tokenizer training run for the multi-process tests (launched by torchrun from tests/test_multiprocess.py).

usage: python _mp_tok_driver.py PHOTOS OUT BATCH STEPS [--resume] [--hold-at N]

Tiny CNN tokenizer with the StyleGAN discriminator (adaptive weight, LeCam), EMA and a random-init
semantic teacher, all world-size independent (no quantizer dropout, no batch-norm discriminator).
``--hold-at N``: after step N,
write OUT/held-N and sleep, so the test can signal or kill a rank mid-run.
Rank 0 writes OUT/result-<world>.json (history, validation metrics, status).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from xqtool.config import load_tokenizer_config
from xqtool.training import TokenizerRunOptions, TrainInjected, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def config(photos: Path, batch: int, overrides: Sequence[str] = ()):  # noqa: ANN201
    """The tiny, world-size independent tokenizer config of these tests."""
    return load_tokenizer_config(ROOT / "configs/tokenizer/tiny-cnn.yaml", overrides=[
        "model.ch=8", "model.z_channels=8", "quant.codebook_size=16", "quant.codebook_drop=0",
        f"train.global_batch_size={batch}", "train.warmup_steps=0", "train.log_every=1", "train.tracker=none",
        "train.eval_every=3", "train.ckpt_every=3", "train.ema_decay=0.8", "train.best_metric=psnr",
        "loss.disc_type=stylegan", "loss.disc_start=1", "loss.lecam_loss_weight=0.1",
        "loss.semantic_guide=dinov2", "loss.sem_loss_weight=0.1",
        f"data.data_path={photos / 'train'}", f"data.val_data_path={photos / 'val'}", "data.max_val_images=8",
        *overrides,
    ])


def run(photos: Path, out: Path, batch: int, steps: int, resume: Optional[str] = None, hold_at: Optional[int] = None,
        overrides: Sequence[str] = ()):  # noqa: ANN201
    """Train (any world size) -> TrainResult."""
    rank = int(os.environ.get("RANK", "0"))
    cfg = config(photos, batch, overrides)

    def hook(tr) -> None:  # noqa: ANN001
        if hold_at is not None and tr.pos.step == hold_at:
            (out / f"held-{rank}").write_text(str(os.getpid()))
            t0 = time.time()  # wait for the test to signal / kill a rank, then write OUT/release
            while not (out / "release").exists() and time.time() - t0 < 60:
                time.sleep(0.05)

    from xqtool.metrics import TorchFeatureExtractor

    # tiny stand-in for Inception (mean colour): rFID runs through the cross-rank feature gather
    fx = TorchFeatureExtractor(lambda x: torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 1).flatten(1), name="tiny")
    torch.manual_seed(1234)
    res = train_tokenizer(cfg, TokenizerRunOptions(output_dir=out, resume=resume, max_steps=steps, progress=False),
                          TrainInjected(allow_random_weights=True, feature_extractor=fx,
                                        disc_overrides=dict(base_channels=4, max_channels=8),
                                        teacher_overrides=dict(embed_dim=16, depth=1, num_heads=2, patch_size=8),
                                        callbacks=[hook]))
    return res


def main() -> None:
    photos, out, batch, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    args = sys.argv[5:]
    hold_at = int(args[args.index("--hold-at") + 1]) if "--hold-at" in args else None
    # the trainer handles SIGTERM while it runs; afterwards, let rank 0 write its result even when the
    # launcher already tears the other ranks down
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    res = run(photos, out, batch, steps, resume="auto" if "--resume" in args else None, hold_at=hold_at)
    if int(os.environ.get("RANK", "0")) == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        (out / f"result-{world}.json").write_text(json.dumps(
            {"status": res.status, "step": res.step, "history": res.history, "val": res.last_val,
             "launch": getattr(res, "launch", ""), "message": res.message}, default=str))
    sys.exit(0 if res.status == "finished" else 143)


if __name__ == "__main__":
    main()
