"""A real low-bit inference path: W8A8 linear layers with int8 x int8 -> int32 matrix products.

:class:`Int8Linear` computes ``y = (q_x q_W^T) * s_x[:, None] * s_W[None, :] + b`` where

* ``q_W`` (``d_out x d_in`` int8) and ``s_W`` (float32, per output channel) are the symmetric
  round-to-nearest codes of the linear's weight (``s_W = max|W_row| / 127``);
* ``q_x`` and ``s_x`` (per token) are the symmetric codes of the activation **after** the online
  transform: with a Kronecker transform (FlatQuant / FreeAct sites, QuaRot's power-of-two online
  Hadamard) transform, type mask and quantization run as one kernel
  (:func:`~freeact.kernels.act_quant.act_quant_int8`); any other module is applied first, then the
  rows are quantized;
* the int32 product runs on the integer tensor cores: a Triton GEMM with the rescale and bias fused
  into its epilogue (``backend="triton"``), or ``torch._int_mm`` followed by the rescale in torch
  (``backend="torch"``). On CPU, :func:`int_mm` uses ``torch._int_mm`` when this build has it and
  otherwise float64 products of the integer codes, which are exact (``|sum| <= d_in * 127 * 128 < 2^53``).

The weight given to :meth:`Int8Linear.from_linear` must already carry the weight side of the
transform (as every method leaves it after merging); ``input_transform`` is the activation side.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant.quantizer import QuantSpec, quantize
from .act_quant import KronActQuant, kron_spec, triton, tl

__all__ = ["quantize_rows_int8", "int_mm", "int_mm_reference", "int8_matmul", "Int8Linear"]

MM_BACKENDS = ("auto", "triton", "torch", "reference")


def quantize_rows_int8(x: Tensor, clip: float = 1.0) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes per row (last dim) and float32 scales: ``x ~= q * s[..., None]``."""
    qt = quantize(x.float(), QuantSpec(bits=8, symmetric=True, granularity="row"), clip=float(clip))
    return qt.q, qt.scale.squeeze(-1)


def int_mm_reference(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of int8 matrices as int32 through float64 (exact for these sizes)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8 operands expected, got {a.dtype} and {b.dtype}")
    if a.shape[1] * 127 * 128 >= 2**53:
        raise ValueError("inner dimension too large for an exact float64 product")
    return (a.double() @ b.double()).round().to(torch.int32)


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """int8 ``(M, K) @ (K, N)`` -> int32 with ``torch._int_mm`` where it runs (CUDA: ``M > 16``, ``K`` and
    ``N`` multiples of 8, small ``M`` zero-padded), else :func:`int_mm_reference`."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"shapes {tuple(a.shape)} @ {tuple(b.shape)} do not match")
    M, K = a.shape
    N = b.shape[1]
    fn = getattr(torch, "_int_mm", None)
    if fn is not None and a.is_cuda and K % 8 == 0 and N % 8 == 0:
        if M <= 16:
            pad = torch.zeros(32 - M, K, dtype=a.dtype, device=a.device)
            return fn(torch.cat([a, pad]), b)[:M]
        return fn(a.contiguous(), b)
    if fn is not None and not a.is_cuda:
        try:
            return fn(a.contiguous(), b)
        except RuntimeError:  # a CPU build without the int8 kernel
            pass
    return int_mm_reference(a, b)


# ----------------------------------------------------------------------------- Triton GEMM + epilogue
if triton is not None:

    def _configs():
        cfg = triton.Config
        return [cfg({"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
                cfg({"BM": 256, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
                cfg({"BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
                cfg({"BM": 64, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=4, num_stages=4)]

    @triton.autotune(configs=_configs(), key=["M", "N", "K"])
    @triton.jit
    def _int8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
                          stride_am, stride_bn, stride_cm, HAS_BIAS: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """``c = (a @ b^T) * sa[:, None] * sb[None, :] (+ bias)``; a: (M, K) int8, b: (N, K) int8."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + (rm % M)[:, None].to(tl.int64) * stride_am + rk[None, :]
        b_ptrs = b_ptr + (rn % N)[None, :].to(tl.int64) * stride_bn + rk[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            kmask = rk < K - k0
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BK
            b_ptrs += BK
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
        c = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            c += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        cmask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], c.to(c_ptr.dtype.element_ty), mask=cmask)


