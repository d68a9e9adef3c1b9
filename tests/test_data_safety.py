"""Data safety (issue 12): never destroy, mix or leak data.

Each case of the issue is a test here:
1. outputs are never replaced or deleted unless they are xqtool's own and --overwrite is given;
   outputs inside (or containing) a source are refused; a file where a folder is expected is refused;
3. a resumed encode with another tokenizer / precision / source is refused;
4. tokens and VAR checkpoints made with other tokenizer weights (same config) are refused;
5. NaN weights are refused on load (naming the tensor) and never saved;
6. outputs honour the umask;
7. a second writer gets one line; a lock of a killed process never blocks;
8. corrupt artefacts of every kind give one line, exit 2, and nothing is overwritten;
plus the crash-safe checkpoint replacement (recovery, stale temporaries) and disk full.
(Case 2, safe training-state loading, is covered by the training-state tests.)
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _data_fixtures import write_class_tree
from xqtool.checkpoints import load_tokenizer, save_tokenizer, weights_fingerprint
from xqtool.cli import app
from xqtool.config import load_tokenizer_config
from xqtool.errors import CheckpointError, OutputError, TokenError
from xqtool.models.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tokenizer" / "tiny-cnn.yaml"
TINY_VAR = ROOT / "configs" / "var" / "tiny.yaml"
TOK_ANY = "unused-tokenizer"  # train-var refuses the run folder before it loads anything
runner = CliRunner()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _one_error(res, *needles: str) -> str:
    """Exit 2, no traceback, exactly one non-progress line, starting with 'error:' and holding `needles`."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not _PROGRESS.search(ln)]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


