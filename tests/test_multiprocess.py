"""Several real processes (2 gloo CPU processes via torchrun): equality with one process, agreed stop,
a rank dying, exact resume, launch checks. Each launch has a timeout, so a hang fails instead of blocking."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _mp import ROOT, TESTS, finish, mp_env, one_thread, torchrun, wait_for
from xqtool.data.samples import sample_photo_folder

DRIVER = TESTS / "_mp_tok_driver.py"
BATCH, STEPS, LR = 8, 6, 2e-4


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mp-photos") / "sample"
    sample_photo_folder(root, 32)
    return root


@pytest.fixture(scope="module")
def two_proc_run(photos, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run of STEPS steps at global batch BATCH (4 per process)."""
    out = tmp_path_factory.mktemp("mp-ref") / "run"
    out.mkdir()
    proc = torchrun([DRIVER, photos, out, BATCH, STEPS], log=out.parent / "log.txt")
    assert finish(proc) == 0, (out.parent / "log.txt").read_text()[-3000:]
    return out


def _result(out: Path) -> dict:
    return json.loads((out / "result-2.json").read_text())


def _close(a: float, b: float, rel: float = 1e-4, abs_: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_global_batch(photos, two_proc_run, tmp_path):
    """2 procs x batch 4 == 1 proc x batch 8: losses, weights, EMA and validation (disc + LeCam + adaptive
    weight, EMA, semantic teacher on); the logged validation equals re-validating the saved EMA."""
    import _mp_tok_driver

    res2 = _result(two_proc_run)
    assert res2["status"] == "finished" and res2["step"] == STEPS
    assert res2["launch"].startswith("2 processes, backend gloo, device cpu, precision fp32"), res2["launch"]
    with one_thread():
        res1 = _mp_tok_driver.run(photos, tmp_path / "one", BATCH, STEPS)
    assert res1.launch.startswith("1 process,")
    assert len(res1.history) == len(res2["history"]) == STEPS
    for h1, h2 in zip(res1.history, res2["history"]):
        for k in ("rec_loss", "train_loss", "vq_loss", "commit_loss", "sem_loss", "generator_adv_loss",
                  "disc_adaptive_weight", "discriminator_adv_loss", "lecam_loss", "logits_real", "logits_fake"):
            if k in h1:
                assert _close(h1[k], h2[k]), (h1["step"], k, h1[k], h2[k])
    assert "lecam_loss" in res1.history[-1] and "sem_loss" in res1.history[-1]
    for name in ("model", "ema"):
        a, b = load_file(tmp_path / "one" / "last" / f"{name}.safetensors"), load_file(two_proc_run / "last" / f"{name}.safetensors")
        diffs = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a if a[k].is_floating_point()])
        # float-summation noise; Adam can turn it into at most ~lr per step for the few weights whose
        # gradient is ~0 (conv biases before GroupNorm)
        assert float(diffs.max()) <= 2 * LR * STEPS and float((diffs > 1e-5).double().mean()) < 0.02, name
    assert res2["val"]["val/images"] == 8 and math.isfinite(res2["val"]["val/rfid"])
    usage = sorted(k for k in res1.last_val if k.startswith("val/codebook_usage"))
    assert usage
    for k in ("val/psnr", "val/ssim", "val/rfid", *usage):
        assert _close(res1.last_val[k], res2["val"][k], rel=1e-4 if k == "val/rfid" else 1e-5), k

    # re-validate the EMA that the 2-process run saved, in this (1) process: PSNR of the first 8 val images
    from xqtool.checkpoints import load_tokenizer
    from xqtool.data.images import make_loader
    from xqtool.metrics import psnr

    tok = load_tokenizer(two_proc_run / "last").eval()
    batch = next(iter(make_loader(photos / "val", image_size=32, batch_size=8)))
    with torch.no_grad():
        value = float(psnr(tok.decode(tok.encode(batch["image"])).float(), batch["image"]).double().mean())
    assert _close(value, res2["val"]["val/psnr"], rel=1e-5), (value, res2["val"]["val/psnr"])

    # resuming a 2-process run in one process is refused in one line, unless asked for (approximate)
    import shutil

    from xqtool.errors import ConfigError

    shutil.copytree(two_proc_run, tmp_path / "cont", ignore=shutil.ignore_patterns("result-*"))
    with pytest.raises(ConfigError, match="saved run used 2 processes, this one 1"):
        _mp_tok_driver.run(photos, tmp_path / "cont", BATCH, STEPS + 1, resume="auto")
    res = _mp_tok_driver.run(photos, tmp_path / "cont", BATCH, STEPS + 1, resume="auto",
                             overrides=["train.allow_batch_change=true"])
    assert res.status == "finished" and res.step == STEPS + 1 and math.isfinite(res.history[-1]["train_loss"])


