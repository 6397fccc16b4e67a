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
tokenizer shipped in ``freeact/assets/tokenizer``; ``source: pretrained`` loads ``path`` (a hub
id or a local directory) and ``gguf_file`` if given.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from .sharding import shard_groups
from ..paths import PKG_SCHEME, resolve_path  # noqa: F401  (re-exported)
from .dllm import DreamConfig, DreamModelLM, LLaDAConfig, LLaDAModelLM

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
TINY_VLM_DIR = ASSETS / "tiny_vlm"  # tokenizer with image tokens + image processor of the tiny VLM

# LLaDA's checkpoint names (OLMo-style) -> transformers LLaMA names, and back.
LLADA_TO_HF = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.": r"model.layers.\1.input_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
    # one pattern per projection: transformers' key_mapping supports a single group (\1) only
    r"^model\.transformer\.blocks\.(\d+)\.q_proj\.": r"model.layers.\1.self_attn.q_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.k_proj\.": r"model.layers.\1.self_attn.k_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.v_proj\.": r"model.layers.\1.self_attn.v_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_out\.": r"model.layers.\1.self_attn.o_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.up_proj\.": r"model.layers.\1.mlp.up_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_out\.": r"model.layers.\1.mlp.down_proj.",
}
HF_TO_LLADA = {
    r"^model\.embed_tokens\.": "model.transformer.wte.",
    r"^model\.norm\.": "model.transformer.ln_f.",
    r"^lm_head\.": "model.transformer.ff_out.",
    r"^model\.layers\.(\d+)\.input_layernorm\.": r"model.transformer.blocks.\1.attn_norm.",
    r"^model\.layers\.(\d+)\.post_attention_layernorm\.": r"model.transformer.blocks.\1.ff_norm.",
    r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.": r"model.transformer.blocks.\1.\2.",
    r"^model\.layers\.(\d+)\.self_attn\.o_proj\.": r"model.transformer.blocks.\1.attn_out.",
    r"^model\.layers\.(\d+)\.mlp\.gate_proj\.": r"model.transformer.blocks.\1.ff_proj.",
    r"^model\.layers\.(\d+)\.mlp\.up_proj\.": r"model.transformer.blocks.\1.up_proj.",
    r"^model\.layers\.(\d+)\.mlp\.down_proj\.": r"model.transformer.blocks.\1.ff_out.",
}
# LLaDA config.json field -> LlamaConfig field
LLADA_CONFIG_FIELDS = {
    "d_model": "hidden_size", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
    "n_layers": "num_hidden_layers", "mlp_hidden_size": "intermediate_size", "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps", "max_sequence_length": "max_position_embeddings",
    "mask_token_id": "mask_token_id", "weight_tying": "tie_word_embeddings",
    "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id",
}
# Every field the official LLaDA config class (``configuration_llada.py`` of the LLaDA-8B hub repos,
# an OLMo-style ``ModelConfig``) reads, with the values of the released LLaDA-8B ``config.json``
# that do not depend on the model's size. ``block_type: llama`` with ``rope``, ``rms`` norms and
# ``silu`` (SwiGLU through ``ff_proj``/``up_proj``) is the layer the project's LLaMA-layout model is.
LLADA_OFFICIAL_FIXED = {
    "activation_type": "silu", "block_type": "llama", "block_group_size": 1, "alibi": False,
    "alibi_bias_max": 8.0, "rope": True, "rope_full_precision": True, "flash_attention": False,
    "attention_dropout": 0.0, "multi_query_attention": None, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True, "residual_dropout": 0.0, "embedding_dropout": 0.0,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "include_bias": False, "include_qkv_bias": False, "bias_for_layer_norm": False, "scale_logits": False,
    "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "init_cutoff_factor": None,
    "precision": "amp_bf16", "use_cache": False,
}
# auto_map of the released checkpoints: the official code files are named like this in the hub repo
LLADA_AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
DREAM_AUTO_MAP = {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}
# fields the official Dream config class (``configuration_dream.py``, Qwen2-style) reads
DREAM_OFFICIAL_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "tie_word_embeddings", "rope_theta", "rope_scaling", "use_sliding_window", "sliding_window",
    "max_window_layers", "attention_dropout", "mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id",
)

