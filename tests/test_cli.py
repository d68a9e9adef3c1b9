"""CLI basics: help, version, inspect, one-line user errors with exit code 2, current completions."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import CONFIGS, ROOT
from xqtool import __version__
from xqtool.cli import app
from xqtool.cli.completion import SHELLS, render

runner = CliRunner()


def test_help_lists_every_subcommand() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ["train-tokenizer", "finetune", "encode", "decode", "train-var", "sample", "eval-fid", "probe", "inspect"]:
        assert name in result.output, name


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_inspect_official_config() -> None:
    result = runner.invoke(app, ["inspect", str(CONFIGS / "MSVR10P2-4096.yaml")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "172,327,456" in result.output and "11x11" in result.output and "572" in result.output


def test_user_errors_are_one_line_with_exit_code_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xqtool", "inspect", str(CONFIGS / "tiny-cnn.yaml"), "--set", "quant.codebok_size=3"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "did you mean 'codebook_size'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    missing = runner.invoke(app, ["inspect", "no/such/file.yaml"])
    assert missing.exit_code == 2


@pytest.mark.parametrize("argv, needle", [(["nocmd"], "No such command 'nocmd'"),
                                           (["encode", "imgs", "--out", "x"], "No such option: --out"),
                                           (["train-tokenizer"], "Missing argument"),
                                           (["encode", "imgs", "-b", "abc"], "--batch-size")])
def test_usage_errors_are_one_line_with_exit_code_2(argv, needle) -> None:
    """Unknown commands / options, missing arguments and unparsable values: one 'error:' line naming --help."""
    result = subprocess.run([sys.executable, "-m", "xqtool", *argv], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "--help" in lines[0] and not result.stdout


def test_completion_scripts_are_current() -> None:
    for shell in SHELLS:
        committed = (ROOT / "completions" / f"xqtool.{shell}").read_text()
        assert committed == render(shell, app), f"completions/xqtool.{shell} is stale: run python -m xqtool.cli.completion"
