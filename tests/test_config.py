"""Config loading: official YAML, tiny configs, typos, types, overrides, impossible combinations."""

from __future__ import annotations

import pytest

from conftest import CONFIGS
from xqtool.config import TokenizerConfig, config_hash, load_tokenizer_config, load_yaml_dataclass
from xqtool.errors import ConfigError

OFFICIAL = ["VQ-4096", "VQ-8192", "RobustTok", "VP2-4096", "VP2-16384", "MSVR10P2-4096", "MSVR10P2-8192",
            "MSVR10P2-16384", "MSBR10P2-4096", "MSBR10P2-16384"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_all_official_configs_parse(name: str) -> None:
    cfg = load_tokenizer_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.image_size == 256 and cfg.model.enc_type == "dinov2"
    assert cfg.model.num_latent_tokens == cfg.quant.v_patch_nums[-1] ** 2
    assert cfg.train.lr == pytest.approx(3e-5)
    if name.startswith("MSBR"):
        assert cfg.quant.lfq and cfg.quant.codebook_size == 2 ** cfg.quant.codebook_embed_dim
        assert cfg.loss.detail_guide == "sam"
    if name.startswith("MS"):
        assert cfg.scales == (1, 1, 2, 3, 3, 4, 5, 6, 8, 11) and cfg.tokens_per_branch == 286


def test_official_flat_and_nested_keys_agree() -> None:
    flat = load_tokenizer_config({"codebook_size": 8192, "v_patch_nums": [16], "lr": "3e-5"})
    nested = load_tokenizer_config({"quant": {"codebook_size": 8192, "v_patch_nums": [16]}, "train": {"lr": 3e-5}})
    assert flat == nested and flat.train.lr == 3e-5  # YAML 1.1 reads "3e-5" as a string; it is coerced


def test_typo_gets_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'quant.codebok_size'.*did you mean 'codebook_size'"):
        load_tokenizer_config(CONFIGS / "tiny-cnn.yaml", ["quant.codebok_size=8"])
    with pytest.raises(ConfigError, match=r"did you mean 'codebook_size'"):
        load_tokenizer_config({"codebok_size": 8})


def test_wrong_type_names_key_and_type() -> None:
    with pytest.raises(ConfigError, match=r"'quant.codebook_size' must be an integer"):
        load_tokenizer_config(CONFIGS / "tiny-cnn.yaml", ["quant.codebook_size=lots"])
    with pytest.raises(ConfigError, match=r"'model.enc_type' must be one of cnn, dinov2"):
        load_tokenizer_config(CONFIGS / "tiny-cnn.yaml", ["model.enc_type=vit"])


def test_dotted_and_flat_overrides() -> None:
    cfg = load_tokenizer_config(CONFIGS / "MSVR10P2-4096.yaml", ["quant.codebook_size=8192", "lr=1e-3"])
    assert cfg.quant.codebook_size == 8192 and cfg.train.lr == 1e-3
    assert config_hash(cfg) != config_hash(load_tokenizer_config(CONFIGS / "MSVR10P2-4096.yaml"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_latent_tokens=100"], r"num_latent_tokens=100 must equal the last scale squared"),
        (["quant.lfq=true", "quant.codebook_embed_dim=8"], r"LFQ/BSQ needs codebook_size = 2\*\*codebook_embed_dim"),
        (["quant.start_drop=11"], r"start_drop=11 is outside 1..10"),
        (["quant.v_patch_nums=[1,4,2,11]"], r"non-decreasing"),
        (["model.image_size=250"], r"not divisible by model.vit_patch_size"),
    ],
)
def test_impossible_combinations(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_tokenizer_config(CONFIGS / "MSVR10P2-4096.yaml", overrides)


def test_cnn_latent_must_match_last_scale() -> None:
    with pytest.raises(ConfigError, match=r"produces a 8x8 latent .* ends with 4"):
        load_tokenizer_config(CONFIGS / "tiny-cnn.yaml", ["quant.v_patch_nums=[1,2,4]", "model.num_latent_tokens=16"])


def test_bad_yaml_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_tokenizer_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_tokenizer_config(tmp_path / "missing.yaml")


def test_generic_loader_on_plain_dataclass() -> None:
    from dataclasses import dataclass

    @dataclass
    class Small:
        depth: int = 2
        ratio: float = 0.5

    assert load_yaml_dataclass({"depth": 4}, Small, ["ratio=0.25"]) == Small(4, 0.25)
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        load_yaml_dataclass({"dept": 4}, Small)
    assert isinstance(load_tokenizer_config(), TokenizerConfig)
