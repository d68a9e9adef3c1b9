"""Objects a task entry point uses instead of building them itself.

Every task entry point (``run_probe``, ``sample_images``, ``evaluate_fid``, ``evaluate_rfid``, ``make_fid_stats``,
``encode_images``, ``decode_tokens``) takes a settings dataclass (what the CLI options say) plus one
:class:`Injected`: pre-built models and extractors (tests, notebooks, the trainer) and progress callbacks (the
CLI's progress bars and tables).
A field left ``None`` means "build / load it from the settings" or "no callback". Each task reads only the fields
its docstring names; the others are ignored. The trainers (and ``finetune_tokenizer``) take
:class:`xqtool.training.TrainInjected` instead: ``training`` sits below ``tasks`` and cannot import this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional


@dataclass
class Injected:
    """Pre-built components and callbacks for a task (all optional).

    Attributes:
        tokenizer: a built tokenizer module used instead of loading the settings' checkpoint.
        var: a built VAR model used instead of loading the settings' VAR checkpoint.
        var_info: the info dict of ``load_var`` for an injected `var` (enables the fingerprint check).
        feature_extractor: a :class:`xqtool.metrics.FeatureExtractor` used instead of clean-fid's Inception.
        lpips: a callable ``(x, y) -> [B]`` on images in [-1, 1] used instead of LPIPS-VGG16 (``evaluate_rfid``).
        progress: called with the number of items (images / views) just processed.
        on_start: called once with the number of items to process now (None when unknown).
        on_epoch: called with each epoch's record (probe).
        console: a rich console for live progress output (sample).
    """

    tokenizer: Any = None
    var: Any = None
    var_info: Any = None
    feature_extractor: Any = None
    lpips: Any = None
    progress: Optional[Callable[[int], None]] = None
    on_start: Optional[Callable[[Optional[int]], None]] = None
    on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None
    console: Any = None


__all__ = ["Injected"]
