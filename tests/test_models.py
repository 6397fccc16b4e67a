"""Tiny models of every family: forward/backward, attention direction, checkpoint round trips."""
import json

import pytest
import torch
from safetensors import safe_open

from freeact.models import DreamModelLM, LLaDAModelLM, get_adapter
from freeact.models.checkpoint_formats import save_dream_checkpoint, save_llada_checkpoint
from freeact.models.loading import load_pretrained


@pytest.mark.parametrize("kind", ["llama", "llada", "dream"])
def test_forward_backward(tiny_model, kind):
    model = tiny_model(kind).train()
    ids = torch.randint(2, 4096, (2, 16))
    out = model(input_ids=ids)
    assert out.logits.shape == (2, 16, model.config.vocab_size)
    out.logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    adapter = get_adapter(model)
    assert len(adapter.blocks()) == model.config.num_hidden_layers
    assert set(adapter.block(0).linears()) == {"q", "k", "v", "o", "gate", "up", "down"}


@pytest.mark.parametrize("kind,bidirectional", [("llama", False), ("llada", True), ("dream", True)])
def test_attention_direction(tiny_model, kind, bidirectional):
    model = tiny_model(kind)
    a = torch.randint(2, 4096, (1, 12))
    b = a.clone()
    b[0, -1] = (a[0, -1] + 7) % 4096
    with torch.no_grad():
        changed = not torch.allclose(model(input_ids=a).logits[0, 0], model(input_ids=b).logits[0, 0])
    assert changed == bidirectional


def test_adapters_know_objectives(tiny_model, tokenizer):
    assert get_adapter(tiny_model("llama")).objective == "ar"
    llada, dream = get_adapter(tiny_model("llada")), get_adapter(tiny_model("dream"))
    assert llada.objective == dream.objective == "mdm"
    assert llada.mask_token_id == dream.mask_token_id == tokenizer.mask_token_id
    assert not llada.shift_logits and dream.shift_logits
    with pytest.raises(TypeError, match="no freeact adapter"):
        get_adapter(torch.nn.Linear(2, 2))


def test_dream_logits_are_shifted(tiny_model):
    model = tiny_model("dream")
    adapter = get_adapter(model)
    ids = torch.randint(2, 4096, (1, 8))
    with torch.no_grad():
        out = model(input_ids=ids)
    aligned = adapter.logits(out)
    torch.testing.assert_close(aligned[:, 1:], out.logits[:, :-1])


