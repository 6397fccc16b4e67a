"""Multimodal LLMs: adapters (Qwen2.5-VL, InternVL), vision/text token types, invariance of the
language model's rotations with an image in the prompt, data, metrics, the end-to-end run, and
the lmms-eval bridge. Tiny models, offline, CPU."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from freeact.data.multimodal import MultimodalCalibSet
from freeact.data.processor import (GridImageProcessor, encode_prompts, encode_with_continuations, load_processor,
                                    tokenizer_of)
from freeact.data.vqa_records import load_records, record_images
from freeact.data.vqa_sources import COLOURS, KINDS, generate_synthetic_vqa
from freeact.eval.multimodal import (anls, continuation_logprobs, evaluate_records, generate_answers,
                                     normalize_vqa_answer, references, vqa_accuracy)
from freeact.models import get_adapter
from freeact.models.loading import load_tokenizer
from freeact.models.tiny import build_tiny, default_tokenizer_dir
from freeact.models.token_types import TokenTypes, rules_from_names

RTOL = 1e-6


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy machine two OpenMP threads
    per op made these tests about ten times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_vlm_arch():
    conf = Path(__file__).resolve().parent.parent / "conf" / "model" / "tiny_vlm.yaml"
    return OmegaConf.to_container(OmegaConf.load(conf).arch)


@pytest.fixture(scope="module")
def processor():
    return load_processor(default_tokenizer_dir("vlm"))


@pytest.fixture(scope="module")
def make_vlm():
    tok = load_tokenizer(default_tokenizer_dir("vlm"))

    def make(dtype=torch.float32, seed=0):
        return build_tiny("vlm", tiny_vlm_arch(), tok, seed=seed).to(dtype).eval()

    return make


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    """One synthetic item of every kind."""
    return generate_synthetic_vqa(tmp_path_factory.mktemp("vqa"), n=len(KINDS), seed=5)


@pytest.fixture(scope="module")
def records(vqa_dir):
    return load_records(vqa_dir)


def f64(batch):
    return {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in batch.items()}


def answer_batch(processor, records):
    return encode_with_continuations(processor, records, [r["answer"] for r in records])[0]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_internvl(dtype=torch.float64, seed=0):
    """InternVL (transformers-native) at a small size: InternViT (1 layer, hidden 32, 56x56 input,
    patch 14, pixel shuffle 0.5 -> 4 image tokens) and a Qwen2 decoder (hidden 64, 2 layers)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=[56, 56], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
                         tie_word_embeddings=False),
        image_token_id=299, image_seq_length=4, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(cfg).to(dtype).eval()


def internvl_inputs(n_images=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 290, (n_images, 14), generator=g)
    ids[:, 3:7] = 299  # four <IMG_CONTEXT> placeholders per sequence
    return {"input_ids": ids, "pixel_values": torch.randn(n_images, 3, 56, 56, generator=g, dtype=torch.float64)}


# -- adapters -------------------------------------------------------------------------------------
def test_qwen2_5_vl_adapter_exposes_the_language_model(make_vlm):
    model = make_vlm()
    a = get_adapter(model)
    lm = model.model.language_model
    assert type(a).__name__ == "Qwen2_5_VLAdapter" and a.objective == "ar" and a.mask_token_id is None
    assert (a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim) == (128, 4, 2, 32)
    assert a.embeddings() is lm.embed_tokens and a.final_norm() is lm.norm and a.lm_head() is model.lm_head
    assert len(a.blocks()) == 2 and a.layers() is lm.layers
    b = a.block(1)
    assert b.layer is lm.layers[1] and b.q is lm.layers[1].self_attn.q_proj and b.down is lm.layers[1].mlp.down_proj
    assert b.q.bias is not None  # Qwen2 q/k/v biases: rotations must keep them
    # image / video placeholders of the config (the released checkpoint: 151655 / 151656)
    assert a.token_type_ids() == {"vision": [model.config.image_token_id, model.config.video_token_id]} \
        == {"vision": [4100, 4101]}
    block_linears = {id(lin) for blk in a.blocks() for lin in blk.linears().values()}
    vision = a.vision_linears()
    assert len(vision) == 2 * 5 + 2  # per vision block: qkv, proj, gate, up, down; merger: mlp 0 and 2
    assert not block_linears & {id(lin) for lin in vision.values()}
    assert a.residual_writers() == [model.model.visual.merger.mlp[2]]
    assert a.projector_out().out_features == a.hidden_size


