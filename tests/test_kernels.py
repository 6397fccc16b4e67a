"""Kernels (freeact.kernels) and layer-wise streaming (freeact.methods.streaming).

CPU: the eager fallbacks equal the model's own pipeline and the reference math (Kronecker convention,
per-token quantization, Hadamard factors), the W8A8 integer path is exact against float64 integer
math, and streaming calibration gives the same quantized model as the non-streaming path.
CUDA (skipped without a GPU): the Triton kernels agree with the eager versions to tolerance.
"""
import copy
import math

import pytest
import torch

from freeact.data.calib import CalibSet
from freeact.kernels import (Int8Linear, act_quant_eager, act_quant_int8, fuse_input_quantizers, fused_act_quant,
                             hadamard_transform, int_mm, quantize_rows_int8)
from freeact.kernels.act_quant import (FusedInputQuantizer, KronActQuant, fused_row_quant, kernel_tiling, kron_spec,
                                      mask_owner, triton_supports, tuned_tiling)
from freeact.kernels.hadamard import kernel_fits
from freeact.transforms.hadamard import hadamard_kron_factors, sylvester_factors
from freeact.kernels.int8 import int8_matmul, int_mm_reference
from freeact.methods import QuantContext, QuantSettings, get_method
from freeact.methods.streaming import LayerStreamer, LayerTimeline, active_streamer
from freeact.models import get_adapter
from freeact.models.token_types import TokenTypes
from freeact.quant.act import InputQuantizer, attach_input_quantizer
from freeact.quant.quantizer import QuantSpec
from freeact.transforms.affine import AffineSite, HeadwiseVO, random_orthogonal
from freeact.transforms.hadamard import OnlineHadamard, fast_hadamard_transform, hadamard_matrix
from freeact.transforms.typed import TypeMask, keep_masks, owner_from_ranks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is fastest, and far faster on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _typed_site(d, ranks, dtype=torch.float32, seed=0):
    """A merged FreeAct site: Kronecker orthogonal basis with per-channel scale, typed by `ranks`."""
    g = _gen(seed)
    scale = torch.rand(d, generator=g, dtype=F64) + 0.5
    site = AffineSite(d, "orthogonal", "kronecker", scale=scale, learn_scale=False, generator=g, dtype=dtype)
    site.merge()
    tt = TokenTypes([("mask", [7]), ("rest", None)])
    return TypeMask(site, owner_from_ranks(d, ranks), tt), tt


# ----------------------------------------------------------------------------- act kernel: eager path
def test_kronecker_convention_is_x_times_kron():
    """y = vec(P_l^T X P_r), X the row-major (d_l, d_r) reshape == x @ kron(P_l, P_r) == kron_matmul."""
    d_l, d_r = 6, 10
    x = torch.randn(5, d_l * d_r, dtype=F64, generator=_gen(1))
    P_l, P_r = torch.randn(d_l, d_l, dtype=F64, generator=_gen(2)), torch.randn(d_r, d_r, dtype=F64, generator=_gen(3))
    y = fused_act_quant(x, P_l, P_r, bits=16, backend="eager")
    explicit = torch.stack([(P_l.T @ t.reshape(d_l, d_r) @ P_r).reshape(-1) for t in x])
    torch.testing.assert_close(y, explicit, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, x @ torch.kron(P_l, P_r), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, x @ torch.kron(P_r, P_l))  # the factor order matters