def test_llada_checkpoint_round_trip(tiny_model, tmp_path):
    model = tiny_model("llada")
    save_llada_checkpoint(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["d_model"] == 64 and cfg["n_layers"] == 2
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # LLaDA's own names, as in the released checkpoints
    for k in ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
              "model.transformer.blocks.1.attn_norm.weight", "model.transformer.blocks.1.q_proj.weight",
              "model.transformer.blocks.1.attn_out.weight", "model.transformer.blocks.1.ff_norm.weight",
              "model.transformer.blocks.1.ff_proj.weight", "model.transformer.blocks.1.up_proj.weight",
              "model.transformer.blocks.1.ff_out.weight"]:
        assert k in keys, k
    assert not any(k.startswith("model.layers") for k in keys)
    loaded = load_pretrained("llada", str(tmp_path), torch.float32).eval()
    assert isinstance(loaded, LLaDAModelLM) and loaded.config.mask_token_id == model.config.mask_token_id
    ids = torch.randint(2, 4096, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_dream_checkpoint_round_trip(tiny_model, tmp_path):
    model = tiny_model("dream")
    save_dream_checkpoint(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "Dream" and cfg["hidden_size"] == 112
    loaded = load_pretrained("dream", str(tmp_path), torch.float32).eval()
    assert isinstance(loaded, DreamModelLM) and loaded.config.is_causal is False
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2 layout: qkv biases
    ids = torch.randint(2, 4096, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# Fields the official LLaDA config class reads (OLMo-style ModelConfig in configuration_llada.py of the
# LLaDA-8B hub repos, cross-checked with the released config.json); written out here as the reference.
LLADA_OFFICIAL_FIELDS = [
    "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_ratio", "mlp_hidden_size", "activation_type",
    "block_type", "block_group_size", "alibi", "alibi_bias_max", "rope", "rope_full_precision",
    "flash_attention", "attention_dropout", "multi_query_attention", "attention_layer_norm",
    "residual_dropout", "embedding_dropout", "input_emb_norm", "layer_norm_type", "layer_norm_with_affine",
    "rms_norm_eps", "attention_layer_norm_with_affine", "max_sequence_length", "rope_theta",
    "include_qkv_bias", "include_bias", "bias_for_layer_norm", "scale_logits", "vocab_size", "embedding_size",
    "weight_tying", "eos_token_id", "pad_token_id", "mask_token_id", "init_device", "init_fn", "init_std",
    "init_cutoff_factor", "precision", "use_cache", "model_type", "architectures", "auto_map",
]
# Fields the official Dream config class (configuration_dream.py, Qwen2-style) reads
DREAM_OFFICIAL_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "tie_word_embeddings", "rope_theta", "rope_scaling", "use_sliding_window", "sliding_window",
    "max_window_layers", "attention_dropout", "mask_token_id", "pad_token_id", "model_type", "architectures",
    "auto_map",
]


def test_llada_checkpoint_carries_the_official_config(tiny_model, tmp_path):
    model = tiny_model("llada")
    c = model.config
    save_llada_checkpoint(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    missing = [k for k in LLADA_OFFICIAL_FIELDS if k not in cfg]
    assert not missing, missing
    # the layer the official code builds from these is the project's LLaMA-layout block
    assert (cfg["block_type"], cfg["rope"], cfg["layer_norm_type"], cfg["activation_type"]) == ("llama", True, "rms", "silu")
    assert not cfg["alibi"] and not cfg["include_bias"] and not cfg["include_qkv_bias"] and not cfg["scale_logits"]
    assert cfg["d_model"] == c.hidden_size and cfg["n_heads"] == c.num_attention_heads
    assert cfg["n_kv_heads"] == c.num_key_value_heads and cfg["n_layers"] == c.num_hidden_layers
    assert cfg["mlp_hidden_size"] == c.intermediate_size  # the official MLP uses it for ff_proj/up_proj
    assert cfg["vocab_size"] == cfg["embedding_size"] == c.vocab_size
    assert cfg["weight_tying"] == c.tie_word_embeddings
    assert cfg["rope_theta"] == c.rope_parameters["rope_theta"] and cfg["rms_norm_eps"] == c.rms_norm_eps
    assert cfg["max_sequence_length"] == c.max_position_embeddings
    assert (cfg["mask_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (c.mask_token_id, c.eos_token_id, c.pad_token_id)
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_llada.LLaDAConfig",
                               "AutoModel": "modeling_llada.LLaDAModelLM",
                               "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
    # the official MLP width rule: mlp_hidden_size, else mlp_ratio * d_model; ours is set explicitly
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert tuple(f.get_slice("model.transformer.blocks.0.ff_out.weight").get_shape()) == (cfg["d_model"], cfg["mlp_hidden_size"])
        assert tuple(f.get_slice("model.transformer.blocks.0.k_proj.weight").get_shape()) == (
            cfg["n_kv_heads"] * cfg["d_model"] // cfg["n_heads"], cfg["d_model"])
    # round trip through the project's loader: special ids from the config, identical logits
    loaded = load_pretrained("llada", str(tmp_path), torch.float32).eval()
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
        assert getattr(loaded.config, k) == getattr(c, k), k
    ids = torch.randint(2, 4096, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_llada_config_ids_come_from_the_config(tmp_path):
    from freeact.models.checkpoint_formats import llada_config_from_json

    raw = {"d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 1, "mlp_hidden_size": 96, "vocab_size": 300,
           "embedding_size": 320, "mask_token_id": 299, "eos_token_id": 7, "pad_token_id": 8}
    cfg = llada_config_from_json(raw)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.mask_token_id, cfg.vocab_size) == (7, 8, 299, 320)
    assert cfg.bos_token_id is None  # the official config has none: not LLaMA's default 1
    assert llada_config_from_json({**raw, "bos_token_id": 6}).bos_token_id == 6


def test_dream_checkpoint_carries_the_official_config(tiny_model, tmp_path):
    model = tiny_model("dream")
    save_dream_checkpoint(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    missing = [k for k in DREAM_OFFICIAL_FIELDS if k not in cfg]
    assert not missing, missing
    c = model.config
    assert cfg["auto_map"] == {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}
    assert cfg["model_type"] == "Dream" and cfg["architectures"] == ["DreamModel"]
    assert cfg["mask_token_id"] == c.mask_token_id and cfg["hidden_size"] == c.hidden_size
    assert cfg["rope_theta"] == c.rope_parameters["rope_theta"] and cfg["rope_scaling"] is None
    assert cfg["use_sliding_window"] is False and cfg["use_cache"] is False
    loaded = load_pretrained("dream", str(tmp_path), torch.float32).eval()
    ids = torch.randint(2, 4096, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def _remote_code_tokenizer_dir(tmp_path):
    # a tokenizer whose class exists only in the checkpoint's own code (as Dream's on the hub)
    d = tmp_path / "remote_tok"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
    }))
    return d


def test_remote_code_tokenizer_error_names_the_key(tmp_path):
    from freeact.models.loading import load_tokenizer

    d = _remote_code_tokenizer_dir(tmp_path)
    with pytest.raises(ValueError) as e:
        load_tokenizer(str(d))
    msg = str(e.value)
    assert "model.trust_remote_code=true" in msg and str(d) in msg and "\n" not in msg


def test_trust_remote_code_is_in_the_model_schema():
    from omegaconf import OmegaConf

    from freeact.config import ModelConfig

    assert OmegaConf.structured(ModelConfig(name="x")).trust_remote_code is False
