"""Normalized Hadamard transform on tensor cores (Triton), eager fallback: powers of two and the
``2^k m`` orders with a Paley base (12288 = 2^10 x 12, 18944 = 2^7 x 148, 3584 = 2^7 x 28, ...).

``hadamard_transform(x) == fast_hadamard_transform(x) == x @ hadamard_matrix(n).T`` over the last dim.

**How.** ``H_n = S_2^k (x) B_m`` (Sylvester times the Paley base; ``B_1 = 1``) regroups as
``S_2^a (x) (S_2^(k-a) (x) B_m)``: two factors, the most square split
(4096 = 64 x 64, 12288 = 128 x 96, 18944 = 128 x 148;
:func:`freeact.transforms.hadamard.hadamard_kron_factors`), so ``x @ H_n^T = vec(P_l^T X P_r)`` with ``X``
the row-major ``d_l x d_r`` reshape: the butterfly stages and the dense base step of the fast transform
become two small dense products on tensor cores. It runs through the Kronecker kernel of
:mod:`freeact.kernels.act_quant` (one read and one write of ``x``) with the
unnormalized +-1 factors (exact in half precision), the ``1/sqrt(n)`` applied to the float32 accumulator,
and ``P_l^T X`` carried in two half words (hi + lo) so half inputs get float32 accuracy before the final
rounding, as the eager path computes. Tiles up to :data:`MAX_TILE` padded elements (two passes beyond
16384; in float32 those do not fit the shared memory and run eagerly).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..transforms.hadamard import fast_hadamard_transform, hadamard_kron_factors, sylvester_factors  # noqa: F401
from .act_quant import MAX_TILE, KronActQuant, _pick_backend, hadamard_factors, triton_supports

__all__ = ["MAX_TILE", "sylvester_factors", "hadamard_transform", "kernel_fits"]


@functools.lru_cache(maxsize=None)
def _op(n: int) -> KronActQuant:
    """The transform-only Kronecker op of width ``n`` (operands cached per dtype and device)."""
    P_l, P_r = hadamard_kron_factors(n)
    return KronActQuant(P_l, P_r, out_mul=1.0 / math.sqrt(n), split_z=True)


@functools.lru_cache(maxsize=None)
def kernel_fits(n: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel takes width ``n`` in ``dtype``: a Hadamard order this project constructs,
    a tile of at most :data:`MAX_TILE` padded elements that fits the shared memory, no float64."""
    factors = hadamard_factors(n) if dtype != torch.float64 else None
    return factors is not None and triton_supports(factors[0].shape[0], factors[1].shape[0], dtype)


def hadamard_transform(x: Tensor, backend: str = "auto") -> Tensor:
    """``x @ hadamard_matrix(n).T`` over the last dim (normalized), ``n`` a supported Hadamard order.

    ``backend``: "triton" (CUDA, or CPU under ``TRITON_INTERPRET=1``; :func:`kernel_fits`), "eager"
    (:func:`freeact.transforms.hadamard.fast_hadamard_transform`, any supported ``n``) or "auto"
    (Triton for CUDA float32/float16/bfloat16 inputs that fit, outside autograd).
    """
    n = x.shape[-1]
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    choice = _pick_backend(backend, x, needs_grad)
    if choice == "triton" and not kernel_fits(n, x.dtype):
        if backend == "triton":
            raise ValueError(f"the Triton Hadamard needs a supported order with a tile of <= {MAX_TILE} padded "
                             f"elements that fits in {x.dtype} (got n={n}); float64 runs eagerly")
        choice = "eager"
    if choice == "eager":
        return fast_hadamard_transform(x, scale=True, backend="torch")
    return _op(n)(x, bits=16, backend="triton")
