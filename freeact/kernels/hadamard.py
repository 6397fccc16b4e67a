"""Normalized Walsh-Hadamard transform of power-of-two widths on tensor cores (Triton), eager fallback.

``hadamard_transform(x) == fast_hadamard_transform(x) == x @ hadamard_matrix(n).T`` over the last dim
for ``n = 2^k <= 16384`` (Sylvester order; the matrix is symmetric).

**How.** Sylvester's matrix factors as ``H_n = H_a (x) H_b`` (``a * b = n``, both powers of two, the
most square split: 4096 = 64 x 64, 16384 = 128 x 128), so ``x @ H_n^T = vec(H_a X H_b)`` with ``X`` the
row-major ``a x b`` reshape: the first ``log2(a)`` and the last ``log2(b)`` butterfly stages of the
fast transform, each done as one small dense product on tensor cores instead of ``log2`` shuffling
stages. It runs through the Kronecker kernel of :mod:`freeact.kernels.act_quant` (one program per
row, one read and one write of ``x``) with the unnormalized +-1 factors (exact in half precision),
the ``1/sqrt(n)`` applied to the float32 accumulator, and ``H_a X`` carried in two half words
(hi + lo) so half inputs get float32 accuracy before the final rounding, as the eager path computes.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..transforms.hadamard import _sylvester_pair, fast_hadamard_transform, sylvester_factors  # noqa: F401
from .act_quant import KronActQuant, _pick_backend

__all__ = ["MAX_N", "sylvester_factors", "hadamard_transform"]

MAX_N = 16384


@functools.lru_cache(maxsize=None)
def _op(n: int) -> KronActQuant:
    """The transform-only Kronecker op of width ``n`` (operands cached per dtype and device)."""
    H_a, H_b = _sylvester_pair(n)
    return KronActQuant(H_a, H_b, out_mul=1.0 / math.sqrt(n), split_z=True)


def hadamard_transform(x: Tensor, backend: str = "auto") -> Tensor:
    """``x @ hadamard_matrix(n).T`` over the last dim (normalized), ``n`` a power of two.

    ``backend``: "triton" (CUDA, or CPU under ``TRITON_INTERPRET=1``; ``n <= 16384``), "eager"
    (:func:`freeact.transforms.hadamard.fast_hadamard_transform`, any supported ``n``) or "auto"
    (Triton for CUDA float32/float16/bfloat16 inputs with ``n <= 16384`` outside autograd).
    """
    n = x.shape[-1]
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    pow2 = n >= 1 and n & (n - 1) == 0
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    choice = _pick_backend(backend, x, needs_grad)
    if choice == "triton" and not (pow2 and n <= MAX_N and x.dtype != torch.float64):
        if backend == "triton":
            raise ValueError(f"the Triton Hadamard needs a power-of-two width <= {MAX_N} (got {n}) "
                             f"and a float32/float16/bfloat16 input (got {x.dtype})")
        choice = "eager"
    if choice == "eager":
        return fast_hadamard_transform(x, scale=True, backend="torch")
    return _op(n)(x, bits=16, backend="triton")
