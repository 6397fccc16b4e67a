"""FlatQuant: Kronecker affine transforms, merge == online, float64 invariance, clipping, training."""
import re

import pytest
import torch
from omegaconf import OmegaConf

from freeact.methods import QuantContext, QuantSettings, get_method
from freeact.methods.block_training import NonFiniteLossError, full_precision_pass
from freeact.methods.blockwise import capture_layer0_inputs, run_layer
from freeact.methods.flatquant import FlatQuant
from freeact.models import get_adapter
from freeact.quant.act import set_act_quant
from freeact.quant.kv import IMPL
from freeact.data.calib import build_calib_set as _build_calib_set
from freeact.quant.quantizer import QuantSpec, fake_quant
from freeact.quant.rtn import rtn_quantize_weight
from freeact.transforms.affine import (AffineSite, CayleyOrthogonal, HeadwiseVO, clipped_fake_quant,
                                      compiled_clipped_fake_quant, kron_matmul, most_square_factors)


def build_calib_set(tokenizer, source, n, seqlen, seed, mask_token_id=None):
    """The library's calibration set, on the first 100k characters of the corpus (fast)."""
    return _build_calib_set(tokenizer, source, n, seqlen, seed, mask_token_id=mask_token_id, max_chars=100_000)


def make_ctx(model, tokenizer, w=16, a=16, kv=16, n=4, seqlen=24, seed=0):
    ad = get_adapter(model)
    calib = build_calib_set(tokenizer, "wiki.train", n, seqlen, seed,
                            mask_token_id=ad.mask_token_id if ad.objective == "mdm" else None)
    q = QuantSettings(QuantSpec(w), QuantSpec(a), QuantSpec(kv, symmetric=False))
    return QuantContext(model, ad, q, calib, batch_size=2, progress=False)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_most_square_factors_and_kron_matmul():
    assert most_square_factors(224) == (14, 16)
    assert most_square_factors(592) == (16, 37)
    assert most_square_factors(128) == (8, 16)
    assert most_square_factors(37) == (1, 37)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=g, dtype=torch.float64)
    B = torch.randn(37, 37, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, 592, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kron_matmul(x, [A, B]), x @ torch.kron(A, B), rtol=1e-10, atol=1e-10)


