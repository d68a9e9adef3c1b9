"""Training survives NaN, signals, kills, damaged states, planted pickles, batch changes and reruns (issue 13)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_state, photo_crops, to_tensor
from xqtool.checkpoints import save_tokenizer
from xqtool.config import load_tokenizer_config, load_var_config
from xqtool.data.tokens import TokenManifest, write_tokens
from xqtool.errors import CheckpointError, ConfigError
from xqtool.models.tokenizer import build_tokenizer
from xqtool.training import TrainInjected, VARRunOptions, train_var

ROOT = Path(__file__).resolve().parents[1]
TINY_VAR = ROOT / "configs" / "var" / "tiny.yaml"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def var_data(tmp_path_factory):
    """Tiny CNN tokenizer (random init, saved), 24 token rows as .npy and as token shards."""
    from PIL import Image

    from xqtool.tasks.encode import EncodeSettings, encode_images
    from xqtool.tasks.injected import Injected

    root = tmp_path_factory.mktemp("var13")
    torch.manual_seed(0)
    tok = build_tokenizer(load_tokenizer_config(ROOT / "configs" / "tokenizer" / "tiny-cnn.yaml")).eval()
    crops = photo_crops(24, 32, seed=3)
    tokens = tok.encode(to_tensor(crops))
    manifest = TokenManifest.from_tokenizer(tok, labels=[i % 10 for i in range(24)], keys=[f"i{i}" for i in range(24)])
    write_tokens(root / "train.npy", tokens.numpy(), manifest)
    save_tokenizer(root / "tok", tok)
    (root / "imgs" / "c0").mkdir(parents=True)
    for i, arr in enumerate(crops):
        Image.fromarray(arr).save(root / "imgs" / "c0" / f"{i:03d}.png")
    encode_images(EncodeSettings(source=root / "imgs", output=root / "shards", batch_size=4), Injected(tokenizer=tok))
    return root, tok


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from xqtool.data.samples import sample_photo_folder

    root = tmp_path_factory.mktemp("photos13") / "p"
    sample_photo_folder(root, 32)
    return root


def _vcfg(root: Path, run: Path, source: str = "npy", *extra: str):
    src = {"npy": f"data.tokens={root / 'train.npy'}", "shards": f"data.tokens={root / 'shards'}",
           "images": f"data.images={root / 'imgs'}"}[source]
    return load_var_config(TINY_VAR, ["data.tokens=null", src, f"train.results_dir={run}", "train.max_steps=6",
                                      "train.ckpt_every=100", "train.keep_last=10", *extra])




def _sig_at(step: int, sig=signal.SIGTERM):
    def cb(row):
        if row["step"] == step:
            os.kill(os.getpid(), sig)
    return cb


# ------------------------------------------------------------------------------------------- case 1: NaN
def _cli(args, monkeypatch=None, module: str = "", step: int = 0, sig=None):
    """The CLI in this process; with `sig`, the trainer sends itself `sig` after optimizer step `step`."""
    from typer.testing import CliRunner

    import xqtool.cli

    if sig is not None:
        if module == "var":
            import xqtool.training as m

            real = m.train_var

            def patched(cfg, run, injected):
                return real(cfg, run, dataclasses.replace(injected, callbacks=[_sig_at(step, sig)]))
            monkeypatch.setattr(m, "train_var", patched)
        else:
            import xqtool.training as m

            real = m.train_tokenizer

            def patched(cfg, run, injected):
                hook = [lambda t: t.pos.step == step and os.kill(os.getpid(), sig)]
                return real(cfg, run, dataclasses.replace(injected, callbacks=hook))
            monkeypatch.setattr(m, "train_tokenizer", patched)
    return CliRunner().invoke(xqtool.cli.app, list(args))


def test_var_nan_is_skipped_then_stops_nonzero_and_nothing_nonfinite_is_saved(var_data, tmp_path):
    root, _ = var_data
    r = _cli(["train-var", str(TINY_VAR), "--tokens", str(root / "train.npy"), "--tokenizer", str(root / "tok"), "--device", "cpu",
              "--set", "train.tblr=1e9", "--set", "train.max_steps=30", "--set", "train.ckpt_every=10", "--set",
              f"train.results_dir={tmp_path / 'run'}"])
    assert r.exit_code == 1, r.output
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "nan_patience" in errs[0], r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)
    for f in (tmp_path / "run").rglob("*.safetensors"):
        for k, v in load_file(f).items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), (f, k)


def test_tokenizer_never_exports_nonfinite_weights(photos, tmp_path):
    from xqtool.training import TokenizerRunOptions, TokenizerTrainer

    cfg = load_tokenizer_config(ROOT / "configs/tokenizer/tiny-cnn.yaml", overrides=[
        "train.global_batch_size=4", "train.warmup_steps=0", "train.tracker=none", "loss.disc_type=none",
        "train.ckpt_every=2", "train.eval_every=100", "train.best_metric=psnr", "data.max_val_images=4",
        "train.ema_decay=0.5", f"data.data_path={photos / 'train'}", f"data.val_data_path={photos / 'val'}"])
    tr = TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=4, progress=False))

    def poison(t):  # a finite loss but a weight turned NaN (e.g. an optimizer overflow)
        if t.pos.step == 3:
            with torch.no_grad():
                next(t.unwrapped.parameters()).view(-1)[0] = float("nan")
    tr.callbacks.append(poison)
    res = tr.run()
    assert res.status == "diverged" and res.exit_code == 1 and "NaN" in res.message
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]
    for f in (tmp_path / "run").rglob("*.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(f).values() if v.is_floating_point()), f


# ------------------------------------------------------------------------------------------- cases 2+3: signals
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_train_var_signal_saves_then_exits_128_plus_signal(var_data, tmp_path, monkeypatch, sig, code):
    root, _ = var_data
    run = tmp_path / "run"
    args = ["train-var", str(TINY_VAR), "--tokens", str(root / "train.npy"), "--tokenizer", str(root / "tok"), "--device", "cpu",
            "--set", "train.max_steps=6", "--set", "train.ckpt_every=100", "--set", f"train.results_dir={run}"]
    before = signal.getsignal(sig)
    with monkeypatch.context() as mp:
        r = _cli(args, mp, "var", 2, sig)
    assert r.exit_code == code, r.output
    assert f"stopped by {sig.name} at step 2" in r.stderr and "--resume auto" in r.stderr
    assert (run / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
    assert signal.getsignal(sig) is before  # handlers restored
    r2 = _cli(args + ["--resume", "auto"])  # the advice printed above works
    assert r2.exit_code == 0 and "resumed from 2" in r2.stdout, r2.output


def test_train_tokenizer_sigint_exits_130_after_saving(photos, tmp_path, monkeypatch):
    args = ["train-tokenizer", str(ROOT / "configs/tokenizer/tiny-cnn.yaml"), "-o", str(tmp_path / "run"),
            "--max-steps", "4", "--no-progress"]
    for s in ("train.global_batch_size=4", "train.warmup_steps=0", "train.tracker=none", "loss.disc_type=none",
              "train.ckpt_every=100", "train.eval_every=100", "train.best_metric=psnr", "data.max_val_images=4",
              f"data.data_path={photos / 'train'}", f"data.val_data_path={photos / 'val'}"):
        args += ["--set", s]
    with monkeypatch.context() as mp:
        r = _cli(args, mp, "tok", 2, signal.SIGINT)
    assert r.exit_code == 130, r.output
    assert "stopped by SIGINT at step 2" in r.stderr and "--resume auto" in r.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir() and (tmp_path / "run" / "last").is_dir()
    rerun = _cli(args)
    assert rerun.exit_code == 2 and "--resume auto" in rerun.output
    r2 = _cli(args + ["--resume", "auto"])
    assert r2.exit_code == 0 and "finished" in r2.stdout, r2.output
    r3 = _cli(args + ["--resume", "auto"])
    assert r3.exit_code == 0 and "images/s" not in r3.stdout and "already finished" in r3.stdout, r3.output


# ------------------------------------------------------------------------------------------- cases 4+5: data position
@pytest.mark.parametrize("source", ["npy", "shards", "images"])
def test_var_resume_continues_the_exact_data_stream(var_data, tmp_path, source):
    root, tok = var_data
    straight = train_var(_vcfg(root, tmp_path / "a", source), VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
    r1 = train_var(_vcfg(root, tmp_path / "b", source), VARRunOptions(cpu=True),
                   TrainInjected(tokenizer=tok, callbacks=[_sig_at(4)]))
    assert r1.status == "interrupted" and r1.exit_code == 143 and r1.steps == 4
    r2 = train_var(_vcfg(root, tmp_path / "b", source), VARRunOptions(cpu=True, resume="auto"),
                   TrainInjected(tokenizer=tok))
    assert r2.resumed_from == 4
    # the batches after the resume are the uninterrupted run's: same losses, bit-identical state
    assert [h["loss"] for h in straight.history[4:]] == [h["loss"] for h in r2.history]
    assert_same_state(tmp_path / "a" / "checkpoints" / "step-0000006", tmp_path / "b" / "checkpoints" / "step-0000006")


def test_var_batch_change_is_refused_or_remapped_exactly(var_data, tmp_path, monkeypatch, caplog):
    root, tok = var_data
    from xqtool.data.tokens import TokenArrayDataset

    seen = []
    real = TokenArrayDataset.__getitem__
    monkeypatch.setattr(TokenArrayDataset, "__getitem__", lambda self, i: seen.append(i) or real(self, i))
    train_var(_vcfg(root, tmp_path / "a", "npy", "train.max_steps=4"), VARRunOptions(cpu=True),
              TrainInjected(tokenizer=tok))
    straight, seen[:] = list(seen), []
    train_var(_vcfg(root, tmp_path / "b", "npy", "train.max_steps=2"), VARRunOptions(cpu=True),
              TrainInjected(tokenizer=tok))
    with pytest.raises(ConfigError, match=r"global batch 8, this one 16.*allow_batch_change=true"):
        train_var(_vcfg(root, tmp_path / "b", "npy", "train.max_steps=3", "train.global_batch_size=16"),
                  VARRunOptions(cpu=True, resume="auto"), TrainInjected(tokenizer=tok))
    caplog.set_level("WARNING")
    train_var(_vcfg(root, tmp_path / "b", "npy", "train.max_steps=3", "train.global_batch_size=16",
                    "train.allow_batch_change=true"), VARRunOptions(cpu=True, resume="auto"),
              TrainInjected(tokenizer=tok))
    assert "global batch 8 -> 16; data continues at sample 16" in caplog.text
    assert seen == straight  # 2 x 8 then 1 x 16 rows = the 4 x 8 rows of the uninterrupted run, in order
    info = json.loads((tmp_path / "b" / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert (info["samples_seen"], info["global_batch"], info["world_size"]) == (32, 16, 1)


def test_tokenizer_batch_change_is_refused_naming_both_values(photos, tmp_path):
    from xqtool.training import TokenizerRunOptions, train_tokenizer

    base = ["train.warmup_steps=0", "train.tracker=none", "loss.disc_type=none", "train.ckpt_every=100",
            "train.eval_every=100", "train.best_metric=psnr", "data.max_val_images=4",
            f"data.data_path={photos / 'train'}", f"data.val_data_path={photos / 'val'}"]
    cfg = lambda *x: load_tokenizer_config(ROOT / "configs/tokenizer/tiny-cnn.yaml", overrides=base + list(x))  # noqa
    kw = dict(output_dir=tmp_path / "run", progress=False)
    train_tokenizer(cfg("train.global_batch_size=4"), TokenizerRunOptions(max_steps=2, **kw))
    with pytest.raises(ConfigError, match=r"global batch 4, this one 8.*--set train.allow_batch_change=true"):
        train_tokenizer(cfg("train.global_batch_size=8"), TokenizerRunOptions(max_steps=3, resume="auto", **kw))
    res = train_tokenizer(cfg("train.global_batch_size=8", "train.allow_batch_change=true"),
                          TokenizerRunOptions(max_steps=3, resume="auto", **kw))
    assert res.status == "finished" and res.step == 3
    info = json.loads((tmp_path / "run" / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert (info["samples_seen"], info["global_batch"]) == (16, 8)


# ------------------------------------------------------------------------------------------- case 7: rerun
def test_var_rerun_into_a_finished_run_is_refused(var_data, tmp_path):
    root, tok = var_data
    train_var(_vcfg(root, tmp_path / "run", "npy", "train.max_steps=3"), VARRunOptions(cpu=True),
              TrainInjected(tokenizer=tok))
    before = load_file(tmp_path / "run" / "var-last" / "model.safetensors")
    with pytest.raises(ConfigError, match=r"already holds (a VAR run|training checkpoints): pass --resume auto .*-o/--output"):
        train_var(_vcfg(root, tmp_path / "run", "npy", "train.max_steps=3"), VARRunOptions(cpu=True),
                  TrainInjected(tokenizer=tok))
    after = load_file(tmp_path / "run" / "var-last" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------- issue 12 case 2: no pickles
class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_a_planted_file(var_data, tmp_path):
    root, tok = var_data
    run = tmp_path / "run"
    train_var(_vcfg(root, run, "npy", "train.max_steps=2"), VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
    state = run / "checkpoints" / "step-0000002"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Boom(marker))
    for f in list(state.iterdir()):
        if f.name != "trainer_state.json":
            f.write_bytes(payload)
    (state / "custom_checkpoint_0.pkl").write_bytes(payload)
    (state / "random_states_0.pkl").write_bytes(payload)
    r = _cli(["train-var", str(TINY_VAR), "--tokens", str(root / "train.npy"), "--tokenizer", str(root / "tok"),
              "--device", "cpu", "--resume", str(state), "--set", f"train.results_dir={run}", "--set", "train.max_steps=3"])
    assert r.exit_code == 2 and not marker.exists(), r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "damaged" in r.stderr and str(state) in r.stderr
    (state / "trainer_state.json").write_bytes(payload)  # even the JSON index
    with pytest.raises(CheckpointError, match="damaged"):
        train_var(_vcfg(root, run, "npy", "train.max_steps=3"), VARRunOptions(cpu=True, resume=str(state)),
                  TrainInjected(tokenizer=tok))
    # an old Accelerate-style state (pickles only) is refused, never loaded
    old = run / "checkpoints" / "step-0000001"
    old.mkdir()
    (old / "custom_checkpoint_0.pkl").write_bytes(payload)
    (old / "trainer_state.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(CheckpointError, match="Accelerate pickles"):
        train_var(_vcfg(root, run, "npy", "train.max_steps=3"), VARRunOptions(cpu=True, resume=str(old)),
                  TrainInjected(tokenizer=tok))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- case 9: damaged newest
@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_newest_state_falls_back_to_the_newest_intact_one(var_data, tmp_path, caplog, damage):
    root, tok = var_data
    cfg = lambda run: _vcfg(root, run, "npy", "train.ckpt_every=2")  # noqa
    train_var(cfg(tmp_path / "a"), VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
    train_var(cfg(tmp_path / "b"), VARRunOptions(cpu=True), TrainInjected(tokenizer=tok, callbacks=[_sig_at(4)]))
    newest = tmp_path / "b" / "checkpoints" / "step-0000004"
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[-5] ^= 0x10
        target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"training state {newest} is damaged: model.safetensors"):
        train_var(cfg(tmp_path / "b"), VARRunOptions(cpu=True, resume=str(newest)), TrainInjected(tokenizer=tok))
    caplog.set_level("WARNING")
    r = train_var(cfg(tmp_path / "b"), VARRunOptions(cpu=True, resume="auto"), TrainInjected(tokenizer=tok))
    assert r.resumed_from == 2 and f"{newest} is damaged" in caplog.text
    assert_same_state(tmp_path / "a" / "checkpoints" / "step-0000006", tmp_path / "b" / "checkpoints" / "step-0000006")


# ------------------------------------------------------------------------------------------- kill -9
def _run_killed(args, kill: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess that SIGKILLs itself at `kill`: 'step:N' (after optimizer step N) or 'write:N'
    (inside the N-th component write of a training-state save)."""
    what, n = kill.split(":")
    hook = ("import xqtool.checkpoints.training_state as ts; w=ts._write_component; c=[0]\n"
            "def g(*a):\n c[0]+=1\n if c[0]=={n}: os.kill(os.getpid(), signal.SIGKILL)\n return w(*a)\n"
            "ts._write_component=g\n" if what == "write" else
            "import xqtool.checkpoints.training_state as ts; S=ts.SampleBatches.__next__; c=[0]\n"
            "def g(self):\n c[0]+=1\n if c[0]=={n}: os.kill(os.getpid(), signal.SIGKILL)\n return S(self)\n"
            "ts.SampleBatches.__next__=g\n").format(n=n)
    code = "import os, signal, sys\n" + hook + "from xqtool.cli import app\nsys.argv=['xqtool']+sys.argv[1:]\napp()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture
