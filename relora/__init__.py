"""relora-study: ReLoRA vs full-rank pretraining of small language models."""

__version__ = "0.1.0"