def _launch_held(photos: Path, out: Path, hold: int, log: str, resume: bool = True) -> subprocess.Popen:
    for p in list(out.glob("held-*")) + [out / "release"]:
        p.unlink(missing_ok=True)
    args = [DRIVER, photos, out, BATCH, STEPS, "--hold-at", hold] + (["--resume"] if resume else [])
    proc = torchrun(args, log=out.parent / log)
    wait_for([out / "held-0", out / "held-1"], proc)
    return proc


def _newest_state(out: Path) -> str:
    from xqtool.checkpoints.training_state import list_states

    states = list_states(out)
    return states[-1].name if states else "(no complete state)"


@pytest.mark.slow
def test_sigterm_kill_and_resume_end_bit_identical(photos, two_proc_run, tmp_path):
    """SIGTERM to the launcher, then to one rank: all ranks save at that step and exit; a rank killed
    mid-run: the other stops with one line; resuming ends bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    out.mkdir()
    # 1. SIGTERM to the launcher (torchrun forwards it): both ranks save step 2 together
    proc = _launch_held(photos, out, 2, "log1.txt", resume=False)
    os.kill(proc.pid, signal.SIGTERM)
    (out / "release").touch()
    finish(proc)
    assert _newest_state(out) == "step-0000002", (out.parent / "log1.txt").read_text()[-3000:]
    assert {"rng-0.safetensors", "rng-1.safetensors"} <= {p.name for p in (out / "checkpoints/step-0000002").iterdir()}
    assert _result(out)["status"] == "interrupted"

    # 2. SIGTERM to rank 1 only: every rank stops at step 4 and saves it
    proc = _launch_held(photos, out, 4, "log2.txt")
    os.kill(int((out / "held-1").read_text()), signal.SIGTERM)
    (out / "release").touch()
    finish(proc)
    assert _newest_state(out) == "step-0000004", (out.parent / "log2.txt").read_text()[-3000:]
    assert _result(out)["status"] == "interrupted" and _result(out)["step"] == 4

    # 3. rank 1 killed at step 5: rank 0 stops with one line (no hang); nothing newer than step 4 is kept
    proc = _launch_held(photos, out, 5, "log3.txt")
    os.kill(int((out / "held-1").read_text()), signal.SIGKILL)
    (out / "release").touch()
    assert finish(proc) != 0
    log3 = (out.parent / "log3.txt").read_text()
    assert "PeerLostError: another process of train-tokenizer stopped" in log3, log3[-3000:]
    assert _newest_state(out) == "step-0000004"

    # 4. resume to the end: bit-identical to the uninterrupted 2-process run
    proc = torchrun([DRIVER, photos, out, BATCH, STEPS, "--resume"], log=out.parent / "log4.txt")
    assert finish(proc) == 0, (out.parent / "log4.txt").read_text()[-3000:]
    for rel in ("last/model.safetensors", "last/ema.safetensors"):
        a, b = load_file(two_proc_run / rel), load_file(out / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    ref_state, state = two_proc_run / "checkpoints/step-0000006", out / "checkpoints/step-0000006"
    names = sorted(p.name for p in ref_state.iterdir())
    assert names == sorted(p.name for p in state.iterdir())
    for name in names:
        _assert_same_file(ref_state / name, state / name)


def _assert_same_file(a: Path, b: Path) -> None:
    """Same tensors (bit for bit) and metadata for .safetensors (whose header order is not stable), same
    JSON apart from the per-file checksums (of those headers), same bytes otherwise."""
    if a.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
            assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys()), a.name
            for k in fa.keys():
                assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), (a.name, k)
    elif a.suffix == ".json":
        ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
        ja.pop("files", None), jb.pop("files", None)
        assert ja == jb, a.name
    else:
        assert a.read_bytes() == b.read_bytes(), a.name


def test_check_launch_reports_a_wrong_launch_in_one_line(monkeypatch):
    from xqtool.distributed import LaunchError, check_launch

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(k, raising=False)
    check_launch(1)
    # --multi_gpu on a machine without GPUs: WORLD_SIZE=2 but each process is alone
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="ACCELERATE_USE_CPU=true"):
        check_launch(1)
    check_launch(2)
    monkeypatch.delenv("WORLD_SIZE")
    # accelerate launch's single-process launcher given a rendezvous (--cpu --num_processes 2)
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    with pytest.raises(LaunchError, match="single process"):
        check_launch(1)


@pytest.mark.slow
def test_accelerate_launch_cpu_num_processes_2_is_refused(tmp_path):
    """The command docs/training.md used to give: accelerate starts ONE process; xqtool says so (exit 2)."""
    env = mp_env(cpu=False)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "xqtool", "train-tokenizer",
           str(ROOT / "configs/tokenizer/tiny-cnn.yaml"), "-o", str(tmp_path / "run"), "--max-steps", "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(ROOT))
    assert r.returncode != 0
    assert "accelerate launch started a single process" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def task_inputs(tmp_path_factory) -> Path:
    """tok/ (tiny CNN, random init), imgs/ (2 classes x 5 photos), shards/ (2 image shards), tokens.npy,
    token-shards/ and var/ (tiny VAR, random init)."""
    from _data_fixtures import write_class_tree
    from xqtool.checkpoints import save_tokenizer
    from xqtool.config import load_tokenizer_config, load_var_config
    from xqtool.models.tokenizer import build_tokenizer
    from xqtool.models.var import VAR
    from xqtool.tasks.encode import EncodeSettings, encode_images
    from xqtool.tasks.injected import Injected
    from xqtool.tasks.make_shards import make_shards
    from xqtool.checkpoints import save_var

    base = tmp_path_factory.mktemp("mp-tasks")
    torch.manual_seed(0)
    tok = build_tokenizer(load_tokenizer_config(ROOT / "configs/tokenizer/tiny-cnn.yaml")).eval()
    save_tokenizer(base / "tok", tok)
    write_class_tree(base / "imgs", per_class=5)
    make_shards(base / "imgs", base / "shards", maxcount=5, image_format="png")
    encode_images(EncodeSettings(source=base / "imgs", output=base / "tokens.npy"), Injected(tokenizer=tok))
    encode_images(EncodeSettings(source=base / "imgs", output=base / "token-shards"), Injected(tokenizer=tok))
    save_var(base / "var", VAR(load_var_config(ROOT / "configs/var/tiny.yaml").model))
    return base


@pytest.mark.slow
def test_encode_sample_train_var_eval_probe_match_one_process(task_inputs, tmp_path):
    """2 processes give the same tokens (rows, order), samples, VAR weights, rFID/PSNR and probe numbers."""
    import numpy as np

    import _mp_tasks_driver
    from xqtool.data.tokens import load_tokens

    two, one = tmp_path / "two", tmp_path / "one"
    proc = torchrun([TESTS / "_mp_tasks_driver.py", task_inputs, two], log=tmp_path / "log.txt")
    assert finish(proc) == 0, (tmp_path / "log.txt").read_text()[-4000:]
    with one_thread():
        _mp_tasks_driver.run(task_inputs, one)

    for name in ("enc.npy", "enc-shards"):
        t1, m1 = load_tokens(one / name)
        t2, m2 = load_tokens(two / name)
        assert m2.keys == m1.keys and len(set(m2.keys)) == len(m2.keys) == 10, name  # no duplicates or gaps
        assert m2.labels == m1.labels and np.array_equal(t1, t2), name
    assert np.array_equal(np.load(one / "s.npz")["arr_0"], np.load(two / "s.npz")["arr_0"])
    pngs = sorted(p.name for p in (two / "png").glob("*.png"))
    assert pngs == sorted(p.name for p in (one / "png").glob("*.png")) and len(pngs) == 5
    assert all((one / "png" / n).read_bytes() == (two / "png" / n).read_bytes() for n in pngs)
    for name in ("var-npy", "var-shards"):
        info = json.loads((two / f"{name}.json").read_text())
        assert info["launch"].startswith("2 processes, backend gloo"), info["launch"]
        a = load_file(one / name / "var-last" / "model.safetensors")
        b = load_file(two / name / "var-last" / "model.safetensors")
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a), name
    # (this process may run more BLAS threads than the launched ones: float sums agree to ~1e-7)
    r1, r2 = json.loads((one / "rfid.json").read_text()), json.loads((two / "rfid.json").read_text())
    m1, m2 = r1["metrics"], r2["metrics"]
    assert {"rfid", "psnr", "ssim"} <= set(m1) and m1.keys() == m2.keys()
    assert r1["image_counts"] == r2["image_counts"] and r1["image_counts"]["originals"] == 10
    for k, v in m1.items():
        if isinstance(v, (int, float)):
            assert _close(m2[k], v, rel=1e-5), (k, v, m2[k])
    p1, p2 = json.loads((one / "probe.json").read_text()), json.loads((two / "probe.json").read_text())
    assert p1["best_top1"] == p2["best_top1"] and len(p1["history"]) == len(p2["history"]) == 2
    for h1, h2 in zip(p1["history"], p2["history"]):
        assert h1.keys() == h2.keys()
        for k in h1:
            assert _close(h1[k], h2[k], rel=1e-5), k
