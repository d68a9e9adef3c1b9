"""Throughput of the product quantizer with MSVR10P2-4096 shapes (P=2, K=4096, D=32, 10 scales, 11x11).

Usage: python bench/quantize.py [--batch 32] [--seconds 3] [--device cpu] [--threads 1]
Prints one JSON object: quantize() images/s and ms/batch (inference_mode), training forward+backward
images/s and ms/batch, plus tokens_to_fhat and var_input ms/batch. Random weights; keeps well under 30 s.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from xqtool.quantize import ProductQuantizer, build_branch_quantizer

SCALES = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)


def _timeit(fn, budget_s: float, min_iters: int = 2) -> float:
    """Mean seconds per call of ``fn`` after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < budget_s:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0, help="time budget per measurement")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0 = torch default); 1 avoids spin-wait stalls on a shared machine")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    pq = ProductQuantizer(
        [build_branch_quantizer(codebook_size=4096, dim=32, scales=SCALES, side=11) for _ in range(2)],
        codebook_drop=0.1, start_drop=3,
    ).to(dev)
    B = args.batch
    z = [torch.randn(B, 32, 11, 11, device=dev) for _ in range(2)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    pq.eval()
    with torch.inference_mode():
        tokens = pq.quantize(z)

        def infer():
            pq.quantize(z)
            sync()

        t_q = _timeit(infer, args.seconds)

        def decode():
            pq.tokens_to_fhat(tokens)
            sync()

        t_d = _timeit(decode, args.seconds / 4)

        def var_in():
            pq.var_input(tokens)
            sync()

        t_v = _timeit(var_in, args.seconds / 4)

    pq.train()
    zg = [t.clone().requires_grad_(True) for t in z]

    def train_step():
        out = pq(zg)
        loss = out.loss["vq"] + out.loss["commit"] + out.quantized.square().mean()
        loss.backward()
        sync()

    t_t = _timeit(train_step, args.seconds)
    print(json.dumps({
        "config": "MSVR10P2-4096 shapes: P=2, K=4096, D=32, scales 1..11 (10), random weights",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch": B,
        "quantize_images_per_s": round(B / t_q, 1),
        "quantize_ms_per_batch": round(1e3 * t_q, 2),
        "tokens_to_fhat_ms_per_batch": round(1e3 * t_d, 2),
        "var_input_ms_per_batch": round(1e3 * t_v, 2),
        "train_fwd_bwd_images_per_s": round(B / t_t, 1),
        "train_fwd_bwd_ms_per_batch": round(1e3 * t_t, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
