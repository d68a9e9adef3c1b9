"""What a trainer is asked to do besides its config: run options and injected components.

The trainers (:class:`~xqtool.training.tokenizer_trainer.TokenizerTrainer` / :func:`train_tokenizer`,
:func:`~xqtool.training.var_trainer.train_var`, and the task :func:`xqtool.tasks.finetune.finetune_tokenizer`)
take their config, one run-options dataclass (what the CLI's run options say: :class:`TokenizerRunOptions`,
:class:`VARRunOptions`) and one :class:`TrainInjected` (pre-built components and hooks used by tests, notebooks,
the benchmark and the CLI's console). :class:`TrainInjected` is the trainers' counterpart of
:class:`xqtool.tasks.injected.Injected`: a separate class because ``training`` sits below ``tasks`` in the layer
order (see :mod:`xqtool`) and so cannot import it, and because its fields (size overrides, random-weight
permission, step callbacks) only make sense for training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence


@dataclass
class TokenizerRunOptions:
    """Run options of ``train-tokenizer`` and ``finetune`` (the CLI's ``-o``, ``--resume``, ``--max-steps``,
    ``--overwrite``, ``--no-progress``).

    Attributes:
        output_dir: run directory (default ``train.results_dir``; for a fine-tune the folder next to the source,
            see :func:`xqtool.tasks.finetune.default_output_dir`).
        resume: ``None``, ``"auto"`` (newest complete state in the run directory, if any) or a state directory.
        max_steps: overrides ``train.max_steps`` (optimizer steps).
        overwrite: delete an earlier xqtool run in the run directory first (a foreign non-empty folder is always
            refused, see :func:`xqtool.fsutil.check_run_dir`).
        progress: rich progress bar on the main process (False: plain log lines on the injected console).
    """

    output_dir: Optional[os.PathLike] = None
    resume: Optional[str] = None
    max_steps: Optional[int] = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class VARRunOptions:
    """Run options of ``train-var`` (``--resume``, ``--overwrite``, ``--device``, ``--ignore-fingerprint``). The run
    directory and the step count are config keys there (``train.results_dir``, ``train.max_steps``).

    Attributes:
        resume: ``None``, ``"auto"`` (newest intact state in ``train.results_dir``) or a state directory.
        overwrite: delete an earlier xqtool run in ``train.results_dir`` first.
        cpu: run on the CPU even when a GPU is visible.
        ignore_fingerprint: accept tokens (or a resumed run) made with other tokenizer weights (TokenError otherwise).
    """

    resume: Optional[str] = None
    overwrite: bool = False
    cpu: bool = False
    ignore_fingerprint: bool = False


@dataclass
class TrainInjected:
    """Pre-built components and hooks for a trainer (all optional; ``None`` = build it from the config / none).

    Attributes:
        tokenizer: tokenizer trainers: start from this (already loaded / tuned) tokenizer instead of a random one;
            ``train_var``: the frozen tokenizer, used instead of loading ``data.tokenizer``.
        feature_extractor: images uint8 ``[B,3,H,W]`` → features ``[B,F]`` for validation rFID. ``TokenizerTrainer``
            skips rFID without one; ``train_tokenizer`` and ``finetune_tokenizer`` then use the clean-fid Inception
            of :func:`xqtool.training.build.rfid_extractor` (skipped when its weights are missing, unless
            ``train.best_metric=rfid``, which raises WeightsMissingError).
        disc_overrides / teacher_overrides: size overrides of the discriminator / the teachers (tiny models in tests).
        allow_random_weights: tests only: keep random init for LPIPS / teachers / DINO discriminator when their
            weights are missing.
        console: a rich console for the progress bar and the plain log lines (``train_var``: no output without one).
        callbacks: called after every optimizer step; the tokenizer trainers pass the trainer, ``train_var`` the
            step's history row.
        on_finish: tokenizer trainers: called with the trainer and its result before the summary is written.
    """

    tokenizer: Any = None
    feature_extractor: Optional[Callable[[Any], Any]] = None
    disc_overrides: Optional[Dict[str, Any]] = None
    teacher_overrides: Optional[Dict[str, Any]] = None
    allow_random_weights: bool = False
    console: Any = None
    callbacks: Sequence[Callable[[Any], None]] = ()
    on_finish: Optional[Callable[[Any, Any], None]] = None


__all__ = ["TokenizerRunOptions", "TrainInjected", "VARRunOptions"]