def test_eager_quantization_formula():
    """Symmetric per-token: s = clip * max|y| / (2^(b-1)-1), q = clamp(round(y/s)), mask before the max."""
    d_l, d_r, bits, clip = 4, 8, 4, 0.8
    x = torch.randn(6, 32, dtype=F64, generator=_gen(4))
    P_l, P_r = random_orthogonal(d_l, _gen(5)), random_orthogonal(d_r, _gen(6))
    masks = torch.ones(2, 32, dtype=F64)
    masks[1, -5:] = 0
    types = torch.tensor([0, 1, 1, 0, 1, 0])
    out = fused_act_quant(x, P_l, P_r, masks, types, bits=bits, clip=clip, backend="eager")
    y = (x @ torch.kron(P_l, P_r)) * masks[types]
    qmax = 2 ** (bits - 1) - 1
    s = clip * y.abs().amax(-1, keepdim=True) / qmax
    ref = torch.clamp(torch.round(y / s), -qmax - 1, qmax) * s
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert (out[types == 1][:, -5:] == 0).all() and (out[types == 0][:, -5:] != 0).any()
    assert out.unique().numel() > 2 * qmax  # several scales, not a constant


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_eager_equals_freeact_input_pipeline(dtype):
    """The eager fallback is exactly the model's InputQuantizer(TypeMask(merged AffineSite))."""
    d = 224  # 14 x 16 like the tiny Dream width
    site, tt = _typed_site(d, [7, 7], dtype=dtype)
    spec = QuantSpec(bits=4, clip_ratio=0.9)
    iq = InputQuantizer(spec, site)
    x = torch.randn(2, 9, d, dtype=dtype, generator=_gen(8))
    types = torch.randint(0, 2, (2, 9), generator=_gen(9))
    with tt.use(types):
        ref = iq(x)
        ks = kron_spec(site)
        out = fused_act_quant(x, ks["P_l"], ks["P_r"], ks["masks"], types, bits=4, clip=0.9,
                              in_scale=ks["in_scale"], backend="eager")
        fused = FusedInputQuantizer(iq, backend="eager")(x)
    assert torch.equal(out, ref) and torch.equal(fused, ref)
    assert ks["P_l"].shape == (14, 14) and ks["P_r"].shape == (16, 16)


def test_fuse_input_quantizers_keeps_freeact_logits(tiny_model):
    """Swapping a FreeAct model's input pipelines for the fused ones (eager backend) changes nothing."""
    model = tiny_model("dream")
    adapter = get_adapter(model)
    ids = torch.randint(0, 500, (2, 24), generator=_gen(10))
    ids[:, ::3] = adapter.mask_token_id
    ctx = QuantContext(model, adapter, QuantSettings(QuantSpec(4), QuantSpec(4), QuantSpec(16)), CalibSet(ids, ids),
                       batch_size=2, progress=False)
    get_method("freeact", {"epochs": 1}).apply(ctx)
    lins = [l for b in adapter.blocks() for l in b.linears().values()]
    sharing = {}
    for l in lins:  # linears per installed pipeline (FreeAct may give each linear its own clip)
        sharing[id(l.input_quantizer)] = sharing.get(id(l.input_quantizer), 0) + 1
    expect = [sharing[id(l.input_quantizer)] for l in lins]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        n = fuse_input_quantizers(model, backend="eager")
        out = model(input_ids=ids).logits
    assert n == len(lins) == 7 * len(adapter.layers())  # q, k, v, o, gate, up, down all fused
    assert all(isinstance(l.input_quantizer, FusedInputQuantizer) for l in lins)
    assert [l.input_quantizer.consumers for l in lins] == expect
    assert len({id(l.input_quantizer) for l in lins}) == len(sharing)  # sharing preserved
    assert torch.equal(out, ref)
    with torch.no_grad():  # the shared-input cache (if any sharing) never serves a stale output
        assert torch.equal(model(input_ids=ids.flip(0)).logits, ref.flip(0))


def test_fused_pipeline_shared_by_linears_computes_once():
    site, tt = _typed_site(224, [7, 7])
    iq = InputQuantizer(QuantSpec(bits=4), site, learnable_clip=True)
    lins = [torch.nn.Linear(224, 8) for _ in range(3)]
    for l in lins:
        attach_input_quantizer(l, iq)  # one pipeline for three linears, as q/k/v can share one
    parent = torch.nn.ModuleList(lins)
    assert fuse_input_quantizers(parent, backend="eager") == 3
    fused = lins[0].input_quantizer
    assert fused is lins[1].input_quantizer is lins[2].input_quantizer and fused.consumers == 3
    calls = []
    fused.op = _Counting(fused.op, calls)
    x = torch.randn(2, 5, 224)
    types = torch.randint(0, 2, (2, 5))
    with tt.use(types), torch.no_grad():
        outs = [l(x) for l in lins]
        ref = [torch.nn.functional.linear(iq(x), l.weight, l.bias) for l in lins]
        x.add_(1.0)  # modified in place: must be recomputed
        again = lins[0](x)
        ref_again = torch.nn.functional.linear(iq(x), lins[0].weight, lins[0].bias)
    assert len(calls) == 2
    assert all(torch.equal(o, r) for o, r in zip(outs, ref))
    assert torch.equal(again, ref_again)
    old_clip = fused._clip_value()
    with torch.no_grad():  # the cached clip value follows the learned clip parameter
        fused.clip_logit.fill_(-1.0)
        with tt.use(types):
            new, ref_new = lins[2](x), torch.nn.functional.linear(iq(x), lins[2].weight, lins[2].bias)
    assert torch.equal(new, ref_new) and fused._clip_value() < 0.5 < old_clip


