"""encode / sample / train-var / eval-fid --rfid / probe at any world size (tests/test_multiprocess.py).

usage: python _mp_tasks_driver.py BASE OUT   (BASE from the test's fixture: tok/, imgs/, shards/, tokens/, var/)
Every output goes under OUT; the test compares a 2-process launch with a 1-process call of :func:`run`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_features(images_u8: torch.Tensor) -> torch.Tensor:
    """Deterministic stand-in for Inception: mean colour of each 4x4 cell -> [B, 48]."""
    return torch.nn.functional.adaptive_avg_pool2d(images_u8.float() / 255.0, 4).flatten(1)


def run(base: Path, out: Path) -> None:
    from xqtool.config import load_var_config
    from xqtool.distributed import main_process_only
    from xqtool.metrics import TorchFeatureExtractor
    from xqtool.tasks.encode import EncodeSettings, encode_images
    from xqtool.tasks.eval_fid import RfidSettings, evaluate_rfid
    from xqtool.tasks.injected import Injected
    from xqtool.tasks.probe import ProbeOptim, ProbeSettings, run_probe
    from xqtool.tasks.sample import SampleSettings, sample_images
    from xqtool.training import VARRunOptions, train_var

    out.mkdir(parents=True, exist_ok=True)
    tok = base / "tok"
    # encode: a folder into .npy (work units split over ranks), 2 shards into a shard folder with
    # 2 workers per process (fewer shards than processes x workers)
    encode_images(EncodeSettings(source=base / "imgs", output=out / "enc.npy", ckpt=tok, batch_size=3, unit_size=2))
    encode_images(EncodeSettings(source=str(base / "shards" / "shard-{000000..000001}.tar"),
                                 output=out / "enc-shards", ckpt=tok, batch_size=2, num_workers=2))
    # sample: per-image seeds, PNGs and the merged .npz
    sample_images(SampleSettings(var_ckpt=base / "var", tokenizer_ckpt=tok, labels=[1, 3, 5, 7, 2], cfg=2.0, top_k=20,
                                 seed=7, batch_size=2, out_dir=out / "png", npz=out / "s.npz", cpu=True))
    # train-var on .npy tokens and on token shards
    for name, tokens in (("var-npy", base / "tokens.npy"), ("var-shards", base / "token-shards")):
        cfg = load_var_config(ROOT / "configs/var/tiny.yaml", [
            f"data.tokens={tokens}", f"data.tokenizer={tok}", f"train.results_dir={out / name}",
            "train.max_steps=3", "train.ckpt_every=0", "train.log_every=1", "model.cond_drop_rate=0"])
        res = train_var(cfg, VARRunOptions(cpu=True))
        if res.launch and int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
            (out / f"{name}.json").write_text(json.dumps({"launch": res.launch, "history": res.history}))
    # eval-fid --rfid and probe run in one process (rank 0 reads everything, the others return)
    if main_process_only("eval-fid"):
        rep = evaluate_rfid(RfidSettings(tokenizer=tok, data=base / "imgs", lpips="off", kid=False, batch_size=4,
                                         report_path=out / "rfid.json"),
                            Injected(feature_extractor=TorchFeatureExtractor(tiny_features, name="tiny")))
        probe = run_probe(ProbeSettings(ckpt=tok, train=base / "imgs", val=base / "imgs", features="all",
                                        out_dir=out / "probe", optim=ProbeOptim(epochs=2, batch_size=4)))
        (out / "probe.json").write_text(json.dumps({"best_top1": probe["best_top1"],
                                                     "history": probe["history"]}, default=str))
        del rep


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]))
