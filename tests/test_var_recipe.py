"""VAR training recipe per var.md: on-the-fly image preprocessing (§1.5) and the validation pass (§3)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo_crops, to_tensor
from xqtool.config import load_tokenizer_config, load_var_config
from xqtool.data.tokens import TokenManifest, write_tokens
from xqtool.models.tokenizer import build_tokenizer
from xqtool.training import TrainInjected, VARRunOptions, train_var
from xqtool.training.var_data import build_data

ROOT = Path(__file__).resolve().parents[1]


def _photo(tmp_path: Path) -> Path:
    """One 400×600 photo (scikit-image coffee) in a class tree."""
    from skimage import data

    (tmp_path / "imgs" / "c").mkdir(parents=True)
    Image.fromarray(data.coffee()).save(tmp_path / "imgs" / "c" / "coffee.png")
    return tmp_path / "imgs"


def _find_crop(big: np.ndarray, crop: np.ndarray) -> bool:
    s = crop.shape[0]
    for top, left in zip(*np.nonzero((big[: big.shape[0] - s + 1, : big.shape[1] - s + 1] == crop[0, 0]).all(-1))):
        if np.array_equal(big[top:top + s, left:left + s], crop):
            return True
    return False


@pytest.mark.parametrize("hflip", [False, True])
def test_on_the_fly_images_are_lanczos_288_then_random_crop_256(tmp_path: Path, hflip: bool) -> None:
    """Each training image is a 256 crop of the photo resized (PIL LANCZOS) to a 288 shorter side; flipped crops
    appear only with data.hflip."""
    src = _photo(tmp_path)
    img = Image.open(next(src.rglob("*.png"))).convert("RGB")
    big = np.asarray(img.resize((432, 288), Image.LANCZOS))  # 600×400 → shorter side 288
    cfg = load_var_config(ROOT / "configs/var/tiny.yaml", [f"data.images={src}", f"data.hflip={hflip}",
                                                            "train.global_batch_size=1"])
    captured = SimpleNamespace(image_size=256, encode=lambda x: x)  # the "tokens" are the images themselves
    data, _ = build_data(cfg, captured, 1, 1, 0, 1, torch.device("cpu"))
    flips = []
    for micro in range(12):
        x, _ = data.next_batch()
        arr = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        plain = _find_crop(big, arr)
        flipped = _find_crop(big, np.ascontiguousarray(arr[:, ::-1]))
        assert plain or flipped, "not a crop of the LANCZOS 288 resize"
        flips.append(flipped and not plain)
    assert any(flips) == hflip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("varval")
    torch.manual_seed(0)
    tok = build_tokenizer(load_tokenizer_config(ROOT / "configs" / "tokenizer" / "tiny-cnn.yaml")).eval()
    for name, n, seed in (("train", 16, 3), ("val", 6, 9)):
        tokens = tok.encode(to_tensor(photo_crops(n, 32, seed=seed)))
        labels = [(i * 3 + seed) % 10 for i in range(n)]
        write_tokens(root / f"{name}.npy", tokens.numpy(),
                     TokenManifest.from_tokenizer(tok, labels=labels, keys=[f"{name}{i}" for i in range(n)]))
    return root, tok


def test_validation_pass_reports_held_out_loss_and_accuracy(tiny) -> None:
    """Validation every epoch (16 rows, batch 8 → 2 steps) and at the end; the numbers equal a hand computation on
    the final weights (log-softmax per branch, argmax)."""
    from xqtool.data.tokens import load_tokens
    from xqtool.checkpoints import load_var

    root, tok = tiny
    cfg = load_var_config(ROOT / "configs/var/tiny.yaml", [
        f"data.tokens={root / 'train.npy'}", f"data.val_tokens={root / 'val.npy'}", f"train.results_dir={root / 'r'}",
        "train.max_steps=5", "train.val_every_epochs=1", "train.val_batch_size=4", "train.ckpt_every=0",
        "model.cond_drop_rate=0.9"])  # training drops most labels; validation must drop none
    res = train_var(cfg, VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
    with_val = [h["step"] for h in res.history if "val/loss" in h]
    assert with_val == [2, 4, 5]
    model, _ = load_var(res.model_dir)
    tokens, _manifest = load_tokens(root / "val.npy")[:2]
    tokens = torch.from_numpy(np.array(tokens)).long()
    labels = torch.tensor([(i * 3 + 9) % 10 for i in range(6)])
    with torch.no_grad():
        logits = model(labels, tok.quantizer.var_input(tokens))
    lp = logits.view(6, model.L, 2, 64).log_softmax(-1)
    target = tokens.transpose(1, 2)
    ce = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    acc = (lp.argmax(-1) == target).float()
    last = res.history[-1]
    assert last["val/loss"] == pytest.approx(ce.mean().item(), rel=1e-5)
    assert last["val/acc"] == pytest.approx(acc.mean().item(), abs=1e-6)
    assert last["val/loss_tail"] == pytest.approx(ce[:, -64:].mean().item(), rel=1e-5)
    assert last["val/acc_tail"] == pytest.approx(acc[:, -64:].mean().item(), abs=1e-6)
