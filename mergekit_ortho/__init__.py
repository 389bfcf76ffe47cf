"""mergekit-ortho: streaming, exact merging of checkpoints and LoRA adapters."""

__version__ = "0.1.0"
