"""xqtool: XQ-GAN hierarchical image tokenizers and VAR next-scale generation."""

__version__ = "0.1.0"