class _Counting:
    def __init__(self, op, calls):
        self.op, self.calls = op, calls

    def __call__(self, *a, **kw):
        self.calls.append(1)
        return self.op(*a, **kw)


def test_act_inputs_are_checked():
    x = torch.randn(3, 12)
    with pytest.raises(ValueError, match="d_l"):
        fused_act_quant(x, torch.eye(3), torch.eye(5))
    with pytest.raises(ValueError, match="together"):
        fused_act_quant(x, torch.eye(3), torch.eye(4), masks=torch.ones(2, 12))
    with pytest.raises(ValueError, match="backend"):
        fused_act_quant(x, torch.eye(3), torch.eye(4), backend="cuda")


def test_kernel_tuning_is_checked():
    """Launch choices (column block, warps, tokens per program) are checked when the op is built."""
    from freeact.kernels.act_quant import KronActQuant, tuned_tiling

    assert tuned_tiling(8, 32, {"BN": 16})["passes"] == 2 and tuned_tiling(8, 32)["passes"] == 1
    for bad, msg in (({"BN": 24}, "power of two"), ({"BN": 64}, "16..32"), ({"num_warps": 3}, "num_warps"),
                     ({"tokens_per_prog": 0}, ">= 1"), ({"warps": 4}, "unknown")):
        with pytest.raises(ValueError, match=msg):
            KronActQuant(torch.eye(8), torch.eye(32), tuning=bad)


def test_mask_owner_recovers_freeacts_owners_and_refuses_other_masks():
    """FreeAct's keep rows (shared coordinates, then each type's unique block) give back their owner vector; masks
    of another form, or with values other than 0 and 1, give None (the kernel then reads a mask row per token)."""
    owner = owner_from_ranks(40, [3, 5])
    assert torch.equal(mask_owner(keep_masks(owner, 2)), owner.to(torch.int32))
    none_kept = keep_masks(owner, 2)
    none_kept[:, 0] = 0
    assert mask_owner(none_kept)[0] == -2 and torch.equal(mask_owner(none_kept)[1:], owner[1:].to(torch.int32))
    assert torch.equal(mask_owner(torch.ones(1, 8)), torch.full((8,), -1, dtype=torch.int32))
    two_of_three = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # coordinate 0 kept by two of three types
    assert mask_owner(two_of_three) is None
    assert mask_owner(keep_masks(owner, 2) * 0.5) is None and mask_owner(None) is None
    with pytest.raises(ValueError, match="mask must be auto or rows"):
        tuned_tiling(64, 64, {"mask": "owner"})


def test_kernel_tiling_covers_8b_widths():
    t = kernel_tiling(64, 64)  # 4096
    assert (t["DL"], t["DR"], t["BN"], t["passes"], t["padding"]) == (64, 64, 64, 1, 1.0)
    assert kernel_tiling(56, 64)["passes"] == 1 and kernel_tiling(112, 128)["passes"] == 1
    big = kernel_tiling(128, 148)  # 18944
    assert big["passes"] == 2 and big["DR"] == 256 and big["DL"] * big["BN"] <= 8192