def one_thread():
    """In-process runs use the killed subprocesses' thread count (OMP_NUM_THREADS=1): same float reductions."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("source,kills", [("train.npy", ["write:4", "write:11"]), ("shards", ["step:5"])])
def test_var_killed_with_sigkill_resumes_bit_identical(var_data, tmp_path, source, kills, one_thread):
    root, _ = var_data

    def args(run):
        return ["train-var", str(TINY_VAR), "--tokens", str(root / source), "--tokenizer", str(root / "tok"), "--device", "cpu",
                "--set", "train.max_steps=8", "--set", "train.ckpt_every=2", "--set", "train.keep_last=0",
                "--set", f"train.results_dir={run}"]
    ok = _cli(args(tmp_path / "a"))
    assert ok.exit_code == 0, ok.output
    first = True
    for kill in kills:
        r = _run_killed(args(tmp_path / "b") + ([] if first else ["--resume", "auto"]), kill)
        assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
        first = False
    r = _cli(args(tmp_path / "b") + ["--resume", "auto"])
    assert r.exit_code == 0, r.output
    for step in (2, 4, 6, 8):
        assert_same_state(tmp_path / "a" / "checkpoints" / f"step-{step:07d}",
                          tmp_path / "b" / "checkpoints" / f"step-{step:07d}")
    a, b = load_file(tmp_path / "a" / "var-last" / "model.safetensors"), load_file(tmp_path / "b" / "var-last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_with_gan_and_ema_killed_with_sigkill_resumes_bit_identical(photos, tmp_path, one_thread):

    def args(run):
        a = ["train-tokenizer", str(ROOT / "configs/tokenizer/tiny-cnn.yaml"), "-o", str(run), "--max-steps", "6",
             "--no-progress"]
        for s in ("train.global_batch_size=4", "train.warmup_steps=0", "train.tracker=none", "loss.disc_type=patchgan",
                  "loss.disc_start=1", "loss.lecam_loss_weight=0.01", "train.ema=true", "train.ema_decay=0.5",
                  "train.ckpt_every=2", "train.eval_every=3", "train.best_metric=psnr", "data.max_val_images=4",
                  "loss.perceptual_weight=0", f"data.data_path={photos / 'train'}",
                  f"data.val_data_path={photos / 'val'}"):
            a += ["--set", s]
        return a
    ok = _cli(args(tmp_path / "a"))
    assert ok.exit_code == 0, ok.output
    r = _run_killed(args(tmp_path / "b"), "write:3")  # inside the step-2 save
    assert r.returncode == -signal.SIGKILL
    r = _run_killed(args(tmp_path / "b") + ["--resume", "auto"], "step:5")
    assert r.returncode == -signal.SIGKILL
    r = _cli(args(tmp_path / "b") + ["--resume", "auto"])
    assert r.exit_code == 0, r.output
    assert_same_state(tmp_path / "a" / "checkpoints" / "step-0000006", tmp_path / "b" / "checkpoints" / "step-0000006")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "a" / "last" / name), load_file(tmp_path / "b" / "last" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_training_state_disk_full_is_one_line_and_keeps_the_earlier_state(tmp_path, monkeypatch):
    """Disk full while writing a training state: one OutputError line naming the state and 'no space left',
    the previous state intact and loadable, no temporary left; written states honour the umask."""
    import errno
    import os
    import stat

    from accelerate import Accelerator

    from xqtool.checkpoints import training_state as ts
    from xqtool.errors import OutputError

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    old_mask = os.umask(0o022)
    try:
        first = ts.save_state_atomic(acc, tmp_path, 1, {"model": model}, {"trainer": "var"}, keep=0)
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(first.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in first.iterdir())

    real_write = ts._write_component

    def full_disk(path, state):
        if "model" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, state)

    monkeypatch.setattr(ts, "_write_component", full_disk)
    with pytest.raises(OutputError) as err:
        ts.save_state_atomic(acc, tmp_path, 2, {"model": model}, {"trainer": "var"}, keep=0)
    msg = str(err.value)
    assert "no space left" in msg and "step-0000002" in msg and "\n" not in msg
    assert [p.name for p in ts.list_states(tmp_path)] == [first.name]
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(ts, "_write_component", real_write)
    assert ts.resolve_resume("auto", tmp_path, 0).path == first
