"""Fine-tuning: LoRA trains only adapters, frozen stays bit-identical, --freeze-codebook, merged export, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from xqtool.checkpoints import load_tokenizer, save_tokenizer
from xqtool.config import load_tokenizer_config
from xqtool.errors import ConfigError
from xqtool.models.tokenizer import build_tokenizer
from xqtool.tasks.finetune import FinetuneSettings, finetune_tokenizer
from xqtool.training import TokenizerRunOptions, TrainInjected
from xqtool.data.samples import sample_photo_folder
from xqtool.models.lora import apply_tuning, freeze_codebook

ROOT = Path(__file__).resolve().parents[1]
RUN = ["train.global_batch_size=4", "train.warmup_steps=0", "train.log_every=1", "train.tracker=none",
       "loss.disc_type=none", "train.eval_every=100", "train.ckpt_every=100", "train.best_metric=psnr",
       "train.lr=1e-2", "data.max_val_images=4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    photos = root / "photos"
    sample_photo_folder(photos, 32)
    cfg = load_tokenizer_config(ROOT / "configs/tokenizer/tiny-vit.yaml",
                                overrides=["model.vit_embed_dim=16", "quant.codebook_size=16", "quant.codebook_embed_dim=4"])
    torch.manual_seed(0)
    base = root / "base"
    save_tokenizer(base, build_tokenizer(cfg))
    run = load_tokenizer_config(ROOT / "configs/tokenizer/tiny-vit.yaml", overrides=RUN + [
        f"data.data_path={photos / 'train'}", f"data.val_data_path={photos / 'val'}"])
    return root, base, run


def test_lora_encoder_frozen_decoder(setup, tmp_path):
    root, base, run = setup
    ref = load_file(base / "model.safetensors")
    res = finetune_tokenizer(run, FinetuneSettings(source=base, enc="lora", dec="frozen"),
                             TokenizerRunOptions(output_dir=tmp_path / "ft", max_steps=3, progress=False))
    assert res.status == "finished"
    raw = load_file(tmp_path / "ft" / "last" / "model.safetensors")
    pre = "encoder.model.base_model.model."
    lora_b = [k for k in raw if "lora_B" in k]
    assert lora_b and any(raw[k].abs().sum() > 0 for k in lora_b)  # adapters trained (B starts at zero)
    for k, v in raw.items():
        if k.startswith(pre) and "lora_" not in k and "modules_to_save" not in k:
            orig = "encoder.model." + k[len(pre):].replace(".base_layer", "").replace(".original_module", "")
            assert torch.equal(v, ref[orig]), k  # LoRA leaves the base backbone weights untouched
        if k.startswith("decoder.model."):
            assert torch.equal(v, ref[k]), k  # frozen: bit-identical
    # merged export loads as a normal checkpoint; encoder MLP weights now carry the merged delta
    assert res.export_dir is not None and (res.export_dir / "adapter_encoder" / "adapter_config.json").is_file()
    tok = load_tokenizer(res.export_dir, prefer_ema=False)
    sd = tok.state_dict()
    fc = "encoder.model.blocks.0.mlp.fc1.weight"
    assert not torch.equal(sd[fc], ref[fc])
    assert torch.equal(sd["encoder.model.blocks.0.attn.qkv.weight"], ref["encoder.model.blocks.0.attn.qkv.weight"])
    assert all(torch.equal(sd[k], ref[k]) for k in ref if k.startswith("decoder.model."))


def test_freeze_codebook_via_cli(setup, tmp_path):
    root, base, run = setup
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text((ROOT / "configs/tokenizer/tiny-vit.yaml").read_text())
    args = ["finetune", str(cfg_path), "-t", str(base), "--enc", "full", "--dec", "full", "--freeze-codebook",
            "-o", str(tmp_path / "ft"), "--max-steps", "2", "--no-progress"]
    for s in RUN + [f"data.data_path={run.data.data_path}", f"data.val_data_path={run.data.val_data_path}"]:
        args += ["--set", s]
    import xqtool.cli

    r = CliRunner().invoke(xqtool.cli.app, args)
    assert r.exit_code == 0, r.output
    ref = load_file(base / "model.safetensors")
    new = load_file(tmp_path / "ft" / "export" / "model.safetensors")
    frozen = [k for k in ref if k.startswith(("quantizer.", "quant_conv.")) and ref[k].is_floating_point()
              and "ema_vocab_hit" not in k]
    assert frozen and all(torch.equal(new[k], ref[k]) for k in frozen)
    assert not torch.equal(new["post_quant_conv.weight"], ref["post_quant_conv.weight"])  # the rest trains


def test_bad_tuning_requests(setup):
    root, base, run = setup
    cnn = build_tokenizer(load_tokenizer_config(ROOT / "configs/tokenizer/tiny-cnn.yaml"))
    with pytest.raises(ConfigError, match="conv targets"):
        apply_tuning(cnn, "encoder", "lora")
    with pytest.raises(ConfigError, match="match no supported layer"):
        apply_tuning(cnn, "encoder", "lora", targets=r"nothing_matches_\d+")
    stats = apply_tuning(cnn, "decoder", "lora", targets=r".*conv_out")
    assert stats["trainable"] > 0 and stats["frozen"] > 0
    names = freeze_codebook(cnn)
    assert any("embedding" in n for n in names) and "quant_conv.weight" in names
    import xqtool.cli

    r = CliRunner().invoke(xqtool.cli.app, ["finetune", str(ROOT / "configs/tokenizer/tiny-vit.yaml"), "-t",
                                            str(base), "--enc", "half"])
    assert r.exit_code == 2 and "--enc must be one of" in r.output


def test_finetune_default_output_is_fresh_and_resume_works(setup, tmp_path):
    """Case 8 (issue 13): a fresh default dir next to the source; the printed advice works; LoRA resume is exact."""
    import os
    import shutil
    import signal

    from conftest import assert_same_state

    root, base, run = setup
    src = tmp_path / "src"
    shutil.copytree(base, src)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text((ROOT / "configs/tokenizer/tiny-vit.yaml").read_text())
    args = ["finetune", str(cfg_path), "-t", str(src), "--enc", "lora", "--dec", "frozen", "--max-steps", "2",
            "--no-progress"]
    for s in RUN + [f"data.data_path={run.data.data_path}", f"data.val_data_path={run.data.val_data_path}",
                    f"train.results_dir={src}"]:  # a config pointing at the source run must not matter
        args += ["--set", s]
    import xqtool.cli

    r = CliRunner().invoke(xqtool.cli.app, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "src-finetune" / "export" / "model.safetensors").is_file()
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in base.iterdir())  # source untouched
    again = CliRunner().invoke(xqtool.cli.app, args)
    assert again.exit_code == 2 and "--resume auto" in again.output
    follow = CliRunner().invoke(xqtool.cli.app, args[:-len(args) + args.index("--max-steps")] + ["--max-steps", "3"]
                                + args[args.index("--max-steps") + 2:] + ["--resume", "auto"])
    assert follow.exit_code == 0, follow.output
    # LoRA + frozen parts: interrupted at step 2 and resumed == 4 steps straight, every tensor
    settings = FinetuneSettings(source=src, enc="lora", dec="frozen")
    kw = dict(max_steps=4, progress=False)
    finetune_tokenizer(run, settings, TokenizerRunOptions(output_dir=tmp_path / "a", **kw))

    def stop_at_2(tr):
        if tr.pos.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    r1 = finetune_tokenizer(run, settings, TokenizerRunOptions(output_dir=tmp_path / "b", **kw),
                            TrainInjected(callbacks=[stop_at_2]))
    assert r1.status == "interrupted" and r1.exit_code == 143
    r2 = finetune_tokenizer(run, settings, TokenizerRunOptions(output_dir=tmp_path / "b", resume="auto", **kw))
    assert r2.status == "finished" and r2.step == 4
    assert_same_state(tmp_path / "a" / "checkpoints" / "step-0000004", tmp_path / "b" / "checkpoints" / "step-0000004")
