"""YAML 1.1 boolean words (no/off/on/yes/...) in string and boolean fields of both config loaders.

Expected values are the words themselves (string fields) or the plain-English truth value (bool fields);
they are read from a YAML file and through ``--set`` overrides alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from xqtool.config import load_tokenizer_config, load_var_config
from xqtool.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOK_CFG = ROOT / "configs" / "tokenizer" / "tiny-cnn.yaml"
VAR_CFG = ROOT / "configs" / "var" / "tiny.yaml"

WORDS = ["no", "No", "NO", "off", "Off", "on", "ON", "yes", "Yes", "y", "n"]
TRUTH = {"yes": True, "on": True, "y": True, "true": True, "no": False, "off": False, "n": False, "false": False}


def _tok(tmp_path: Path, key: str, raw: str, via: str):
    if via == "set":
        return load_tokenizer_config(str(TOK_CFG), [f"{key}={raw}"])
    section, leaf = key.split(".")
    path = tmp_path / "tok.yaml"
    # flat (official-style) keys are accepted too and override the nested section read before them
    path.write_text(TOK_CFG.read_text() + f"\n{leaf}: {raw}\n")
    return load_tokenizer_config(str(path))


def _var(tmp_path: Path, key: str, raw: str, via: str):
    if via == "set":
        return load_var_config(VAR_CFG, [f"{key}={raw}"])
    section, leaf = key.split(".")
    path = tmp_path / "var.yaml"
    path.write_text(VAR_CFG.read_text() + f"\n{leaf}: {raw}\n")
    return load_var_config(path)


LOADERS = {"tokenizer": _tok, "var": _var}


@pytest.mark.parametrize("via", ["yaml", "set"])
@pytest.mark.parametrize("loader", ["tokenizer", "var"])
@pytest.mark.parametrize("word", WORDS)
def test_yaml11_words_stay_strings_in_string_fields(tmp_path, loader, via, word):
    cfg = LOADERS[loader](tmp_path, "train.results_dir", word, via)
    assert cfg.train.results_dir == word


@pytest.mark.parametrize("via", ["yaml", "set"])
@pytest.mark.parametrize("loader", ["tokenizer", "var"])
@pytest.mark.parametrize("word", ["no", "No", "NO"])
def test_mixed_precision_no(tmp_path, loader, via, word):
    cfg = LOADERS[loader](tmp_path, "train.mixed_precision", word, via)
    assert cfg.train.mixed_precision == "no"


@pytest.mark.parametrize("via", ["yaml", "set"])
@pytest.mark.parametrize("loader", ["tokenizer", "var"])
@pytest.mark.parametrize("word", ["off", "on", "yes"])
def test_mixed_precision_other_words_name_the_choices(tmp_path, loader, via, word):
    with pytest.raises(ConfigError, match=r"mixed_precision' must be one of no, fp16, bf16; got '" + word):
        LOADERS[loader](tmp_path, "train.mixed_precision", word, via)


@pytest.mark.parametrize("via", ["yaml", "set"])
@pytest.mark.parametrize("word", WORDS + ["true", "false", "True", "FALSE"])
def test_boolean_fields_accept_yaml11_words(tmp_path, via, word):
    tok = _tok(tmp_path, "train.save_best", word, via)
    assert tok.train.save_best is TRUTH[word.lower()]
    var = _var(tmp_path, "data.hflip", word, via)
    assert var.data.hflip is TRUTH[word.lower()]


@pytest.mark.parametrize("via", ["yaml", "set"])
@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_non_finite_floats_rejected(tmp_path, via, raw):
    with pytest.raises(ConfigError, match="finite"):
        _tok(tmp_path, "train.lr", raw, via)
    with pytest.raises(ConfigError, match="finite"):
        _var(tmp_path, "train.tblr", raw, via)
    assert math.isfinite(_tok(tmp_path, "train.lr", "3e-5", via).train.lr)


@pytest.mark.parametrize("argv", [["train-tokenizer", "{missing}"], ["train-tokenizer", "{folder}"],
                                  ["train-var", "{missing}"], ["finetune", "{missing}", "-t", "any"]])
def test_missing_or_folder_config_is_one_line(tmp_path: Path, argv) -> None:
    """A config path that does not exist (or is a folder) is one 'error:' line and exit 2, not a usage box."""
    from typer.testing import CliRunner

    from xqtool.cli import app

    args = [a.format(missing=tmp_path / "nope.yaml", folder=tmp_path) for a in argv]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "not found" in lines[0] or "is a folder" in lines[0]
