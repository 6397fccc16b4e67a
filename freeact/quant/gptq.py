"""GPTQ (Frantar et al., 2022): column-wise quantization with Hessian-based error feedback.

``H = 2 X^T X`` is accumulated from the inputs a linear layer sees during calibration
(:class:`HessianAccumulator`); :func:`gptq_quantize_weight` then quantizes ``W`` column by
column, pushing each column's rounding error onto the not-yet-quantized columns through the
Cholesky factor of ``H^-1``. Options: damping, act-order, group size, block size, MSE clip.
With act-order and groups, group parameters are computed in the original column order
("static groups"), so the result is deployable without a permutation of the scales.
"""
from __future__ import annotations

import torch

from .quantizer import QuantSpec, _scale_zero, search_clip, to_grid


class HessianAccumulator:
    """Running ``2/n * sum x x^T`` over the rows of every input batch (float64-safe in float32)."""

    def __init__(self, d: int, device=None):
        self.H = torch.zeros(d, d, device=device, dtype=torch.float32)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


def _row_params(w: torch.Tensor, spec: QuantSpec, mse_clip: bool):
    rowspec = spec.with_(granularity="row")
    clip = search_clip(w, rowspec) if mse_clip else None
    return _scale_zero(w, rowspec, clip)


@torch.no_grad()
def gptq_quantize_weight(
    w: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    mse_clip: bool = False,
) -> torch.Tensor:
    """Return the dequantized GPTQ weight (same dtype and shape as ``w``)."""
    if not spec.enabled:
        return w
    if spec.granularity == "tensor":
        raise ValueError("GPTQ supports row or group granularity, not tensor")
    W = w.float().clone()
    H = H.float().clone()
    ncol = W.shape[1]
    group = spec.group_size if spec.granularity == "group" else ncol
    if ncol % group:
        raise ValueError(f"group_size {group} does not divide the width {ncol}")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    # Quantization parameters per group of ORIGINAL columns (static groups).
    params = [_row_params(W[:, g : g + group], spec, mse_clip) for g in range(0, ncol, group)]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(ncol, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(ncol, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    for i1 in range(0, ncol, block_size):
        i2 = min(i1 + block_size, ncol)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            scale, zero = params[int(perm[i1 + i]) // group]
            s, z = scale[:, 0], zero[:, 0]
            q = (to_grid(col, s, z, spec) - z) * s
            Q[:, i1 + i] = q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    Q = Q[:, torch.argsort(perm)]
    return Q.to(w.dtype)
