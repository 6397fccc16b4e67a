"""Model families: adapters (structure) and loaders (weights)."""
from . import llama  # noqa: F401  (registers the adapters)
from .adapter import Block, ModelAdapter, get_adapter, register_adapter
from .dllm import DreamModelLM, LLaDAModelLM

__all__ = ["Block", "ModelAdapter", "get_adapter", "register_adapter", "DreamModelLM", "LLaDAModelLM"]