def test_internvl_adapter_and_token_types():
    model = tiny_internvl(torch.float32)
    a = get_adapter(model)
    lm = model.model.language_model
    assert type(a).__name__ == "InternVLAdapter"
    assert a.embeddings() is lm.embed_tokens and a.final_norm() is lm.norm and a.layers() is lm.layers
    assert (a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim) == (64, 4, 2, 16)
    assert a.token_type_ids() == {"vision": [299]}
    assert a.residual_writers() == [model.model.multi_modal_projector.linear_2]
    tt = TokenTypes(rules_from_names(a, ["vision", "text"])).attach(model)
    seen = []
    h = a.block(0).q.register_forward_pre_hook(lambda m, args: seen.append(tt.get().clone()))
    inputs = internvl_inputs()
    with torch.no_grad():
        model(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
    h.remove()
    assert torch.equal(seen[0], (inputs["input_ids"] != 299).long())  # vision = 0, text = 1
    assert tt.counts(seen[0]) == {"vision": 8, "text": 20}


# -- token types --------------------------------------------------------------------------------
def test_vision_token_types_match_image_placeholders(make_vlm, processor, records):
    model = make_vlm()
    a = get_adapter(model)
    tt = TokenTypes(rules_from_names(a, ["vision", "text"])).attach(model)
    seen = {}
    hooks = [blk.down.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, tt.get().clone()))
             for i, blk in enumerate(a.blocks())]
    batch = answer_batch(processor, records)
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    ids = batch["input_ids"]
    expected = (ids != 4100).long()  # type index: vision = 0, text = 1
    per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()  # merged patches per image
    assert per_image == [16] * len(records)  # a 112x112 image: 8x8 patches -> 16 tokens
    for i in (0, 1):  # the same tensor reaches every layer
        assert torch.equal(seen[i], expected)
        assert (seen[i] == 0).sum(1).tolist() == per_image
    # exact positions: one contiguous run right after <|vision_start|>
    row = ids[0].tolist()
    start = row.index(4098) + 1
    assert torch.nonzero(seen[0][0] == 0).flatten().tolist() == list(range(start, start + 16))
    assert tt.current is None  # cleared after the forward


# -- invariance (float64) -------------------------------------------------------------------------
def _randomize_norms(adapter):
    with torch.no_grad():
        for blk in adapter.blocks():
            for n in (blk.attn_norm, blk.mlp_norm):
                n.weight.uniform_(0.5, 1.5)
        adapter.final_norm().weight.uniform_(0.5, 1.5)


def _own_residual_rotation(a, Q, rotate_writers=True):
    """Minimal norm fusion + residual rotation using the adapter API only."""
    with torch.no_grad():
        def fuse(norm, lins):
            for lin in lins:
                lin.weight.mul_(norm.weight)
            norm.weight.fill_(1.0)

        for blk in a.blocks():
            fuse(blk.attn_norm, [blk.q, blk.k, blk.v])
            fuse(blk.mlp_norm, [blk.gate, blk.up])
            for lin in (blk.q, blk.k, blk.v, blk.gate, blk.up):
                lin.weight.copy_(lin.weight @ Q)
            for lin in (blk.o, blk.down):
                lin.weight.copy_(Q.T @ lin.weight)
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias @ Q)
        fuse(a.final_norm(), [a.lm_head()])
        a.lm_head().weight.copy_(a.lm_head().weight @ Q)
        a.embeddings().weight.copy_(a.embeddings().weight @ Q)
        for lin in a.residual_writers() if rotate_writers else []:
            lin.weight.copy_(Q.T @ lin.weight)
            lin.bias.copy_(lin.bias @ Q)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "internvl"])
def test_own_residual_rotation_is_invariant_with_an_image(make_vlm, processor, records, kind):
    if kind == "qwen2_5_vl":
        model, batch = make_vlm(torch.float64), f64(answer_batch(processor, records[:3]))
    else:
        model, batch = tiny_internvl(), internvl_inputs()
    a = get_adapter(model)
    _randomize_norms(a)
    with torch.no_grad():
        ref = model(**batch).logits
    Q = torch.linalg.qr(torch.randn(a.hidden_size, a.hidden_size, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(1)))[0]
    _own_residual_rotation(a, Q)
    with torch.no_grad():
        out = model(**batch).logits
    # transformers' RMSNorm computes in float32 even for float64 inputs: ~1e-7 is the floor
    assert rel(out, ref) < RTOL
    # the projector writes the residual stream: leaving it unrotated breaks the image tokens
    _own_residual_rotation(a, Q.T, rotate_writers=False)  # undo everything but the projector
    with torch.no_grad():
        broken = model(**batch).logits
    assert rel(broken, ref) > 1e-2


