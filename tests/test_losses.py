"""GAN losses, LeCam, adaptive weight, semantic InfoNCE, DiffAug, EMA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xqtool.ema import EMAModel, EMAState
from xqtool.errors import ConfigError
from xqtool.losses import (
    DiffAug,
    LeCam,
    SemanticDistillLoss,
    adaptive_weight,
    clip_infonce,
    disc_loss_fn,
    disc_weight_at,
    fade_blur_schedule,
    gen_loss_fn,
    semantic_scale,
)
from xqtool.losses.diffaug import gaussian_blur, rand_cutout, rand_translation
from xqtool.losses.semantic import teacher_to_map


def test_hinge_values():
    real = torch.tensor([2.0, 0.0])
    fake = torch.tensor([-2.0, 0.0])
    # relu(1-2)=0, relu(1-0)=1 -> mean 0.5 ; relu(1-2)=0, relu(1+0)=1 -> 0.5 ; ½(0.5+0.5)=0.5
    assert disc_loss_fn("hinge")(real, fake).item() == pytest.approx(0.5)
    assert gen_loss_fn("hinge")(fake).item() == pytest.approx(1.0)


def test_non_saturating_generator_is_softplus_of_minus_logits():
    fake = torch.tensor([[-3.0, 0.5], [2.0, 0.0]])
    expected = F.softplus(-fake).mean()
    assert gen_loss_fn("non_saturating")(fake).item() == pytest.approx(expected.item(), rel=1e-6)
    # the reference's swapped-argument form gives a different value: make sure we are not it
    swapped = F.binary_cross_entropy_with_logits(torch.ones_like(fake), torch.sigmoid(fake).clamp(0, 1))
    assert not math.isclose(gen_loss_fn("non_saturating")(fake).item(), swapped.item(), rel_tol=1e-3)
    # a better fake (higher logit) lowers the generator loss
    assert gen_loss_fn("non_saturating")(fake + 1).item() < gen_loss_fn("non_saturating")(fake).item()


@pytest.mark.parametrize("kind", ["hinge", "vanilla", "non_saturating"])
def test_disc_losses_prefer_separated_logits(kind):
    fn = disc_loss_fn(kind)
    good = fn(torch.full((4,), 3.0), torch.full((4,), -3.0))
    bad = fn(torch.full((4,), -3.0), torch.full((4,), 3.0))
    assert good.item() < bad.item()
    g = gen_loss_fn(kind)
    assert g(torch.full((4,), 3.0)).item() < g(torch.full((4,), -3.0)).item()


def test_vanilla_equals_non_saturating_for_disc():
    r, f = torch.randn(8), torch.randn(8)
    assert disc_loss_fn("vanilla")(r, f).item() == pytest.approx(disc_loss_fn("non_saturating")(r, f).item(), rel=1e-5)


def test_unknown_loss_is_config_error():
    with pytest.raises(ConfigError, match="disc_loss"):
        disc_loss_fn("wasserstein")


def test_disc_weight_at():
    assert disc_weight_at(9, 10, 0.5) == 0.0
    assert disc_weight_at(10, 10, 0.5) == 0.5


def test_lecam_ema_and_value():
    lecam = LeCam(decay=0.5)
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    lecam.update(real, fake)
    assert lecam.ema_real.item() == pytest.approx(1.0)
    assert lecam.ema_fake.item() == pytest.approx(-1.0)
    # relu(2 - (-1))^2 = 9 ; relu(1 - (-2))^2 = 9
    val = lecam(real, fake)
    assert torch.isfinite(val) and val.item() == pytest.approx(18.0)
    assert "ema_real" in lecam.state_dict()


def test_adaptive_weight_finite_and_ratio():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 4))
    x = torch.randn(2, 4)
    out = x @ w
    nll = (out**2).mean()
    g = -out.mean()
    lam = adaptive_weight(nll, g, w)
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    assert torch.isfinite(lam) and not lam.requires_grad
    assert lam.item() == pytest.approx((gn / (gg + 1e-4)).item(), rel=1e-5)
    # zero adversarial gradient -> clamped to the max
    lam2 = adaptive_weight(nll, (w * 0).sum(), w)
    assert lam2.item() == pytest.approx(1e4)


def test_clip_infonce_matched_lower_than_shuffled():
    torch.manual_seed(0)
    t = torch.randn(8, 16)
    matched = clip_infonce(t.clone(), t, scale=5.0, normalize=True)
    shuffled = clip_infonce(t[torch.randperm(8)], t, scale=5.0, normalize=True)
    assert matched.item() < shuffled.item()
    assert matched.item() >= 0


def test_semantic_scale_schedule():
    assert semantic_scale(50, clip_norm=False, base_scale=1.0) == 1.0
    assert semantic_scale(0, clip_norm=True) == pytest.approx(1.0)
    assert semantic_scale(100, clip_norm=True) == pytest.approx(50.5)
    assert semantic_scale(250, clip_norm=True) == 100.0


def test_teacher_to_map_transposes_patches():
    b, n, e = 2, 4, 3
    feat = torch.arange(b * n * e, dtype=torch.float).view(b, n, e)
    m = teacher_to_map(feat)
    assert m.shape == (b, e, 2, 2)
    # channel c at (row, col) is token row*2+col's c-th feature
    assert torch.equal(m[1, 2, 1, 0], feat[1, 2, 2])
    assert teacher_to_map(torch.randn(2, 5)).shape == (2, 5, 1, 1)


def test_semantic_loss_skips_dropout_samples_and_trains_quant_conv():
    torch.manual_seed(0)
    qc = nn.Conv2d(12, 4, 1)
    loss_fn = SemanticDistillLoss(teacher_dim=12, embed_dim=4)
    student = torch.randn(6, 4, 3, 3, requires_grad=True)
    teacher = torch.randn(6, 12)
    loss = loss_fn(student, teacher, quant_conv=qc, n_drop=2)
    loss.backward()
    assert torch.isfinite(loss)
    assert student.grad[:2].abs().sum() == 0  # dropped samples receive no gradient
    assert student.grad[2:].abs().sum() > 0
    assert qc.weight.grad is not None and qc.weight.grad.abs().sum() > 0
    # own projection when quant_conv does not fit the teacher width
    assert SemanticDistillLoss.needs_own_projection(nn.Conv2d(8, 4, 1), 12, 4)
    own = SemanticDistillLoss(12, 4, own_projection=True)
    assert torch.isfinite(own(student, teacher, n_drop=0))


def test_diffaug_shapes_grad_and_effects():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    y = DiffAug(prob=1.0)(x, blur=1.0)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(DiffAug(prob=0.0)(x.detach()), x.detach())
    # cutout zeroes a square of round(0.2*16)=3 px per side (fully inside when centred)
    ones = torch.ones(2, 3, 20, 20)
    zeros = (rand_cutout(ones, 0.2) == 0).sum(dim=(1, 2, 3))
    assert (zeros > 0).all() and (zeros <= 3 * 4 * 4).all()
    # translation keeps the pixel values (some zero fill)
    t = rand_translation(ones, 0.125)
    assert set(t.unique().tolist()) <= {0.0, 1.0}
    # blur of a constant image is the constant, blur smooths noise
    assert torch.allclose(gaussian_blur(ones, 1.5), ones, atol=1e-6)
    noise = torch.randn(1, 3, 16, 16)
    assert gaussian_blur(noise, 1.5).std() < noise.std()


def test_fade_blur_schedule():
    assert fade_blur_schedule(5, 10, 0) == 1.0
    assert fade_blur_schedule(11, 10, 0) == 0.0
    assert fade_blur_schedule(15, 10, 10) == pytest.approx(0.5)


def test_ema_update_and_state_roundtrip():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMAModel(m, decay=0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m.train()
    m(torch.randn(4, 3))  # moves BN running stats
    before = ema.module[0].weight.clone()
    ema.update(m)
    assert torch.allclose(ema.module[0].weight, before + 0.5)
    assert torch.equal(ema.module[1].running_mean, m[1].running_mean)  # buffers follow the model
    st = EMAState(ema).state_dict()
    ema2 = EMAModel(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), decay=0.5)
    EMAState(ema2).load_state_dict(st)
    assert torch.equal(ema2.module[0].weight, ema.module[0].weight) and ema2.num_updates == 1
    assert all(not p.requires_grad for p in ema.module.parameters())
