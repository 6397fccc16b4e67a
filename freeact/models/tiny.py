"""Tiny models for tests and demos: a family's architecture at a small size with random weights, and the
tokenizers shipped in ``freeact/assets`` (text LMs share one; the tiny VLM's has image tokens)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from .dllm import DreamConfig, DreamModelLM, LLaDAConfig, LLaDAModelLM

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
TINY_VLM_DIR = ASSETS / "tiny_vlm"  # tokenizer with image tokens + image processor of the tiny VLM
VLM_TOKEN_FIELDS = ("image", "video", "vision_start", "vision_end")


def default_tokenizer_dir(family: str) -> Path:
    """The shipped tokenizer of a tiny model: text LMs share one; the tiny VLM has image tokens."""
    return TINY_VLM_DIR if family == "vlm" else TOKENIZER_DIR


def build_tiny_vlm(arch: dict, tokenizer):
    """A vision-language model from ``arch = {model_type, text_config, vision_config, ...}``
    (e.g. ``qwen2_5_vl``); special-token ids and the vocabulary come from the tokenizer."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    kw = dict(arch)
    if "model_type" not in kw or "text_config" not in kw:
        raise ValueError("a tiny vlm arch needs model_type and text_config (and usually vision_config)")
    text = dict(kw.pop("text_config"))
    text.setdefault("vocab_size", len(tokenizer))
    for name in ("bos", "eos", "pad"):
        text.setdefault(f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    for name in VLM_TOKEN_FIELDS:
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            kw.setdefault(f"{name}_token_id", tid)
    cfg = AutoConfig.for_model(kw.pop("model_type"), text_config=text, **kw)
    return AutoModelForImageTextToText.from_config(cfg)


def build_tiny(family: str, arch: dict, tokenizer, seed: int = 0):
    """A randomly initialised model of ``family`` with the small ``arch`` dims."""
    if family == "vlm":
        torch.manual_seed(seed)
        return build_tiny_vlm(arch, tokenizer)
    kw = dict(arch)
    kw.setdefault("vocab_size", len(tokenizer))
    kw.setdefault("bos_token_id", tokenizer.bos_token_id)
    kw.setdefault("eos_token_id", tokenizer.eos_token_id)
    kw.setdefault("pad_token_id", tokenizer.pad_token_id)
    if family in ("llada", "dream"):
        if tokenizer.mask_token_id is None:
            raise ValueError("a diffusion LM needs a tokenizer with a mask token")
        kw.setdefault("mask_token_id", tokenizer.mask_token_id)
    cfg = {"causal": LlamaConfig, "llada": LLaDAConfig, "dream": DreamConfig}[family](**kw)
    torch.manual_seed(seed)
    cls = {"llada": LLaDAModelLM, "dream": DreamModelLM}.get(family)
    return cls(cfg) if cls else AutoModelForCausalLM.from_config(cfg)
