"""xqtool: XQ-GAN hierarchical image tokenizers and VAR next-scale generation.

Layers, each importing only from the ones before it: ``errors``, ``fsutil``, ``runtime``, ``distributed`` →
``config`` → ``quantize`` → ``models``, ``losses`` → ``checkpoints`` → ``data``, ``metrics``, ``fid_stats``,
``evaluation`` → ``training`` → ``tasks`` (one function per job) → ``cli`` (parse options, call one task,
print). Two exceptions look forward: ``quantize`` and ``models`` use ``metrics``' codebook and parameter
counters, and ``models`` loads backbone weights through ``checkpoints.pretrained`` (lazily). The README's
"Project layout" section says what each package owns.
"""

__version__ = "0.1.0"