def _mm_backend(backend: str, a: Tensor) -> str:
    if backend not in MM_BACKENDS:
        raise ValueError(f"backend must be one of {MM_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if a.is_cuda:
        return "triton" if triton is not None else "torch"
    return "reference"


def int8_matmul(q_x: Tensor, s_x: Tensor, q_w: Tensor, s_w: Tensor, bias: Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> Tensor:
    """``(q_x @ q_w^T) * s_x[:, None] * s_w[None, :] + bias`` in ``out_dtype``; ``q_x`` (M, K), ``q_w`` (N, K)
    int8, scales float32. ``backend``: triton (fused epilogue), torch (``torch._int_mm`` + torch
    rescale), reference (float64, exact integer products) or auto."""
    M, K = q_x.shape
    N = q_w.shape[0]
    if q_w.shape[1] != K:
        raise ValueError(f"weight codes {tuple(q_w.shape)} do not match activations {tuple(q_x.shape)}")
    choice = _mm_backend(backend, q_x)
    if choice == "triton":
        q_x, q_w = q_x.contiguous(), q_w.contiguous()
        out = torch.empty(M, N, device=q_x.device, dtype=out_dtype)
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
        _int8_gemm_kernel[grid](q_x, q_w, s_x.float().contiguous(), s_w.float().contiguous(),
                                bias if bias is not None else s_w, out, M, N, K, q_x.stride(0), q_w.stride(0),
                                out.stride(0), HAS_BIAS=bias is not None)
        return out
    if choice == "torch":
        acc = int_mm(q_x, q_w.t())
        y = acc.float() * s_x.float()[:, None] * s_w.float()[None, :]
    else:
        acc = int_mm_reference(q_x, q_w.t())
        y = acc.double() * s_x.double()[:, None] * s_w.double()[None, :]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


class Int8Linear(nn.Module):
    """W8A8 drop-in for ``nn.Linear`` (see the module doc). ``act_clip`` scales the activation range."""

    def __init__(self, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
                 input_transform: nn.Module | None = None, act_clip: float = 1.0, backend: str = "auto"):
        super().__init__()
        if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
            raise TypeError("weight_q must be a 2-d int8 tensor")
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight_q", weight_q.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.input_transform = input_transform
        self.kron = kron_spec(input_transform) if input_transform is not None else None
        k = self.kron
        self.act_op = None if k is None else KronActQuant(k["P_l"], k["P_r"], k["in_scale"], k["masks"], k["out_mul"],
                                                          k["split_z"])
        self.act_clip = float(act_clip)
        self.backend = backend

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, input_transform: nn.Module | None = None, act_clip: float = 1.0,
                    backend: str = "auto") -> "Int8Linear":
        """Quantize ``linear.weight`` per output channel; ``input_transform`` runs on the input first."""
        q, s = quantize_rows_int8(linear.weight.detach())
        return cls(q, s, linear.bias, input_transform, act_clip, backend)

    def dequantized_weight(self) -> Tensor:
        return self.weight_q.float() * self.weight_scale[:, None]

    def quantize_input(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Codes and scales of the (transformed) activation rows ``x2`` (tokens, d_in)."""
        if self.kron is not None:
            k = self.kron
            types = k["token_types"].get() if k["masks"] is not None else None
            return self.act_op.int8(x2, types, clip=self.act_clip)
        if self.input_transform is not None:
            x2 = self.input_transform(x2)
        return quantize_rows_int8(x2, self.act_clip)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear of width {self.in_features} got an input of width {x.shape[-1]}")
        x2 = x.reshape(-1, self.in_features)
        q, s = self.quantize_input(x2)
        y = int8_matmul(q, s, self.weight_q, self.weight_scale, self.bias, out_dtype=x.dtype, backend=self.backend)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "kron-fused" if self.kron is not None else type(self.input_transform).__name__ if self.input_transform else "none"
        return f"in={self.in_features}, out={self.out_features}, transform={kind}, backend={self.backend!r}"