# ----------------------------------------------------------------------------- Hadamard
@pytest.mark.parametrize("n", [2, 64, 1024, 16384])
def test_sylvester_factors(n):
    H_a, H_b = sylvester_factors(n)
    assert H_a.shape[0] * H_b.shape[0] == n and H_a.shape[0] <= H_b.shape[0]
    if n <= 1024:
        torch.testing.assert_close(torch.kron(H_a, H_b) / math.sqrt(n), hadamard_matrix(n), rtol=0, atol=1e-15)
    x = torch.randn(3, n, dtype=F64, generator=_gen(n))
    via_kron = act_quant_eager(x, H_a, H_b, bits=16, out_mul=1 / math.sqrt(n))  # the kernel's math
    torch.testing.assert_close(via_kron, fast_hadamard_transform(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [12, 40, 384, 448, 576, 3584, 12288, 18944])
def test_non_power_of_two_hadamards_as_two_kronecker_factors(n):
    """QuaRot's online Hadamards of widths 2^k m (a Paley base m) as the kernel's two +-1 factors: exactly
    sqrt(n) H_n^T against the dense matrix, and the kernel's eager math equals the fast transform."""
    P_l, P_r = hadamard_kron_factors(n)
    d_l, d_r = P_l.shape[0], P_r.shape[0]
    assert d_l * d_r == n and d_l & (d_l - 1) == 0 and bool((P_l.abs() == 1).all() and (P_r.abs() == 1).all())
    if n <= 4096:
        assert torch.equal(torch.kron(P_l, P_r), (hadamard_matrix(n).T * math.sqrt(n)).round())
    x = torch.randn(3, n, dtype=F64, generator=_gen(n))
    via_kron = act_quant_eager(x, P_l, P_r, bits=16, out_mul=1 / math.sqrt(n))
    torch.testing.assert_close(via_kron, fast_hadamard_transform(x), rtol=1e-12, atol=1e-12)
    tile = kernel_tiling(d_l, d_r)
    assert tile["DL"] * tile["DR"] <= {12288: 16384, 18944: 32768}.get(n, tile["DL"] * tile["DR"])
    assert (d_l, d_r) == {12288: (128, 96), 18944: (128, 148), 3584: (64, 56)}.get(n, (d_l, d_r))


def test_quarot_fuses_a_non_power_of_two_online_hadamard(tiny_model):
    """A tiny LLaDA's down_proj input is 160 = 8 x 20 wide (Paley base 20): its online Hadamard now runs
    through the fused kernel (eager backend here) with the same quantized outputs as the unfused pipeline."""
    model = tiny_model("llada", dtype=F64)
    adapter = get_adapter(model)
    ids = torch.randint(0, 500, (2, 24), generator=_gen(21))
    ctx = QuantContext(model, adapter, QuantSettings(QuantSpec(4), QuantSpec(4), QuantSpec(16)), CalibSet(ids, ids),
                       batch_size=2, progress=False)
    get_method("quarot", {"weight_algo": "rtn"}).apply(ctx)
    downs = [b.down for b in adapter.blocks()]
    assert downs[0].in_features == 160 and isinstance(downs[0].input_quantizer.transform, OnlineHadamard)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        fuse_input_quantizers(model, backend="eager")
        out = model(input_ids=ids).logits
    assert all(isinstance(d.input_quantizer, FusedInputQuantizer) for d in downs)
    assert downs[0].input_quantizer.kron["P_l"].shape == (8, 8)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_flatquant_fuses_every_linear_including_the_per_head_o_proj_transform(tiny_model):
    """FlatQuant's o_proj input takes the per-head P_h (HeadwiseVO), P_h (x) I for the kernel: all seven linears
    of a layer are fused (eager backend here), with the same logits as the unfused pipelines."""
    model = tiny_model("llada")
    adapter = get_adapter(model)
    ids = torch.randint(0, 500, (2, 24), generator=_gen(22))
    ctx = QuantContext(model, adapter, QuantSettings(QuantSpec(4), QuantSpec(4), QuantSpec(16)), CalibSet(ids, ids),
                       batch_size=2, progress=False)
    get_method("flatquant", {"epochs": 1}).apply(ctx)
    os_ = [b.linears()["o"] for b in adapter.blocks()]
    assert isinstance(os_[0].input_quantizer.transform, HeadwiseVO)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        n = fuse_input_quantizers(model, backend="eager")
        out = model(input_ids=ids).logits
    assert n == 7 * len(adapter.layers())
    heads = os_[0].input_quantizer.transform.num_heads
    assert os_[0].input_quantizer.kron["P_l"].shape == (heads, heads)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", ["rtn", "quarot"])
def test_linears_without_a_transform_fuse_their_per_token_quantizer(tiny_model, method):
    """RTN's and QuaRot's q/k/v, o and gate/up inputs have no online transform: fuse_input_quantizers gives them
    the per-token quantizer kernel (eager backend here), shared where the pipeline was shared, same logits
    (RTN: bit for bit)."""
    model = tiny_model("llada", dtype=F64)
    adapter = get_adapter(model)
    ids = torch.randint(0, 500, (2, 24), generator=_gen(23))
    ctx = QuantContext(model, adapter, QuantSettings(QuantSpec(4), QuantSpec(4), QuantSpec(16)), CalibSet(ids, ids),
                       batch_size=2, progress=False)
    get_method(method, {"weight_algo": "rtn"} if method == "quarot" else {}).apply(ctx)
    lins = adapter.blocks()[0].linears()
    assert lins["q"].input_quantizer.transform is None and lins["q"].input_quantizer is lins["k"].input_quantizer
    plain = [l for b in adapter.blocks() for l in b.linears().values() if l.input_quantizer.transform is None]
    assert len(plain) == (7 if method == "rtn" else 5) * len(adapter.layers())  # QuaRot: o and down transformed
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        fuse_input_quantizers(model, backend="eager")
        out = model(input_ids=ids).logits
    assert all(isinstance(l.input_quantizer, FusedInputQuantizer) for l in plain)
    assert isinstance(lins["q"].input_quantizer, FusedInputQuantizer) and lins["q"].input_quantizer.kron is None
    assert lins["q"].input_quantizer is lins["v"].input_quantizer  # still one pipeline for q/k/v
    if method == "quarot":  # and the Hadamard across heads on o_proj's input: H_heads (x) I
        o = lins["o"].input_quantizer
        assert isinstance(o, FusedInputQuantizer) and o.kron["P_l"].shape == (4, 4) and o.kron["split_z"]
    if method == "rtn":
        assert torch.equal(out, ref)
    else:  # QuaRot's Hadamards (o_proj across heads, down_proj) moved to Kronecker factors: float64 rounding apart
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_two_pass_tiles_take_the_gemm_path_by_default():
    """d = 18944 as 128 x 148 (a two-pass tile, measured no faster than eager) goes through two GEMMs and the
    row-quant kernel; single-pass tiles keep the fused kernel; either can be asked for."""
    assert tuned_tiling(128, 148)["path"] == "gemm" and tuned_tiling(64, 64)["path"] == "kernel"
    assert tuned_tiling(64, 64, {"path": "gemm"})["path"] == "gemm"
    with pytest.raises(ValueError, match="path must be one of kernel, batched, persistent, gemm"):
        tuned_tiling(64, 64, {"path": "cublas"})
    assert tuned_tiling(56, 64, {"path": "batched", "tokens_per_prog": 8})["path"] == "batched"
    with pytest.raises(ValueError, match="path batched takes padded tiles up to 4096"):
        tuned_tiling(96, 128, {"path": "batched"})
    with pytest.raises(ValueError, match="power of two tokens per program"):
        tuned_tiling(64, 64, {"path": "batched", "tokens_per_prog": 3})
    assert tuned_tiling(112, 128, {"path": "persistent", "programs_per_sm": 2, "stages": 3})["stages"] == 3
    with pytest.raises(ValueError, match="path persistent takes single-pass tiles"):
        tuned_tiling(128, 148, {"path": "persistent"})
    with pytest.raises(ValueError, match="stages must be >= 1"):
        tuned_tiling(64, 64, {"path": "persistent", "stages": 0})


def test_row_quant_rejects_bad_inputs_and_passes_16_bits_through():
    x = torch.randn(3, 8)
    assert fused_row_quant(x, bits=16) is x
    with pytest.raises(ValueError, match="clip"):
        fused_row_quant(x, clip=0.0)
    with pytest.raises(TypeError):
        fused_row_quant(torch.ones(3, 8, dtype=torch.int32))


def test_hadamard_eager_is_fast_hadamard_transform():
    x = torch.randn(4, 256, generator=_gen(11))
    assert torch.equal(hadamard_transform(x, backend="eager"), fast_hadamard_transform(x))
    with pytest.raises(ValueError):
        sylvester_factors(96)


# ----------------------------------------------------------------------------- int8
def test_int_mm_is_exact():
    a = torch.randint(-128, 128, (40, 96), dtype=torch.int8, generator=_gen(12))
    b = torch.randint(-128, 128, (96, 24), dtype=torch.int8, generator=_gen(13))
    a[0] = -128
    b[:, 0] = -128  # the extreme product 128 * 128 * 96
    ref = (a.long() @ b.long()).to(torch.int32)
    assert torch.equal(int_mm(a, b), ref) and torch.equal(int_mm_reference(a, b), ref)
    assert int(ref[0, 0]) == 128 * 128 * 96


def test_int8_linear_reference_path_is_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True).double()
    il = Int8Linear.from_linear(lin, backend="reference")
    x = torch.randn(5, 64, dtype=F64)
    qx, sx = quantize_rows_int8(x)
    acc = (qx.long() @ il.weight_q.long().T).double()
    ref = acc * sx.double()[:, None] * il.weight_scale.double()[None, :] + lin.bias.detach()
    out = il(x)
    assert torch.equal(out, ref)
    # and it approximates the float layer at 8 bits
    rel = (out - lin(x)).norm() / lin(x).norm()
    assert rel < 2e-2
    assert int(qx.abs().max()) == 127 and qx.dtype == torch.int8


