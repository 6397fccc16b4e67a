"""Build or load a model + tokenizer from a model config.

``family`` says which architecture the weights have:

* ``causal``: any transformers causal LM (LLaMA, Qwen2, SmolLM2 ...), via ``AutoModelForCausalLM``;
* ``llada``: LLaDA checkpoints (their own key names, ``model.transformer.blocks.N...``);
* ``dream``: Dream checkpoints (Qwen2 key names, ``model_type: Dream``);
* ``vlm``: vision-language models (Qwen2.5-VL, InternVL ...), via ``AutoModelForImageTextToText``;
  the tiny one uses the tokenizer and image processor in ``freeact/assets/tiny_vlm``.

A directory with ``composed.json`` holds only the trained tensors of a model whose other weights
come from a base model (:mod:`freeact.models.composed`; ``testbed_vlm``).

``source: tiny`` builds the family's architecture at a small size with random weights and the
tokenizer shipped in ``freeact/assets/tokenizer`` (:mod:`freeact.models.tiny`); ``source: pretrained``
loads ``path`` (a hub id or a local directory, ``pkg://`` for a path inside an installed package) and
``gguf_file`` if given; LLaDA's own key names and config fields: :mod:`freeact.models.checkpoint_formats`.
"""
from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..paths import resolve_path
from .checkpoint_formats import LLADA_TO_HF, read_config_json, llada_config_from_json
from .dllm import DreamConfig, DreamModelLM, LLaDAModelLM
from .tiny import TOKENIZER_DIR, build_tiny, default_tokenizer_dir

def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


REMOTE_CODE_HINT = "set model.trust_remote_code=true to run it (it executes code shipped with the checkpoint)"


def _needs_remote_code(err: Exception) -> bool:
    return "trust_remote_code" in str(err)


def remote_code_error(path: str, what: str) -> ValueError:
    return ValueError(f"{path}: the {what} needs the checkpoint's own code; {REMOTE_CODE_HINT}")


def load_tokenizer(path: str | os.PathLike | None, gguf_file: str | None = None, trust_remote_code: bool = False):
    path = resolve_path(path) or str(TOKENIZER_DIR)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if trust_remote_code:
        kw["trust_remote_code"] = True
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except ValueError as e:
        if not trust_remote_code and _needs_remote_code(e):
            raise remote_code_error(path, "tokenizer") from None
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(family: str, path: str, dtype: torch.dtype, gguf_file: str | None = None,
                    trust_remote_code: bool = False):
    path = resolve_path(path)
    try:
        return _load_pretrained(family, path, dtype, gguf_file, trust_remote_code)
    except ValueError as e:
        if not trust_remote_code and _needs_remote_code(e):
            raise remote_code_error(path, "model") from None
        raise


def _load_pretrained(family: str, path: str, dtype: torch.dtype, gguf_file: str | None, trust_remote_code: bool):
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    from .composed import is_composed, load_composed  # composed models: transformers only when needed

    if is_composed(path):  # ships only its trained tensors; the rest comes from a base model
        return load_composed(path, dtype, load_base_model=load_pretrained)
    if family == "vlm":
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **remote)
    if family == "llada":
        cfg = llada_config_from_json(read_config_json(path))
        return LLaDAModelLM.from_pretrained(path, config=cfg, key_mapping=LLADA_TO_HF, dtype=dtype)
    if family == "dream":
        raw = read_config_json(path)
        raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
        return DreamModelLM.from_pretrained(path, config=DreamConfig(**raw), dtype=dtype)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw, **remote)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF: weights are dequantized already
        model.hf_quantizer = None
        model.config.quantization_config = None
    return model


# ----------------------------------------------------------------------------- a run's model
def pick_device(name: str) -> str:
    """``auto`` -> cuda when there is one, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_model(mcfg, device: str, seed: int = 0):
    """The model and tokenizer a run's ``model`` config names (tiny random, hub id, local path, ``pkg://``)."""
    from omegaconf import OmegaConf

    dtype = resolve_dtype(mcfg.dtype, device)
    if mcfg.source == "tiny":
        tok = load_tokenizer(mcfg.tokenizer or default_tokenizer_dir(mcfg.family))
        model = build_tiny(mcfg.family, OmegaConf.to_container(mcfg.arch), tok, seed=seed).to(dtype)
    else:
        remote = bool(mcfg.get("trust_remote_code", False))
        tok = load_tokenizer(mcfg.tokenizer or mcfg.path, gguf_file=None if mcfg.tokenizer else mcfg.gguf_file,
                             trust_remote_code=remote)
        model = load_pretrained(mcfg.family, mcfg.path, dtype, gguf_file=mcfg.gguf_file, trust_remote_code=remote)
    return model.to(device).eval(), tok
