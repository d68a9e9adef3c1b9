"""Everything that reads or writes weights files: xqtool's own checkpoint directories, official XQ-GAN / VAR
``.pt``/``.pth`` import, training states for ``--resume``, and pretrained backbone weights.

Modules: ``safe_io`` (the one safe ``torch.load`` and its allow-list, checked safetensors, the one strict state
loader, the one atomic checkpoint-directory writer), ``official`` (one key map per model family: tokenizer, VAR),
``tokenizer`` / ``var`` (save and load per model family), ``training_state`` (atomic training states, ``--resume``,
exact data position), ``pretrained`` (DINOv2 / CLIP / DINO backbone weights). This package may import
``xqtool.config``, ``xqtool.errors``, ``xqtool.fsutil``, ``xqtool.hub`` and ``xqtool.models`` (the model classes it
fills); it never imports ``xqtool.tasks``, ``xqtool.cli`` or the trainers. ``xqtool.models`` imports only
``pretrained`` from here, lazily or through this package.
"""

from xqtool.checkpoints.official import (map_official_tokenizer_keys, map_official_var_keys, read_official_tokenizer,
                                         read_official_var, var_config_from_state_dict)
from xqtool.checkpoints.safe_io import (ALLOWED_GLOBALS, check_finite, check_state_fits, is_xqtool_dir,
                                        load_safetensors_checked, load_state_strict, safe_torch_load, save_safetensors,
                                        write_checkpoint_dir)
from xqtool.checkpoints.tokenizer import load_tokenizer, save_model_dir, save_tokenizer, weights_fingerprint
from xqtool.checkpoints.var import load_var, read_var_config, save_var

__all__ = ["ALLOWED_GLOBALS", "check_finite", "check_state_fits", "is_xqtool_dir", "load_safetensors_checked",
           "load_state_strict", "load_tokenizer", "load_var", "map_official_tokenizer_keys", "map_official_var_keys",
           "read_official_tokenizer", "read_official_var", "read_var_config", "safe_torch_load", "save_model_dir",
           "save_safetensors", "save_tokenizer", "save_var", "var_config_from_state_dict", "weights_fingerprint",
           "write_checkpoint_dir"]
