"""Encode throughput of an official-size tokenizer on CPU (random weights): fp32 vs bf16.

Prints JSON: images/s for fp32 and bf16 autocast, the speed-up, and the fraction of tokens that
bf16 leaves equal to fp32. Usage:

    python bench/encode.py [--config configs/tokenizer/MSVR10P2-4096.yaml] [--batch 4] [--threads 2] [--iters 3]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def photos(n: int, size: int) -> torch.Tensor:
    """`n` real photos (scikit-image) resized to `size`, as [n, 3, size, size] in [-1, 1]."""
    from skimage import data, transform

    src = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = [transform.resize(src[i % len(src)], (size, size), anti_aliasing=True) for i in range(n)]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() * 2 - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(ROOT / "configs/tokenizer/MSVR10P2-4096.yaml"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from xqtool.config import load_tokenizer_config
    from xqtool.models.tokenizer import build_tokenizer

    cfg = load_tokenizer_config(args.config)
    tok = build_tokenizer(cfg).eval()
    x = photos(args.batch, cfg.model.image_size)

    def run(precision: str):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        with ctx:
            tokens = tok.encode(x)  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.iters):
                tokens = tok.encode(x)
            dt = time.perf_counter() - t0
        return tokens, args.batch * args.iters / dt

    fp32_tokens, fp32_ips = run("fp32")
    bf16_tokens, bf16_ips = run("bf16")

    # Random init leaves DINOv2's LayerScale at 1e-5, so the blocks barely act and agreement is trivially
    # high. Stress check: LayerScale 0.1 makes every block change the latents, as in a trained model.
    with torch.no_grad():
        for name, p in tok.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(0.1)
    with torch.inference_mode():
        stressed_fp32 = tok.encode(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stressed_bf16 = tok.encode(x)
    print(json.dumps({
        "config": Path(args.config).stem,
        "batch": args.batch,
        "threads": args.threads,
        "image_size": cfg.model.image_size,
        "fp32_images_per_s": round(fp32_ips, 3),
        "bf16_images_per_s": round(bf16_ips, 3),
        "bf16_speedup": round(bf16_ips / fp32_ips, 2),
        "bf16_token_agreement": round(float((fp32_tokens == bf16_tokens).float().mean()), 4),
        "bf16_token_agreement_active_blocks": round(float((stressed_fp32 == stressed_bf16).float().mean()), 4),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }, indent=2))


if __name__ == "__main__":
    main()