def test_public_fusion_and_rotation_are_invariant_with_an_image(make_vlm, processor, records):
    from freeact.transforms import fusion, rotation
    model = make_vlm(torch.float64)
    a = get_adapter(model)
    _randomize_norms(a)
    batch = f64(answer_batch(processor, records[:3]))
    with torch.no_grad():
        ref = model(**batch).logits
    fusion.fuse_norms(a)
    Q = torch.linalg.qr(torch.randn(a.hidden_size, a.hidden_size, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(2)))[0]
    before = a.projector_out().weight.clone()
    rotation.apply_residual_rotation(a, Q)
    assert not torch.equal(before, a.projector_out().weight)  # the projector writes the residual: rotated
    with torch.no_grad():
        out = model(**batch).logits
    assert rel(out, ref) < RTOL


VLM_METHODS = {
    "quarot": {"weight_algo": "rtn"},
    "smoothquant": {"weight_algo": "rtn"},
    "spinquant": {"weight_algo": "rtn", "steps": 2},
    "flatquant": {"weight_algo": "rtn", "epochs": 1},
    "freeact": {"weight_algo": "rtn", "epochs": 1, "token_types": ["vision", "text"], "rank_ratio": 0.0},
}


@pytest.mark.parametrize("method", list(VLM_METHODS))
def test_methods_are_invariant_on_a_vlm_without_quantization(make_vlm, processor, records, method):
    """Every transform method, calibrated on image-text data, keeps the VLM's logits (float64,
    quantization off, an image in the prompt). FreeAct at r_k = 0: its exact (rotation) part."""
    from freeact.methods import QuantContext, QuantSettings, get_method
    from freeact.quant.quantizer import QuantSpec

    model = make_vlm(torch.float64)
    a = get_adapter(model)
    batch = f64(answer_batch(processor, records[:3]))
    with torch.no_grad():
        ref = model(**batch).logits
    off = QuantSpec(bits=16)
    calib = MultimodalCalibSet(records[:4], processor)
    ctx = QuantContext(model, a, QuantSettings(off, off, off), calib, batch_size=2, progress=False)
    get_method(method, VLM_METHODS[method]).apply(ctx)
    model.to(torch.float64)
    with torch.no_grad():
        out = model(**batch).logits
    assert rel(out, ref) < RTOL