def test_cayley_parametrization_is_torchs_orthogonal_map():
    """The same function of the same parameter as torch's Cayley map with trivialisation (value and gradient),
    starting at the initial matrix."""
    from torch.nn.utils import parametrizations, parametrize

    n, g = 12, torch.Generator().manual_seed(0)
    init = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    ref = parametrizations.orthogonal(torch.nn.Linear(n, n, bias=False, dtype=torch.float64), orthogonal_map="cayley")
    with torch.no_grad():
        ref.weight = init
    ours = torch.nn.Linear(n, n, bias=False, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.copy_(init)
    parametrize.register_parametrization(ours, "weight", CayleyOrthogonal(), unsafe=True)
    torch.testing.assert_close(ours.weight, init, rtol=0, atol=1e-14)
    X = torch.randn(n, n, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref.parametrizations.weight.original.copy_(X)
        ours.parametrizations.weight.original.copy_(X)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=1e-12)
    assert not torch.allclose(ours.weight, init)  # X moved it
    probe = torch.randn(n, n, generator=g, dtype=torch.float64)
    (ref.weight * probe).sum().backward()
    (ours.weight * probe).sum().backward()
    torch.testing.assert_close(ours.parametrizations.weight.original.grad, ref.parametrizations.weight.original.grad,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("d,structure", [(224, "kronecker"), (592, "kronecker"), (96, "dense")])
def test_affine_site_weight_side_inverts_activation_side(d, structure):
    g = torch.Generator().manual_seed(1)
    site = AffineSite(d, "invertible", structure, scale=torch.rand(d, generator=g, dtype=torch.float64) + 0.5,
                      generator=g, dtype=torch.float64)
    with torch.no_grad():  # move away from the orthogonal init: sigma != 1, skew parts != 0
        for p in site.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    P = kron_matmul(torch.eye(d, dtype=torch.float64), [f.matrix() for f in site.factors]).detach()
    assert (P @ P.T - torch.eye(d, dtype=torch.float64)).abs().max() > 1e-2  # really not orthogonal
    x = torch.randn(4, 7, d, generator=g, dtype=torch.float64)
    W = torch.randn(40, d, generator=g, dtype=torch.float64)
    y = x @ W.T
    with torch.no_grad():
        online = site(x) @ site.transform_weight(W).T
        frozen = site.frozen()
        W_merged = AffineSite.apply_frozen_weight(frozen, W)
        site.merge(frozen)
        merged = site(x) @ W_merged.T
    assert rel(online, y) < 1e-10 and rel(merged, y) < 1e-10
    assert site.merged and not list(site.parameters())


def test_headwise_vo_is_exact_with_gqa():
    g = torch.Generator().manual_seed(2)
    H, KV, hd, d = 4, 2, 8, 24
    vo = HeadwiseVO(H, KV, hd, "invertible", generator=g, dtype=torch.float64)
    with torch.no_grad():
        for p in vo.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    Wv = torch.randn(KV * hd, d, generator=g, dtype=torch.float64)
    bv = torch.randn(KV * hd, generator=g, dtype=torch.float64)
    Wo = torch.randn(d, H * hd, generator=g, dtype=torch.float64)
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    a = torch.softmax(torch.randn(H, 5, 5, generator=g, dtype=torch.float64), -1)

    def attn_out(v):  # (5, KV*hd) -> (5, H*hd), each query head reads its KV group
        v = v.reshape(5, KV, hd).repeat_interleave(H // KV, dim=1).transpose(0, 1)
        return (a @ v).transpose(0, 1).reshape(5, H * hd)

    ref = attn_out(x @ Wv.T + bv) @ Wo.T
    with torch.no_grad():
        v = x @ vo.transform_v_weight(Wv).T + vo.transform_v_bias(bv)
        out = vo(attn_out(v)) @ vo.transform_o_weight(Wo).T
    assert rel(out, ref) < 1e-10


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_merged_weights_match_online_transforms(tiny_model, tokenizer, kind):
    """Calibrating mode (weights transformed on the fly) == merged mode == original, float64, quant off."""
    model = tiny_model(kind, torch.float64)
    ctx = make_ctx(model, tokenizer)
    method = FlatQuant({"kv_transform": True})
    model.set_attn_implementation(IMPL)
    hidden, kwargs, _ = capture_layer0_inputs(model, ctx.adapter, ctx.calib.batches(2))
    block = ctx.adapter.block(0)
    w0 = {n: l.weight.detach().clone() for n, l in block.linears().items()}
    targets, stats = full_precision_pass(block, hidden, kwargs, None, None, 1, False, False)
    plan = method.build_layer(ctx, 0, block, stats)
    plan.install()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in plan.param_groups()[0]:
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    online = run_layer(block.layer, hidden, kwargs)
    plan.merge()
    merged = run_layer(block.layer, hidden, kwargs)
    for o, m, t in zip(online, merged, targets):
        assert rel(m, o) < 1e-6 and rel(o, t) < 1e-6
    assert all((block.linears()[n].weight - w).abs().max() > 1e-3 for n, w in w0.items())  # weights really changed
    assert block.attn.qkv_hook.qk_transform.merged


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_trained_flatquant_model_is_invariant_in_float64(tiny_model, tokenizer, kind):
    """Train with activation + KV quantization, then switch quantization off: logits == original."""
    model = tiny_model(kind, torch.float64)
    ids = torch.randint(2, 4000, (2, 20))
    ids[:, ::3] = get_adapter(model).mask_token_id
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ctx = make_ctx(model, tokenizer, w=16, a=4, kv=4)
    info = FlatQuant({"epochs": 1, "lr": 1e-2, "batch_size": 2}).apply(ctx)
    assert info["train_steps"] == 2 * 2 and info["nonfinite"] == "none"
    layer_secs = [float(v) for v in info["train_layer_seconds"].split("|")]  # the step time bench_cost reads
    assert len(layer_secs) == 2 and all(v > 0 for v in layer_secs)
    with torch.no_grad():
        quantized = model(input_ids=ids).logits
        set_act_quant(model, False)
        out = model(input_ids=ids).logits
    assert rel(out, ref) < 1e-6
    assert rel(quantized, ref) > 1e-3  # quantization is really on in the model
    site = model.model.layers[0].self_attn.q_proj.input_quantizer.transform
    P = kron_matmul(torch.eye(site.d, dtype=torch.float64), site._act_mats())
    assert (P @ P.T - torch.eye(site.d, dtype=torch.float64)).abs().max() > 1e-4  # trained away from orthogonal


def test_learned_weight_clip_is_what_rtn_quantizes_after_merge(tiny_model, tokenizer):
    model = tiny_model("llada", torch.float64)
    ctx = make_ctx(model, tokenizer, w=4, a=16)
    method = FlatQuant({})
    model.set_attn_implementation(IMPL)
    hidden, kwargs, _ = capture_layer0_inputs(model, ctx.adapter, ctx.calib.batches(2))
    block = ctx.adapter.block(0)
    _, stats = full_precision_pass(block, hidden, kwargs, None, None, 1, False, False)
    plan = method.build_layer(ctx, 0, block, stats)
    plan.install()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for clip in plan.clips.values():  # learned-looking clips, different per row (0.3 .. 0.95)
            clip.logit_max.copy_(torch.rand(clip.logit_max.shape, generator=g) * 3.8 - 0.85)
            clip.logit_min.copy_(torch.rand(clip.logit_min.shape, generator=g) * 3.8 - 0.85)
        trained = {n: l.weight.detach().clone() for n, l in block.linears().items()}  # Q_w(clip(T(W)))
        unclipped = {n: plan._input_side(n)(l.parametrizations.weight.original) for n, l in block.linears().items()
                     if n != "v"}
    plan.merge()
    for n, lin in block.linears().items():
        deployed = rtn_quantize_weight(lin.weight.data, ctx.quant.weight)
        assert (deployed - trained[n]).abs().max() < 1e-5, n
        if n in unclipped:  # the clip really matters: RTN of the unclipped weight is different
            assert (fake_quant(unclipped[n], ctx.quant.weight) - trained[n]).abs().max() > 1e-2


def test_gptq_weights_after_merge(tiny_model, tokenizer):
    # reference: the same transforms merged without quantizing (weight_algo=none), then GPTQ run on that
    # model by hand; the GPTQ path must give exactly those weights (GPTQ on the transformed weights, with
    # the Hessians of the transformed inputs)
    runs = {}
    for algo in ("gptq", "none"):
        model = tiny_model("dream", torch.float32)
        ctx = make_ctx(model, tokenizer, w=4, a=4)
        method = FlatQuant({"epochs": 0, "weight_algo": algo})
        method.apply(ctx)
        if algo == "none":
            before = {n: l.weight.detach().clone() for n, l in ctx.adapter.block(0).linears().items()}
            method.gptq(ctx)  # the reference, by hand
        runs[algo] = (model, ctx)
    (model, ctx), (ref, ref_ctx) = runs["gptq"], runs["none"]
    for block, ref_block in zip(ctx.adapter.blocks(), ref_ctx.adapter.blocks()):
        for n, lin in block.linears().items():
            w, w_ref = lin.weight.detach(), ref_block.linears()[n].weight.detach()
            assert torch.equal(w, w_ref), n
            assert max(len(torch.unique(row)) for row in w) <= 16, n  # 4-bit symmetric: at most 16 per row
    assert any(not torch.equal(before[n], l.weight) for n, l in ref_ctx.adapter.block(0).linears().items())
    ids = ctx.calib.input_ids[:1]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def _nan_on_call(module, call):
    count = {"n": 0}

    def hook(_, __, out):
        count["n"] += 1
        return out * float("nan") if count["n"] == call else out

    return module.register_forward_hook(hook)


def test_nonfinite_loss_raises_with_layer_and_step(tiny_model, tokenizer):
    model = tiny_model("llada")
    ctx = make_ctx(model, tokenizer, w=4, a=4)
    # layer 1's down_proj: 2 calls in the full-precision pass, then step 0, 1, 2 of training
    h = _nan_on_call(ctx.adapter.block(1).down, 2 + 3)
    with pytest.raises(NonFiniteLossError, match=r"layer 1, epoch 1;"):
        FlatQuant({"epochs": 2, "batch_size": 2}).apply(ctx)
    h.remove()


def test_nonfinite_loss_keep_last(tiny_model, tokenizer):
    model = tiny_model("llada")
    ctx = make_ctx(model, tokenizer, w=4, a=4)
    h = _nan_on_call(ctx.adapter.block(1).down, 2 + 3)
    info = FlatQuant({"epochs": 2, "batch_size": 2, "on_nonfinite": "keep_last"}).apply(ctx)
    h.remove()
    assert "layer 1" in info["nonfinite"] and "step 2" in info["nonfinite"]
    assert info["train_steps"] == 4 + 2  # layer 0 trained fully, layer 1 stopped before step 2
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ctx.calib.input_ids[:1]).logits).all()


def test_flatquant_config_composes_and_validates(compose):
    cfg = compose(["model=tiny_dream", "method=flatquant"])
    m = get_method(cfg.method.name, OmegaConf.to_container(cfg.method))
    assert isinstance(m, FlatQuant) and m.cfg["lr"] == 5e-3 and m.cfg["smooth_alpha"] == 0.3
    assert m.train_config().clip_lr_mult == 10
    with pytest.raises(ValueError, match="method.structure"):
        FlatQuant({"structure": "banded"})
    with pytest.raises(ValueError, match="on_nonfinite"):
        FlatQuant({"on_nonfinite": "ignore"})
    with pytest.raises(ValueError, match="epochs"):
        FlatQuant({"epochs": -1})


def test_blockwise_loss_leaves_out_padding_and_sums_types():
    from freeact.methods.block_training import blockwise_loss
    from freeact.methods.blockwise import real_tokens

    out = torch.zeros(1, 4, 2)
    y = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [9.0, 9.0]]])  # per-token MSE 1, 4, 9, 81
    valid = real_tokens({"attention_mask": torch.tensor([[1, 1, 1, 0]])})
    assert real_tokens(torch.zeros(1, 4, dtype=torch.long)) is None  # text batches have no padding
    assert blockwise_loss(out, y).item() == pytest.approx((1 + 4 + 9 + 81) / 4)
    assert blockwise_loss(out, y, valid=valid).item() == pytest.approx((1 + 4 + 9) / 3)
    types = torch.tensor([[0, 1, 1, 0]])
    assert blockwise_loss(out, y, types, 2, valid).item() == pytest.approx(1 + (4 + 9) / 2)  # pad is no type-0 token
    assert blockwise_loss(out, y, torch.tensor([[0, 1, 1, -1]]), 2).item() == pytest.approx(1 + (4 + 9) / 2)
    assert blockwise_loss(out, y, torch.zeros(1, 4, dtype=torch.long), 2).item() == pytest.approx(95 / 4)  # absent type adds 0


