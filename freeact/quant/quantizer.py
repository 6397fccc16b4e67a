"""Uniform integer quantizers: the one place where numbers are rounded.

Every quantizer in freeact works over the LAST dimension of a tensor:

* weights ``W`` are ``(d_out, d_in)``: ``granularity="row"`` is per output channel;
* activations ``X`` are ``(..., tokens, d)``: ``granularity="row"`` is per token (dynamic);
* ``granularity="group"`` splits the last dim into groups of ``group_size``;
* ``granularity="tensor"`` uses one scale for the whole tensor.

Symmetric: ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)`` with ``s = c * max|x| / (2^(b-1) - 1)``.
Asymmetric: ``q = clamp(round(x / s) + z, 0, 2^b - 1)`` with ``s = c * (max(x,0) - min(x,0)) / (2^b - 1)``,
``z = round(-c * min(x,0) / s)``. ``c`` is the clip ratio, a float or a tensor broadcastable to the
per-row/per-group statistics (FlatQuant's learnable clipping passes ``sigmoid(param)`` here).

Rounding uses a straight-through estimator so gradients reach the input and the clip ratio. Where no
gradient is wanted (evaluation), :func:`fake_quant` gives the same numbers in fewer passes over the tensor.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .spec import _ALIASES, GRANULARITIES, QuantSpec  # noqa: F401  (re-exported)


class QTensor(NamedTuple):
    """Integer codes with their scale and zero point; ``dequantize()`` gives the float tensor."""

    q: torch.Tensor  # integer codes, same shape as the (grouped) input
    scale: torch.Tensor
    zero: torch.Tensor
    shape: torch.Size  # original shape

    def dequantize(self) -> torch.Tensor:
        return ((self.q.to(self.scale.dtype) - self.zero) * self.scale).reshape(self.shape)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.granularity == "group":
        d = x.shape[-1]
        if d % spec.group_size:
            raise ValueError(f"group_size {spec.group_size} does not divide the width {d}")
        return x.reshape(*x.shape[:-1], d // spec.group_size, spec.group_size)
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    return x


def _scale_zero(xg: torch.Tensor, spec: QuantSpec, clip, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-group) scale and zero point. ``grad=False``: max |x| in one pass (no ``|x|`` copy), the
    same value; with autograd, the form whose gradient training relies on."""
    clip = spec.clip_ratio if clip is None else clip
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        absmax = (xg.abs().amax(dim=-1, keepdim=True) if grad
                  else torch.linalg.vector_norm(xg, ord=math.inf, dim=-1, keepdim=True))
        xmax = absmax * clip
        scale = (xmax / qmax).clamp(min=1e-8)
        return scale, torch.zeros_like(scale)
    qmax = 2**spec.bits - 1
    xmax = xg.amax(dim=-1, keepdim=True).clamp(min=0) * clip
    xmin = xg.amin(dim=-1, keepdim=True).clamp(max=0) * clip
    scale = ((xmax - xmin) / qmax).clamp(min=1e-8)
    zero = round_ste(-xmin / scale)
    return scale, zero


def _qrange(spec: QuantSpec) -> tuple[int, int]:
    if spec.symmetric:
        return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    return 0, 2**spec.bits - 1


def to_grid(x: torch.Tensor, scale, zero, spec: QuantSpec, ste: bool = False) -> torch.Tensor:
    """The integer codes of ``x`` on the grid ``(scale, zero)`` of ``spec``: ``clamp(round(x / scale) + zero,
    qmin, qmax)`` (as floats). The one rounding rule of the project: fake quant (``ste=True``: straight-through
    gradient), integer codes, GPTQ's columns and the kernels' eager references all call it. Without the
    straight-through form the codes are rounded and clamped in place on the one new tensor, and a symmetric
    grid's zero point (0) is not added: the same values, fewer passes over ``x``."""
    lo, hi = _qrange(spec)
    if ste:
        return torch.clamp(round_ste(x / scale) + zero, lo, hi)
    r = (x / scale).round_()
    return (r if spec.symmetric else r.add_(zero)).clamp_(lo, hi)


def quantize(x: torch.Tensor, spec: QuantSpec, clip=None) -> QTensor:
    """Integer codes of ``x`` (no gradient tricks; use :func:`fake_quant` for training)."""
    xg = _grouped(x, spec)
    scale, zero = _scale_zero(xg, spec, clip)
    q = to_grid(xg, scale, zero, spec)
    if spec.bits <= 8:
        dtype = torch.int8 if spec.symmetric else torch.uint8
    else:
        dtype = torch.int32
    return QTensor(q.to(dtype), scale, zero, x.shape)


def _needs_grad(x: torch.Tensor, clip) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (isinstance(clip, torch.Tensor) and clip.requires_grad))


def fake_quant(x: torch.Tensor, spec: QuantSpec, clip=None) -> torch.Tensor:
    """Quantize-dequantize ``x`` (straight-through rounding); identity when ``spec`` is off."""
    if not spec.enabled:
        return x
    xg = _grouped(x, spec)
    grad = _needs_grad(x, clip)
    scale, zero = _scale_zero(xg, spec, clip, grad)
    if not grad:  # evaluation: the same numbers (up to the sign of a zero) in about half the passes over x
        q = to_grid(xg, scale, zero, spec)
        return (q if spec.symmetric else q.sub_(zero)).mul_(scale).reshape(x.shape)
    q = to_grid(xg, scale, zero, spec, ste=True)
    return ((q - zero) * scale).reshape(x.shape)


@torch.no_grad()
def search_clip(
    w: torch.Tensor, spec: QuantSpec, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
) -> torch.Tensor:
    """Per-row (per-group) clip ratio minimising ``sum |w - Q(w)|^norm`` (the GPTQ/QuaRot MSE search).

    Returns a tensor shaped like the per-row (per-group) statistics, to pass as ``clip=``.
    """
    wg = _grouped(w.float(), spec)
    best_err = torch.full(wg.shape[:-1] + (1,), float("inf"), device=w.device)
    best = torch.ones_like(best_err)
    for i in range(int(max_shrink * grid)):
        c = 1.0 - i / grid
        err = (fake_quant(wg, spec.with_(granularity="row"), clip=c) - wg).abs().pow(norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, c), best)
    return best
