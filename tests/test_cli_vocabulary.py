"""One command line: one spelling per concept, runnable help examples, deprecated spellings, completions."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import typer
from typer.testing import CliRunner

from conftest import ROOT
from xqtool.cli import app
from xqtool.cli import options as O

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

# concept -> (the one spelling, the shared help text or None when the help says what this command writes)
CANONICAL: Dict[str, Tuple[frozenset, object]] = {
    "tokenizer": (frozenset({"--tokenizer", "-t"}), O.HELP_TOKENIZER),
    "var": (frozenset({"--var"}), O.HELP_VAR),
    "output": (frozenset({"--output", "-o"}), None),
    "batch_size": (frozenset({"--batch-size", "-b"}), O.HELP_BATCH_SIZE),
    "num_workers": (frozenset({"--num-workers", "-j"}), O.HELP_NUM_WORKERS),
    "device": (frozenset({"--device"}), O.HELP_DEVICE),
    "precision": (frozenset({"--precision"}), O.HELP_PRECISION),
    "seed": (frozenset({"--seed"}), O.HELP_SEED),
    "overwrite": (frozenset({"--overwrite"}), O.HELP_OVERWRITE),
    "set": (frozenset({"--set"}), O.HELP_SET),
    "resume": (frozenset({"--resume"}), O.HELP_RESUME),
    "max_steps": (frozenset({"--max-steps"}), O.HELP_MAX_STEPS),
    "bad_files": (frozenset({"--bad-files"}), O.HELP_BAD_FILES),
}
# any of these option strings (or parameter names) means the concept, whatever the command
SYNONYMS: Dict[str, set] = {
    "tokenizer": {"--tokenizer", "-t", "--ckpt", "--from", "--tok", "--checkpoint", "tokenizer", "ckpt", "from_"},
    "var": {"--var", "--var-ckpt", "var", "var_ckpt"},
    "output": {"--output", "-o", "--out", "--output-dir", "--out-dir", "--outdir", "out", "out_dir", "output",
               "output_dir"},
    "batch_size": {"--batch-size", "-b", "--bs", "--batch", "batch_size"},
    "num_workers": {"--num-workers", "-j", "--workers", "--jobs", "num_workers", "workers"},
    "device": {"--device", "--cpu", "--gpu", "--cuda", "device", "cpu"},
    "precision": {"--precision", "--fp16", "--bf16", "--amp", "--mixed-precision", "precision"},
    "seed": {"--seed", "seed"},
    "overwrite": {"--overwrite", "--force", "overwrite", "force"},
    "set": {"--set", "set_"},
    "resume": {"--resume", "resume"},
    "max_steps": {"--max-steps", "max_steps"},
    "bad_files": {"--bad-files", "bad_files"},
}
TAKES_TOKENIZER = ("encode", "decode", "eval-fid", "probe", "finetune", "train-var", "sample")


def _commands() -> Dict[str, typer.core.TyperCommand]:
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _concept(param) -> List[str]:
    words = set(param.opts) | set(param.secondary_opts) | {param.name}
    return [c for c, syn in SYNONYMS.items() if words & syn]


def test_every_concept_has_one_spelling_and_one_help() -> None:
    problems = []
    for name, cmd in _commands().items():
        for param in cmd.params:
            if getattr(param, "hidden", False) or param.param_type_name != "option":
                continue
            for concept in _concept(param):
                spelling, help_text = CANONICAL[concept]
                opts = frozenset(param.opts)
                if opts != spelling:
                    problems.append(f"{name}: {concept} spelled {sorted(opts)}, expected {sorted(spelling)}")
                if help_text is not None and param.help != help_text:
                    problems.append(f"{name}: {concept} help differs: {param.help!r}")
    assert not problems, "\n".join(problems)


def test_commands_that_use_a_tokenizer_take_dash_t() -> None:
    cmds = _commands()
    for name in TAKES_TOKENIZER:
        opts = {o for p in cmds[name].params if not getattr(p, "hidden", False) for o in p.opts}
        assert {"--tokenizer", "-t"} <= opts, name
    sample_opts = {o for p in cmds["sample"].params for o in p.opts}
    assert "--var" in sample_opts and "--ckpt" not in sample_opts


def _examples(cmd) -> List[List[str]]:
    text = re.sub(r"\[/?[a-z ]*\]", "\n", cmd.help or "")
    found = []
    for line in text.splitlines():
        m = re.search(r"(?<!-m )\bxqtool ([a-z-]+.*)$", line.strip())
        if m:
            found.append(shlex.split(m.group(1).split(" && ")[0]))
    return found


def test_every_help_has_an_example_that_parses(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # examples name the repository's configs
    cmds = _commands()
    for name, cmd in cmds.items():
        examples = _examples(cmd)
        assert any(argv[0] == name for argv in examples), f"{name}: no 'xqtool {name} ...' example in its help"
        for argv in examples:
            target = cmds[argv[0]]
            ctx = target.make_context(argv[0], list(argv[1:]))  # raises on an unknown option / missing value
            assert ctx.params is not None, argv


def test_flags_show_no_bool_metavar() -> None:
    runner = CliRunner()
    for name in _commands():
        out = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output
        assert "<bool>" not in out, name


def test_usage_lines_hide_deprecated_positionals() -> None:
    runner = CliRunner()
    for name in _commands():
        usage = next(line for line in runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output.splitlines()
                     if "Usage:" in line)
        assert "legacy" not in usage.lower(), (name, usage)


@pytest.mark.parametrize("argv,param,value", [
    (["encode", "imgs/", "-o", "t.npy", "--ckpt", "T"], "tokenizer", "T"),
    (["decode", "t.npy", "-o", "r", "--ckpt=T"], "tokenizer", "T"),
    (["finetune", "configs/tokenizer/tiny-cnn.yaml", "--from", "T"], "tokenizer", "T"),
    (["finetune", "configs/tokenizer/tiny-cnn.yaml", "-t", "T", "--output-dir", "runs/x"], "output", Path("runs/x")),
    (["sample", "--ckpt", "V", "-t", "T", "-n", "1", "--out", "s"], "var_ckpt", "V"),
    (["sample", "--var", "V", "-t", "T", "-n", "1", "--cpu"], "device", "cpu"),
    (["eval-fid", "--rfid", "--ckpt", "T", "data/", "--report", "r.json"], "output", Path("r.json")),
    (["probe", "--out", "p", "-t", "T", "--train", "a", "--val", "b"], "output", Path("p")),
    (["make-shards", "src", "--workers", "8", "-o", "s"], "reader_workers", 8),
])
def test_deprecated_spellings_still_parse_with_one_warning_line(argv, param, value, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    cmd = _commands()[argv[0]]
    ctx = cmd.make_context(argv[0], argv[1:])
    assert ctx.params[param] == value
    err = capsys.readouterr().err
    used = {a.split("=")[0] for a in argv} & set(O.all_aliases(cmd))
    assert used and err.count("deprecated") == len(used) == len(err.strip().splitlines())  # one line each
    assert all(f"{old} is deprecated" in err for old in used)


def test_deprecated_positional_forms_warn(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "xqtool", "demo-images", str(tmp_path / "d"), "--per-class", "1",
                        "--val-per-class", "1", "--size", "16"], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "deprecated" in r.stderr and "-o/--output" in r.stderr
    assert len(list((tmp_path / "d" / "train").rglob("*.png"))) > 0
    # a piped run prints plain progress lines (no live bar) and ends with the total
    assert "demo images:" in r.stdout and "100%" in r.stdout


def test_messages_name_flags_and_only_possible_fixes(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from xqtool.errors import ConfigError
    from xqtool.training.var_data import check_tokenizer_fit

    runner = CliRunner()
    r = runner.invoke(app, ["train-var", str(ROOT / "configs/var/tiny.yaml"), "--tokens", "x.npy"])
    assert r.exit_code == 2 and "--tokenizer" in r.output and "data.tokenizer" not in r.output
    model = SimpleNamespace(patch_nums=(1, 2), num_branches=2, codebook_size=64, branch_dim=8)
    tok = SimpleNamespace(scales=(1, 2), num_branches=2, codebook_size=128, embed_dim=8)
    with pytest.raises(ConfigError) as sample_err:  # sample has no --set: the fix is another tokenizer
        check_tokenizer_fit(model, tok, trained=True)
    assert "--set" not in str(sample_err.value) and "--tokenizer" in str(sample_err.value)
    with pytest.raises(ConfigError, match="--set model.codebook_size=128"):  # train-var has --set
        check_tokenizer_fit(model, tok)
    r = runner.invoke(app, ["sample", "--var", "V", "-t", "T", "-n", "1"])
    assert r.exit_code == 2 and "-o/--output" in r.output


def test_encode_output_forms(tmp_path: Path) -> None:
    from xqtool.errors import ConfigError
    from xqtool.tasks.encode import token_output_path

    assert token_output_path("a/tokens.npy") == Path("a/tokens.npy")
    assert token_output_path(f"{tmp_path}/shards/") == tmp_path / "shards"
    assert token_output_path(str(tmp_path)) == tmp_path  # an existing folder
    for bad in ("tokens.npz", str(tmp_path / "new-folder"), "tok.pt"):
        with pytest.raises(ConfigError, match=r"X\.npy .*DIR/"):
            token_output_path(bad)
    r = CliRunner().invoke(app, ["encode", str(tmp_path), "-o", str(tmp_path / "tokens.npz"), "-t", "T"])
    assert r.exit_code == 2 and "DIR/" in r.output
    assert not (tmp_path / "tokens.npz").exists()
    # errors found by the task's own checks come without a stale "encoding 0/?" bar before them
    r = CliRunner().invoke(app, ["encode", str(tmp_path / "missing"), "-o", str(tmp_path / "t.npy"), "-t", "T"])
    assert r.exit_code == 2 and "encoding" not in r.output


def test_completion_module_help_creates_nothing(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "xqtool.cli.completion", "--help"], capture_output=True, text=True,
                       env=ENV, cwd=tmp_path)
    assert r.returncode == 0 and "usage" in r.stdout.lower()
    assert list(tmp_path.iterdir()) == []


def test_bash_completion_completes_option_values(tmp_path: Path) -> None:
    script = ROOT / "completions" / "xqtool.bash"

    def complete(*words: str) -> List[str]:
        line = " ".join(shlex.quote(w) for w in words)
        code = (f"source {shlex.quote(str(script))}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
                "_xqtool; printf '%s\\n' \"${COMPREPLY[@]}\"")
        out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return [w for w in out.stdout.splitlines() if w]

    assert complete("xqtool", "encode", "--precision", "") == ["fp32", "bf16", "fp16"]
    assert complete("xqtool", "encode", "--precision", "b") == ["bf16"]
    assert complete("xqtool", "encode", "--bad-files", "") == ["skip", "fail"]
    assert "--tokenizer" in complete("xqtool", "encode", "--tok")
    assert "sample" in complete("xqtool", "sam")


def _doc_commands(text: str) -> List[str]:
    """`xqtool ...` command lines of the fenced bash blocks of a markdown file (continuations joined)."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            m = re.search(r"(?:^|\s)xqtool ([a-z][a-z-]*\b.*)$", line)
            if m and not line.startswith(("pip ", "python ")):
                cmds.append(m.group(1).split(" && ")[0].split(" | ")[0])
    return cmds