# -- calibration --------------------------------------------------------------------------------
def test_layer0_capture_takes_multimodal_dict_batches(make_vlm, processor, records):
    from freeact.methods.blockwise import capture_layer0_inputs, run_layer

    model = make_vlm()
    a = get_adapter(model)
    tt = TokenTypes(rules_from_names(a, ["vision", "text"])).attach(model)
    calib = MultimodalCalibSet(records, processor)
    batches = list(calib.batches(4))
    hidden, kwargs, types = capture_layer0_inputs(model, a, calib.batches(4))
    assert [h.shape[:2] for h in hidden] == [b["input_ids"].shape for b in batches]
    for t, b in zip(types, batches):
        assert torch.equal(t == 0, b["input_ids"] == 4100)
    # replaying the captured layer-0 inputs reproduces the model's own layer-0 output
    outs = run_layer(a.layers()[0], hidden, kwargs, types, tt)
    got = []
    h = a.layers()[0].register_forward_hook(lambda m, i, o: got.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(**batches[0])
    h.remove()
    assert torch.allclose(outs[0], got[0], atol=1e-6)
    # statistics over token types see every calibration sequence
    assert calib.input_ids.shape[0] == len(records) and int((calib.input_ids == 4100).sum()) == 16 * len(records)


def test_gptq_runs_on_a_vlm_and_leaves_the_vision_side_alone(make_vlm, processor, records):
    from freeact.methods import QuantContext, QuantSettings, get_method
    from freeact.quant.quantizer import QuantSpec

    model = make_vlm()
    a = get_adapter(model)
    vision_before = {n: lin.weight.clone() for n, lin in a.vision_linears().items()}
    q_before = a.block(0).q.weight.clone()
    w4 = QuantSpec(bits=4)
    ctx = QuantContext(model, a, QuantSettings(w4, w4, QuantSpec(bits=16)), MultimodalCalibSet(records, processor),
                       batch_size=3, progress=False)
    get_method("gptq", {}).apply(ctx)
    assert all(torch.equal(vision_before[n], lin.weight) for n, lin in a.vision_linears().items())
    q = a.block(0).q.weight
    assert not torch.equal(q, q_before)
    assert max(len(torch.unique(row)) for row in q) <= 16  # 4-bit grid per output channel
    assert not any(hasattr(lin, "input_quantizer") for lin in a.vision_linears().values())

    from freeact.methods.vision import quantize_vision_rtn

    info = quantize_vision_rtn(a, ctx.quant)
    assert info == {"vision_linears_quantized": len(vision_before)}
    assert all(hasattr(lin, "input_quantizer") for lin in a.vision_linears().values())
    assert all(len(torch.unique(lin.weight[0])) <= 16 for lin in a.vision_linears().values())


# -- data ---------------------------------------------------------------------------------------
def test_synthetic_vqa_is_deterministic_and_answers_follow_the_image(tmp_path, records):
    a = generate_synthetic_vqa(tmp_path / "a", n=12, seed=3)
    b = generate_synthetic_vqa(tmp_path / "b", n=12, seed=3)
    c = generate_synthetic_vqa(tmp_path / "c", n=12, seed=4)
    assert (a / "data.jsonl").read_text() == (b / "data.jsonl").read_text() != (c / "data.jsonl").read_text()
    assert (a / "images/00007.png").read_bytes() == (b / "images/00007.png").read_bytes()
    recs = load_records(a)
    assert {r["kind"] for r in recs} == set(KINDS) and {r["type"] for r in recs} == {"open", "text", "mc"}
    for r in recs:
        if r["kind"] in ("colour", "colour_choice"):  # the only non-white colour drawn is the answer's
            pixels = torch.tensor(np.asarray(record_images(r)[0])).reshape(-1, 3)
            colours, counts = torch.unique(pixels[(pixels != 255).any(1)], dim=0, return_counts=True)
            assert tuple(colours[counts.argmax()].tolist()) == COLOURS[r["answer"]]
        if r["type"] == "mc":
            assert r["answer"] in r["options"]


def test_processor_expands_placeholders(processor, records):
    two = [records[0], records[3]]  # prompts of different lengths
    batch = encode_prompts(processor, two, padding_side="left")
    n_img = (batch["input_ids"] == processor.image_token_id).sum(1)
    assert n_img.tolist() == [16, 16] and batch["pixel_values"].shape == (2 * 64, 3 * 2 * 14 * 14)
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == processor.image_token_id)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding for generation
    if isinstance(processor, GridImageProcessor):  # the torchvision-free fallback
        with pytest.raises(ValueError, match="more images"):
            processor(images=record_images(records[0]) * 2, text=["<|image_pad|> once"])


def test_records_are_checked(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "x.png", "prompt": "q?"}) + "\n")
    with pytest.raises(ValueError, match="no 'answer' field"):
        load_records(tmp_path)
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "x.png", "prompt": "q", "answer": "a",
                                                     "type": "mc", "options": ["b"]}) + "\n")
    with pytest.raises(ValueError, match="options that contain its answer"):
        load_records(tmp_path)


# -- metrics ------------------------------------------------------------------------------------
def test_vqa_normalisation_and_metrics():
    assert normalize_vqa_answer("Two dogs.") == "2 dogs"
    assert normalize_vqa_answer("The RED one!") == "red 1"
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("1,000") == "1000" and normalize_vqa_answer("3.5") == "3.5"
    assert vqa_accuracy("two", ["2"]) == 1.0 and vqa_accuracy("3", ["2"]) == 0.0
    ten = ["yes"] * 2 + ["no"] * 8  # VQA: leave-one-out mean of min(1, matches / 3)
    assert vqa_accuracy("yes", ten) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("no", ten) == 1.0
    assert anls("hello", ["hello"]) == 1.0 and anls("hellp", ["hello"]) == pytest.approx(0.8)
    assert anls("abc", ["xyz"]) == 0.0 and anls("HeLLo ", ["x", "hello"]) == 1.0


