"""Lower bound on VAR sampling time: the transformer's GEMMs and the tokenizer decode alone.

Runs only the unavoidable dense work of one sampling batch with CFG, with the same kernels ``xqtool sample`` uses:
each block's four linears (qkv, proj, fc1+GELU, fc2) at the real per-scale row counts 2B·pn², the head, and the
tokenizer decode of B images. Attention, filtering, draws and the quantizer are left out, so
``max_images_per_s`` is an upper bound on what any sampler built on these kernels can reach here.

    python bench/sample_floor.py --threads 2       # d17 + MSVR10P2-4096, batch 2, fp32

Prints one JSON object; ``gemm_gflops`` is the sustained rate over all the transformer's GEMMs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=17)
    ap.add_argument("--tokenizer-config", default=str(ROOT / "configs/tokenizer/MSVR10P2-4096.yaml"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    ap.add_argument("--repeats", type=int, default=3, help="report the best of this many passes")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--no-pack", action="store_true", help="MKL F.linear instead of oneDNN pre-packed weights")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from xqtool.config import VARModelConfig, load_tokenizer_config
    from xqtool.models.tokenizer import build_tokenizer
    from xqtool.models.var import VAR

    torch.manual_seed(0)
    tok = build_tokenizer(load_tokenizer_config(args.tokenizer_config)).eval().requires_grad_(False)
    var = VAR(VARModelConfig(depth=args.depth, patch_nums=tuple(tok.scales), codebook_size=tok.codebook_size,
                             num_branches=tok.num_branches, branch_dim=tok.embed_dim)).eval().requires_grad_(False)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rows = [2 * args.batch * pn * pn for pn in var.patch_nums]
    c, hidden = var.C, var.blocks[0].ffn.fc1.out_features
    flops = sum(2 * m * (c * 3 * c + c * c + 2 * c * hidden) * var.depth + 2 * m * c * var.V for m in rows)

    def linears(x, h) -> None:
        for blk in var.blocks:
            a, f = blk.attn, blk.ffn
            if a.packed is not None:
                a.packed[0](x), a.packed[1](x), f.packed[0](x), f.packed[1](h)
            else:
                a.mat_qkv(x), a.proj(x), torch.nn.functional.gelu(f.fc1(x), approximate="tanh"), f.fc2(h)
        (var.packed_head or var.head)(x)

    inputs = [(torch.randn(m, c).to(dtype), torch.randn(m, hidden).to(dtype)) for m in rows]
    side = tok.quantizer.quantizes[0].side
    f_hat = torch.randn(args.batch, sum(int(q.dim) for q in tok.quantizer.quantizes), side, side)
    amp = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    gemm, decode = [], []
    with torch.no_grad(), contextlib.ExitStack() as stack:
        packed = (not args.no_pack) and stack.enter_context(var.packed_linears(dtype))
        if dtype != torch.float32 and not packed:
            var.to(dtype)
        for _ in range(args.repeats + 1):  # the first pass warms up
            t0 = time.perf_counter()
            for x, h in inputs:
                linears(x, h)
            gemm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with amp:
                tok.decode_fhat(f_hat)
            decode.append(time.perf_counter() - t0)
    g, d = min(gemm[1:]), min(decode[1:])
    print(json.dumps({
        "depth": args.depth, "batch": args.batch, "threads": torch.get_num_threads(), "precision": args.precision,
        "packed_linears": bool(packed), "rows_per_scale": rows, "gemm_gflop": round(flops / 1e9, 1),
        "gemm_seconds": round(g, 3), "gemm_gflops": round(flops / g / 1e9, 1), "decode_seconds": round(d, 3),
        "floor_seconds_per_batch": round(g + d, 3), "max_images_per_s": round(args.batch / (g + d), 3),
    }, indent=1))


if __name__ == "__main__":
    main()