def _five_layer_llada(tokenizer):
    from freeact.models.tiny import build_tiny

    from conftest import TINY_ARCH

    family, arch = TINY_ARCH["llada"]
    return build_tiny(family, {**arch, "num_hidden_layers": 5}, tokenizer).eval()


@pytest.mark.parametrize("method", ["flatquant", "freeact"])
def test_layers_in_flight_train_the_same_model_as_one_at_a_time(tokenizer, method):
    """Layers trained interleaved, three at a time (a wave of 3, then 2), against one after the other: every
    layer sees the same inputs and takes the same steps, so the losses, the per-type errors and every weight
    of the quantized model are bit-identical (on a CPU the operations are the same ones, in the same order
    per layer). Catches any state that leaks between layers in flight (token types, caches, memos)."""
    got = {}
    for width in (1, 3):
        model = _five_layer_llada(tokenizer)
        ctx = make_ctx(model, tokenizer, w=4, a=4, n=6)
        info = get_method(method, {"epochs": 2, "batch_size": 2, "layers_in_flight": width}).apply(ctx)
        assert info["train_steps"] == 5 * 2 * 3 and info["layers_in_flight"] == width
        got[width] = (info, {k: v.clone() for k, v in model.state_dict().items()})
    keys = [k for k in got[1][0] if k.startswith("loss_") or re.match(r"layer\d+\.", k)]
    assert any(".err." in k for k in keys) and len(got[1][0]["loss_last_epoch"].split("|")) == 5
    assert {k: got[3][0][k] for k in keys} == {k: got[1][0][k] for k in keys}
    assert got[3][1].keys() == got[1][1].keys()
    for k, v in got[1][1].items():
        assert torch.equal(got[3][1][k], v), k
    assert got[1][0]["loss_first_epoch"] != got[1][0]["loss_last_epoch"]  # the layers did train


