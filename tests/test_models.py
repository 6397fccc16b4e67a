"""Tiny models of every family: forward/backward, attention direction, checkpoint round trips."""
import json

import pytest
import torch
from safetensors import safe_open

from freeact.models import DreamModelLM, LLaDAModelLM, get_adapter
from freeact.models.loading import load_pretrained, save_dream_checkpoint, save_llada_checkpoint


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
