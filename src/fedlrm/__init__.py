"""fedlrm: personalized federated fine-tuning of CLIP-style models with LoRA mixtures."""

__version__ = "0.1.0"
