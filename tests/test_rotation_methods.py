"""Transform baselines: norm fusion, rotations (QuaRot, SpinQuant), Cayley SGD, SmoothQuant.

Models are the configured tiny families (conf/model/tiny_*.yaml: LLaMA 128/384 with GQA 4/2,
LLaDA 128/384, Dream 224/592 with 7 heads / 1 KV head and q/k/v biases). Norm scales and biases
are randomised first: a fresh model has unit norms and zero biases, which would make fusion and
bias handling untestable.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from freeact.data.calib import build_calib_set
from freeact.data.text import read_text
from freeact.methods import QuantContext, QuantSettings, get_method
from freeact.methods.smoothquant import input_absmax
from freeact.methods.spinquant import load_rotations
from freeact.models import get_adapter
from freeact.models.tiny import build_tiny
from freeact.quant.act import set_act_quant
from freeact.quant.quantizer import QuantSpec
from freeact.transforms.cayley import CayleySGD, orthogonality_error
from freeact.transforms.fusion import fuse_norms
from freeact.transforms.hadamard import OnlineHadamard, block_hadamard_matrix, random_hadamard_matrix
from freeact.transforms.rotation import HeadMixHadamard, apply_residual_rotation

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
F64 = torch.float64
KINDS = ["llama", "llada", "dream"]
TOL = 1e-6  # max |logits - ref| / max |ref|
OFF = QuantSettings(QuantSpec(16), QuantSpec(16), QuantSpec(16, symmetric=False))
W4A4 = QuantSettings(QuantSpec(4), QuantSpec(4), QuantSpec(16, symmetric=False))
W4A4KV4 = QuantSettings(QuantSpec(4), QuantSpec(4), QuantSpec(4, symmetric=False))
FAST = {"weight_algo": "rtn", "mse_clip": False}  # keep the tests quick; the configs default to GPTQ


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Small matmuls on a shared 2-core machine are up to 50x slower with 2 contending threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(tokenizer, kind: str, dtype=F64, perturb=True, **arch_overrides):
    c = OmegaConf.load(f"{CONF_DIR}/model/tiny_{kind}.yaml")
    arch = {**OmegaConf.to_container(c.arch), **arch_overrides}
    model = build_tiny(c.family, arch, tokenizer, seed=0).to(dtype).eval()
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=F64))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Small slices of the shipped corpora (tokenizing the whole files dominates the runtime)."""
    d = tmp_path_factory.mktemp("corpus")
    out = {}
    for name in ("wiki.train", "wiki.valid", "wiki.test"):
        (d / f"{name}.txt").write_text(read_text(name, max_chars=40_000), encoding="utf-8")
        out[name] = str(d / f"{name}.txt")
    return out


