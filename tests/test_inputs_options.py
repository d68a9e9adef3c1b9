"""Every numeric CLI option (and device, output path, --resume, config range) is checked before anything
loads: one line naming the option and its range, exit code 2.

The checkpoints named in these commands do not exist: a message about the option (not about the missing
checkpoint) proves the check runs before any model is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xqtool.cli import app

ROOT = Path(__file__).resolve().parents[1]
TOK_CFG = str(ROOT / "configs" / "tokenizer" / "tiny-cnn.yaml")
VAR_CFG = str(ROOT / "configs" / "var" / "tiny.yaml")


@pytest.fixture
def env(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    ro = tmp_path / "readonly"
    ro.mkdir()
    for trainer, state in (("var", {"step": 10, "epoch_micro": 3, "trainer": "var"}),
                           ("tok", {"step": 10, "epoch": 0, "batch_in_epoch": 10, "best_value": None, "best_step": 0})):
        d = tmp_path / f"{trainer}run" / "checkpoints" / "step-0000010"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps(state))
    return tmp_path


def _sample(t: Path, *extra: str) -> list:
    return ["sample", "--var", str(t / "nope-var"), "--tokenizer", str(t / "nope-tok"), "-n", "2",
            "--npz", str(t / "a.npz"), *extra]


def _encode(t: Path, *extra: str) -> list:
    return ["encode", str(t / "nope-imgs"), "-o", str(t / "t.npy"), "--tokenizer", str(t / "nope"), *extra]


def _decode(t: Path, *extra: str) -> list:
    return ["decode", str(t / "nope.npy"), "-o", str(t / "out"), "--tokenizer", str(t / "nope"), *extra]


def _fid(t: Path, *extra: str) -> list:
    return ["eval-fid", str(t / "gen"), str(t / "ref"), *extra]


def _probe(t: Path, *extra: str) -> list:
    return ["probe", "--tokenizer", str(t / "nope"), "--train", str(t / "tr"), "--val", str(t / "va"), *extra]


# (id, argv builder, option named in the message, range fragment)
CASES = [
    ("temperature 0", lambda t: _sample(t, "--temperature", "0"), "--temperature", "> 0"),
    ("temperature -1", lambda t: _sample(t, "--temperature", "-1"), "--temperature", "> 0"),
    ("temperature nan", lambda t: _sample(t, "--temperature", "nan"), "--temperature", "finite"),
    ("cfg nan", lambda t: _sample(t, "--cfg", "nan"), "--cfg", "finite"),
    ("cfg inf", lambda t: _sample(t, "--cfg", "inf"), "--cfg", "finite"),
    ("cfg -1", lambda t: _sample(t, "--cfg", "-1"), "--cfg", ">= 0"),
    ("top-p -0.1", lambda t: _sample(t, "--top-p", "-0.1"), "--top-p", "[0, 1]"),
    ("top-p 1.5", lambda t: _sample(t, "--top-p", "1.5"), "--top-p", "[0, 1]"),
    ("top-p nan", lambda t: _sample(t, "--top-p", "nan"), "--top-p", "finite"),
    ("top-k -5", lambda t: _sample(t, "--top-k", "-5"), "--top-k", ">= 0"),
    ("sample -b 0", lambda t: _sample(t, "-b", "0"), "--batch-size", ">= 1"),
    ("sample -b -2", lambda t: _sample(t, "-b", "-2"), "--batch-size", ">= 1"),
    ("per-class 0", lambda t: _sample(t, "--per-class", "0"), "--per-class", ">= 1"),
    ("num-samples 0", lambda t: _sample(t, "-n", "0"), "--num-samples", ">= 1"),
    ("seed -1", lambda t: _sample(t, "--seed", "-1"), "--seed", ">= 0"),
    ("sample -o onto a file", lambda t: _sample(t, "-o", str(t / "afile.txt")), "afile.txt", "existing file"),
    ("sample --npz under a file", lambda t: _sample(t)[:-2] + ["--npz", str(t / "afile.txt" / "x.npz")], "--npz",
     "which is a file"),
    ("sample --npz onto a folder", lambda t: _sample(t)[:-2] + ["--npz", str(t / "readonly")], "--npz",
     "existing folder"),
    ("encode --device cuda:99", lambda t: _encode(t, "--device", "cuda:99"), "--device", "cuda"),
    ("encode --device bogus", lambda t: _encode(t, "--device", "bogus"), "--device", "cpu, cuda"),
    ("encode -o under a file", lambda t: _encode(t)[:3] + [str(t / "afile.txt" / "t.npy")] + _encode(t)[4:], "--output",
     "which is a file"),
    ("encode -o folder onto a file", lambda t: _encode(t)[:3] + [str(t / "afile.txt")] + _encode(t)[4:], "--output",
     "existing file"),
    ("decode -o onto a file", lambda t: _decode(t)[:3] + [str(t / "afile.txt")] + _decode(t)[4:], "--output",
     "existing file"),
    ("decode --device bogus", lambda t: _decode(t, "--device", "bogus"), "--device", "cpu, cuda"),
    ("make-shards out under a file", lambda t: ["make-shards", str(t / "imgs"), "-o", str(t / "afile.txt" / "s")], "--output",
     "which is a file"),
    ("eval-fid --device bogus", lambda t: _fid(t, "--device", "bogus"), "--device", "cpu, cuda"),
    ("eval-fid --report under a file", lambda t: _fid(t, "-o", str(t / "afile.txt" / "r.json")), "--output",
     "which is a file"),
    ("make-fid-stats --device cuda:99", lambda t: ["make-fid-stats", str(t / "s"), "--name", "n", "--device", "cuda:99"],
     "--device", "cuda"),
    ("probe --lr -1", lambda t: _probe(t, "--lr", "-1"), "--lr", "> 0"),
    ("probe --lr nan", lambda t: _probe(t, "--lr", "nan"), "--lr", "finite"),
    ("probe --weight-decay -1", lambda t: _probe(t, "--weight-decay", "-1"), "--weight-decay", ">= 0"),
    ("probe --decay-rate 0", lambda t: _probe(t, "--decay-rate", "0"), "--decay-rate", "(0, 1]"),
    ("probe --min-lr inf", lambda t: _probe(t, "--min-lr", "inf"), "--min-lr", "finite"),
    ("probe --device bogus", lambda t: _probe(t, "--device", "bogus"), "--device", "cpu, cuda"),
    ("demo-images --size 0", lambda t: ["demo-images", "-o", str(t / "d"), "--size", "0"], "--size", "[8, 512]"),
    ("demo-images --per-class 0", lambda t: ["demo-images", "-o", str(t / "d"), "--per-class", "0"], "--per-class", ">= 1"),
    ("demo-images --val-per-class -1", lambda t: ["demo-images", "-o", str(t / "d"), "--val-per-class", "-1"],
     "--val-per-class", ">= 0"),
    ("train-tokenizer --max-steps -1", lambda t: ["train-tokenizer", TOK_CFG, "--max-steps", "-1"], "--max-steps", ">= 1"),
    ("train-tokenizer lr < 0", lambda t: ["train-tokenizer", TOK_CFG, "--set", "train.lr=-1"], "train.lr", "> 0"),
    ("train-tokenizer lr nan", lambda t: ["train-tokenizer", TOK_CFG, "--set", "train.lr=.nan"], "train.lr", "finite"),
    ("train-tokenizer beta2 1", lambda t: ["train-tokenizer", TOK_CFG, "--set", "train.beta2=1"], "train.beta2", "[0, 1)"),
    ("train-tokenizer -o under a file", lambda t: ["train-tokenizer", TOK_CFG, "-o", str(t / "afile.txt" / "r")],
     "--output", "which is a file"),
    ("train-tokenizer --resume var run", lambda t: ["train-tokenizer", TOK_CFG, "--resume", str(t / "varrun")],
     "--resume", "train-var run"),
    ("finetune --max-steps 0", lambda t: ["finetune", TOK_CFG, "--tokenizer", TOK_CFG, "--max-steps", "0"], "--max-steps",
     ">= 1"),
    ("finetune --lora-rank 0", lambda t: ["finetune", TOK_CFG, "--tokenizer", TOK_CFG, "--lora-rank", "0"], "--lora-rank",
     ">= 1"),
    ("train-var tblr < 0", lambda t: ["train-var", VAR_CFG, "--set", "train.tblr=-1"], "train.tblr", "> 0"),
    ("train-var tblr inf", lambda t: ["train-var", VAR_CFG, "--set", "train.tblr=inf"], "train.tblr", "finite"),
    ("train-var --resume tokenizer run", lambda t: ["train-var", VAR_CFG, "--resume", str(t / "tokrun" / "checkpoints"
                                                                                          / "step-0000010")],
     "--resume", "train-tokenizer/finetune run"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_option_is_one_line_exit_2(env, case):
    _, argv, option, fragment = case
    res = CliRunner().invoke(app, argv(env))
    out = res.output.strip()
    assert res.exit_code == 2, out
    assert len(out.splitlines()) == 1, out
    assert out.startswith("error:") and option in out and fragment in out, out
    assert "Traceback" not in out


def test_read_only_output_folder(env, monkeypatch):
    ro = env / "readonly"
    os.chmod(ro, 0o555)
    real_access = os.access
    try:
        if os.geteuid() == 0:  # root may write anywhere: report the folder read-only the way os.access would
            monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == ro else real_access(p, m))
        res = CliRunner().invoke(app, _sample(env, "-o", str(ro / "png")))
        assert res.exit_code == 2 and "read-only" in res.output and str(ro) in res.output, res.output
    finally:
        os.chmod(ro, 0o755)


def test_good_values_pass_validation():
    from xqtool.validate import validate_command

    validate_command("sample", {"temperature": 0.7, "cfg": 0.0, "top_p": 1.0, "top_k": 0, "batch_size": 1,
                                "per_class": 1, "num_samples": None, "seed": 0, "out": None, "npz": None})
    validate_command("encode", {"batch_size": 5, "num_workers": 0, "device": "cpu", "output": None})


def test_every_numeric_option_of_every_command_has_a_rule():
    """A new or renamed int/float option without a range in xqtool/validate.py fails here."""
    import typing

    import typer

    from xqtool.validate import COMMAND_RULES, RULES

    root = typer.main.get_command(app)
    missing = []
    for name, cmd in sorted(root.commands.items()):
        fn = cmd.callback
        while hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        for param, tp in typing.get_type_hints(fn).items():
            numeric = any(t in (int, float) for t in (tp, *typing.get_args(tp)))
            if param != "return" and numeric and param not in RULES and (name, param) not in COMMAND_RULES:
                missing.append(f"{name} {param}")
    assert not missing, missing