@pytest.mark.parametrize("kind", ["site", "hadamard"])
def test_int8_linear_with_online_transform(kind):
    """The transform runs before activation quantization; W carries its weight side."""
    d = 64
    torch.manual_seed(1)
    lin = torch.nn.Linear(d, 32, bias=False).double()
    x = torch.randn(6, d, dtype=F64) * torch.linspace(0.1, 8, d, dtype=F64)  # outlier channels
    if kind == "site":
        t = AffineSite(d, "orthogonal", "kronecker", scale=torch.rand(d, dtype=F64) + 0.5, learn_scale=False,
                       generator=_gen(3), dtype=F64)
        t.merge()
        # weight side: W diag(s) P^{-T} with P orthogonal = W diag(s) (P_l (x) P_r)
        P = torch.kron(t.act_0, t.act_1)
        w = lin.weight.detach() * (1 / t.inv_scale) @ P
    else:
        t = OnlineHadamard(d, seed=4)
        w = lin.weight.detach() @ t.matrix()
    moved = torch.nn.Linear(d, 32, bias=False).double()
    moved.weight.data = w
    torch.testing.assert_close(moved(t(x)), lin(x), rtol=1e-10, atol=1e-10)  # the pair is exact in float
    il = Int8Linear.from_linear(moved, input_transform=t, backend="reference")
    assert il.kron is not None
    out = il(x)
    q, s = act_quant_int8(x, **{k: v for k, v in il.kron.items() if k in ("P_l", "P_r", "in_scale", "out_mul")},
                          backend="eager")
    ref = (q.double() @ il.weight_q.double().T) * s.double()[:, None] * il.weight_scale.double()[None, :]
    assert torch.equal(out, ref)
    assert (out - lin(x)).norm() / lin(x).norm() < 2e-2


