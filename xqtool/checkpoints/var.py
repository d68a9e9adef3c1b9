"""VAR checkpoints: save in xqtool's own format, load it or the released ``ar-ckpt-last.pth`` layout (spec var.md §5).

Own format: a directory with ``model.safetensors`` (VAR state_dict) and ``config.yaml`` (``format: xqtool-var``,
the ``model:`` section plus optional ``tokenizer:`` info), written atomically
(:func:`xqtool.checkpoints.safe_io.write_checkpoint_dir`). Official files are mapped by
:func:`xqtool.checkpoints.official.map_official_var_keys`; their architecture is inferred from the tensor shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml

from xqtool.checkpoints.official import read_official_var, var_config_from_state_dict
from xqtool.checkpoints.safe_io import (CONFIG_FILE, MODEL_FILE, load_safetensors_checked, load_state_strict,
                                        locate_checkpoint, read_yaml_mapping, write_checkpoint_dir)
from xqtool.config import config_to_dict
from xqtool.config import var_model_config_from_dict
from xqtool.errors import CheckpointError, ConfigError
from xqtool.models.var import VAR

#: ``format`` of a VAR checkpoint's config.yaml and safetensors metadata
VAR_FORMAT = "xqtool-var"


def save_var(directory: Union[str, Path], model: VAR, extra_config: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``directory/{model.safetensors, config.yaml}`` atomically; returns the directory.

    `extra_config` entries (e.g. ``tokenizer: {weights_fingerprint: ...}``) are added to config.yaml. Raises
    CheckpointError when a weight is NaN/Inf (nothing written), OutputError when `directory` exists and is not an
    xqtool checkpoint or the disk is full (the previous checkpoint stays intact).
    """
    conf: Dict[str, Any] = {"format": VAR_FORMAT, "model": config_to_dict(model.config), **dict(extra_config or {})}
    return write_checkpoint_dir(directory, {MODEL_FILE: model.state_dict()}, yaml.safe_dump(conf, sort_keys=False),
                                {"format": VAR_FORMAT}, kind="VAR ")


def read_var_config(directory: Union[str, Path]) -> Dict[str, Any]:
    """The ``config.yaml`` dict of an xqtool VAR directory (CheckpointError when unreadable or a tokenizer's)."""
    path = Path(directory) / CONFIG_FILE
    data = read_yaml_mapping(path, not_mapping="is not an xqtool VAR config (no 'model' section)")
    if not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path} is not an xqtool VAR config (no 'model' section)")
    if isinstance(data.get("quant"), dict) and "codebook_size" in data["quant"]:
        raise CheckpointError(f"{directory} is a tokenizer checkpoint, not a VAR model (use it as `xqtool sample --tokenizer`)")
    return data


def load_var(path: Union[str, Path], map_location: str = "cpu", patch_nums: Optional[Sequence[int]] = None,
             device: Optional[str] = None, num_branches: Optional[int] = None) -> Tuple[VAR, Dict[str, Any]]:
    """Load a VAR from an xqtool directory or an official ``.pth`` → (model in eval mode, info dict).

    ``device="meta"`` builds the model on the meta device and assigns the tensors (fast layout checks).
    info: ``format`` ('xqtool' | 'official'), ``config`` (the whole config.yaml for xqtool dirs) or ``meta``
    (official), ``patch_nums``. `path` may also be a registry name (``VAR-d17``) or ``hf://`` reference
    (:func:`xqtool.hub.resolve_checkpoint`). Raises CheckpointError for missing, foreign or non-fitting files.
    """

    path = locate_checkpoint(path, "var")
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise CheckpointError(f"{path} is a directory without {MODEL_FILE} (not an xqtool VAR checkpoint)")
        conf = read_var_config(path)
        try:
            cfg = var_model_config_from_dict(conf["model"])
        except ConfigError as exc:
            raise CheckpointError(f"{path}/{CONFIG_FILE}: {exc}") from None
        sd = load_safetensors_checked(path / MODEL_FILE, device=map_location)
        info: Dict[str, Any] = {"format": "xqtool", "config": conf}
    elif path.is_file():
        sd, meta = read_official_var(path)
        cfg = var_config_from_state_dict(sd, patch_nums or meta.get("patch_nums"), num_branches or meta.get("num_branches"))
        info = {"format": "official", "meta": meta}
    else:
        raise CheckpointError(f"VAR checkpoint not found: {path}")
    lead = f"{path} does not fit this VAR"
    if device == "meta":
        with torch.device("meta"):
            model = VAR(cfg)
        load_state_strict(model, sd, lead, assign=True)
    else:
        model = VAR(cfg)
        load_state_strict(model, sd, lead)
    info["patch_nums"] = model.patch_nums
    return model.eval(), info