_PROGRESS = re.compile(r"━|images/s|^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] ")  # progress-bar lines (stdout) around the error


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two tiny CNN tokenizers with the same config but other weights (A, B) and 6 real photos."""
    base = tmp_path_factory.mktemp("safety")
    cfg = load_tokenizer_config(TINY)
    torch.manual_seed(0)
    tok_a = build_tokenizer(cfg).eval()
    torch.manual_seed(1)
    tok_b = build_tokenizer(cfg).eval()
    save_tokenizer(base / "tokA", tok_a)
    save_tokenizer(base / "tokB", tok_b)
    write_class_tree(base / "data" / "imgs", per_class=3)
    return {"base": base, "A": base / "tokA", "B": base / "tokB", "imgs": base / "data" / "imgs",
            "tok_a": tok_a, "tok_b": tok_b}


# ------------------------------------------------------------------------------------------ case 1


def test_existing_outputs_are_refused_and_overwrite_replaces_only_xqtool_outputs(env, tmp_path):
    imgs = env["imgs"]
    # make-shards into a folder holding user data: refused, with or without --overwrite; nothing touched
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    _one_error(_invoke("make-shards", imgs, "-o", out, "--format", "png"), "--overwrite")
    _one_error(_invoke("make-shards", imgs, "-o", out, "--format", "png", "--overwrite"), "not an xqtool")
    assert (out / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old-PID, no temporaries
    # its own output: refused without --overwrite, replaced with it
    sh = tmp_path / "sh"
    assert _invoke("make-shards", imgs, "-o", sh, "--format", "png").exit_code == 0
    before = _snapshot(sh)
    _one_error(_invoke("make-shards", imgs, "-o", sh, "--format", "png", "--maxcount", "2"), "--overwrite")
    assert _snapshot(sh) == before
    assert _invoke("make-shards", imgs, "-o", sh, "--format", "png", "--maxcount", "2", "--overwrite").exit_code == 0
    assert len(list(sh.glob("*.tar"))) == 3
    # encode to .npy / token shards, decode, demo-images: the same rule
    for args in (["encode", imgs, "-o", tmp_path / "t.npy", "-t", env["A"], "-j", "0"],
                 ["encode", imgs, "-o", f"{tmp_path / 'tokdir'}/", "-t", env["A"], "-j", "0"],
                 ["decode", tmp_path / "t.npy", "-o", tmp_path / "png", "-t", env["A"]],
                 ["demo-images", "-o", tmp_path / "demo", "--per-class", "1", "--val-per-class", "1", "--size", "16"]):
        assert _invoke(*args).exit_code == 0
        _one_error(_invoke(*args), "already exists", "--overwrite")
        res = _invoke(*args, "--overwrite")
        assert res.exit_code == 0, res.output
    # a foreign .npy is never replaced, not even with --overwrite
    foreign = tmp_path / "foreign.npy"
    np.save(foreign, np.arange(3))
    raw = foreign.read_bytes()
    _one_error(_invoke("encode", imgs, "-o", foreign, "-t", env["A"], "--overwrite"), "not an xqtool")
    assert foreign.read_bytes() == raw
    # ... and without --overwrite the refusal does not suggest a flag that would not help
    res = _invoke("encode", imgs, "-o", foreign, "-t", env["A"])
    _one_error(res, "not an xqtool")
    assert "pass --overwrite" not in res.output and foreign.read_bytes() == raw


def test_output_inside_or_containing_the_source_is_refused(env, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(env["imgs"], data / "imgs")
    before = _snapshot(data)
    # the reported mistake: `encode data/imgs -o data` deleted the images
    _one_error(_invoke("encode", data / "imgs", "-o", data, "-t", env["A"]), "contains the source")
    _one_error(_invoke("encode", data / "imgs", "-o", data, "-t", env["A"], "--overwrite"), "source")
    _one_error(_invoke("encode", data / "imgs", "-o", data / "imgs" / "t.npy", "-t", env["A"]), "inside the source")
    _one_error(_invoke("make-shards", data / "imgs", "-o", data / "imgs" / "shards"), "inside the source")
    _one_error(_invoke("make-shards", data / "imgs", "-o", data, "--overwrite"), "source")
    assert _snapshot(data) == before


def test_a_file_where_a_folder_is_expected_is_refused(env, tmp_path):
    target = tmp_path / "OUT"
    target.write_text("precious")
    for args in (["make-shards", env["imgs"], "-o", target],
                 ["encode", env["imgs"], "-o", f"{target}/", "-t", env["A"]],
                 ["demo-images", "-o", target, "--overwrite"]):
        _one_error(_invoke(*args), str(target), "file")
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]  # not hidden as .OUT.old-PID


def test_training_never_writes_into_a_foreign_folder(tmp_path):
    run = tmp_path / "photos"
    run.mkdir()
    (run / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    _one_error(_invoke("train-tokenizer", TINY, "-o", run, "--max-steps", "1", "--no-progress"), "not an xqtool run")
    _one_error(_invoke("train-var", TINY_VAR, "-o", run, "-t", TOK_ANY, "--tokens", run / "t.npy", "--device", "cpu"), "not an xqtool run")
    assert sorted(p.name for p in run.iterdir()) == ["holiday.jpg"]


# ------------------------------------------------------------------------------------------ case 6


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_honour_the_umask(env, tmp_path, umask):
    from xqtool.data.tokens import TokenManifest, write_tokens
    from xqtool.tasks.make_shards import make_shards

    old = os.umask(umask)
    try:
        save_tokenizer(tmp_path / "ck", env["tok_a"])
        tokens = env["tok_a"].encode(torch.zeros(2, 3, 32, 32))
        write_tokens(tmp_path / "t.npy", tokens.numpy(), TokenManifest.from_tokenizer(env["tok_a"]))
        make_shards(env["imgs"], tmp_path / "sh", image_format="png")
        res = _invoke("decode", tmp_path / "t.npy", "-o", tmp_path / "png", "-t", tmp_path / "ck")
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask  # 0644 / 0755 under umask 022
    paths = [p for p in tmp_path.rglob("*") if not p.name.endswith(".lock")]
    assert len(paths) > 10
    for p in paths:
        mode = p.stat().st_mode & 0o777
        assert mode == (want_dir if p.is_dir() else want_file), f"{p}: {oct(mode)}"


# ------------------------------------------------------------------------------------------ case 5


def test_nan_weights_are_refused_on_load_naming_the_tensor_and_never_saved(env, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    tok = env["tok_a"]
    ema = {k: v.clone() for k, v in tok.state_dict().items()}
    save_tokenizer(ck, tok, ema_state=ema)
    # one NaN planted in ema.safetensors (written without xqtool's checksum, as another tool would)
    state = load_file(ck / "ema.safetensors")
    state["quantizer.quantizes.0.embedding.weight"][3, 1] = float("nan")
    save_file(state, ck / "ema.safetensors")
    with pytest.raises(CheckpointError, match=r"quantizer\.quantizes\.0\.embedding\.weight.*non-finite"):
        load_tokenizer(ck)
    out = tmp_path / "t.npy"
    _one_error(_invoke("encode", env["imgs"], "-o", out, "-t", ck), "embedding.weight", "NaN")
    assert not out.exists()
    # the writer refuses NaN/Inf in the model or the EMA; the previous checkpoint stays as it was
    good = tmp_path / "good"
    save_tokenizer(good, tok)
    before = _snapshot(good)
    bad = {k: v.clone() for k, v in tok.state_dict().items()}
    bad["decoder.conv_out.weight"].view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match="decoder.conv_out.weight"):
        save_tokenizer(good, tok, ema_state=bad)
    assert _snapshot(good) == before
    from xqtool.config import load_var_config
    from xqtool.models.var import VAR
    from xqtool.checkpoints import save_var

    var = VAR(load_var_config(TINY_VAR).model)
    with torch.no_grad():
        var.head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="head.weight"):
        save_var(tmp_path / "var", var)
    assert not (tmp_path / "var").exists()


# ------------------------------------------------------------------------------------------ case 4


def test_tokens_and_var_made_with_other_tokenizer_weights_are_refused(env, tmp_path):
    from xqtool.config import load_var_config
    from xqtool.tasks.encode import EncodeSettings, encode_images
    from xqtool.tasks.sample import SampleSettings, sample_images
    from xqtool.training import TrainInjected, VARRunOptions, train_var

    fa, fb = weights_fingerprint(env["tok_a"]), weights_fingerprint(env["tok_b"])
    assert fa != fb and fa == weights_fingerprint(load_tokenizer(env["A"]))
    tokens = tmp_path / "t.npy"
    encode_images(EncodeSettings(source=env["imgs"], output=tokens, ckpt=env["A"], batch_size=6))
    encode_images(EncodeSettings(source=env["imgs"], output=tmp_path / "tdir", ckpt=env["A"], batch_size=6))
    assert json.loads((tmp_path / "t.npy.json").read_text())["weights_fingerprint"] == fa
    _one_error(_invoke("decode", tokens, "-o", tmp_path / "png", "-t", env["B"]), fa, fb, "--ignore-fingerprint")
    _one_error(_invoke("decode", tmp_path / "tdir", "-o", tmp_path / "png", "-t", env["B"]), fa, fb)
    assert not (tmp_path / "png").exists()
    res = _invoke("decode", tokens, "-o", tmp_path / "png", "-t", env["B"], "--ignore-fingerprint")
    assert res.exit_code == 0, res.output

    # train-var on A's tokens with tokenizer B is refused; the VAR trained with A records A's fingerprint
    over = [f"data.tokens={tokens}", "train.global_batch_size=2", "train.max_steps=1", "train.ckpt_every=0"]
    with pytest.raises(TokenError, match=f"{fa}.*{fb}"):
        train_var(load_var_config(TINY_VAR, over + [f"train.results_dir={tmp_path / 'runB'}"]),
                  VARRunOptions(cpu=True), TrainInjected(tokenizer=env["tok_b"]))
    var_dir = train_var(load_var_config(TINY_VAR, over + [f"train.results_dir={tmp_path / 'runA'}"]),
                        VARRunOptions(cpu=True), TrainInjected(tokenizer=env["tok_a"])).model_dir
    assert var_dir is not None
    _one_error(_invoke("sample", "--var", var_dir, "-t", env["B"], "-n", "1", "--npz", tmp_path / "s.npz",
                       "--device", "cpu"), fa, fb)
    assert not (tmp_path / "s.npz").exists()
    sample_images(SampleSettings(var_ckpt=str(var_dir), tokenizer_ckpt=str(env["B"]), labels=[0], npz=tmp_path / "s.npz",
                                 cpu=True, ignore_fingerprint=True))
    assert (tmp_path / "s.npz").is_file()

    # an older manifest without a fingerprint: accepted with a warning
    m = json.loads((tmp_path / "t.npy.json").read_text())
    for k in ("weights_fingerprint", "manifest_sha256"):  # as written by older xqtool
        m.pop(k)
    (tmp_path / "t.npy.json").write_text(json.dumps(m))
    res = _invoke("decode", tokens, "-o", tmp_path / "png3", "-t", env["B"])
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------------ case 3


def test_resumed_encode_with_other_weights_precision_or_listing_is_refused(env, tmp_path):
    from xqtool.tasks.encode import EncodeSettings, encode_images, partial_dir
    from xqtool.tasks.injected import Injected

    src = tmp_path / "imgs"
    shutil.copytree(env["imgs"], src)
    out = tmp_path / "t.npy"

    def stop(_n: int) -> None:
        if any((partial_dir(out) / "_units").glob("unit-*.json")):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # interrupted after the first finished unit
        encode_images(EncodeSettings(source=src, output=out, ckpt=env["A"], batch_size=2, unit_size=2),
                      Injected(progress=stop))
    assert (partial_dir(out) / "plan.json").is_file() and not out.exists()
    units_before = _snapshot(partial_dir(out))
    with pytest.raises(OutputError, match="tokenizer weights"):
        encode_images(EncodeSettings(source=src, output=out, ckpt=env["B"], batch_size=2, unit_size=2))
    with pytest.raises(OutputError, match="precision"):
        encode_images(EncodeSettings(source=src, output=out, ckpt=env["A"], batch_size=2, unit_size=2,
                                     precision="bf16"))
    (src / "cat" / "img0.png").rename(src / "cat" / "img9.png")
    with pytest.raises(OutputError, match="listing"):
        encode_images(EncodeSettings(source=src, output=out, ckpt=env["A"], batch_size=2, unit_size=2))
    (src / "cat" / "img9.png").rename(src / "cat" / "img0.png")
    assert _snapshot(partial_dir(out)) == units_before  # the unfinished work is kept
    res = _invoke("encode", src, "-o", out, "-t", env["B"], "--unit-size", "2", "-b", "2", "-j", "0")
    _one_error(res, "tokenizer weights", "--overwrite")
    # the same settings resume and give the tokens of an uninterrupted run
    encode_images(EncodeSettings(source=src, output=out, ckpt=env["A"], batch_size=2, unit_size=2))
    encode_images(EncodeSettings(source=src, output=tmp_path / "ref.npy", ckpt=env["A"], batch_size=3, unit_size=6))
    assert np.array_equal(np.load(out), np.load(tmp_path / "ref.npy"))


# ------------------------------------------------------------------------------------------ case 7


def test_second_writer_gets_one_line_and_a_killed_writers_lock_is_stale(env, tmp_path):
    from xqtool.fsutil import lock_path

    out, run = tmp_path / "sh", tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom xqtool.fsutil import acquire_output_lock\n"
         f"locks = [acquire_output_lock(p) for p in ({str(out)!r}, {str(run)!r})]\n"
         "print('locked', flush=True)\ntime.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        _one_error(_invoke("make-shards", env["imgs"], "-o", out, "--format", "png"), "another xqtool process", str(out))
        _one_error(_invoke("train-tokenizer", TINY, "-o", run, "--max-steps", "1", "--no-progress"),
                   "another xqtool process")
        _one_error(_invoke("train-var", TINY_VAR, "-o", run, "-t", TOK_ANY, "--tokens", run / "t.npy", "--device", "cpu"), "another xqtool process")
        assert not run.exists()
        res = subprocess.run([sys.executable, "-m", "xqtool", "encode", str(env["imgs"]), "-o", f"{out}/",
                              "-t", str(env["A"])], capture_output=True, text=True, env=_env(), timeout=300)
        assert res.returncode == 2 and "another xqtool process" in res.stderr and "Traceback" not in res.stderr
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # the killed process left its lock file: stale, it must not block
    res = _invoke("make-shards", env["imgs"], "-o", out, "--format", "png")
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------------ crash safety


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_checkpoint_replacement_is_crash_safe_and_recovers(env, tmp_path):
    ck = tmp_path / "last"
    save_tokenizer(ck, env["tok_a"])
    ref = _snapshot(ck)
    # crash between "old renamed aside" and "new renamed in": only .last.old-PID exists; readers restore it
    from xqtool.fsutil import _owner

    dead = _owner().rpartition("-")[0] + f"-{_dead_pid()}"  # HOST-PID of a process that died mid-write
    os.replace(ck, tmp_path / f".last.old-{dead}")
    (tmp_path / f".last.tmp-{dead}-abc").mkdir()  # the half-written new one
    tok = load_tokenizer(ck)
    assert _snapshot(ck) == ref and weights_fingerprint(tok) == weights_fingerprint(env["tok_a"])
    # the stale temporary of the dead writer is cleaned on the next save; replacing keeps one complete copy
    save_tokenizer(ck, env["tok_b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert weights_fingerprint(load_tokenizer(ck)) == weights_fingerprint(env["tok_b"])


def test_disk_full_during_save_names_the_path_and_keeps_earlier_checkpoints(env, tmp_path, monkeypatch):
    import safetensors.torch

    ck = tmp_path / "best"
    save_tokenizer(ck, env["tok_a"])
    ref = _snapshot(ck)
    real = safetensors.torch.save_file
    calls = []

    def full(tensors, filename, metadata=None):
        calls.append(filename)
        real(tensors, filename, metadata=metadata)  # half of it lands on disk ...
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OutputError, match=r"best.*no space left"):
        save_tokenizer(ck, env["tok_b"])
    from xqtool.config import load_var_config
    from xqtool.models.var import VAR
    from xqtool.checkpoints import save_var

    with pytest.raises(OutputError, match=r"var-last.*no space left"):
        save_var(tmp_path / "var-last", VAR(load_var_config(TINY_VAR).model))
    monkeypatch.undo()
    assert calls and _snapshot(ck) == ref
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporaries left behind


# ------------------------------------------------------------------------------------------ case 8


def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    i = min(int(len(data) * where), len(data) - 1)
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _delete(path: Path) -> None:
    path.unlink()


DAMAGE = {"truncate": _truncate, "flip-head": lambda p: _flip(p, 0.02), "flip-data": lambda p: _flip(p, 0.8),
          "empty": _empty, "delete": _delete}

# (artefact kind, member to damage, damages)
CASES = [
    ("tokenizer", "model.safetensors", list(DAMAGE)),
    ("tokenizer", "config.yaml", ["truncate", "empty", "delete", "flip-head"]),
    ("tokenizer-ema", "ema.safetensors", ["truncate", "flip-head", "flip-data", "empty"]),
    ("var", "model.safetensors", list(DAMAGE)),
    ("var", "config.yaml", ["truncate", "empty", "delete"]),
    ("tokens-npy", "t.npy", list(DAMAGE)),
    ("tokens-npy", "t.npy.json", list(DAMAGE)),
    ("token-shards", "manifest.json", list(DAMAGE)),
    ("token-shards", "tokens-000000.tar", list(DAMAGE)),
    ("image-shards", "shard-000000.tar", ["truncate", "empty", "delete"]),
]


@pytest.fixture(scope="module")
def artefacts(env, tmp_path_factory):
    """One pristine artefact of every kind xqtool writes and reads back."""
    from xqtool.config import load_var_config
    from xqtool.models.var import VAR
    from xqtool.tasks.encode import EncodeSettings, encode_images
    from xqtool.tasks.injected import Injected
    from xqtool.tasks.make_shards import make_shards
    from xqtool.checkpoints import save_var

    base = tmp_path_factory.mktemp("pristine")
    tok = env["tok_a"]
    save_tokenizer(base / "tokenizer", tok)
    save_tokenizer(base / "tokenizer-ema", tok, ema_state=tok.state_dict())
    torch.manual_seed(0)
    save_var(base / "var", VAR(load_var_config(TINY_VAR).model),
             extra_config={"tokenizer": {"weights_fingerprint": weights_fingerprint(tok)}})
    (base / "tokens-npy").mkdir()
    encode_images(EncodeSettings(source=env["imgs"], output=base / "tokens-npy" / "t.npy", batch_size=6),
                  Injected(tokenizer=tok))
    encode_images(EncodeSettings(source=env["imgs"], output=base / "token-shards", batch_size=6),
                  Injected(tokenizer=tok))
    make_shards(env["imgs"], base / "image-shards", image_format="png", maxcount=3)
    return base


def _command(kind: str, art: Path, env: dict, out: Path) -> list:
    if kind.startswith("tokenizer"):
        return ["encode", env["imgs"], "-o", out / "o.npy", "-t", art, "-j", "0"]
    if kind == "var":
        return ["sample", "--var", art, "-t", env["A"], "-n", "1", "--npz", out / "s.npz", "--device", "cpu"]
    if kind == "tokens-npy":
        return ["decode", art / "t.npy", "-o", out / "png", "-t", env["A"]]
    if kind == "token-shards":
        return ["decode", art, "-o", out / "png", "-t", env["A"]]
    return ["encode", str(art / "shard-{000000..000001}.tar"), "-o", out / "o.npy", "-t", env["A"], "-j", "0",
            "--bad-files", "fail"]


@pytest.mark.parametrize("kind,member,damage", [(k, m, d) for k, m, ds in CASES for d in ds],
                         ids=lambda v: str(v))
def test_corrupt_artefacts_give_one_line_exit_2_and_overwrite_nothing(env, artefacts, tmp_path, kind, member, damage):
    art = tmp_path / kind
    shutil.copytree(artefacts / kind, art)
    DAMAGE[damage](art / member)
    damaged = _snapshot(art)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    res = _invoke(*_command(kind, art, env, out))
    line = _one_error(res)
    assert str(art) in line, line  # names the artefact
    assert _snapshot(art) == damaged  # the reader changed nothing
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, nothing overwritten


def test_inspect_refuses_a_random_file_and_an_empty_config_in_one_line(env, tmp_path):
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    _one_error(_invoke("inspect", rnd), str(rnd))
    (tmp_path / "empty.yaml").write_text("")
    _one_error(_invoke("inspect", tmp_path / "empty.yaml"), "empty")
    ck = tmp_path / "ck"
    shutil.copytree(env["A"], ck)
    (ck / "config.yaml").write_text("")
    _one_error(_invoke("inspect", ck), "config.yaml", "empty")
    (ck / "config.yaml").write_text("model: [unclosed\n  quant: {")
    _one_error(_invoke("inspect", ck), "config.yaml")
