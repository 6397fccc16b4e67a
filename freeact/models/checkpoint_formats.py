"""The official checkpoint formats of LLaDA and Dream: LLaDA's key names (OLMo-style) and config fields
mapped to the transformers LLaMA layout and back, and writers that save a model in either format (so that
the official code, with ``trust_remote_code``, loads it: how the testbeds ship and how loading was checked
bit for bit against the official code)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .dllm import DreamModelLM, LLaDAConfig, LLaDAModelLM
from .sharding import shard_groups

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


def _rename(sd: dict, mapping: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for pat, rep in mapping.items():
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[k] = v
    return out


def read_config_json(path: str) -> dict:
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
