"""Discriminators: shapes, key layout, frozen DINO outside the state_dict, missing-weights error."""

from __future__ import annotations

import pytest
import torch

from xqtool.errors import ConfigError, WeightsMissingError
from xqtool.losses import disc_loss_fn
from xqtool.models.discriminators import (
    BatchNormLocal,
    DinoDiscriminator,
    PatchGANDiscriminator,
    StyleGANDiscriminator,
    build_discriminator,
)

TINY_DINO = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2)


def test_patchgan_shape_and_keys():
    d = PatchGANDiscriminator(ndf=8, n_layers=3)
    out = d(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)
    keys = set(d.state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight", "main.11.weight"} <= keys


def test_stylegan_shape_and_power_of_two():
    d = StyleGANDiscriminator(32, base_channels=8, max_channels=32)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1)
    with pytest.raises(ConfigError):
        StyleGANDiscriminator(48)


def test_dinodisc_tiny_shapes_keys_and_frozen_backbone():
    torch.manual_seed(0)
    d = build_discriminator("dinodisc", 32, allow_random=True, overrides=TINY_DINO)
    assert isinstance(d, DinoDiscriminator)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    out = d(x)
    n = (32 // 8) ** 2
    assert out.shape == (3, 5 * n)
    sd = d.state_dict()
    assert all(k.startswith("heads.") for k in sd)  # frozen DINO not in the state_dict
    assert sd["heads.0.0.0.weight_orig"].shape == (16, 16, 1)
    assert sd["heads.0.1.fn.0.weight_v"].shape == (16 * 9,)
    assert sd["heads.4.2.weight_orig"].shape == (1, 16, 1)
    assert all(p.requires_grad for p in d.parameters())
    assert not any(p.requires_grad for p in d.backbone.parameters())
    # gradient reaches the input (for the generator) but not the frozen backbone
    x.requires_grad_(True)
    d(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.backbone.parameters())
    # larger inputs are resized / cropped to the backbone size
    assert d(torch.randn(2, 3, 48, 48)).shape == (2, 5 * n)


def test_dinodisc_without_weights_is_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("XQTOOL_DINO_DISC_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsMissingError):
        build_discriminator("dinodisc", 32, overrides=TINY_DINO)


def test_batchnorm_local_groups():
    bn = BatchNormLocal(4, virtual_bs=2)
    x = torch.randn(4, 4, 10) * 3 + 5
    y = bn(x)
    # each group of 2 samples is normalised on its own
    assert torch.allclose(y[:2].mean(dim=(0, 2)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y[2:].mean(dim=(0, 2)), torch.zeros(4), atol=1e-5)


@pytest.mark.parametrize("disc_type", ["patchgan", "stylegan", "dinodisc"])
def test_one_disc_step_reduces_loss(disc_type):
    torch.manual_seed(0)
    ov = {"patchgan": dict(ndf=8, n_layers=2), "stylegan": dict(base_channels=8, max_channels=16), "dinodisc": TINY_DINO}
    d = build_discriminator(disc_type, 32, allow_random=True, overrides=ov[disc_type])
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    fake = torch.zeros(8, 3, 32, 32)
    fn = disc_loss_fn("hinge")
    losses = []
    for _ in range(5):
        loss = fn(d(real), d(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_build_none_and_unknown():
    assert build_discriminator("none", 32) is None
    with pytest.raises(ConfigError, match="disc_type"):
        build_discriminator("samdisc", 32)
