"""Shared fixtures: real photos from scikit-image, tiny configs, seeded RNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "tokenizer"
# Fixtures copied from the spec into the repository (the only place tests read them from; a missing file fails
# the test with FileNotFoundError, it is never skipped): official state-dict layouts and the golden numbers of
# the reference implementation (tests/data/golden/README.md).
DATA = ROOT / "tests" / "data"
LAYOUTS = DATA / "layouts"
GOLDEN = DATA / "golden"


def photo_crops(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """`n` distinct uint8 RGB crops [n, size, size, 3] cut from scikit-image's sample photos."""
    from skimage import data, transform

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = transform.resize(img[y : y + side, x : x + side], (size, size), anti_aliasing=True)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append((crop * 255).round().astype(np.uint8))
    return np.stack(out)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tiny_cnn_tokens(path: Path, n: int, seed: int, labels=None):
    """Random-init tiny CNN tokenizer (torch seed 0, eval) and the tokens ``[n, P, L]`` of `n` photo crops
    (crop seed `seed`), written to `path` (``.npy`` + manifest, keys ``img0`` ..) -> (tokenizer, tokens)."""
    from xqtool.config import load_tokenizer_config
    from xqtool.data.tokens import TokenManifest, write_tokens
    from xqtool.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(load_tokenizer_config(CONFIGS / "tiny-cnn.yaml")).eval()
    tokens = tok.encode(to_tensor(photo_crops(n, 32, seed=seed)))
    extra = {"labels": list(labels)} if labels is not None else {}
    manifest = TokenManifest.from_tokenizer(tok, keys=[f"img{i}" for i in range(n)], **extra)
    write_tokens(path, tokens.numpy(), manifest)
    return tok, tokens


def assert_same(x, y, where: str = "state") -> None:
    """Every tensor / array / value of two nested structures equal (same types), no key skipped."""
    assert type(x) is type(y), where
    if isinstance(x, torch.Tensor):
        assert x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_same(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same(u, v, f"{where}[{i}]")
    elif isinstance(x, np.ndarray) or hasattr(x, "shape"):  # numpy arrays, RNG keys, numpy scalars
        assert np.array_equal(x, y), where
    else:
        assert x == y, where


def assert_same_state(a: Path, b: Path) -> None:
    """Every tensor and value of two training states is identical (models, EMA, optimizers, schedulers,
    LeCam, data position, RNG), no key skipped."""
    from xqtool.checkpoints.training_state import load_verified

    sa, sb = load_verified(a), load_verified(b)
    assert sorted(sa.components) == sorted(sb.components)
    assert_same(sa.components, sb.components, "state")
    assert_same(sa.rng, sb.rng, "rng")


@pytest.fixture(autouse=True, scope="session")
def _cpu_math() -> None:
    from xqtool.runtime import configure_cpu_math

    configure_cpu_math()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def images32() -> torch.Tensor:
    """8 real photo crops as a [8, 3, 32, 32] tensor in [-1, 1]."""
    return to_tensor(photo_crops(8, 32))


@pytest.fixture
def tiny_cnn_cfg():
    from xqtool.config import load_tokenizer_config

    return load_tokenizer_config(CONFIGS / "tiny-cnn.yaml")


@pytest.fixture
def tiny_vit_cfg():
    from xqtool.config import load_tokenizer_config

    return load_tokenizer_config(CONFIGS / "tiny-vit.yaml")
