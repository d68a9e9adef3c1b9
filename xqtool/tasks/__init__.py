"""Task entry points: one public function per job that a CLI command runs (train, finetune, encode, decode,
sample, probe, eval-fid, make-fid-stats, inspect, push, make-shards).

The non-training entry points take a settings dataclass (``EncodeSettings``, ``DecodeSettings``,
``SampleSettings``, ``ProbeSettings``, ``FidSettings``, ``FidStatsSettings``: what the CLI options say; the
CLI builds them) plus one optional :class:`xqtool.tasks.injected.Injected` (pre-built models and extractors
used by tests, progress callbacks used by the CLI). ``finetune_tokenizer`` takes ``FinetuneSettings`` plus the
trainers' objects (:class:`xqtool.training.TokenizerRunOptions` and :class:`xqtool.training.TrainInjected`,
defined in ``training`` because tasks sit above it). Tasks may import everything below them (config, data,
models, quantize, losses, metrics, fid_stats, checkpoints, fsutil, runtime, distributed) but never
``xqtool.cli``, and they print nothing (they log, and return results the CLI prints).
"""