def test_vqa_normalisation_matches_lmms_eval():
    vqa = pytest.importorskip("lmms_eval.tasks._task_utils.vqa_eval_metric",
                              reason="lmms-eval not installed (pip install --no-deps lmms-eval)")
    ref = vqa.EvalAIAnswerProcessor()
    for s in ["Two dogs.", "It's the red one", "3.5 feet", "1,000", "yes!", "a\tb\nc", "(none)", "Ive got 10",
              "left-hand side", "dont know", "x = 2", "U.S.A.", "what's up?"]:
        assert normalize_vqa_answer(s) == ref(s), s


# -- evaluation ---------------------------------------------------------------------------------
def test_continuation_scores_do_not_depend_on_batching(make_vlm, processor, records):
    model = make_vlm()
    conts = [r["answer"] + " and more" for r in records]
    batched = continuation_logprobs(model, processor, records, conts)
    single = [continuation_logprobs(model, processor, [r], [c])[0] for r, c in zip(records, conts)]
    for (lb, nb, _), (ls, ns, _) in zip(batched, single):
        assert nb == ns and lb == pytest.approx(ls, abs=1e-3)
    assert len({round(lp, 3) for lp, _, _ in batched}) > 1


def _greedy_by_hand(model, processor, record, max_new_tokens):
    """Greedy decoding written out: one full forward per new token, argmax, stop at an end token."""
    tok = tokenizer_of(processor)
    batch = encode_prompts(processor, [record])
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            nxt = int(model(**batch).logits[0, -1].argmax())
        if nxt in eos:
            break
        new.append(nxt)
        one = torch.ones(1, 1, dtype=torch.long)
        batch = {**batch, "input_ids": torch.cat([batch["input_ids"], one * nxt], 1),
                 "attention_mask": torch.cat([batch["attention_mask"], one], 1),
                 **({"mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], one * 0], 1)}
                    if "mm_token_type_ids" in batch else {})}
    return tok.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip()


def _option_logprob_by_hand(model, processor, record, option):
    """log p(option tokens | prompt with image), the option tokenized on its own and appended."""
    tok = tokenizer_of(processor)
    batch = encode_prompts(processor, [record])
    cont = tok(option, add_special_tokens=False)["input_ids"]
    n = batch["input_ids"].shape[1]
    c = torch.tensor([cont])
    batch = {**batch, "input_ids": torch.cat([batch["input_ids"], c], 1),
             "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(c)], 1),
             **({"mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], torch.zeros_like(c)], 1)}
                if "mm_token_type_ids" in batch else {})}
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch).logits[0].double(), -1)
    return float(sum(logp[n - 1 + i, t] for i, t in enumerate(cont)))


def test_offline_benchmark_equals_a_hand_computed_reference(make_vlm, processor, records):
    """evaluate_records (batched HF generate, batched continuation scores) against the published metrics
    computed item by item by hand: greedy answers decoded token by token, VQA accuracy / ANLS of those
    answers against the references, multiple choice by the likeliest option."""
    model = make_vlm()
    metrics, per = evaluate_records(model, processor, records, batch_size=4, max_new_tokens=8, progress=False)
    assert metrics["n"] == len(records) and metrics["n_mc"] == 2 and metrics["n_text"] == 1
    by_hand, scores = {}, {"open": [], "text": [], "mc": []}
    for r in records:
        if r["type"] == "mc":
            lps = [_option_logprob_by_hand(model, processor, r, o) for o in r["options"]]
            pred = r["options"][max(range(len(lps)), key=lps.__getitem__)]
            scores["mc"].append(float(pred == r["answer"]))
        else:
            pred = _greedy_by_hand(model, processor, r, 8)
            scores[r["type"]].append((vqa_accuracy if r["type"] == "open" else anls)(pred, references(r)))
        by_hand[r["id"]] = pred
    assert {p["id"]: p["prediction"] for p in per} == by_hand
    for name, t in (("vqa_acc", "open"), ("anls", "text"), ("mc_acc", "mc")):
        assert metrics[name] == pytest.approx(sum(scores[t]) / len(scores[t])), name
    again, _ = evaluate_records(model, processor, records, batch_size=4, max_new_tokens=8, progress=False)
    assert again == metrics  # deterministic


