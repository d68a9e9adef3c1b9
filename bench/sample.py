"""Benchmark VAR sampling: images/s and peak memory with and without the KV cache, and the speed-up.

Random weights, tokenizer decode included, class-conditional with CFG (the batch is doubled internally).

    python bench/sample.py                                   # small depth on CPU (tiny tokenizer)
    python bench/sample.py --depth 17 --tokenizer-config configs/tokenizer/MSVR10P2-4096.yaml \
        --batch 2 --threads 2 --batches 1 --skip-nocache      # the d17 CPU target (fp32)
    python bench/sample.py --depth 17 --tokenizer-config configs/tokenizer/MSVR10P2-4096.yaml \
        --batch 16 --device cuda --precision bf16            # GPU

Prints one JSON object. CPU peak memory is the process's max RSS (monotonic over the run);
CUDA peak memory is ``torch.cuda.max_memory_allocated`` per measurement. ``load_avg`` is the 1-minute load
average before and after each measurement and ``cpu_seconds`` the process CPU time: on a shared machine wall time
collapses when other jobs take a core (every parallel kernel then waits for a descheduled thread), so quote
figures with their load. ``--profile N`` adds the N largest op totals (self CPU seconds, calls) of one extra
profiled batch, which is the better yardstick for comparing code changes on a busy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _build(args: argparse.Namespace):
    from xqtool.config import VARModelConfig, load_tokenizer_config
    from xqtool.models.tokenizer import build_tokenizer
    from xqtool.models.var import VAR

    torch.manual_seed(0)
    tcfg = load_tokenizer_config(args.tokenizer_config)
    tok = build_tokenizer(tcfg).eval().requires_grad_(False)
    with torch.no_grad():  # random, finite weights everywhere (spec §7.16)
        for p in tok.parameters():
            if not torch.isfinite(p).all():
                p.normal_(0, 0.02)
    cfg = VARModelConfig(depth=args.depth, width=args.width, num_heads=args.heads,
                         patch_nums=tuple(tok.scales), codebook_size=tok.codebook_size,
                         num_branches=tok.num_branches, branch_dim=tok.embed_dim)
    var = VAR(cfg).eval().requires_grad_(False)
    dev = torch.device(args.device)
    return var.to(dev), tok.to(dev), dev


def _measure(var, tok, dev, args, use_cache: bool) -> dict:
    from xqtool.models.var_sampling import sample_tokens

    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    labels = torch.arange(args.batch, device=dev) % var.num_classes

    def one(b: int) -> None:
        out = sample_tokens(var, tok.quantizer, labels, seeds=[b * args.batch + i for i in range(args.batch)],
                            cfg=3.25, top_k=750, top_p=0.95, use_cache=use_cache, amp_dtype=amp)
        with torch.no_grad(), (torch.autocast(dev.type, dtype=amp) if amp else torch.autocast(dev.type, enabled=False)):
            img = tok.decode_fhat(out.f_hat)
        assert torch.isfinite(img).all()

    for _ in range(args.warmup):
        one(-1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    per_batch = []
    for b in range(args.batches):
        tb = time.perf_counter()
        one(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        per_batch.append(time.perf_counter() - tb)
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    load1 = os.getloadavg()[0]
    n = args.batches * args.batch
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    per_batch.sort()
    res = {"images_per_s": round(n / sec, 4), "seconds": round(sec, 3), "cpu_seconds": round(cpu, 3), "images": n,
           "batch_seconds_median": round(per_batch[len(per_batch) // 2], 3),
           "batch_seconds_best": round(per_batch[0], 3),
           "peak_mem_mb": round(peak, 1), "load_avg": [round(load0, 2), round(load1, 2)]}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one(args.batches)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        res["profile_self_cpu_s"] = round(sum(e.self_cpu_time_total for e in ops) / 1e6, 3)
        res["profile_top_ops"] = {e.key: [round(e.self_cpu_time_total / 1e6, 3), e.count] for e in ops[:args.profile]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=None, help="default 64·depth")
    ap.add_argument("--heads", type=int, default=None, help="default depth")
    ap.add_argument("--tokenizer-config", default=str(ROOT / "configs/tokenizer/tiny-cnn.yaml"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--skip-nocache", action="store_true", help="only the KV-cache path (slow models)")
    ap.add_argument("--no-pack", action="store_true",
                    help="CPU: keep MKL linears instead of oneDNN pre-packed ones (VAR.packed_linears)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile one batch and report the N largest op totals (0 = off)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    var, tok, dev = _build(args)
    res = {"device": str(dev), "threads": torch.get_num_threads(), "depth": args.depth, "width": var.C,
           "params": sum(p.numel() for p in var.parameters()), "batch": args.batch, "precision": args.precision,
           "tokenizer": Path(args.tokenizer_config).name, "cfg": 3.25, "top_k": 750, "top_p": 0.95}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    with contextlib.ExitStack() as stack:
        tp = time.perf_counter()
        res["packed_linears"] = (not args.no_pack) and stack.enter_context(var.packed_linears(compute))
        res["pack_seconds"] = round(time.perf_counter() - tp, 3)
        res["kv_cache"] = _measure(var, tok, dev, args, True)
        if not args.skip_nocache:
            res["no_cache"] = _measure(var, tok, dev, args, False)
            res["speedup"] = round(res["kv_cache"]["images_per_s"] / res["no_cache"]["images_per_s"], 3)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
