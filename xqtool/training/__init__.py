"""Training of the tokenizer (spec tokenizer.md §5) and of VAR (spec var.md §1, §3).

Owns the trainers (:mod:`~xqtool.training.tokenizer_trainer`, :mod:`~xqtool.training.var_trainer`), the
tokenizer's generator/discriminator objectives (:mod:`~xqtool.training.objective`), what the trainers are built
from (:mod:`~xqtool.training.build`: data, models, optimizers), the lr/weight-decay/RobustTok schedules of both
trainers (:mod:`~xqtool.training.schedules`), what a run shows (:mod:`~xqtool.training.reporting`) and what a
trainer takes besides its config (:mod:`~xqtool.training.options`: run options such as :class:`TokenizerRunOptions`
and one :class:`TrainInjected` of pre-built components and hooks). It may import config, models, quantize,
losses, data, metrics, evaluation, checkpoints/training state and runtime helpers; nothing outside
``xqtool.tasks`` and ``xqtool.cli`` imports the trainers (models never import training).
"""

from xqtool.training.options import TokenizerRunOptions, TrainInjected, VARRunOptions
from xqtool.training.tokenizer_trainer import TokenizerTrainer, TrainResult, train_tokenizer
from xqtool.training.var_trainer import TrainVARResult, train_var

__all__ = ["TokenizerRunOptions", "TokenizerTrainer", "TrainInjected", "TrainResult", "TrainVARResult", "VARRunOptions",
           "train_tokenizer", "train_var"]