def test_run_writes_multimodal_metrics(compose, tmp_path, monkeypatch):
    from freeact.validate import validate
    from freeact.experiment import run_experiment

    monkeypatch.setenv("FREEACT_CACHE", str(tmp_path))
    rows = {}
    for method in ("fp16", "rtn"):
        cfg = compose(["model=tiny_vlm", f"method={method}", "quant=w4a4", "calib=mm_synthetic",
                       "eval=mm_synthetic", "calib.nsamples=6", "eval.nsamples=6", "progress=false"])
        rows[method], _ = run_experiment(cfg, validate(cfg), "test")
    for row in rows.values():
        assert row["model.family"] == "vlm" and row["eval.kind"] == "multimodal"
        assert {"mm_synthetic.vqa_acc", "mm_synthetic.anls", "mm_synthetic.mc_acc", "mm_synthetic.answer_nll",
                "mm_synthetic.score"} <= set(row)
        assert row["mm_synthetic.n"] == 6
    assert rows["rtn"]["mm_synthetic.answer_nll"] != rows["fp16"]["mm_synthetic.answer_nll"]
    assert (tmp_path / "synthetic_vqa" / "v1_n6_seed0" / "data.jsonl").exists()  # calibration items
    assert (tmp_path / "synthetic_vqa" / "v1_n6_seed1234" / "data.jsonl").exists()  # evaluation items


def test_multimodal_data_needs_a_vlm(compose):
    from freeact.config import ConfigError
    from freeact.validate import validate

    with pytest.raises(ConfigError, match="eval.kind=multimodal needs a vision-language model"):
        validate(compose(["model=tiny_llama", "eval=mm_synthetic"]))
    with pytest.raises(ConfigError, match="eval.source"):
        validate(compose(["model=tiny_vlm", "eval=mm_textvqa", "eval.source=/no/such/dir"]))


# -- lmms-eval ----------------------------------------------------------------------------------
def test_lmms_eval_bridge_on_a_local_task(make_vlm, processor, records, tmp_path):
    from freeact.eval.lmms_bridge import local_tasks, run_lmms_eval

    _lmms_or_skip()
    model = make_vlm()
    # Every other item of each type is labelled with the model's own greedy answer (open / text) or likeliest
    # option (mc), the rest with an answer it did not give: a string sharing no character with its answer
    # (VQA accuracy and ANLS 0 by definition), or another option. Each task's score is then known by counting:
    # (items labelled with the model's answer) / (items), which a bridge whose prompts, images, decoding or
    # scoring differ from ours would miss, and one that scores everything alike could not hit.
    answers = dict(zip([r["id"] for r in records], generate_answers(model, processor, records, 8)))
    lines, expected = [], {}
    for r in records:
        r = dict(r, image=str(r["image"]))
        kind = r["type"]
        if kind != "mc" and not answers[r["id"]]:
            continue
        seen = expected.setdefault(kind, [])
        own = len(seen) % 2 == 0
        if kind == "mc":
            lps = [lp[0] for lp in continuation_logprobs(model, processor, [r] * len(r["options"]), r["options"])]
            best = max(range(len(lps)), key=lambda i: lps[i])
            r["answer"] = r["options"][best if own else (best + 1) % len(lps)]
        else:
            mine = answers[r["id"]]
            other = "".join(c for c in "zqxjkvwyfbgmhp" if c not in mine.lower())[:6]
            assert len(other) == 6 and not set(other) & set(mine.lower())
            r.update(answer=mine if own else other, answers=[mine if own else other])
        seen.append(own)
        lines.append(json.dumps(r))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    res = run_lmms_eval(model, processor, local_tasks(tmp_path), include_defaults=False, batch_size=4,
                        max_new_tokens=8, progress=False)
    tasks = {"mc": "freeact_vqa_mc.acc", "open": "freeact_vqa_open", "text": "freeact_vqa_text"}
    assert len(expected["mc"]) >= 2 and len(expected["open"]) >= 2  # both labellings in each
    for kind, owns in expected.items():
        key = tasks[kind] if kind == "mc" else next(k for k in res if k.startswith(tasks[kind] + "."))
        assert res[key] == pytest.approx(sum(owns) / len(owns)), (kind, res)


