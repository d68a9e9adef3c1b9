"""Tokenizer training throughput (images/s) and peak memory for the tiny configs.

Runs the real training loop (data loading, generator + discriminator steps, EMA) on scikit-image's
sample photos for a few steps per config and prints one JSON line per config. Usage:

    python bench/train_step.py [--configs tiny-cnn tiny-vit] [--steps 20] [--batch 8] [--threads 2] [--gan]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--configs", nargs="+", default=["tiny-cnn", "tiny-vit"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gan", action="store_true", help="discriminator active from step 1 (patchgan, LeCam)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from xqtool.config import load_tokenizer_config
    from xqtool.tasks.train_tokenizer import TokenizerTrainer, sample_photo_folder

    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        sample_photo_folder(photos, 32)
        for name in args.configs:
            overrides = [
                f"data.data_path={photos / 'train'}", f"data.val_data_path={photos / 'val'}",
                f"train.global_batch_size={args.batch}", "train.tracker=none", "train.eval_every=100000",
                "train.ckpt_every=100000", "train.best_metric=psnr", "train.log_every=1",
            ]
            if args.gan:
                overrides += ["loss.disc_start=0", "loss.disc_type=patchgan"]
            cfg = load_tokenizer_config(ROOT / "configs" / "tokenizer" / f"{name}.yaml", overrides=overrides)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            trainer = TokenizerTrainer(cfg, output_dir=Path(tmp) / name, max_steps=args.steps, progress=False)
            t0 = time.perf_counter()
            res = trainer.run()
            wall = time.perf_counter() - t0
            # steady-state speed: skip the first 20% of steps (warm-up, first batches)
            hist = res.history
            k = max(1, len(hist) // 5)
            steady = None
            if len(hist) > k + 1:
                n_img = (hist[-1]["step"] - hist[k]["step"]) * args.batch
                t_a = hist[k]["step"] * args.batch / hist[k]["images_per_sec"]
                t_b = hist[-1]["step"] * args.batch / hist[-1]["images_per_sec"]
                steady = n_img / max(1e-9, t_b - t_a)
            out = {
                "config": name, "steps": res.step, "batch": args.batch, "gan": args.gan, "threads": args.threads,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "images_per_sec": round(res.images_per_sec, 2),
                "images_per_sec_steady": round(steady, 2) if steady else None,
                "wall_s_incl_final_eval_ckpt": round(wall, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
                "rec_loss_first": round(hist[0]["rec_loss"], 4), "rec_loss_last": round(hist[-1]["rec_loss"], 4),
            }
            print(json.dumps(out))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
