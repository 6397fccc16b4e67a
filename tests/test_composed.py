"""Composed checkpoints (freeact.models.composed): a base model from elsewhere + only the trained
tensors. Built on a tiny random LLaMA base, so nothing here needs the SmolLM2 GGUF (train_vlm's run
needs easy-vqa's images): the same code builds testbed_vlm (Qwen2.5-VL around SmolLM2) and
testbed_dream (Dream-style SmolLM2)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import requires_easy_vqa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.testbeds import train_dream, train_vlm  # noqa: E402
from freeact.eval.elbo import elbo  # noqa: E402
from freeact.models import DreamModelLM, get_adapter  # noqa: E402
from freeact.models.composed import compose, load_trained, save_trained  # noqa: E402
from freeact.models.loading import load_pretrained  # noqa: E402

PREFIX_VLM = {"model.": "model.language_model.", "lm_head.": "lm_head."}


def _vlm_parts(tmp_path, lora_rank=0):
    """A tiny Qwen2.5-VL checkpoint dir around a tiny LLaMA base, and its trained tensors."""
    base = train_vlm.tiny_base(tmp_path / "base")
    tok = train_vlm.build_checkpoint_dir(tmp_path / "ck", base, train_vlm.TINY_VISION, lora_scale=0.5)
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "ck")
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    base_model = load_pretrained("causal", base["path"], torch.float64)
    n = base_model.get_input_embeddings().weight.shape[0]
    trained = {f"model.visual.{k}": v for k, v in model.model.visual.state_dict().items()}
    trained["model.language_model.embed_tokens.weight.new_rows"] = \
        model.model.language_model.embed_tokens.weight[n:].detach().clone()
    trained.update({k: torch.zeros_like(p) for k, p in model.named_parameters() if k.endswith(".bias")
                    and ".language_model." in k})
    g = torch.Generator().manual_seed(1)
    lora = {}
    if lora_rank:
        q = model.model.language_model.layers[0].self_attn.q_proj
        lora = {"model.language_model.layers.0.self_attn.q_proj.lora_A": torch.randn(lora_rank, q.in_features, generator=g),
                "model.language_model.layers.0.self_attn.q_proj.lora_B": torch.randn(q.out_features, lora_rank, generator=g)}
    return tok, base_model, n, trained, lora


def test_composed_vlm_is_exactly_its_base_on_text(tmp_path):
    tok, base_model, n, trained, _ = _vlm_parts(tmp_path)
    save_trained(trained, tmp_path / "ck", max_shard_mb=0.05)  # several shards
    assert len(list((tmp_path / "ck").glob("trained-*.safetensors"))) > 1
    assert json.loads((tmp_path / "ck" / "composed.json").read_text())["base_prefix"] == PREFIX_VLM
    vlm = load_pretrained("vlm", str(tmp_path / "ck"), torch.float64)
    assert type(vlm).__name__ == "Qwen2_5_VLForConditionalGeneration"
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        a = base_model(input_ids=ids).logits
        b = vlm(input_ids=ids).logits
    assert b.shape[-1] == len(tok) > n  # the vision special tokens were added
    # Qwen2 layers with zero q/k/v biases and multimodal RoPE on text positions = the LLaMA base
    assert ((a - b[..., :n]).abs().max() / a.abs().max()).item() < 1e-12
    emb = vlm.model.language_model.embed_tokens.weight
    assert torch.equal(emb[n:], trained["model.language_model.embed_tokens.weight.new_rows"].double())
    assert vlm.lm_head.weight is emb  # tied, as in SmolLM2


def test_composed_low_rank_update_is_merged(tmp_path):
    _, base_model, _, trained, lora = _vlm_parts(tmp_path, lora_rank=3)
    save_trained({**trained, **lora}, tmp_path / "ck")
    vlm = load_pretrained("vlm", str(tmp_path / "ck"), torch.float64)
    w0 = base_model.model.layers[0].self_attn.q_proj.weight
    key = "model.language_model.layers.0.self_attn.q_proj"
    want = w0 + 0.5 * lora[f"{key}.lora_B"].double() @ lora[f"{key}.lora_A"].double()
    got = vlm.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(got, want, atol=1e-6, rtol=0)  # float32 factors, merged in float64
    assert torch.equal(vlm.model.language_model.layers[1].self_attn.q_proj.weight,
                       base_model.model.layers[1].self_attn.q_proj.weight)  # no update: unchanged


def test_composed_refuses_incomplete_or_misfit_tensors(tmp_path):
    _, base_model, _, trained, _ = _vlm_parts(tmp_path)
    vlm_cfg = transformers.AutoConfig.from_pretrained(tmp_path / "ck")
    fresh = lambda: transformers.Qwen2_5_VLForConditionalGeneration._from_config(vlm_cfg)  # noqa: E731
    sd = base_model.state_dict()
    partial = {k: v for k, v in trained.items() if not k.startswith("model.visual.blocks.0.")}
    with pytest.raises(ValueError, match="neither the base nor the trained"):
        compose(fresh(), sd, partial, PREFIX_VLM)
    bad = dict(trained)
    bad["model.language_model.embed_tokens.weight.new_rows"] = bad["model.language_model.embed_tokens.weight.new_rows"][:1]
    with pytest.raises(ValueError, match="does not complete"):
        compose(fresh(), sd, bad, PREFIX_VLM)
    with pytest.raises(ValueError, match="not a parameter"):
        compose(fresh(), sd, {**trained, "model.no_such.weight": torch.zeros(1)}, PREFIX_VLM)
    with pytest.raises(ValueError, match="lora_A and lora_B"):
        compose(fresh(), sd, {**trained, "model.language_model.layers.0.mlp.up_proj.lora_A": torch.zeros(1, 4)},
                PREFIX_VLM)


def test_train_dream_tiny_end_to_end(tmp_path):
    """The Dream-style adaptation script on a tiny base: it trains, exports a composed checkpoint of
    the trained tensors only, and that checkpoint loads as a bidirectional, shifted-logits dLLM."""
    train_dream.main(["--out", str(tmp_path), "--tiny", "--steps", "4"])
    log = json.loads((tmp_path / "train_dream_log.json").read_text())
    assert log["steps"] == 4 and math.isfinite(log["test_elbo"]["nll"]) and log["outliers"]
    ck = tmp_path / "testbed_dream"
    names = set(load_trained(ck))
    assert any(k.endswith(".lora_A") for k in names) and any("norm" in k for k in names)
    assert not any(k.endswith("proj.weight") for k in names)  # base weights are not shipped
    model = load_pretrained("dream", str(ck), torch.float32)
    assert isinstance(model, DreamModelLM) and model.config.is_causal is False
    adapter = get_adapter(model)
    assert adapter.objective == "mdm" and adapter.shift_logits
    ids = torch.randint(2, 4000, (1, 64))
    r = elbo(model, adapter, ids.flatten(), 32, mc_num=2, seed=0, progress=False)
    assert math.isfinite(r["nll"]) and r["eval_tokens"] == 64


@requires_easy_vqa
def test_train_vlm_tiny_end_to_end(tmp_path):
    train_vlm.main(["--out", str(tmp_path), "--tiny", "--lora_rank", "2"])
    log = json.loads((tmp_path / "train_vlm_log.json").read_text())
    assert log["steps"] == 6 and 0 <= log["test_acc"] <= 1 and log["params_trained"]["low_rank"] > 0
    vlm = load_pretrained("vlm", str(tmp_path / "testbed_vlm"), torch.float32)
    assert type(vlm).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_elbo_with_a_start_token_never_masks_or_scores_it(tokenizer):
    from freeact.data.text import read_text, token_stream
    from freeact.models.tiny import build_tiny

    model = build_tiny("llada", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, max_position_embeddings=64), tokenizer)
    adapter = get_adapter(model)
    ids = token_stream(tokenizer, read_text("wiki.test", 5000))
    seen = []
    h = model.model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    r = elbo(model, adapter, ids, 16, mc_num=3, seed=0, max_chunks=2, progress=False, bos_id=tokenizer.bos_token_id)
    h.remove()
    assert r["eval_tokens"] == 2 * 15
    x = torch.cat(seen)
    assert (x[:, 0] == tokenizer.bos_token_id).all()  # position 0 is the start token, never the mask
    assert (x[:, 1:] == adapter.mask_token_id).any()
    assert torch.equal(x[0, 1:][x[0, 1:] != adapter.mask_token_id],
                       ids[:15][x[0, 1:] != adapter.mask_token_id])  # the text follows it
