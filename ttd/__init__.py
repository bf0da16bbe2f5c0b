"""TTD: Text-Tag Self-Distillation for CLIP — model, tag selection, fine-tuning and runtimes."""

__version__ = "0.1.0"
