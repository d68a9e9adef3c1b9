"""Benchmark: streaming `encode` throughput and peak memory vs. dataset size (tiny CNN tokenizer, CPU ok).

For each image count (default 1,000 and 4,000) it writes that many distinct 64x64 PNG crops of
scikit-image photos into a temporary folder, then runs ``encode_images`` in a FRESH subprocess and
reports images/s and the subprocess's peak RSS. Peak RSS must not grow with the image count
(encoding streams: memory is bounded by the batch size and the work unit, not the dataset).

Usage: python bench/encode_stream.py [--counts 1000 4000] [--batch-size 64] [--num-workers 0] [--device cpu]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tokenizer" / "tiny-cnn.yaml"


def make_images(folder: Path, n: int, side: int = 64) -> None:
    import numpy as np
    import skimage.data as sd
    from PIL import Image

    photos = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket()]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        p = photos[i % len(photos)]
        step = int(rng.integers(1, 4))
        h = side * step
        y = int(rng.integers(0, p.shape[0] - h))
        x = int(rng.integers(0, p.shape[1] - h))
        crop = p[y : y + h : step, x : x + h : step]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:06d}.png", compress_level=1)


def child(args: argparse.Namespace) -> None:
    import torch

    from xqtool.tasks.encode import EncodeSettings, encode_images

    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    res = encode_images(EncodeSettings(source=args.src, output=args.out, ckpt=args.ckpt, batch_size=args.batch_size,
                                       num_workers=args.num_workers, device=args.device, unit_size=args.unit_size))
    wall = time.perf_counter() - t0
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({
        "images": res.count,
        "encode_seconds": round(res.seconds, 3),
        "images_per_s": round(res.images_per_s, 1),
        "wall_seconds_incl_merge": round(wall, 3),
        "peak_rss_mb": round(self_kb / 1024, 1),
        "peak_rss_workers_mb": round(kids_kb / 1024, 1),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--unit-size", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch

    from xqtool.checkpoints import save_tokenizer
    from xqtool.config import load_tokenizer_config
    from xqtool.models.tokenizer import build_tokenizer

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        torch.manual_seed(0)
        save_tokenizer(tmpdir / "ckpt", build_tokenizer(load_tokenizer_config(TINY)))
        for n in args.counts:
            src = tmpdir / f"imgs{n}"
            make_images(src, n)
            cmd = [sys.executable, __file__, "--child", "--src", str(src), "--out", str(tmpdir / f"tok{n}.npy"),
                   "--ckpt", str(tmpdir / "ckpt"), "--batch-size", str(args.batch_size),
                   "--num-workers", str(args.num_workers), "--device", args.device,
                   "--unit-size", str(args.unit_size), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    rss = [r["peak_rss_mb"] for r in results]
    print(json.dumps({
        "benchmark": "encode_stream",
        "tokenizer": "tiny-cnn (32 px, P=2, scales 1,2,4,8, K=64)",
        "device": args.device,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "results": results,
        "peak_rss_growth_mb": round(rss[-1] - rss[0], 1) if len(rss) > 1 else 0.0,
    }, indent=1))


if __name__ == "__main__":
    main()