def calib_for(tokenizer, model, source, n=4, seqlen=32, seed=0):
    a = get_adapter(model)
    return build_calib_set(tokenizer, source, n, seqlen, seed,
                           mask_token_id=a.mask_token_id if a.objective == "mdm" else None)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def rel_err(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def apply_method(model, name, cfg, quant, calib, **ctx_kw):
    ctx = QuantContext(model, get_adapter(model), quant, calib, progress=False, batch_size=2, **ctx_kw)
    info = get_method(name, cfg).apply(ctx)
    return ctx, info


@pytest.fixture(scope="module")
def models(tokenizer, corpus):
    """float64 reference model, calibration set and reference logits per family (built once)."""
    out = {}
    for kind in KINDS:
        m = make_model(tokenizer, kind)
        calib = calib_for(tokenizer, m, corpus["wiki.train"])
        ids = calib.input_ids[:2]
        out[kind] = (m, calib, ids, logits(m, ids))
    return out


# ------------------------------------------------------------------------------ norm fusion
@pytest.mark.parametrize("kind", KINDS)
def test_norm_fusion_is_exact(models, kind):
    base, _, ids, ref = models[kind]
    m = copy.deepcopy(base)
    a = get_adapter(m)
    q0 = a.blocks()[0].q.weight.clone()
    fuse_norms(a)
    norms = [a.final_norm()] + [n for b in a.blocks() for n in (b.attn_norm, b.mlp_norm)]
    assert all(torch.all(n.weight == 1) for n in norms)
    assert (a.blocks()[0].q.weight - q0).abs().max() > 0.01 * q0.abs().max()  # scales really moved
    err = rel_err(logits(m, ids), ref)
    print(f"invariance {kind} fuse_norms: {err:.2e}")
    assert err < TOL


def test_norm_fusion_unties_tied_embeddings(tokenizer, corpus):
    m = make_model(tokenizer, "llama", tie_word_embeddings=True)
    a = get_adapter(m)
    assert a.lm_head().weight is a.embeddings().weight
    ids = calib_for(tokenizer, m, corpus["wiki.train"]).input_ids[:2]
    ref, emb0 = logits(m, ids), a.embeddings().weight.clone()
    assert fuse_norms(a)["untied_embeddings"] is True
    assert a.lm_head().weight.data_ptr() != a.embeddings().weight.data_ptr()
    assert torch.equal(a.embeddings().weight, emb0)  # only the head absorbed the final norm
    assert not m.config.tie_word_embeddings
    assert rel_err(logits(m, ids), ref) < TOL


def test_rotation_refuses_unfused_norms_and_non_orthogonal_matrices(models):
    m = copy.deepcopy(models["llama"][0])
    a = get_adapter(m)
    Q = random_hadamard_matrix(a.hidden_size, seed=0)
    with pytest.raises(ValueError, match="fuse_norms"):
        apply_residual_rotation(a, Q)
    fuse_norms(a)
    with pytest.raises(ValueError, match="not orthogonal"):
        apply_residual_rotation(a, 1.01 * Q)


def test_per_kv_head_rotations_with_gqa(models):
    """Distinct R2 per KV head (LLaMA: 4 heads share 2 KV heads): o must use each query head's group."""
    base, _, ids, ref = models["llama"]
    m = copy.deepcopy(base)
    a = get_adapter(m)
    g = torch.Generator().manual_seed(0)
    R = torch.stack([torch.linalg.qr(torch.randn(a.head_dim, a.head_dim, generator=g, dtype=F64))[0]
                     for _ in range(a.num_kv_heads)])
    apply_residual_rotation(a, None, R)
    assert rel_err(logits(m, ids), ref) < TOL
    m2 = copy.deepcopy(base)  # wrong GQA grouping (tile instead of repeat_interleave) breaks it
    a2 = get_adapter(m2)
    from freeact.transforms import rotation

    b = a2.blocks()[0]
    with torch.no_grad():
        b.v.weight.copy_(rotation.headwise_output_side(b.v.weight, R, a2.num_kv_heads))
        b.o.weight.copy_(rotation.headwise_input_side(b.o.weight, R.repeat(a2.num_heads // a2.num_kv_heads, 1, 1),
                                                      a2.num_heads))
    assert rel_err(logits(m2, ids), ref) > 1e-3


# ------------------------------------------------------------------------------ invariance of each method
CASES = [("quarot", {"rotate_qk": False}), ("quarot", {"rotate_qk": True}), ("spinquant", {"steps": 0}),
         ("smoothquant", {})]


@pytest.mark.parametrize("name,cfg", CASES, ids=["quarot", "quarot_qk", "spinquant_init", "smoothquant"])
@pytest.mark.parametrize("kind", KINDS)
def test_method_is_exact_without_quantization(models, kind, name, cfg):
    base, calib, ids, ref = models[kind]
    m = copy.deepcopy(base)
    ctx, info = apply_method(m, name, {**FAST, **cfg}, OFF, calib)
    a = ctx.adapter
    blk, blk0 = a.blocks()[0], get_adapter(base).blocks()[0]
    assert (blk.q.weight - blk0.q.weight).abs().max() > 0.01 * blk0.q.weight.abs().max()
    if name != "smoothquant":
        assert isinstance(blk.down.input_quantizer.transform, OnlineHadamard)  # R4 runs online
        assert (blk.v.weight - blk0.v.weight).abs().max() > 0.01 * blk0.v.weight.abs().max()
        has_qk = getattr(blk.attn, "qkv_hook", None) is not None and blk.attn.qkv_hook.qk_transform is not None
        assert has_qk == (name == "quarot" and cfg["rotate_qk"])
        assert info["rotate_qk"] == has_qk
    err = rel_err(logits(m, ids), ref)
    print(f"invariance {kind} {name} {cfg}: {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("kind,o_kind", [("llama", HeadMixHadamard), ("dream", OnlineHadamard)])
def test_quarot_online_rotations_are_what_makes_it_exact(models, kind, o_kind):
    """o_proj reads z (I (x) R_v) M: with QuaRot's M = H_heads (x) I that is the full Hadamard
    H_heads (x) H_hd of the attention output (every entry +-1/sqrt(width)); dropping M (or the
    down_proj Hadamard) at run time breaks the invariance, so both online transforms really run."""
    base, calib, ids, ref = models[kind]
    m = copy.deepcopy(base)
    ctx, _ = apply_method(m, "quarot", FAST, OFF, calib)
    a = ctx.adapter
    o_t = a.blocks()[0].o.input_quantizer.transform
    assert type(o_t) is o_kind
    if o_kind is HeadMixHadamard:  # 4 heads: QuaRot's cross-head transform
        Rv = block_hadamard_matrix(a.head_dim)
        effective = torch.kron(torch.eye(a.num_heads, dtype=F64), Rv) @ o_t.matrix()
        width = a.num_heads * a.head_dim
        assert torch.allclose(effective.abs(), torch.full_like(effective, 1 / math.sqrt(width)), atol=1e-12)
    assert rel_err(logits(m, ids), ref) < TOL
    for lin in ("o", "down"):
        mm = copy.deepcopy(m)
        for b in get_adapter(mm).blocks():
            getattr(b, lin).input_quantizer.transform = None
        assert rel_err(logits(mm, ids), ref) > 1e-3, f"removing the online rotation of {lin} changed nothing"


@pytest.mark.parametrize("kind", KINDS)
def test_spinquant_trained_rotations_are_fused_exactly(models, kind, tmp_path):
    """Train R1/R2 with W4A4KV4 fake quantization on, then switch quantization off: exact."""
    base, calib, ids, ref = models[kind]
    m = copy.deepcopy(base)
    path = tmp_path / "rot.pt"
    cfg = {**FAST, "weight_algo": "none", "steps": 2, "train_weight_quant": True, "save_rotations": str(path)}
    ctx, info = apply_method(m, "spinquant", cfg, W4A4KV4, calib)
    assert info["train_steps"] == 2 and info["train_weight_quant"]
    a = ctx.adapter
    R1, R2 = load_rotations(path, a)
    init = random_hadamard_matrix(a.hidden_size, seed=0)
    assert (R1 - init).abs().max() > 1e-4  # training moved R1 off its Hadamard init
    assert orthogonality_error(R1) < 1e-10 and all(orthogonality_error(r) < 1e-10 for r in R2)
    set_act_quant(m, False)
    err = rel_err(logits(m, ids), ref)
    print(f"invariance {kind} spinquant trained (2 steps, W4A4KV4): {err:.2e}")
    assert err < TOL
    # reuse the saved rotations: no training, the same weights
    m2 = copy.deepcopy(base)
    _, info2 = apply_method(m2, "spinquant", {**FAST, "weight_algo": "none", "load_rotations": str(path)}, OFF, calib)
    assert "train_steps" not in info2
    for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.allclose(p, p2, atol=1e-10), n


@pytest.mark.parametrize("kind", KINDS)
def test_spinquant_loss_matches_its_definition(models, kind):
    """AR: next-token CE. dLLM: CE of masked positions against the clean targets, each divided by
    its sequence's masking ratio, over all positions; Dream's logits are shifted right by one."""
    from types import SimpleNamespace

    from freeact.methods.spinquant import calibration_loss

    base, calib, _, _ = models[kind]
    a = get_adapter(base)
    ids, tgt = calib.input_ids[:2], calib.targets[:2]
    raw = torch.randn(*ids.shape, 50, generator=torch.Generator().manual_seed(0), dtype=F64)
    tgt_small = tgt % 50  # a 50-token vocabulary for the check; the mask id (1) stays as it is
    ids_small = ids % 50 if a.objective == "ar" else torch.where(ids == a.mask_token_id, ids, ids % 50)
    assert a.objective == "ar" or a.mask_token_id < 50
    loss = calibration_loss(a, SimpleNamespace(logits=raw), ids_small, tgt_small).item()
    logp = raw.log_softmax(-1)
    if a.objective == "ar":
        expected = -logp[:, :-1].gather(-1, ids_small[:, 1:, None]).mean().item()
    else:
        assert (ids == a.mask_token_id).any()
        total = 0.0
        for b in range(ids.shape[0]):
            masked = (ids_small[b] == a.mask_token_id).nonzero()[:, 0].tolist()
            t = len(masked) / ids.shape[1]
            for i in masked:
                j = i - 1 if (a.shift_logits and i > 0) else i  # Dream: position i is scored by logits[i-1]
                total += -logp[b, j, tgt_small[b, i]].item() / t
        expected = total / ids.numel()
    assert loss == pytest.approx(expected, rel=1e-9)


def test_spinquant_training_refuses_layer_streaming(models):
    from freeact.methods.spinquant import learn_rotations

    base, calib, _, _ = models["llama"]
    a = get_adapter(base)
    ctx = QuantContext(base, a, W4A4, calib, progress=False, streaming=True)
    eye = torch.eye(a.hidden_size, dtype=F64)
    with pytest.raises(ValueError, match="streaming"):
        learn_rotations(ctx, eye, [torch.eye(a.head_dim, dtype=F64)] * 2, steps=1)


def test_spinquant_rejects_a_mismatched_rotation_file(models, tmp_path):
    a = get_adapter(models["llama"][0])
    torch.save({"R1": torch.eye(a.hidden_size + 1, dtype=F64), "R2": []}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="R1"):
        load_rotations(tmp_path / "bad.pt", a)
    with pytest.raises(FileNotFoundError):
        load_rotations(tmp_path / "missing.pt", a)


def test_quarot_overrides_act_clip_and_kv_settings(models):
    base, calib, _, _ = models["llama"]
    m = copy.deepcopy(base)
    ctx, info = apply_method(m, "quarot", FAST, W4A4KV4, calib)
    assert ctx.quant.act.clip_ratio == 0.9 and info["act_clip_ratio"] == 0.9
    assert ctx.quant.kv.clip_ratio == 0.95 and not ctx.quant.kv.symmetric
    b = ctx.adapter.blocks()[0]
    assert b.q.input_quantizer.spec.clip_ratio == 0.9
    assert info["rotate_qk"] and b.attn.qkv_hook.kv_spec.bits == 4  # auto: on because KV is quantized


# ------------------------------------------------------------------------------ SmoothQuant
def test_smoothquant_balances_activation_and_weight_ranges(models):
    """alpha = 0.5: after smoothing, max|X'_j| = max|W'_j| = sqrt(max|X_j| max|W_j|) per channel,
    for the norm-fed groups (q/k/v, gate/up) and, GQA-grouped, for o_proj fed by v_proj."""
    base, calib, ids, ref = models["dream"]
    m = copy.deepcopy(base)
    ctx, info = apply_method(m, "smoothquant", {**FAST, "alpha": 0.5, "smooth_vo": False}, OFF, calib)
    b = ctx.adapter.blocks()[1]
    x = input_absmax(ctx, {"q": b.q, "gate": b.gate})
    for name, lins in (("q", [b.q, b.k, b.v]), ("gate", [b.gate, b.up])):
        w = torch.stack([l.weight.abs().amax(0) for l in lins]).amax(0)
        assert torch.allclose(x[name].to(F64), w, rtol=1e-5), name
    assert info["max_scale_ratio"] > 2  # the scales are not all equal
    m = copy.deepcopy(base)
    ctx, info = apply_method(m, "smoothquant", {**FAST, "alpha": 0.5}, OFF, calib)
    a = ctx.adapter
    b = a.blocks()[1]
    x = input_absmax(ctx, {"o": b.o})
    rep, hd = a.num_heads // a.num_kv_heads, a.head_dim
    x_o = x["o"].to(F64).reshape(a.num_kv_heads, rep, hd).amax(1)
    w_o = b.o.weight.abs().amax(0).reshape(a.num_kv_heads, rep, hd).amax(1)
    assert torch.allclose(x_o, w_o, rtol=1e-5)
    assert rel_err(logits(m, ids), ref) < TOL


# ------------------------------------------------------------------------------ Cayley SGD
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cayley_sgd_stays_orthogonal_and_descends(dtype):
    """100 steps (lr 1.5, momentum, cosine schedule) towards reachable targets on the manifold:
    a square rotation, a batch of rotations and a 32 x 8 Stiefel point; orthogonality holds."""
    g = torch.Generator().manual_seed(0)

    def rotate_from(X0, scale=0.3):  # a target in the same connected component as X0
        K = torch.randn(*X0.shape[:-2], X0.shape[-2], X0.shape[-2], generator=g, dtype=F64)
        return torch.linalg.matrix_exp(scale * (K - K.transpose(-1, -2)) / X0.shape[-2] ** 0.5) @ X0

    starts = [random_hadamard_matrix(96, seed=0),
              torch.linalg.qr(torch.randn(3, 16, 16, generator=g, dtype=F64))[0],
              torch.linalg.qr(torch.randn(32, 8, generator=g, dtype=F64))[0]]
    targets = [rotate_from(X0).to(dtype) for X0 in starts]
    params = [torch.nn.Parameter(X0.to(dtype)) for X0 in starts]
    opt = CayleySGD(params, lr=1.5, momentum=0.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)

    def loss_fn():
        return sum(((P - T) ** 2).sum() for P, T in zip(params, targets))

    first = loss_fn().item()
    for _ in range(100):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 1e-3  # the cosine schedule drove it
    for P in params:
        assert orthogonality_error(P) < 1e-5
    assert loss_fn().item() < 1e-3 * first


def test_cayley_sgd_rejects_points_off_the_manifold():
    with pytest.raises(ValueError, match="orthonormal"):
        CayleySGD([torch.nn.Parameter(2 * torch.eye(4))])
    with pytest.raises(ValueError, match="n >= p"):
        CayleySGD([torch.nn.Parameter(torch.eye(8)[:4])])


# ------------------------------------------------------------------------------ outliers
def plant_outliers(model, n=4, lo=50.0, hi=100.0, seed=3):
    """Scale a few residual channels of the embeddings by 50-100x: every layer's q/k/v and
    gate/up inputs then carry a few huge channels, the classic LLM activation outliers."""
    a = get_adapter(model)
    ch = torch.randperm(a.hidden_size, generator=torch.Generator().manual_seed(seed))[:n]
    with torch.no_grad():
        a.embeddings().weight[:, ch] *= torch.linspace(lo, hi, n)
    return ch


@pytest.mark.parametrize("kind", ["llama", "dream"])
def test_rotations_beat_rtn_on_planted_outliers(tokenizer, corpus, kind):
    base = make_model(tokenizer, kind, dtype=torch.float32, perturb=False)
    plant_outliers(base)
    calib = calib_for(tokenizer, base, corpus["wiki.train"], n=4, seqlen=64)
    ids = calib_for(tokenizer, base, corpus["wiki.valid"], n=4, seqlen=64, seed=5).input_ids
    ref = logits(base, ids)
    ctx0 = QuantContext(base, get_adapter(base), OFF, calib, batch_size=2, progress=False)
    x = input_absmax(ctx0, {"q": get_adapter(base).blocks()[0].q})["q"]
    assert x.max() > 20 * x.median()  # the outliers are there

    def error(name, cfg):
        m = copy.deepcopy(base)
        apply_method(m, name, cfg, W4A4, calib)
        return ((logits(m, ids) - ref).pow(2).mean() / ref.pow(2).mean()).item()

    errs = {"rtn": error("rtn", FAST), "quarot": error("quarot", FAST),
            "spinquant": error("spinquant", {**FAST, "steps": 2}), "smoothquant": error("smoothquant", FAST)}
    print(f"W4A4 logit MSE / logit power with planted outliers ({kind}): " +
          ", ".join(f"{k} {v:.5f}" for k, v in errs.items()))
    for name in ("quarot", "spinquant", "smoothquant"):
        assert errs[name] < 0.8 * errs["rtn"], (name, errs)


# ------------------------------------------------------------------------------ configs end to end
@pytest.mark.parametrize("method", ["quarot", "spinquant", "smoothquant"])
def test_configs_run_end_to_end(compose, corpus, method, tmp_path):
    from freeact.config import config_hash
    from freeact.validate import validate
    from freeact.experiment import run_experiment

    over = [f"method={method}", "model=tiny_dream", "quant=w4a4kv4", "progress=false", "calib.nsamples=4",
            "calib.seqlen=32", "eval.max_chunks=1", "eval.mc_num=2", "eval.seqlen=32",
            f"calib.source={corpus['wiki.train']}", f"eval.source={corpus['wiki.test']}"]
    if method == "spinquant":
        over += ["method.steps=2", f"method.save_rotations={tmp_path / 'r.pt'}"]
    cfg = compose(over)
    row, _ = run_experiment(cfg, validate(cfg), config_hash(cfg))
    assert row["status"] == "ok" and math.isfinite(row["wiki.nll"])
    assert row["method.name"] == method
    if method != "smoothquant":
        assert row["info.rotate_qk"] is True  # KV is quantized in w4a4kv4
    if method == "spinquant":
        assert (tmp_path / "r.pt").exists()


def test_spinquant_bf16_training_keeps_float64_rotations_and_tracks_float32(models):
    # the model in float32 (as a real run trains it), bf16 autocast around its forward only
    import copy

    from freeact.methods.spinquant import learn_rotations

    base, calib, _, _ = models["llama"]
    a = get_adapter(base)
    R1 = torch.linalg.qr(torch.randn(a.hidden_size, a.hidden_size, dtype=F64, generator=torch.Generator().manual_seed(0)))[0]
    R2 = [torch.eye(a.head_dim, dtype=F64)] * len(a.layers())
    out = {}
    for amp in ("off", "bf16"):
        model = copy.deepcopy(base).float()
        ctx = QuantContext(model, get_adapter(model), W4A4, calib, batch_size=2, progress=False)
        r1, r2, losses = learn_rotations(ctx, R1, R2, steps=3, lr=0.5, amp=amp)
        assert r1.dtype == F64 and torch.allclose(r1 @ r1.T, torch.eye(a.hidden_size, dtype=F64), atol=1e-10)
        out[amp] = losses
    assert all(math.isfinite(v) for v in out["bf16"])
    # bf16 rounding of the forward moves the loss a little, not the training
    assert out["bf16"][0] == pytest.approx(out["off"][0], rel=0.05) and out["bf16"] != out["off"]
    with pytest.raises(ValueError, match="amp must be off or bf16"):
        learn_rotations(ctx, R1, R2, steps=1, amp="fp16")