def test_progress_bar_counts_steps_while_layers_are_in_flight(tokenizer, monkeypatch):
    """With three layers in flight the bar moves at every optimizer step (a count of finished layers stands
    still until the first of them ends), ends at its total, and a layer that stops early (keep_last after a
    non-finite loss) adds its missing steps when it ends."""
    import freeact.methods.block_training as bt

    bars = []

    class Bar:
        def __init__(self, total, unit, **kw):
            self.total, self.unit, self.n, self.trace, self.postfix = total, unit, 0, [], ""
            bars.append(self)

        def update(self, k=1):
            self.n += k
            self.trace.append((k, self.postfix))

        def set_postfix_str(self, s, refresh=True):
            self.postfix = s

        def close(self):
            pass

    monkeypatch.setattr(bt, "tqdm", Bar)
    model = _five_layer_llada(tokenizer)
    ctx = make_ctx(model, tokenizer, w=4, a=4, n=6)
    ctx.progress = True
    get_method("flatquant", {"epochs": 2, "batch_size": 2, "layers_in_flight": 3}).apply(ctx)
    bar = bars[-1]
    assert bar.unit == "step" and bar.total == 5 * 2 * 3 and bar.n == bar.total
    first_done = next(i for i, (_, p) in enumerate(bar.trace) if p.startswith("layers done 1/"))
    assert first_done >= 3 * 6 - 1 and all(k == 1 for k, _ in bar.trace[:first_done])  # 3 layers stepped together
    assert bar.postfix == "layers done 5/5"

    model = _five_layer_llada(tokenizer)
    calls = {"n": 0}
    layer = get_adapter(model).layers()[2]

    def nan_once_trained(module, args, out):  # layer 2's block output turns non-finite from its 4th training step
        calls["n"] += 1
        if calls["n"] > 3 + 1 and torch.is_grad_enabled():
            return (out[0] * float("nan"),) + tuple(out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    layer.register_forward_hook(nan_once_trained)
    ctx = make_ctx(model, tokenizer, w=4, a=4, n=6)
    ctx.progress = True
    info = get_method("flatquant", {"epochs": 2, "batch_size": 2, "layers_in_flight": 3,
                                    "on_nonfinite": "keep_last"}).apply(ctx)
    bar = bars[-1]
    assert info["train_steps"] < 5 * 2 * 3 and bar.n == bar.total == 5 * 2 * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("method,kind", [("flatquant", "llada"), ("freeact", "llada"), ("flatquant", "dream"),
                                         ("freeact", "dream")])
def test_cuda_graph_steps_match_eager_steps(tiny_model, tokenizer, method, kind):
    """The same training with every step eager and with the steps after the warm-up replayed from a CUDA graph:
    the same losses and the same quantized model."""
    got = {}
    for graph in (False, True):
        model = tiny_model(kind).cuda()
        ctx = make_ctx(model, tokenizer, w=4, a=4, n=6)
        ctx.device = "cuda"
        info = get_method(method, {"epochs": 3, "batch_size": 2, "cuda_graph": graph, "amp": "off"}).apply(ctx)
        assert info["train_steps"] == 2 * 3 * 3  # layers x epochs x batches
        assert info["cuda_graph"] == ("on" if graph else "method.cuda_graph=false")
        with torch.no_grad():
            logits = model(input_ids=ctx.calib.input_ids[:2].cuda()).logits
        got[graph] = ([float(v) for v in info["loss_last_epoch"].split("|")], logits)
    assert got[True][0] == pytest.approx(got[False][0], rel=1e-4)
    torch.testing.assert_close(got[True][1], got[False][1], rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a CUDA device")
@pytest.mark.parametrize("method", ["flatquant", "freeact"])
def test_layers_in_flight_on_cuda_streams_match_one_at_a_time(tokenizer, method):
    """On a GPU, layers in flight run on their own streams with CUDA-graph replay: the same losses and the
    same quantized model as one layer at a time."""
    got = {}
    for width in (1, 4):
        model = _five_layer_llada(tokenizer).cuda()
        ctx = make_ctx(model, tokenizer, w=4, a=4, n=6)
        ctx.device = "cuda"
        info = get_method(method, {"epochs": 3, "batch_size": 2, "cuda_graph": True, "amp": "off",
                                   "layers_in_flight": width}).apply(ctx)
        assert info["cuda_graph"] == "on" and info["train_steps"] == 5 * 3 * 3
        with torch.no_grad():
            logits = model(input_ids=ctx.calib.input_ids[:2].cuda()).logits
        got[width] = ([float(v) for v in info["loss_last_epoch"].split("|")], logits)
    assert got[4][0] == pytest.approx(got[1][0], rel=1e-5)
    torch.testing.assert_close(got[4][1], got[1][1], rtol=1e-4, atol=1e-4)


def test_cuda_graph_setting_is_checked_and_explains_when_it_is_off(tiny_model, tokenizer):
    """auto runs eagerly on a CPU and says why in the row; true refuses to run where no graph can be captured."""
    from freeact.config.methods import SettingsError, parse_settings

    with pytest.raises((SettingsError, ValueError), match="cuda_graph"):
        parse_settings({"name": "flatquant", "cuda_graph": "maybe"})
    model = tiny_model("llada")
    info = FlatQuant({"epochs": 1, "batch_size": 2}).apply(make_ctx(model, tokenizer, w=4, a=4))
    assert info["cuda_graph"] == "not on a CUDA device"
    with pytest.raises(ValueError, match="method.cuda_graph=true but layer 0 cannot be captured: not on a CUDA"):
        FlatQuant({"epochs": 1, "batch_size": 2, "cuda_graph": True}).apply(make_ctx(tiny_model("llada"), tokenizer,
                                                                                      w=4, a=4))


def test_graph_obstacle_names_what_prevents_a_cuda_graph():
    from freeact.methods.block_training import TrainConfig, graph_obstacle

    h = [torch.zeros(2, 8, 4), torch.zeros(2, 8, 4)]
    kw = [{"position_embeddings": (torch.zeros(2, 8, 2), torch.zeros(2, 8, 2)), "attention_mask": None}] * 2
    types = [torch.zeros(2, 8, dtype=torch.long)] * 2
    assert graph_obstacle(TrainConfig(), h, kw, h, types, None) == "not on a CUDA device"  # all shapes agree
    assert graph_obstacle(TrainConfig(cuda_graph=False), h, kw, h, types, None) == "method.cuda_graph=false"
    assert "keep_last" in graph_obstacle(TrainConfig(on_nonfinite="keep_last"), h, kw, h, types, None)
    assert "fp16" in graph_obstacle(TrainConfig(amp="fp16"), h, kw, h, types, None)
    shorter = [h[0], torch.zeros(2, 7, 4)]
    assert graph_obstacle(TrainConfig(), shorter, kw, h, types, None) == "calibration batch 1 differs in shape from batch 0"
    other_kw = [kw[0], {**kw[0], "attention_mask": torch.ones(2, 8)}]
    assert graph_obstacle(TrainConfig(), h, other_kw, h, types, None).startswith("calibration batch 1 differs")
    valid = [torch.ones(2, 8, dtype=torch.bool), torch.ones(2, 9, dtype=torch.bool)]
    assert graph_obstacle(TrainConfig(), h, kw, h, types, valid).startswith("calibration batch 1 differs")


def test_compiled_weight_side_gives_the_eager_values_and_gradients():
    """method.compile: the weights' clip + fake quant through torch.compile (inductor; on the CPU here) gives
    the eager function's outputs exactly and its gradients to float32 rounding, with and without the clip."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(48, 64, generator=g)
    a0, b0 = 4 + 0.5 * torch.randn(48, 1, generator=g), 4 + 0.5 * torch.randn(48, 1, generator=g)
    gy = torch.randn(48, 64, generator=g)
    spec = QuantSpec(bits=4)
    for clipped in (True, False):
        got = []
        for fn in (clipped_fake_quant, compiled_clipped_fake_quant()):
            w, a, b = (t.clone().requires_grad_() for t in (w0, a0, b0))
            y = fn(w, a if clipped else None, b if clipped else None, spec)
            (y * gy).sum().backward()
            got.append([y.detach(), w.grad] + ([a.grad, b.grad] if clipped else []))
        (y_eager, *g_eager), (y_comp, *g_comp) = got
        assert torch.equal(y_eager, y_comp)
        assert len(torch.unique(y_eager)) > 10  # a real quantization, not a constant
        for ge, gc in zip(g_eager, g_comp):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)
            assert ge.abs().max() > 0


def test_compile_auto_means_on_a_gpu_only():
    assert not FlatQuant({}).compiles("cuda")  # off by default until measured on a GPU
    assert not FlatQuant({"compile": "auto"}).compiles("cpu") and FlatQuant({"compile": "auto"}).compiles("cuda")
    assert FlatQuant({"compile": True}).compiles("cpu") and not FlatQuant({"compile": False}).compiles("cuda")
    with pytest.raises(ValueError, match="compile"):
        get_method("flatquant", {"compile": "maybe"})