def test_readme_and_docs_use_the_current_vocabulary(monkeypatch, capsys) -> None:
    from typer._click.exceptions import BadParameter, UsageError

    monkeypatch.chdir(ROOT)
    cmds = _commands()
    seen = 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in _doc_commands(doc.read_text()):
            argv = shlex.split(line)
            if argv[0] not in cmds or "..." in argv:  # elided examples
                continue
            try:
                cmds[argv[0]].make_context(argv[0], argv[1:])
            except BadParameter as exc:  # placeholder files in examples (cfg.yaml) are fine
                assert "does not exist" in str(exc), f"{doc.name}: {line}: {exc}"
            except UsageError as exc:
                raise AssertionError(f"{doc.name}: xqtool {line}: {exc}") from None
            seen += 1
            assert "deprecated" not in capsys.readouterr().err, f"{doc.name}: old spelling in: xqtool {line}"
    assert seen >= 20


def test_quick_start_writes_only_under_runs(monkeypatch) -> None:
    """Every path the README quick start writes is under runs/ (ignored by git): nothing untracked in the root."""
    import yaml

    monkeypatch.chdir(ROOT)
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = _commands()
    lines = _doc_commands("```bash\n" + quick + "```")
    assert len(lines) >= 6
    for line in lines:
        argv = shlex.split(line)
        ctx = cmds[argv[0]].make_context(argv[0], argv[1:])
        written = [ctx.params.get(k) for k in ("output", "grid", "npz") if ctx.params.get(k) is not None]
        if argv[0] == "train-tokenizer" and not written:
            conf = yaml.safe_load(Path(ctx.params["config"]).read_text())
            written = [conf["train"]["results_dir"]]
        assert written, line
        for path in written:
            assert Path(path).parts[0] == "runs", f"quick start writes {path} outside runs/: {line}"
    assert "/runs/" in (ROOT / ".gitignore").read_text().split()
