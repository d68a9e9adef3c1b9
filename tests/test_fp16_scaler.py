"""fp16 training with its gradient scaler, on CPU (issue 11 §3; tokenizer.md §5.6, var.md §1.4).

Accelerate runs ``mixed_precision: fp16`` on a CPU as plain fp32 with no scaler, so these tests give the
Accelerator torch's CPU ``GradScaler`` and switch on its native-AMP path (scaled backward, unscale before
clipping, scaler-aware optimizer and scheduler steps) with autocast disabled, so the arithmetic stays fp32.
What they prove is
the scaler bookkeeping of both trainers, with expectations from first principles:

* loss scaling by a power of two is exact in fp32, so when nothing overflows the unscaled gradients the
  optimizer sees, and the weights after the steps, equal those of the fp32 run (this fails if gradients
  are clipped or fed to the adaptive GAN weight while still scaled, or if the scale is applied twice);
* a step whose scaled gradients overflow (an infinite gradient injected in the backward) is skipped,
  weights untouched, and the scale is halved (GradScaler's default backoff 0.5);
* VAR's scaler starts at 2^11 with growth interval 1000 and never exceeds 32768 (var.md §1.4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs

from conftest import photo_crops, to_tensor
from test_parity_training import photos  # noqa: F401  (the 8 + 4 photo folder fixture)
from xqtool.config import load_tokenizer_config

ROOT = Path(__file__).resolve().parents[1]


class _OverflowInBackward(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (what an fp16 overflow does to the scaled gradients)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * float("inf")


@pytest.fixture
def cpu_grad_scaler(monkeypatch):
    """Accelerators asked for fp16 on CPU get torch's CPU GradScaler (with the trainer's scaler settings)."""
    made = []
    original = Accelerator.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu":
            settings = self.scaler_handler.to_kwargs() if self.scaler_handler is not None else {}
            settings.update(made_settings)
            self.scaler = torch.amp.GradScaler("cpu", **settings)
            self.native_amp = True  # Accelerate's GPU fp16 path (unscale before clipping, scaled backward) ...
            self.autocast_handler = AutocastKwargs(enabled=False)  # ... with fp32 arithmetic
            made.append(self.scaler)

    made_settings: dict = {}
    monkeypatch.setattr(Accelerator, "__init__", init)
    AcceleratorState._reset_state()  # the process-wide state fixes mixed_precision at the first Accelerator
    yield made, made_settings
    AcceleratorState._reset_state()


# ---------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_run(photos: Path, out: Path, precision: str):
    """One step of the tiny CNN tokenizer with the GAN and its adaptive weight on (disc_start 1).

    Returns (gradients seen by the generator optimizer at each step, final generator weights, trainer).
    """
    from xqtool.training import TokenizerRunOptions, TokenizerTrainer

    cfg = load_tokenizer_config(ROOT / "configs/tokenizer/tiny-cnn.yaml", overrides=[
        "model.ch=8", "quant.codebook_size=16", "quant.codebook_embed_dim=4", "train.global_batch_size=4",
        "train.log_every=1", "train.tracker=none", "data.max_val_images=4", "train.eval_every=1000",
        "train.ckpt_every=1000", "train.ema=false", f"data.data_path={photos / 'train'}",
        f"data.val_data_path={photos / 'val'}", "loss.disc_start=1", "loss.disc_weight=0.5",
        # clipping on, at a norm the true gradients stay below but 2^16-scaled ones exceed: clipping before
        # unscaling would shrink them (the fused AdamW unscales inside its kernel, after the gradients are read here)
        "loss.disc_adaptive_weight=true", "train.lr=1e-3", "train.max_grad_norm=1000",
        f"train.mixed_precision={precision}"])
    AcceleratorState._reset_state()  # each run is its own process in real use
    torch.manual_seed(0)
    trainer = TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=out, max_steps=1, progress=False))
    inner = trainer.opt_g.optimizer
    names = {id(p): n for n, p in trainer.unwrapped.named_parameters()}
    grads: list = []
    inner.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
        {names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
         if p.grad is not None and id(p) in names}))
    result = trainer.run()
    weights = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    return grads, weights, trainer, result


def test_tokenizer_fp16_loss_scaling_is_transparent(photos: Path, tmp_path: Path, cpu_grad_scaler) -> None:
    made, _ = cpu_grad_scaler
    g32, w32, _, r32 = _tokenizer_run(photos, tmp_path / "fp32", "no")
    assert not made
    g16, w16, trainer, r16 = _tokenizer_run(photos, tmp_path / "fp16", "fp16")
    assert made and trainer.acc.scaler is made[0]
    assert made[0].get_scale() == 2.0**16  # GradScaler's default start; no overflow, no growth
    assert all(h["disc_weight"] > 0 for h in r16.history)  # the adaptive GAN weight was on
    assert [h["disc_adaptive_weight"] for h in r16.history] == pytest.approx(
        [h["disc_adaptive_weight"] for h in r32.history], rel=1e-4)
    # One step from the same weights: the unscaled, clipped gradients equal the fp32 run's to round-off. (A second
    # step would not be comparable: AdamW turns round-off-level gradients, e.g. of biases before a GroupNorm, into
    # full +-lr steps, so step 2 would start from weights that differ by chance.)
    assert len(g16) == len(g32) == 1
    a, b = g32[0], g16[0]
    assert set(a) == set(b)
    scale = max(v.abs().max().item() for v in a.values())
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5 * scale)


def test_tokenizer_fp16_overflow_skips_the_step_and_halves_the_scale(photos: Path, tmp_path: Path,
                                                                     cpu_grad_scaler) -> None:
    made, _ = cpu_grad_scaler
    from xqtool.training import TokenizerRunOptions, TokenizerTrainer

    cfg = load_tokenizer_config(ROOT / "configs/tokenizer/tiny-cnn.yaml", overrides=[
        "model.ch=8", "quant.codebook_size=16", "quant.codebook_embed_dim=4", "train.global_batch_size=4",
        "train.tracker=none", "train.ema=false", "train.eval_every=1000", "train.ckpt_every=1000",
        f"data.data_path={photos / 'train'}", f"data.val_data_path={photos / 'val'}", "loss.disc_type=none",
        "train.mixed_precision=fp16"])
    torch.manual_seed(0)
    trainer = TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=1, progress=False))
    trainer.unwrapped.decoder.register_forward_hook(lambda m, i, out: _OverflowInBackward.apply(out))
    before = {k: v.detach().clone() for k, v in trainer.unwrapped.named_parameters()}
    result = trainer.run()
    assert len(result.history) == 1 and made[0].get_scale() == 2.0**15  # 2^16 halved once
    for k, v in trainer.unwrapped.named_parameters():
        assert torch.equal(v.detach(), before[k]), f"{k} changed in a step whose scaled gradients overflowed"


# ---------------------------------------------------------------------------------------------- VAR
def _var_tokens(tmp_path: Path):
    from xqtool.data.tokens import TokenManifest, write_tokens
    from xqtool.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(load_tokenizer_config(ROOT / "configs/tokenizer/tiny-cnn.yaml")).eval()
    tokens = tok.encode(to_tensor(photo_crops(16, 32, seed=3)))
    write_tokens(tmp_path / "t.npy", tokens.numpy(),
                 TokenManifest.from_tokenizer(tok, labels=[i % 10 for i in range(16)], keys=[str(i) for i in range(16)]))
    return tok


def _var_run(tmp_path: Path, tok, name: str, precision: str, steps: int = 3):
    from safetensors.torch import load_file

    from xqtool.config import load_var_config
    from xqtool.training import TrainInjected, VARRunOptions, train_var

    AcceleratorState._reset_state()  # each run is its own process in real use
    torch.manual_seed(0)
    cfg = load_var_config(ROOT / "configs/var/tiny.yaml", [
        f"data.tokens={tmp_path / 't.npy'}", f"train.results_dir={tmp_path / name}", f"train.max_steps={steps}",
        "train.ckpt_every=0", "model.cond_drop_rate=0.0", "train.log_every=1", "train.max_grad_norm=0.5",
        f"train.mixed_precision={precision}"])
    res = train_var(cfg, VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
    return load_file(str(res.model_dir / "model.safetensors")), res


def test_var_fp16_scaler_follows_the_spec_and_is_transparent(tmp_path: Path, cpu_grad_scaler) -> None:
    made, _ = cpu_grad_scaler
    tok = _var_tokens(tmp_path)
    w32, r32 = _var_run(tmp_path, tok, "fp32", "no")
    w16, r16 = _var_run(tmp_path, tok, "fp16", "fp16")
    scaler = made[0]
    assert scaler.get_scale() == 2.0**11 and scaler.get_growth_interval() == 1000  # var.md §1.4
    assert [h["loss"] for h in r16.history] == pytest.approx([h["loss"] for h in r32.history], rel=1e-6)
    for k in w32:
        torch.testing.assert_close(w16[k], w32[k], rtol=1e-5, atol=1e-7)


def test_var_fp16_overflow_skips_the_step(tmp_path: Path, cpu_grad_scaler) -> None:
    from torch.nn.modules.module import register_module_forward_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from xqtool.models.var import VAR

    made, _ = cpu_grad_scaler
    before, after = [], []
    snap = lambda opt: [p.detach().clone() for g in opt.param_groups for p in g["params"]]  # noqa: E731
    hooks = [register_optimizer_step_pre_hook(lambda opt, a, kw: before.append(snap(opt))),
             register_optimizer_step_post_hook(lambda opt, a, kw: after.append(snap(opt))),
             register_module_forward_hook(lambda m, i, out: _OverflowInBackward.apply(out) if isinstance(m, VAR) else None)]
    try:
        tok = _var_tokens(tmp_path)
        w16, res = _var_run(tmp_path, tok, "fp16", "fp16", steps=2)
    finally:
        for h in hooks:
            h.remove()
    assert made[0].get_scale() == 2.0**9  # 2^11 halved at each of the two overflowing steps
    assert len(res.history) == 2 and len(before) == len(after) == 2
    for b, a in zip(before, after):  # the fused AdamW is called with found_inf set and leaves every weight as it was
        assert all(torch.equal(x, y) for x, y in zip(b, a))


def test_var_loss_scale_is_capped_at_32768() -> None:
    from xqtool.training.var_trainer import MAX_LOSS_SCALE, cap_loss_scale

    assert MAX_LOSS_SCALE == 32768.0
    high = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    high.scale(torch.ones(()))  # an iteration has started (the scale tensor exists)
    cap_loss_scale(high)
    assert high.get_scale() == 32768.0
    low = torch.amp.GradScaler("cpu", init_scale=2.0**11)
    cap_loss_scale(low)
    assert low.get_scale() == 2.0**11
    cap_loss_scale(None)  # fp32 / bf16: no scaler, nothing to do


@pytest.mark.parametrize("argv", [["train-tokenizer", "configs/tokenizer/tiny-cnn.yaml", "--max-steps", "1"],
                                  ["train-var", "configs/var/tiny.yaml", "-t", "unused", "--tokens", "unused.npy"]])
def test_fp16_training_on_cpu_is_refused_not_silently_fp32(tmp_path: Path, argv) -> None:
    """Accelerate runs fp16 on a CPU as fp32 without a scaler; a run reported as fp16 must not train that way."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-m", "xqtool", *argv, "-o", str(tmp_path / "run"),
                          "--set", "train.mixed_precision=fp16"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "fp16" in errors[0] and "bf16" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
