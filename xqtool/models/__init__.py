"""Networks: the XQ-GAN tokenizer (:mod:`~xqtool.models.tokenizer`, built from its ``model`` and ``quant``
config sections only), its CNN and DINOv2-ViT encoders/decoders (``cnn``, ``vit``), the VAR generator and its
sampler (``var``, ``var_sampling``), discriminators, frozen semantic teachers, and LoRA surgery (``lora``).

Owns architecture and forward passes, nothing about training schedules, files or the command line. May import
``config``, ``quantize``, ``metrics`` (parameter counts), ``errors``, and ``checkpoints.pretrained`` (lazily, to
load backbone weights); never ``tasks``, ``training`` or ``cli``.
"""
