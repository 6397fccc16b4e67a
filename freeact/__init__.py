"""freeact: post-training quantization of diffusion and multimodal LLMs (FreeAct and its baselines)."""

__version__ = "0.1.0"


def load_quantized(path, device=None):
    """Rebuild a quantized model saved by a run with ``save_model=true``: (model, tokenizer, config)."""
    from .artifacts import load_quantized as _load

    return _load(path, device)


__all__ = ["load_quantized", "__version__"]