FAMILIES = ("causal", "llada", "dream", "vlm")
# config fields of a VLM that name special tokens, filled from the tokenizer's named tokens
VLM_TOKEN_FIELDS = ("image", "video", "vision_start", "vision_end")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def _rename(sd: dict, mapping: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for pat, rep in mapping.items():
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[k] = v
    return out


def _read_config_json(path: str) -> dict:
    from transformers.utils import cached_file

    with open(cached_file(path, "config.json")) as f:
        return json.load(f)


def llada_config_from_json(raw: dict) -> LLaDAConfig:
    kw = {hf: raw[k] for k, hf in LLADA_CONFIG_FIELDS.items() if k in raw}
    kw["vocab_size"] = raw.get("embedding_size") or raw["vocab_size"]
    kw.setdefault("num_key_value_heads", kw.get("num_attention_heads"))
    kw["attention_bias"] = bool(raw.get("include_bias", False))
    # the official config has no bos_token_id: keep it unset rather than LLaMA's default (1)
    kw.setdefault("bos_token_id", None)
    return LLaDAConfig(**kw)


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
        cfg = llada_config_from_json(_read_config_json(path))
        return LLaDAModelLM.from_pretrained(path, config=cfg, key_mapping=LLADA_TO_HF, dtype=dtype)
    if family == "dream":
        raw = _read_config_json(path)
        raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
        return DreamModelLM.from_pretrained(path, config=DreamConfig(**raw), dtype=dtype)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw, **remote)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF: weights are dequantized already
        model.hf_quantizer = None
        model.config.quantization_config = None
    return model


def _rope_theta(c) -> float:
    rope = getattr(c, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def llada_official_config(c) -> dict:
    """The ``config.json`` of a LLaDA checkpoint for the project's model config ``c``: every field the
    official LLaDA code reads, so that ``trust_remote_code`` loading builds the same layers."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"LLaDA needs head_dim * n_heads == d_model, got {head_dim} * {c.num_attention_heads}"
                         f" != {c.hidden_size}")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("LLaDA's official layout has no linear biases; this model has attention_bias/mlp_bias")
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":  # (transformers 5: rope_scaling is this same dict)
        raise ValueError(f"LLaDA's official code has plain RoPE only, got {rope}")
    cfg = dict(LLADA_OFFICIAL_FIXED)
    cfg.update(
        d_model=c.hidden_size, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads or c.num_attention_heads, n_layers=c.num_hidden_layers,
        mlp_hidden_size=c.intermediate_size, mlp_ratio=max(1, c.intermediate_size // c.hidden_size),
        rms_norm_eps=c.rms_norm_eps, max_sequence_length=c.max_position_embeddings, rope_theta=_rope_theta(c),
        vocab_size=c.vocab_size, embedding_size=c.vocab_size, weight_tying=bool(c.tie_word_embeddings),
        mask_token_id=c.mask_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else c.eos_token_id,
        model_type="llada", architectures=["LLaDAModelLM"], auto_map=dict(LLADA_AUTO_MAP),
    )
    if c.bos_token_id is not None:  # not read by the official code; kept for the project's loader
        cfg["bos_token_id"] = c.bos_token_id
    return cfg


def save_llada_checkpoint(model: LLaDAModelLM, path: str | os.PathLike, max_shard_mb: float | None = None) -> None:
    """Write ``model`` as a LLaDA checkpoint (LLaDA's key names and config fields). With
    ``max_shard_mb``, weights go to ``model-0000i-of-0000n.safetensors`` files of at most that
    size (unless one tensor is larger) plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = llada_official_config(model.config)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    sd = _rename(sd, HF_TO_LLADA)
    if max_shard_mb is None:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    shards = shard_groups(sd, max_shard_mb)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def save_dream_checkpoint(model: DreamModelLM, path: str | os.PathLike) -> None:
    """Write ``model`` as a Dream checkpoint (Qwen2 key names, ``model_type: Dream``)."""
    path = Path(path)
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    c = model.config
    cfg.update(model_type="Dream", architectures=["DreamModel"], auto_map=dict(DREAM_AUTO_MAP),
               rope_theta=_rope_theta(c), rope_scaling=None, use_cache=False,
               use_sliding_window=bool(getattr(c, "use_sliding_window", False)),
               sliding_window=getattr(c, "sliding_window", None) or 4096,
               max_window_layers=getattr(c, "max_window_layers", None) or c.num_hidden_layers,
               attention_dropout=float(getattr(c, "attention_dropout", 0.0)))
    for k in DREAM_OFFICIAL_FIELDS:
        cfg.setdefault(k, getattr(c, k, None))
    if cfg.get("pad_token_id") is None:
        cfg["pad_token_id"] = c.eos_token_id
    cfg.pop("rope_parameters", None)  # the official (transformers 4.x) code reads rope_theta/rope_scaling
    (path / "config.json").write_text(json.dumps(cfg, indent=1))


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
