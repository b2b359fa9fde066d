"""fedlrm: personalized federated fine-tuning of CLIP-style models with LoRA mixtures."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `import fedlrm` stays light: torch, transformers and the rest load on first use
    if name == "load_personalized":
        from fedlrm.inference import load_personalized

        return load_personalized
    raise AttributeError(f"module 'fedlrm' has no attribute {name!r}")


__all__ = ["__version__", "load_personalized"]