# ----------------------------------------------------------------------------- streaming
def _calib(model, n=4, seq=16, seed=0):
    ids = torch.randint(0, 500, (n, seq), generator=_gen(seed))
    ids[:, ::3] = model.config.mask_token_id
    return CalibSet(ids, ids)


def _quantize(model, name, cfg, calib, logits=True, **ctx_kw):
    adapter = get_adapter(model)
    q = QuantSettings(QuantSpec(4), QuantSpec(4), QuantSpec(16, symmetric=False))
    ctx = QuantContext(model, adapter, q, calib, batch_size=2, progress=False, **ctx_kw)
    get_method(name, cfg).apply(ctx)
    if not logits:
        return None
    with torch.no_grad():
        return model(input_ids=calib.input_ids.to(next(model.parameters()).device)).logits


@pytest.mark.parametrize("name,cfg,cache", [("gptq", {}, "device"), ("gptq", {}, "pinned"),
                                             ("freeact", {"epochs": 1}, "device"),
                                             ("flatquant", {"epochs": 1, "weight_algo": "gptq"}, "device")])
def test_streaming_gives_the_same_model(tiny_model, name, cfg, cache):
    base = tiny_model("llada", dtype=F64)
    calib = _calib(base)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    la = _quantize(a, name, cfg, calib)
    lb = _quantize(b, name, cfg, calib, streaming=True, stream_cache=cache)
    assert torch.equal(la, lb)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert active_streamer(b) is None  # the context closed
    assert not torch.equal(la, base(input_ids=calib.input_ids).logits)  # something was quantized


def test_streamer_pages_each_layer_once_for_gptq(tiny_model):
    model = tiny_model("llada", dtype=F64)
    adapter = get_adapter(model)
    with LayerStreamer(model, adapter, "cpu") as s:
        assert active_streamer(model) is s
        _quantize(model, "gptq", {}, _calib(model), logits=False)  # ctx.streaming off: the outer streamer serves
        assert s.page_ins == len(adapter.layers())
        model(input_ids=_calib(model).input_ids)  # a full forward pages every layer in once more
        assert s.page_ins == 2 * len(adapter.layers()) and s.current is adapter.layers()[-1]
    with pytest.raises(ValueError, match="stream_cache"):
        QuantContext(model, adapter, None, None, stream_cache="disk")


def test_layer_timeline_segments(tiny_model):
    model = tiny_model("llada")
    adapter = get_adapter(model)
    with LayerTimeline(adapter) as tl:
        _quantize(model, "gptq", {}, _calib(model))
    assert sorted(tl.start) == list(range(len(adapter.layers())))
    assert len(tl.segments()) == len(adapter.layers()) and min(tl.segments()) > 0 and tl.prefix() >= 0


