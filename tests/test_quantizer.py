"""Quantizers against a slow, loop-based reference; RTN clip search; GPTQ vs RTN."""
import itertools

import pytest
import torch

from freeact.quant.gptq import HessianAccumulator, gptq_quantize_weight
from freeact.quant.quantizer import QuantSpec, fake_quant, quantize, search_clip
from freeact.quant.rtn import rtn_quantize_weight


def reference_fake_quant(x, bits, symmetric, granularity, group_size, clip):
    """One group at a time with Python-level loops: the definition, spelled out."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    if granularity == "tensor":
        groups = [(slice(None), slice(None))]
    elif granularity == "row":
        groups = [(r, slice(None)) for r in range(rows.shape[0])]
    else:
        groups = [(r, slice(g, g + group_size)) for r in range(rows.shape[0])
                  for g in range(0, rows.shape[1], group_size)]
    for idx in groups:
        v = rows[idx]
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = max(float(v.abs().max()) * clip / qmax, 1e-8)
            q = torch.clamp(torch.round(v / s), -qmax - 1, qmax)
            out[idx] = q * s
        else:
            qmax = 2**bits - 1
            hi, lo = max(float(v.max()), 0.0) * clip, min(float(v.min()), 0.0) * clip
            s = max((hi - lo) / qmax, 1e-8)
            z = round(-lo / s)
            q = torch.clamp(torch.round(v / s) + z, 0, qmax)
            out[idx] = (q - z) * s
    return out.reshape(x.shape)


@pytest.mark.parametrize("bits,symmetric,granularity,clip",
                         list(itertools.product([2, 3, 4, 8], [True, False], ["tensor", "row", "group"], [1.0, 0.9])))
def test_fake_quant_matches_reference(bits, symmetric, granularity, clip):
    g = torch.Generator().manual_seed(bits * 7 + symmetric)
    x = torch.randn(3, 5, 32, generator=g, dtype=torch.float64) * torch.rand(32, generator=g, dtype=torch.float64) * 4
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=8, clip_ratio=clip)
    ours = fake_quant(x, spec)
    ref = reference_fake_quant(x, bits, symmetric, granularity, 8, clip)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # the integer codes dequantize to the same values
    torch.testing.assert_close(quantize(x, spec).dequantize(), ref, rtol=0, atol=1e-12)
    # and the number of distinct levels per quantization group respects the bit width
    assert ours[0, 0, :8].unique().numel() <= 2**bits


def test_fake_quant_off_is_identity_and_ste_passes_gradients():
    x = torch.randn(4, 16, requires_grad=True)
    assert fake_quant(x, QuantSpec(bits=16)) is x
    y = fake_quant(x, QuantSpec(bits=4))
    assert not torch.equal(y, x)
    y.sum().backward()
    # straight-through: d(sum)/dx is 1 wherever x does not also set the scale (the row's max |x|)
    not_max = x.abs() < x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(x.grad[not_max], torch.ones_like(x)[not_max])


def test_learnable_clip_gets_gradient():
    x = torch.randn(8, 32)
    c = torch.tensor(0.8, requires_grad=True)
    loss = (fake_quant(x, QuantSpec(bits=3), clip=c) - x).pow(2).sum()
    loss.backward()
    assert c.grad is not None and c.grad.abs() > 0


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec(bits=4, granularity="per_bogus")
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="does not divide"):
        fake_quant(torch.randn(2, 30), QuantSpec(bits=4, granularity="group", group_size=8))


def test_mse_clip_search_lowers_weight_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[:, 0] *= 20  # one outlier column: full-range scales waste levels
    spec = QuantSpec(bits=3)
    err_plain = (rtn_quantize_weight(w, spec) - w).pow(2).sum()
    err_mse = (rtn_quantize_weight(w, spec, mse_clip=True) - w).pow(2).sum()
    assert err_mse < err_plain
    assert search_clip(w, spec).shape == (64, 1)


def _correlated_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    mix = torch.randn(8, d, generator=g)
    return base @ mix + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("granularity,act_order", [("row", False), ("row", True), ("group", False), ("group", True)])
def test_gptq_beats_rtn_on_correlated_inputs(granularity, act_order):
    x = _correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(64)
    for chunk in x.split(256):
        acc.add(chunk)
    torch.testing.assert_close(acc.H, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-4)
    spec = QuantSpec(bits=3, granularity=granularity, group_size=16)
    out_err = lambda wq: (x @ wq.T - x @ w.T).pow(2).mean().item()  # noqa: E731
    e_rtn = out_err(rtn_quantize_weight(w, spec))
    e_gptq = out_err(gptq_quantize_weight(w, acc.H, spec, act_order=act_order, block_size=16))
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_gptq_with_identity_hessian_is_rtn():
    """With H = I there is nothing to feed back: GPTQ must round exactly like RTN."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=4)
    torch.testing.assert_close(gptq_quantize_weight(w, torch.eye(32), spec, damp=0.0), rtn_quantize_weight(w, spec))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bits,symmetric,granularity", [(4, True, "row"), (8, True, "row"), (4, False, "row"),
                                                        (3, True, "group"), (4, False, "tensor")])
def test_fake_quant_without_grad_gives_the_training_forms_numbers(dtype, bits, symmetric, granularity):
    """Evaluation (no autograd) takes a shorter path: the values must equal those of the straight-through
    form bit for bit, with a float clip, a learned clip tensor, all-zero rows and ties of the row maximum."""
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(4, 6, 32, generator=g) * 3).to(dtype)
    x[0, 0] = 0.0  # an all-zero token
    x[0, 1, :4] = x[0, 1].abs().max()  # the maximum, four times
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=8)
    for clip in (None, 0.9, torch.sigmoid(torch.tensor([2.0])) * 0.95):
        train = fake_quant(x.detach().requires_grad_(True), spec, clip=clip).detach()
        with torch.no_grad():
            evaluated = fake_quant(x, spec, clip=clip)
        assert evaluated.dtype == train.dtype and evaluated.shape == x.shape
        assert torch.equal(evaluated, train), (evaluated - train).abs().max()
    # a clip that needs a gradient keeps the training form (its gradient must flow)
    c = torch.tensor([0.9], requires_grad=True)
    fake_quant(x.float(), spec, clip=c).sum().backward()
    assert c.grad is not None