def test_padding_enters_no_gptq_hessian_nor_smoothquant_statistic(make_vlm, processor, records):
    """Calibration batches are right-padded to the longest item of the set; GPTQ's Hessians and SmoothQuant's
    max |x| must be those of the real tokens alone, i.e. the same as with one record per batch unpadded."""
    from freeact.methods import QuantContext, QuantSettings
    from freeact.methods.blockwise import capture_layer0_inputs, real_tokens
    from freeact.methods.smoothquant import input_absmax
    from freeact.methods.weight_quant import layer_hessians
    from freeact.quant.quantizer import QuantSpec

    model = make_vlm(torch.float64)
    adapter = get_adapter(model)
    calib = MultimodalCalibSet(records, processor)
    assert any(not bool(real_tokens(b).all()) for b in calib.batches(3))  # batches of 3 are padded

    unpadded = [answer_batch(processor, [r]) for r in records]  # one record per batch, no padding
    assert all(bool(real_tokens(b).all()) for b in unpadded)

    def hessians(batches, drop_padding=True):
        batches = [f64(b) for b in batches]
        valid = [real_tokens(b) for b in batches] if drop_padding else None
        hidden, kwargs, types = capture_layer0_inputs(model, adapter, batches, "cpu")
        return {n: a.H for n, a in layer_hessians(adapter.block(0), ("q", "down"), hidden, kwargs, types,
                                                   valid).items()}

    padded_batches = list(calib.batches(3))
    assert len({tuple(b["input_ids"].shape[1:]) for b in padded_batches}) == 1  # one width for the whole set
    assert calib.width == max(b["input_ids"].shape[1] for b in unpadded)
    ref, padded, counted = hessians(unpadded), hessians(padded_batches), hessians(padded_batches, False)
    for n in ref:  # H accumulates in float32: equal up to its rounding
        rel = lambda h: float((h - ref[n]).norm() / ref[n].norm())  # noqa: E731
        assert rel(padded[n]) < 1e-6, (n, rel(padded[n]))
        assert rel(counted[n]) > 1e-3, (n, rel(counted[n]))  # counting the padding would change H

    q = QuantSettings(QuantSpec(4), QuantSpec(4), QuantSpec(16))
    lins = adapter.block(0).linears()

    def absmax(batches):
        class F64Calib:  # the calibration batches in the model's dtype
            def batches(self, n):
                return (f64(b) for b in batches)

        ctx = QuantContext(model, adapter, q, F64Calib(), progress=False)
        return input_absmax(ctx, lins)

    a1, a3 = absmax(unpadded), absmax(padded_batches)
    for n in a1:
        torch.testing.assert_close(a3[n], a1[n], rtol=1e-9, atol=1e-12)


def _lmms_or_skip():
    from freeact.eval.lmms_bridge import LMMS_INSTALL, lmms_available

    if not lmms_available():
        pytest.skip(f"lmms-eval not importable: {LMMS_INSTALL}")


TASK_YAML = """task: my_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_new_tokens: 8
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = """from pathlib import Path
from PIL import Image
ROOT = Path({root!r})
def doc_to_visual(doc):
    return [Image.open(ROOT / doc["image"]).convert("RGB")]
def doc_to_text(doc):
    return doc["prompt"]
def process_results(doc, results):
    return {{"exact": float(results[0].strip() == doc["answer"])}}