# ----------------------------------------------------------------------------- CUDA: kernels vs eager
def _assert_fake_quant_close(out, ref, bits, clip):
    """Rounding-order differences may flip a value by one level, never more, and rarely."""
    o, r = out.float().reshape(-1, out.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    step = r.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)  # >= the row's scale (max|q| is qmax or qmax+1)
    diff = (o - r).abs()
    assert (diff <= step * 1.01 + 2**-7 * r.abs() + 1e-6).all()  # + the rounding of q * s to half
    assert (diff > 0.5 * step).float().mean() < 0.02  # level flips are rare (ulp-level differences are not flips)


@cuda
@pytest.mark.parametrize("d_l,d_r,dtype", [  # the 8B widths in bf16 (one and two passes), other dtypes on two
    (64, 64, torch.bfloat16), (56, 64, torch.bfloat16), (96, 128, torch.bfloat16), (128, 148, torch.bfloat16),
    (64, 64, torch.float16), (14, 16, torch.float32), (128, 148, torch.float32)],
    ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else str(v))
def test_cuda_act_kernel_matches_eager(d_l, d_r, dtype):
    """Half inputs: against the eager pipeline in the same dtype (the kernel mirrors its rounding points).
    float32: against the float64 math (an eager float32 reference on a GPU may run its products in TF32,
    e.g. under TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1)."""
    dev, d = "cuda", d_l * d_r
    if not triton_supports(d_l, d_r, dtype):
        with pytest.raises(RuntimeError, match="does not fit"):
            fused_act_quant(torch.zeros(2, d, device=dev, dtype=dtype), torch.eye(d_l, device=dev),
                            torch.eye(d_r, device=dev), backend="triton")
        return
    g = torch.Generator(device=dev).manual_seed(d)
    x = torch.randn(300, d, device=dev, generator=g).to(dtype)
    x[:, 3] *= 30  # an outlier channel
    P_l = random_orthogonal(d_l, _gen(1)).float().to(dev)
    P_r = random_orthogonal(d_r, _gen(2)).float().to(dev)
    masks = (torch.rand(3, d, device=dev, generator=g) > 0.1).float()
    types = torch.randint(0, 3, (300,), device=dev, generator=g)
    s = torch.rand(d, device=dev, generator=g) + 0.5
    exact = dtype == torch.float32
    args64 = (x.double(), P_l.double(), P_r.double(), masks.double(), types)
    for bits, clip in ((4, 0.9), (8, 1.0)):
        out = fused_act_quant(x, P_l, P_r, masks, types, bits, clip, backend="triton", in_scale=s)
        if exact:
            ref = act_quant_eager(*args64, bits=bits, clip=clip, in_scale=s.double()).float()
        else:
            ref = fused_act_quant(x, P_l, P_r, masks, types, bits, clip, backend="eager", in_scale=s)
        assert out.dtype == dtype and torch.isfinite(out.float()).all()
        _assert_fake_quant_close(out, ref, bits, clip)
        if kernel_tiling(d_l, d_r)["DL"] * kernel_tiling(d_l, d_r)["DR"] <= 4096:  # the batched path too
            op_b = KronActQuant(P_l, P_r, in_scale=s, masks=masks, tuning={"path": "batched"})
            _assert_fake_quant_close(op_b(x, types, bits, clip, backend="triton"), ref, bits, clip)
        if kernel_tiling(d_l, d_r)["passes"] == 1:  # persistent programs striding over the 300 tokens
            for stages in (1, 3):
                op_p = KronActQuant(P_l, P_r, in_scale=s, masks=masks,
                                    tuning={"path": "persistent", "programs_per_sm": 1, "stages": stages})
                _assert_fake_quant_close(op_p(x, types, bits, clip, backend="triton"), ref, bits, clip)
            # FreeAct-form masks: built in the kernel from the owner vector and each token's type
            keep = keep_masks(owner_from_ranks(d, [d // 16] * 3), 3).to(dev)
            assert mask_owner(keep) is not None
            ref_o = (act_quant_eager(*args64[:3], keep.double(), types, bits=bits, clip=clip, in_scale=s.double())
                     .float() if exact else
                     fused_act_quant(x, P_l, P_r, keep, types, bits, clip, backend="eager", in_scale=s))
            for path in ("kernel", "persistent"):
                op_o = KronActQuant(P_l, P_r, in_scale=s, masks=keep, tuning={"path": path})
                _assert_fake_quant_close(op_o(x, types, bits, clip, backend="triton"), ref_o, bits, clip)
    y = fused_act_quant(x, P_l, P_r, masks, types, bits=16, backend="triton", in_scale=s)
    y64 = act_quant_eager(*args64, bits=16, in_scale=s.double())
    tol = 1e-5 if exact else 2e-2
    assert (y.double() - y64).norm() / y64.norm() < tol
    q, sc = act_quant_int8(x, P_l, P_r, masks, types, backend="triton", in_scale=s)
    if exact:
        qe, sce = act_quant_int8(*args64, backend="eager", in_scale=s.double())
    else:
        qe, sce = act_quant_int8(x, P_l, P_r, masks, types, backend="eager", in_scale=s)
    assert (q.int() - qe.int()).abs().max() <= 1 and (q != qe).float().mean() < 0.02
    torch.testing.assert_close(sc, sce.float(), rtol=1e-2, atol=0)


@cuda
@pytest.mark.parametrize("n", [16, 4096, 16384, 3584, 12288, 18944])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_cuda_hadamard_matches_eager(n, dtype):
    x = torch.randn(64, n, device="cuda").to(dtype)
    if not kernel_fits(n, dtype):  # float32 two-pass tiles (18944) do not fit the shared memory
        with pytest.raises(ValueError, match="Triton Hadamard"):
            hadamard_transform(x, backend="triton")
        return
    y = hadamard_transform(x, backend="triton")
    ref = fast_hadamard_transform(x.double())
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert y.dtype == dtype and (y.double() - ref).norm() / ref.norm() < tol


@cuda
@pytest.mark.parametrize("M,K,N", [(8, 256, 128), (333, 4096, 1024), (2048, 3584, 512)])
def test_cuda_int8_paths(M, K, N):
    dev = "cuda"
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=dev)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=dev)
    assert torch.equal(int_mm(a, w.t()).cpu(), int_mm_reference(a.cpu(), w.t().cpu()))
    sa, sw = torch.rand(M, device=dev) / 100, torch.rand(N, device=dev) / 100
    bias = torch.randn(N, device=dev).bfloat16()
    ref = int8_matmul(a.cpu(), sa.cpu(), w.cpu(), sw.cpu(), bias.cpu(), torch.float64, backend="reference")
    for backend in ("triton", "torch"):
        out = int8_matmul(a, sa, w, sw, bias, torch.bfloat16, backend=backend).double().cpu()
        assert (out - ref).norm() / ref.norm() < 5e-3, backend


@cuda
def test_cuda_int8_linear_with_fused_site():
    d = 4096
    site, tt = _typed_site(d, [128, 128])
    site = site.cuda()
    lin = torch.nn.Linear(d, 512, bias=False).cuda().bfloat16()
    il = Int8Linear.from_linear(lin, input_transform=site)
    x = torch.randn(2, 100, d, device="cuda").bfloat16()
    types = torch.randint(0, 2, (2, 100), device="cuda")
    with tt.use(types):
        out = il(x)
        q, s = act_quant_int8(x.reshape(-1, d), site.inner.act_0, site.inner.act_1, site.keep, types,
                              backend="eager", in_scale=site.inner.inv_scale)
    ref = (q.double() @ il.weight_q.double().T) * s.double()[:, None] * il.weight_scale.double()[None, :]
    assert (out.double().reshape(-1, 512) - ref).norm() / ref.norm() < 2e-2


@cuda
def test_cuda_streaming_gptq_matches_resident(tiny_model):
    base = tiny_model("llada")
    calib = _calib(base)
    a, b = copy.deepcopy(base).cuda(), copy.deepcopy(base)
    la = _quantize(a, "gptq", {}, calib, device="cuda")
    lb = _quantize(b, "gptq", {}, calib, device="cuda", streaming=True, stream_cache="pinned")
    assert next(b.parameters()).device.type == "cpu"  # streaming leaves the model on the CPU
    with torch.no_grad():
        lb = b.cuda()(input_ids=calib.input_ids.cuda()).logits
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)


def test_float32_two_pass_tiles_run_eagerly():
    """float32 at d = 18944 (128 x 148) does not fit the GPU's shared memory (seen on an H200):
    the auto backend must not pick Triton for it; half precision and single-pass tiles can."""
    assert not triton_supports(128, 148, torch.float32)
    assert triton_supports(128, 148, torch.bfloat16) and triton_supports(64, 64, torch.float32)
