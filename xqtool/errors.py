"""User-facing errors.

Every mistake a user can make (bad path, bad config, incompatible checkpoint, corrupt data,
out-of-range tokens) raises a subclass of :class:`XQError` with a one-line message. The CLI
prints the message without a traceback and exits with code 2. Bugs keep their traceback.
"""

from __future__ import annotations


class XQError(Exception):
    """Base class of all user-facing errors (one-line message, CLI exit code 2)."""


class ConfigError(XQError):
    """Invalid, unknown or impossible configuration values."""


class CheckpointError(XQError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit the model."""


class DataError(XQError):
    """An image source is missing, empty or unreadable (or a bad file under policy `fail`)."""


class TokenError(XQError):
    """Token arrays that do not fit the tokenizer (range, length, manifest mismatch)."""


class WeightsMissingError(XQError):
    """Pretrained weights (DINOv2, CLIP, VGG/LPIPS, Inception) are not available offline."""


class OutputError(XQError):
    """An output may not be written: it exists, lies inside a source, is locked, or the disk is full."""