"""


def test_eval_lmms_from_the_command_line(compose, tmp_path):
    """``python -m freeact.run ... eval=lmms eval.include_path=DIR eval.tasks=[...]``: an lmms-eval task YAML of
    the user's (its own scoring function) runs on the run's model and its metric lands in the CSV row. Half of
    the documents are labelled with the greedy answer of the model the run builds (built here the same way),
    the other half with a string it did not answer, so the row must read exactly 0.5; a wrong task name is one
    line naming the task and its near miss, exit 2, no row."""
    import subprocess
    import sys

    from freeact.experiment import load_model_processor
    from freeact.models.loading import load_model

    _lmms_or_skip()
    data = generate_synthetic_vqa(tmp_path / "vqa", n=8, seed=3)
    recs = load_records(data)
    cfg = compose(["model=tiny_vlm", "seed=0"])
    model, _ = load_model(cfg.model, "cpu", seed=0)
    answers = generate_answers(model.eval(), load_model_processor(cfg.model), recs, 8)
    lines, own = [], []
    for r, a in zip(recs, answers):
        mine = len(own) % 2 == 0 and bool(a)
        other = "".join(c for c in "zqxjkvwyfbgmhp" if c not in a.lower())[:6]
        own.append(mine)
        lines.append(json.dumps(dict(r, image=str(r["image"]), answer=a if mine else other)))
    (data / "labelled.jsonl").write_text("\n".join(lines) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_vqa.yaml").write_text(TASK_YAML.format(data=data / "labelled.jsonl"))
    (tasks / "utils.py").write_text(TASK_UTILS.format(root=str(data)))
    assert 0 < sum(own) < len(own)

    csv = tmp_path / "runs.csv"
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               FREEACT_CACHE=str(tmp_path / "cache"))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "freeact.run", "model=tiny_vlm", "method=fp16", "seed=0",
                               "eval=lmms", f"eval.include_path={tasks}", "eval.include_defaults=false",
                               "progress=false", f"results_file={csv}", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    res = run("eval.tasks=[my_vqa]")
    assert res.returncode == 0, res.stderr[-2000:]
    import pandas as pd

    row = pd.read_csv(csv).iloc[-1]
    assert row["eval.kind"] == "lmms" and row["status"] == "ok"
    assert row["my_vqa.exact"] == pytest.approx(sum(own) / len(own))

    bad = run("eval.tasks=[my_vqb]")
    assert bad.returncode == 2 and len(pd.read_csv(csv)) == 1
    msg = [line for line in bad.stderr.splitlines() + bad.stdout.splitlines() if "my_vqb" in line]
    assert len(msg) == 1 and "did you mean my_vqa" in msg[0], bad.stderr[-1000:]


def test_eval_lmms_rejects_what_cannot_run(compose, tmp_path):
    from freeact.config import ConfigError
    from freeact.validate import validate

    _lmms_or_skip()
    cases = {("model=tiny_llama", "eval.source=synthetic"): "needs a vision-language model",
             ("model=tiny_vlm",): "nothing to evaluate",
             ("model=tiny_vlm", "eval.source=synthetic", "eval.limit=0"): "limit=0 must be >= 1",
             ("model=tiny_vlm", "eval.source=synthetic", "eval.max_new_tokens=0"): "max_new_tokens=0",
             ("model=tiny_vlm", "eval.tasks=[x]", f"eval.include_path={tmp_path}/none"): "is not a directory",
             ("model=tiny_vlm", "eval.tasks=[x]", "eval.include_defaults=false"): "include_defaults=false",
             ("model=tiny_vlm", f"eval.source={tmp_path}/none"): "eval.source",
             ("model=tiny_vlm", "eval.tasks=[x]", f"eval.include_path={tmp_path}",
              "eval.include_defaults=false"): "task 'x' is not in include_path"}
    gone = tmp_path / "gone_tasks"  # a task whose documents are not there: refused before the model loads
    gone.mkdir()
    (gone / "gone.yaml").write_text(TASK_YAML.replace("task: my_vqa", "task: gone").format(data=tmp_path / "no.jsonl"))
    (gone / "utils.py").write_text(TASK_UTILS.format(root=str(tmp_path)))
    cases[("model=tiny_vlm", "eval.tasks=[gone]", f"eval.include_path={gone}", "eval.include_defaults=false")] = \
        "task 'gone' cannot load its documents: FileNotFoundError"
    for overrides, match in cases.items():
        with pytest.raises(ConfigError, match=match):
            validate(compose(["eval=lmms", *overrides]))
    validate(compose(["model=tiny_vlm", "eval=lmms", "eval.source=synthetic"]))  # records alone are enough


def test_eval_lmms_without_lmms_eval_is_a_config_error(compose, monkeypatch):
    """Where lmms-eval is not installed (``pip install -e .[dev]`` alone), eval=lmms is refused before the model
    loads, with the install line."""
    import freeact.eval.lmms_bridge as bridge
    from freeact.config import ConfigError
    from freeact.validate import validate

    monkeypatch.setattr(bridge, "lmms_available", lambda: False)
    with pytest.raises(ConfigError, match=r"eval=lmms needs lmms-eval: pip install -e \"\.\[lmms\]\" && pip install "
                                          r"--no-deps lmms-eval==0\.7\.3"):
        validate(compose(["model=tiny_vlm", "eval=lmms", "eval.source=synthetic"]))
