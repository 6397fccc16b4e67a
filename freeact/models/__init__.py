"""Model families: adapters (structure) and loaders (weights)."""
from . import internvl, llama, qwen2_5_vl  # noqa: F401  (register the adapters)
from .adapter import Block, ModelAdapter, get_adapter, register_adapter
from .dllm import DreamModelLM, LLaDAModelLM

__all__ = ["Block", "ModelAdapter", "get_adapter", "register_adapter", "DreamModelLM", "LLaDAModelLM"]
