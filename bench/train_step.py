"""Seconds per training step of the tokenizer and of VAR, on a fixed batch (data loading excluded).

Cases (``--what``, several allowed; each runs in its own process so that peak RSS is its own):

* ``tok-msvr10p2``: tokenizer MSVR10P2-4096 (ViT-B encoder/decoder, P=2, 10 scales, DINOv2 ViT-B
  semantic teacher, LPIPS-VGG16, DINO ViT-S discriminator, GAN + adaptive weight + LeCam on from
  step 1), batch 2 at 256 px. Random weights everywhere (same cost as pretrained ones). One step =
  the trainer's ``_micro_step`` (generator forward/backward/AdamW, discriminator forward/backward/AdamW)
  + scheduler + EMA update, exactly what ``train-tokenizer`` runs per optimizer step.
* ``var-d6`` (batch 8) and ``var-d17`` (batch 8 by default) on MSVR10P2-4096 tokens: teacher-forcing
  input from the quantizer, forward, cross-entropy, backward, grad clipping, AdamW — the ``train-var`` step.

Per case one JSON line: wall seconds per step (median, min, max, all), CPU seconds per step (process time:
the better figure on a shared machine), minor page faults per step, images/s, peak RSS, FLOPs of one step
(counted once with ``torch.utils.flop_counter.FlopCounterMode``), achieved GFLOP/s, and on CUDA peak
memory, TFLOP/s and MFU against the chip's bf16 (or fp32) dense peak. ``--profile`` also prints the
top operators of one step (torch.profiler) to stderr and adds them, with the number of copy calls, to
the JSON. Usage::

    OMP_NUM_THREADS=1 python bench/train_step.py --what tok-msvr10p2 var-d6 --threads 1 --steps 5
    python bench/train_step.py --what var-d17 --device cuda --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = ("tok-msvr10p2", "var-d6", "var-d17")
DEFAULT_BATCH = {"tok-msvr10p2": 2, "var-d6": 8, "var-d17": 8}
# dense peak FLOP/s of known accelerators: (bf16, fp32 non-tensor-core)
PEAKS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12),
         "L4": (121e12, 30.3e12), "A10": (125e12, 31.2e12), "4090": (165e12, 82.6e12)}


# ---------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_step(args: argparse.Namespace, tmp: Path) -> tuple[Callable[[], None], Dict[str, Any]]:
    from xqtool.config import load_tokenizer_config

    try:
        from xqtool.data.samples import sample_photo_folder
        from xqtool.training import TokenizerTrainer
    except ImportError:  # xqtool before the training/ package (for before/after comparisons)
        from xqtool.tasks.train_tokenizer import TokenizerTrainer, sample_photo_folder  # type: ignore[no-redef]

    train_dir, _ = sample_photo_folder(tmp / "photos", 256)
    prec = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision]
    overrides = [f"data.data_path={train_dir}", f"data.val_data_path={train_dir}",
                 f"train.global_batch_size={args.batch}", "train.tracker=none", f"train.mixed_precision='{prec}'",
                 "loss.disc_start=0", "data.num_workers=0"]
    import xqtool  # the configs of the xqtool being measured (also when this file runs against another tree)

    configs = Path(xqtool.__file__).resolve().parents[1] / "configs"
    cfg = load_tokenizer_config(configs / "tokenizer" / "MSVR10P2-4096.yaml", overrides=overrides)
    try:
        from xqtool.training import TokenizerRunOptions, TrainInjected
    except ImportError:  # xqtool before the run-options / injected objects: the trainer's keywords
        trainer = TokenizerTrainer(cfg, output_dir=tmp / "run", max_steps=10**6, allow_random_weights=True,
                                   progress=False)
    else:
        trainer = TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=tmp / "run", max_steps=10**6, progress=False),
                                   TrainInjected(allow_random_weights=True))
    if args.compile:
        trainer.tok = torch.compile(trainer.tok)
    x = next(trainer._batches()).to(trainer.acc.device)
    state = {"step": 0}

    def step() -> None:
        state["step"] += 1
        _, ok = trainer._micro_step(x, state["step"])
        if not ok:
            raise RuntimeError("non-finite loss in the benchmark step")
        trainer.sched_g.step()
        if trainer.ema is not None:
            trainer.ema.update(trainer.unwrapped)

    info = {"params_generator": sum(p.numel() for g in trainer.opt_g.param_groups for p in g["params"]),
            "optimizer": _opt_kind(trainer.opt_g)}
    return step, info


# ---------------------------------------------------------------------------------------------- VAR
def _var_step(args: argparse.Namespace, depth: int) -> tuple[Callable[[], None], Dict[str, Any]]:
    try:
        from xqtool.config import VARModelConfig, VARTrainConfig
    except ImportError:  # xqtool before the config package
        from xqtool.config_var import VARModelConfig, VARTrainConfig  # type: ignore[no-redef]
    from xqtool.models.var import VAR
    from xqtool.quantize.factory import build_branch_quantizer
    from xqtool.quantize.product import ProductQuantizer
    try:
        from xqtool.training import build as tv
        from xqtool.training import var_trainer as tv_loss
    except ImportError:  # older xqtool (for before/after comparisons)
        from xqtool.tasks import train_var as tv  # type: ignore[no-redef]

        tv_loss = tv

    dev = torch.device(args.device)
    from xqtool import runtime  # the process settings train-var applies

    runtime.configure_cpu_math()
    if dev.type == "cpu" and hasattr(runtime, "configure_cpu_allocator"):
        runtime.configure_cpu_allocator()
    scales = [1, 1, 2, 3, 3, 4, 5, 6, 8, 11]
    quantizer = ProductQuantizer([build_branch_quantizer(codebook_size=4096, dim=32, scales=scales, side=11)
                                  for _ in range(2)]).to(dev).eval().requires_grad_(False)
    model = VAR(VARModelConfig(depth=depth, patch_nums=scales, codebook_size=4096, num_branches=2,
                               branch_dim=32)).to(dev)
    if args.compile:
        model = torch.compile(model)
    tcfg = VARTrainConfig(max_grad_norm=2.0, mixed_precision={"fp32": "no"}.get(args.precision, args.precision))
    if hasattr(tv, "build_optimizer"):
        optimizer = tv.build_optimizer(model, tcfg, dev)
    else:  # older xqtool (for before/after comparisons): what its train_var built
        optimizer = torch.optim.AdamW(tv.param_groups(model, tcfg.weight_decay), lr=tcfg.tblr,
                                      betas=(tcfg.beta1, tcfg.beta2), **({"fused": True} if dev.type == "cuda" else {}))
    tf_loss = getattr(tv_loss, "teacher_forcing_loss", None) or _old_teacher_forcing_loss
    g = torch.Generator().manual_seed(0)
    L = sum(p * p for p in scales)
    tokens = torch.randint(0, 4096, (args.batch, 2, L), generator=g).to(dev)
    labels = torch.randint(0, 1000, (args.batch,), generator=g).to(dev)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model.train()

    def step() -> None:
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _, _ = tf_loss(model, quantizer, tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], tcfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, {"params": sum(p.numel() for p in model.parameters()), "optimizer": _opt_kind(optimizer)}


def _old_teacher_forcing_loss(model: Any, quantizer: Any, tokens: torch.Tensor, labels: torch.Tensor) -> Any:
    """The step of xqtool versions without ``train_var.teacher_forcing_loss`` (before/after comparisons)."""
    import torch.nn.functional as F

    with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
        x = quantizer.var_input(tokens).float()
    targets = tokens.transpose(1, 2)
    logits = model(labels, x, drop_cond=True)
    logits4 = logits.view(logits.shape[0], -1, 2, 4096)
    return F.cross_entropy(logits4.float().flatten(0, 2), targets.flatten()), logits4, targets


def _opt_kind(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default"


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _count_flops(step: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return int(fc.get_total_flops())


def _profile(step: Callable[[], None], device: str, top: int) -> Dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    ka = prof.key_averages()
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(ka.table(sort_by=sort, row_limit=top), file=sys.stderr)
    rows = sorted(ka, key=lambda e: e.self_device_time_total if device.startswith("cuda") else e.self_cpu_time_total,
                  reverse=True)
    copies = sum(e.count for e in ka if e.key in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat"))
    return {"copy_calls": {e.key: e.count for e in ka if e.key in ("aten::copy_", "aten::clone", "aten::cat")},
            "copy_like_calls": copies,
            "top_ops": [{"op": e.key, "calls": e.count, "self_s": round(e.self_cpu_time_total / 1e6, 4)}
                        for e in rows[:top]]}


def _peak(device: str, precision: str, override: Optional[float]) -> Optional[float]:
    if override:
        return override * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, fp32) in PEAKS.items():
        if key in name:
            return bf16 if precision in ("bf16", "fp16") else fp32
    return None


def run_case(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.what == "tok-msvr10p2":
            step, info = _tokenizer_step(args, Path(tmp))
        else:
            step, info = _var_step(args, 6 if args.what == "var-d6" else 17)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        _sync(args.device)
        warm_s = time.perf_counter() - t0
        flops = _count_flops(step)
        times: List[float] = []
        cpu_times: List[float] = []
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(args.steps):
            t, c = time.perf_counter(), time.process_time()
            step()
            _sync(args.device)
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / max(1, args.steps)
        prof = _profile(step, args.device, args.top) if args.profile else None
    med = statistics.median(times)
    out: Dict[str, Any] = {
        "case": args.what, "batch": args.batch, "device": args.device, "precision": args.precision,
        "threads": args.threads, "compile": args.compile, "torch": torch.__version__, **info,
        "steps": args.steps, "warmup_s": round(warm_s, 3),
        "s_per_step_median": round(med, 4), "s_per_step_min": round(min(times), 4),
        "s_per_step_max": round(max(times), 4), "s_per_step_all": [round(t, 4) for t in times],
        "cpu_s_per_step_median": round(statistics.median(cpu_times), 4),
        "cpu_s_per_step_all": [round(t, 4) for t in cpu_times],
        "images_per_s": round(args.batch / med, 3), "minor_page_faults_per_step": int(faults),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "gflop_per_step": round(flops / 1e9, 2), "achieved_gflop_s": round(flops / med / 1e9, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["achieved_tflop_s"] = round(flops / med / 1e12, 2)
        peak = _peak(args.device, args.precision, args.peak_tflops)
        out["mfu"] = round(flops / med / peak, 4) if peak else None
    if prof is not None:
        out.update(prof)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", nargs="+", choices=CASES, default=list(CASES),
                    help="cases to run (default: all three; var-d17 alone needs ~9 GB and ~15 s per step on a CPU)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup; default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 2 tokenizer, 8 VAR)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="(default fp32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the tokenizer / VAR model")
    ap.add_argument("--profile", action="store_true", help="print the top operators of one step (stderr)")
    ap.add_argument("--top", type=int, default=25, help="operators shown by --profile")
    ap.add_argument("--peak-tflops", type=float, default=None, help="chip peak for MFU (default: known GPUs)")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1) or args.threads < 1:
        ap.error("--steps, --batch and --threads must be at least 1, --warmup at least 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is visible here")
    if len(args.what) > 1:  # one process per case: its own peak RSS, no allocator carry-over
        for what in args.what:
            cmd = [sys.executable, __file__, "--what", what] + [a for a in _passthrough(args)]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(ROOT), os.environ.get("PYTHONPATH", "")])})
        return
    args.what = args.what[0]
    args.batch = args.batch or DEFAULT_BATCH[args.what]
    print(json.dumps(run_case(args)), flush=True)


def _passthrough(args: argparse.Namespace) -> List[str]:
    out = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--device", args.device, "--precision", args.precision, "--top", str(args.top)]
    if args.batch:
        out += ["--batch", str(args.batch)]
    if args.compile:
        out.append("--compile")
    if args.profile:
        out.append("--profile")
    if args.peak_tflops:
        out += ["--peak-tflops", str(args.peak_tflops)]
    return out


if __name__ == "__main__":
    main()
