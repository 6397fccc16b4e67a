"""Fused activation side of a Kronecker-transformed linear: transform, type-zeroing, per-token quantization.

For every token ``x`` (width ``d = d_l * d_r``) the kernel computes, in one pass over ``x``:

1. ``x <- x * in_scale`` (optional; FlatQuant/FreeAct's merged ``1 / s``, QuaRot's random signs);
2. ``y = vec(P_l^T X P_r)`` with ``X = x.reshape(d_l, d_r)`` (row-major) and ``vec`` row-major again,
   i.e. ``y = x @ (P_l (x) P_r)``: the convention of :func:`freeact.transforms.affine.kron_matmul`
   (``kron_matmul(x, [P_l, P_r])``), which every :class:`~freeact.transforms.affine.AffineSite` uses;
   times ``out_mul`` (1 except for the unnormalized Hadamard factors);
3. FreeAct's type-zeroing ``y <- y * masks[types[token]]`` (``masks``: ``(num_types, d)`` of 0/1, the
   :class:`~freeact.transforms.typed.TypeMask` ``keep`` rows; ``types``: one index per token);
4. symmetric per-token quantization with ``bits`` and clip ratio ``clip``:
   ``s = clip * max|y| / (2^(b-1) - 1)``, ``q = clamp(round(y / s), -2^(b-1), 2^(b-1) - 1)``,
   output ``q * s`` (fake quant, the numbers of :func:`freeact.quant.quantizer.fake_quant`) or the
   int8 codes ``q`` and the float32 scales ``s`` (:func:`act_quant_int8`, for the W8A8 path).

``bits >= 16`` skips step 4. :func:`act_quant_eager` is the same math in plain torch (it *is* the
model's pipeline: ``kron_matmul`` and ``fake_quant`` in the input's dtype), used on CPU and for
autograd. The Triton kernel mirrors the eager rounding points for half inputs (``P_l^T X`` and
``y`` are rounded to the input dtype, ``y / s`` too) so the two agree to within rare one-level flips.
``y / s`` is taken as ``y * (1 / s)``, one IEEE reciprocal per token: an element-wise IEEE division made the
kernel 1.9-2.4x slower (H100, d = 4096 and 3584, 2048-32768 tokens: ``results/perf_logs/kernel_ab_recip.txt``),
and the product differs from the quotient by at most one float32 unit, which moves a level only where ``y / s``
lies that close to a rounding boundary. The per-token quantizer without a transform (:func:`fused_row_quant`)
keeps the division: its promise is eager's numbers bit for bit.

**Kernel design.** Each program takes ``TPP`` consecutive tokens (:func:`tokens_per_program`: 1 for few
tokens, up to 8 when there are many, so that ``P_l^T`` and, in one pass, ``P_r`` are loaded once per
``TPP`` tokens). Per token, ``X`` (``d_l x d_r``, padded to powers of two >= 16 with masked loads) is
loaded once; ``Z = P_l^T X`` is one tensor-core ``tl.dot`` (fp32 accumulation) kept
in registers; ``Y = Z P_r`` is computed by column blocks of ``BN``. When the padded tile fits
(``DL * DR <= 16384``: d = 4096 as 64x64, 3584 as 56x64 -> 64x64, 12288 as 96x128 -> 128x128,
14336 as 112x128 -> 128x128) there is a single block and a single pass: dot, mask, row max, quantize,
store. Larger tiles (d = 18944 as 128x148 -> 128x256) take two passes over the column blocks, the
second recomputing ``Y`` (cheap on tensor cores) instead of spilling it to memory: the first finds
``max|y|``, the second quantizes and stores. ``P_l^T``, ``P_r``, the scale vector and the mask rows are
tiny and stay in L2; HBM traffic is one read of ``x`` and one write of the output.
Rounding to nearest even uses the ``1.5 * 2^23`` trick (exact for ``|v| < 2^22``; ``|y / s|`` is
at most ``2^(b-1) / clip``). float32 inputs use IEEE float32 dots (no TF32).

**Blocks of tokens** (``tuning={"path": "batched"}``, padded tiles up to 64 x 64, not the default until a GPU
says it is faster): the same math for ``TB`` tokens at once, ``P_l^T X`` as one batched dot over the
``(TB, DL, DR)`` block and ``Z P_r`` as one ``(TB * DL) x DR`` dot, so each program has a whole block of loads
in flight and larger dots than the token-by-token loop.

**Type masks of FreeAct's form** (each coordinate shared by every type, unique to one, or kept by none:
:func:`mask_owner`, found once by :class:`KronActQuant`) are built in the token loop and the persistent layout from an int32 owner tile read once per
program and each token's type, instead of a mask row read per token (as much traffic, from L2, as the token
itself); other masks, the batched layout, ``tuning={"mask": "rows"}`` and the one-call functions
(:func:`fused_act_quant`, which would pay the check at every call) read the rows. Both give the same numbers.

**Persistent programs** (``tuning={"path": "persistent"}``, single-pass tiles, not the default until a GPU says it
is faster): a fixed grid of a few programs per multiprocessor strides over the tokens, the factors loaded once
per program, the token loop a ``tl.range`` with software-pipelining stages.

**Calling it.** :func:`fused_act_quant` converts the small operands (``P_l^T``, ``P_r``, scale, masks)
to the input dtype at every call; :class:`KronActQuant` keeps them converted, so repeated calls launch
the kernel alone (what :class:`FusedInputQuantizer`, :class:`~freeact.kernels.int8.Int8Linear`, the
Hadamard transform and the benchmarks use). The token-type tensor is read in place (int32 or int64).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
from torch import Tensor

from ..quant.act import InputQuantizer, attach_input_quantizer
from ..quant.quantizer import QuantSpec, fake_quant, quantize
from ..transforms.affine import kron_matmul

try:  # Triton is optional: without it (or without CUDA) everything runs the eager path
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None

__all__ = ["fused_act_quant", "act_quant_eager", "fused_row_quant", "row_quant_eager", "RowActQuant",
           "act_quant_int8", "act_quant_int8_eager", "KronActQuant", "prepare_operands", "FusedInputQuantizer",
           "tokens_per_program", "tuned_tiling", "fuse_input_quantizers", "input_quantizers_fused", "kron_spec",
           "triton_available", "kernel_tiling", "hadamard_factors", "mask_owner"]

BACKENDS = ("auto", "triton", "eager")
MAX_FULL_TILE = 16384  # padded d_l * d_r held as one tile (single pass)
MAX_TILE = 32768  # the largest padded tile run (two passes): FlatQuant's 128 x 148 at d = 18944, bf16, H200
MAX_BATCHED_TILE = 4096  # path "batched": padded tiles up to 64 x 64 (d = 4096, 3584), TB of them in registers
BATCHED_TOKENS = 4  # path "batched": tokens per program unless tuning's tokens_per_prog says otherwise
PATHS = ("kernel", "batched", "persistent", "gemm")
PERSISTENT_PROGRAMS = 4  # path "persistent": programs per multiprocessor unless tuning's programs_per_sm says
PERSISTENT_STAGES = 2  # path "persistent": software-pipelining stages of the token loop unless tuning's stages says
_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- helpers
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """True when the Triton kernels can run (Triton imported, and CUDA or the Triton interpreter)."""
    return triton is not None and (torch.cuda.is_available() or _interpreting())


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def kernel_tiling(d_l: int, d_r: int) -> dict:
    """The tile the kernel uses for factors ``d_l x d_r``: padded sizes, column block, warps, passes."""
    DL, DR = max(16, _next_pow2(d_l)), max(16, _next_pow2(d_r))
    BN = DR if DL * DR <= MAX_FULL_TILE else max(16, min(DR, 8192 // DL))
    tile = DL * DR
    warps = 4 if tile <= 4096 else 8 if tile <= MAX_FULL_TILE else 16
    return {"DL": DL, "DR": DR, "BN": BN, "num_warps": warps, "passes": 1 if BN == DR else 2,
            "padding": tile / (d_l * d_r)}


def triton_supports(d_l: int, d_r: int, dtype: torch.dtype) -> bool:
    """float32 two-pass tiles (e.g. d = 18944 as 128 x 148) need more shared memory than an H100/H200
    has (measured: 288 KiB asked, 227 KiB available); those run eagerly. Half precision fits."""
    return dtype != torch.float32 or kernel_tiling(d_l, d_r)["passes"] == 1


def _pick_backend(backend: str, x: Tensor, needs_grad: bool, d_l: int = 1, d_r: int = 1) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "eager":
        return "eager"
    ok = triton is not None and (x.is_cuda or (_interpreting() and x.device.type == "cpu"))
    if backend == "triton":
        if not ok:
            raise RuntimeError("backend='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
        if needs_grad:
            raise RuntimeError("the Triton kernel has no backward: use backend='eager' under autograd")
        if not triton_supports(d_l, d_r, x.dtype):
            raise RuntimeError(f"the Triton kernel does not fit a float32 {d_l}x{d_r} tile: use bf16/fp16 or eager")
        return "triton"
    fits = x.dtype in (torch.float32, *_HALF) and triton_supports(d_l, d_r, x.dtype)
    return "triton" if (ok and not needs_grad and fits) else "eager"


def _check_quant_args(x: Tensor, bits: int, clip: float) -> None:
    """What every entry point takes: a floating-point input, 2..16 bits (16+: none), a positive clip."""
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if not 2 <= int(bits) <= 32:
        raise ValueError(f"bits must be in 2..16 (16+ = no quantization), got {bits}")
    if not float(clip) > 0:
        raise ValueError(f"clip must be positive, got {clip}")


def _check_inputs(x: Tensor, P_l: Tensor, P_r: Tensor, masks, types, bits: int, clip: float, in_scale) -> int:
    _check_quant_args(x, bits, clip)
    d = x.shape[-1]
    for name, P in (("P_l", P_l), ("P_r", P_r)):
        if P.dim() != 2 or P.shape[0] != P.shape[1]:
            raise ValueError(f"{name} must be square, got shape {tuple(P.shape)}")
    if P_l.shape[0] * P_r.shape[0] != d:
        raise ValueError(f"d_l * d_r = {P_l.shape[0]} * {P_r.shape[0]} != width {d} of x")
    if (masks is None) != (types is None):
        raise ValueError("masks and types go together: give both or neither")
    if masks is not None:
        if masks.dim() != 2 or masks.shape[1] != d:
            raise ValueError(f"masks must be (num_types, {d}), got {tuple(masks.shape)}")
        if types.numel() != x.numel() // d:
            raise ValueError(f"{types.numel()} token types for {x.numel() // d} tokens")
    if in_scale is not None and in_scale.numel() != d:
        raise ValueError(f"in_scale must have {d} entries, got {in_scale.numel()}")
    return d


# ----------------------------------------------------------------------------- eager reference
def _transform_eager(x2: Tensor, P_l: Tensor, P_r: Tensor, masks, types, in_scale, out_mul: float) -> Tensor:
    if in_scale is not None:
        x2 = x2 * in_scale.to(device=x2.device, dtype=x2.dtype)
    y = kron_matmul(x2, [P_l.to(device=x2.device, dtype=x2.dtype), P_r.to(device=x2.device, dtype=x2.dtype)])
    if out_mul != 1.0:
        y = y * out_mul
    if masks is not None:
        y = y * masks.to(device=y.device, dtype=y.dtype)[types.reshape(-1).to(y.device).long()]
    return y


def act_quant_eager(x: Tensor, P_l: Tensor, P_r: Tensor, masks: Tensor | None = None, types: Tensor | None = None,
                    bits: int = 4, clip: float | Tensor = 1.0, in_scale: Tensor | None = None,
                    out_mul: float = 1.0) -> Tensor:
    """The reference math in torch, in ``x``'s dtype: ``kron_matmul`` then mask then ``fake_quant``
    (symmetric, per token). Differentiable (straight-through rounding), any device."""
    d = _check_inputs(x, P_l, P_r, masks, types, bits, float(clip) if not torch.is_tensor(clip) else 1.0, in_scale)
    y = _transform_eager(x.reshape(-1, d), P_l, P_r, masks, types, in_scale, out_mul)
    if bits < 16:
        y = fake_quant(y, QuantSpec(bits=int(bits), symmetric=True, granularity="row"), clip=clip)
    return y.reshape(x.shape)


def act_quant_int8_eager(x: Tensor, P_l: Tensor, P_r: Tensor, masks=None, types=None, clip: float = 1.0,
                         in_scale=None, out_mul: float = 1.0, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Integer codes ``(tokens, d)`` int8 and float32 per-token scales: the transform in ``x``'s dtype,
    then ``s = clip * max|y| / qmax`` and ``q = clamp(round(y / s))`` in float32."""
    d = _check_inputs(x, P_l, P_r, masks, types, bits, clip, in_scale)
    if bits > 8:
        raise ValueError(f"int8 codes need bits <= 8, got {bits}")
    y = _transform_eager(x.reshape(-1, d), P_l, P_r, masks, types, in_scale, out_mul).float()
    qt = quantize(y, QuantSpec(bits=int(bits), symmetric=True, granularity="row"), clip=float(clip))
    return qt.q, qt.scale.squeeze(-1)


# ----------------------------------------------------------------------------- Triton kernel
if triton is not None:

    @triton.jit
    def _rne(v):
        """Round to nearest, ties to even (|v| < 2^22)."""
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _round_to(v, HALF: tl.constexpr):
        """``v`` (float32) rounded to the input's dtype and back: 0 float32 (no-op), 1 float16, 2 bfloat16."""
        if HALF == 1:
            v = v.to(tl.float16).to(tl.float32)
        elif HALF == 2:
            v = v.to(tl.bfloat16).to(tl.float32)
        return v

    @triton.jit
    def _pr_block(pr_ptr, d_r, c0, DR: tl.constexpr, BN: tl.constexpr):
        """Columns ``c0 .. c0 + BN`` of ``P_r`` (zero-padded to ``DR`` rows)."""
        kr = tl.arange(0, DR)
        cols = c0 + tl.arange(0, BN)
        return tl.load(pr_ptr + kr[:, None] * d_r + cols[None, :], mask=(kr[:, None] < d_r) & (cols[None, :] < d_r),
                       other=0.0)

    @triton.jit
    def _y_block(zc, zlo, pr, m_ptr, mrow, d_r, c0, out_mul, il, lmask, HAS_MASK: tl.constexpr, BN: tl.constexpr,
                 DOT_F32: tl.constexpr, SPLIT_Z: tl.constexpr, HALF: tl.constexpr):
        """Columns ``c0 .. c0 + BN`` of ``Y = Z P_r`` (float32; ``pr`` holds those columns of ``P_r``),
        scaled, rounded like eager, masked."""
        cols = c0 + tl.arange(0, BN)
        cmask = cols < d_r
        if DOT_F32:
            y = tl.dot(zc, pr, input_precision="ieee")
        else:
            y = tl.dot(zc, pr)
            if SPLIT_Z:
                y += tl.dot(zlo, pr)
        y = _round_to(y * out_mul, HALF)
        if HAS_MASK:
            flat = il[:, None] * d_r + cols[None, :]
            m = tl.load(m_ptr + mrow + flat, mask=lmask[:, None] & cmask[None, :], other=0.0)
            y = y * m.to(tl.float32)
        return y, cols, cmask

    @triton.jit
    def _scale_of(amax, clip, qmax, MODE: tl.constexpr, HALF: tl.constexpr):
        if MODE == 1:  # fake quant: eager's ops in the input dtype
            xmax = _round_to(amax * clip, HALF)
            s = tl.maximum(_round_to(tl.div_rn(xmax, qmax), HALF), 1e-8)
        else:  # int8 codes: float32 scale
            s = tl.maximum(tl.div_rn(amax * clip, qmax), 1e-8)
        return s

    @triton.jit
    def _store_block(y, s, cols, cmask, il, lmask, o_ptr, row_o, d_r, qmax, MODE: tl.constexpr, HALF: tl.constexpr):
        flat = il[:, None] * d_r + cols[None, :]
        omask = lmask[:, None] & cmask[None, :]
        if MODE == 0:
            tl.store(o_ptr + row_o + flat, y.to(o_ptr.dtype.element_ty), mask=omask)
        elif MODE == 1:
            v = _round_to(y * tl.div_rn(1.0, s), HALF)
            q = tl.minimum(tl.maximum(_rne(v), -qmax - 1.0), qmax)
            tl.store(o_ptr + row_o + flat, (q * s).to(o_ptr.dtype.element_ty), mask=omask)
        else:
            q = tl.minimum(tl.maximum(_rne(y * tl.div_rn(1.0, s)), -qmax - 1.0), qmax)
            tl.store(o_ptr + row_o + flat, q.to(tl.int8), mask=omask)

    @triton.jit
    def _tile_setup(plt_ptr, s_ptr, d_l, d_r, DL: tl.constexpr, DR: tl.constexpr, HAS_SCALE: tl.constexpr):
        """A token tile's row indices and masks, its flat offsets, ``P_l^T`` and the scale tile (``P_l^T`` again
        as a placeholder without a scale)."""
        il = tl.arange(0, DL)
        ir = tl.arange(0, DR)
        lmask = il < d_l
        xmask = lmask[:, None] & (ir[None, :] < d_r)
        flat = il[:, None] * d_r + ir[None, :]
        plt = tl.load(plt_ptr + il[:, None] * d_l + il[None, :], mask=lmask[:, None] & lmask[None, :], other=0.0)
        sv = plt
        if HAS_SCALE:
            sv = tl.load(s_ptr + flat, mask=xmask, other=0.0).to(tl.float32)
        return il, lmask, xmask, flat, plt, sv

    @triton.jit
    def _owner_tile(m_ptr, flat, xmask, placeholder, OWNER: tl.constexpr):
        """The owner of every coordinate of the tile (int32: -1 shared, k unique to type k, -2 kept by none), read
        once per program; ``placeholder`` without it."""
        own = placeholder
        if OWNER:
            own = tl.load(m_ptr + flat, mask=xmask, other=-2)
        return own

    @triton.jit
    def _z_of(x, plt, sv, HAS_SCALE: tl.constexpr, DOT_F32: tl.constexpr, SPLIT_Z: tl.constexpr):
        """``Z = P_l^T (x * scale)`` of one token's tile, as the input dtype's hi (and, with ``SPLIT_Z``, lo)
        words for the second product (float32 inputs: ``Z`` itself, IEEE)."""
        if HAS_SCALE:
            x = (x.to(tl.float32) * sv).to(x.dtype)
        if DOT_F32:
            z = tl.dot(plt, x, input_precision="ieee")
            zc = z
            zlo = z
        else:
            z = tl.dot(plt, x)
            zc = z.to(x.dtype)
            zlo = zc
            if SPLIT_Z:
                zlo = (z - zc.to(tl.float32)).to(x.dtype)
        return zc, zlo

    @triton.jit
    def _single_pass_token(zc, zlo, pr_all, m_ptr, t_ptr, o_ptr, sc_ptr, row, d, d_r, stride_o, qmax, clip, out_mul,
                           il, lmask, own, BN: tl.constexpr, HAS_MASK: tl.constexpr, MODE: tl.constexpr,
                           DOT_F32: tl.constexpr, SPLIT_Z: tl.constexpr, HALF: tl.constexpr, OWNER: tl.constexpr):
        """The rest of one token whose tile is one column block: ``Y = Z P_r``, mask, scale, store. ``OWNER``: the
        mask from the program's owner tile ``own`` (-1 shared, k unique to type k) and the token's type, no
        per-token mask row read."""
        mrow = row * 0
        if HAS_MASK:
            mrow = tl.load(t_ptr + row).to(tl.int64) * d
        y, cols, cmask = _y_block(zc, zlo, pr_all, m_ptr, mrow, d_r, 0, out_mul, il, lmask, HAS_MASK, BN, DOT_F32,
                                  SPLIT_Z, HALF)
        if OWNER:
            tt = tl.load(t_ptr + row).to(tl.int32)
            y = tl.where((own == -1) | (own == tt), y, 0.0)
        s = 1.0
        if MODE != 0:
            s = _scale_of(tl.max(tl.max(tl.abs(y), axis=1), axis=0), clip, qmax, MODE, HALF)
            if MODE == 2:
                tl.store(sc_ptr + row, s)
        _store_block(y, s, cols, cmask, il, lmask, o_ptr, row * stride_o, d_r, qmax, MODE, HALF)

    @triton.jit
    def _kron_act_kernel(x_ptr, plt_ptr, pr_ptr, s_ptr, m_ptr, t_ptr, o_ptr, sc_ptr,
                         n_tokens, d_l, d_r, stride_x, stride_o, qmax, clip, out_mul,
                         DL: tl.constexpr, DR: tl.constexpr, BN: tl.constexpr, TPP: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, MODE: tl.constexpr, DOT_F32: tl.constexpr,
                         SPLIT_Z: tl.constexpr, HALF: tl.constexpr, OWNER: tl.constexpr):
        """MODE 0: transform (+mask) only; 1: fake quant (dequantized output); 2: int8 codes + fp32 scales.
        HALF: the input dtype for eager-like rounding (0 float32, 1 float16, 2 bfloat16). Each program
        takes ``TPP`` consecutive tokens; ``P_l^T``, the scale vector and (single pass) ``P_r`` are loaded
        once for all of them."""
        d = d_l * d_r
        il, lmask, xmask, flat, plt, sv = _tile_setup(plt_ptr, s_ptr, d_l, d_r, DL, DR, HAS_SCALE)
        own = _owner_tile(m_ptr, flat, xmask, plt, OWNER)
        NB: tl.constexpr = DR // BN
        pr_all = plt  # unused with two passes
        if NB == 1:
            pr_all = _pr_block(pr_ptr, d_r, 0, DR, BN)
        first = tl.program_id(0).to(tl.int64) * TPP
        for t in range(TPP):
            row = first + t
            if row < n_tokens:  # the last program's spare slots do nothing
                x = tl.load(x_ptr + row * stride_x + flat, mask=xmask, other=0.0)
                zc, zlo = _z_of(x, plt, sv, HAS_SCALE, DOT_F32, SPLIT_Z)
                if NB == 1:
                    _single_pass_token(zc, zlo, pr_all, m_ptr, t_ptr, o_ptr, sc_ptr, row, d, d_r, stride_o, qmax, clip,
                                       out_mul, il, lmask, own, BN, HAS_MASK, MODE, DOT_F32, SPLIT_Z, HALF, OWNER)
                else:
                    mrow = row * 0
                    if HAS_MASK:
                        mrow = tl.load(t_ptr + row).to(tl.int64) * d
                    row_o = row * stride_o
                    s = 1.0
                    if MODE != 0:
                        amax_v = tl.zeros([BN], dtype=tl.float32)
                        for b in range(NB):
                            y, cols, cmask = _y_block(zc, zlo, _pr_block(pr_ptr, d_r, b * BN, DR, BN), m_ptr, mrow,
                                                      d_r, b * BN, out_mul, il, lmask, HAS_MASK, BN, DOT_F32, SPLIT_Z,
                                                      HALF)
                            amax_v = tl.maximum(amax_v, tl.max(tl.abs(y), axis=0))
                        s = _scale_of(tl.max(amax_v, axis=0), clip, qmax, MODE, HALF)
                        if MODE == 2:
                            tl.store(sc_ptr + row, s)
                    for b in range(NB):
                        y, cols, cmask = _y_block(zc, zlo, _pr_block(pr_ptr, d_r, b * BN, DR, BN), m_ptr, mrow,
                                                  d_r, b * BN, out_mul, il, lmask, HAS_MASK, BN, DOT_F32, SPLIT_Z, HALF)
                        _store_block(y, s, cols, cmask, il, lmask, o_ptr, row_o, d_r, qmax, MODE, HALF)


    @triton.jit
    def _kron_act_persistent_kernel(x_ptr, plt_ptr, pr_ptr, s_ptr, m_ptr, t_ptr, o_ptr, sc_ptr,
                                    n_tokens, d_l, d_r, stride_x, stride_o, qmax, clip, out_mul,
                                    DL: tl.constexpr, DR: tl.constexpr, HAS_SCALE: tl.constexpr,
                                    HAS_MASK: tl.constexpr, MODE: tl.constexpr, DOT_F32: tl.constexpr,
                                    SPLIT_Z: tl.constexpr, HALF: tl.constexpr, OWNER: tl.constexpr,
                                    STAGES: tl.constexpr):
        """:func:`_kron_act_kernel`'s math (single-pass tiles) with a fixed grid of programs that stride over the
        tokens (``tuning={"path": "persistent"}``): the factors are loaded once per program, and the token loop
        is a ``tl.range`` with ``STAGES`` stages, so that the compiler may issue the next tokens' loads while
        one is being transformed."""
        d = d_l * d_r
        il, lmask, xmask, flat, plt, sv = _tile_setup(plt_ptr, s_ptr, d_l, d_r, DL, DR, HAS_SCALE)
        own = _owner_tile(m_ptr, flat, xmask, plt, OWNER)
        pr_all = _pr_block(pr_ptr, d_r, 0, DR, DR)
        zero64 = tl.program_id(0).to(tl.int64) * 0  # rows as int64: offsets past 2^31 elements
        for r in tl.range(tl.program_id(0), n_tokens, tl.num_programs(0), num_stages=STAGES):
            row = zero64 + r
            x = tl.load(x_ptr + row * stride_x + flat, mask=xmask, other=0.0)
            zc, zlo = _z_of(x, plt, sv, HAS_SCALE, DOT_F32, SPLIT_Z)
            _single_pass_token(zc, zlo, pr_all, m_ptr, t_ptr, o_ptr, sc_ptr, row, d, d_r, stride_o, qmax, clip,
                               out_mul, il, lmask, own, DR, HAS_MASK, MODE, DOT_F32, SPLIT_Z, HALF, OWNER)

    @triton.jit
    def _kron_act_batched_kernel(x_ptr, plt_ptr, pr_ptr, s_ptr, m_ptr, t_ptr, o_ptr, sc_ptr,
                                 n_tokens, d_l, d_r, stride_x, stride_o, qmax, clip, out_mul,
                                 DL: tl.constexpr, DR: tl.constexpr, TB: tl.constexpr, HAS_SCALE: tl.constexpr,
                                 HAS_MASK: tl.constexpr, MODE: tl.constexpr, DOT_F32: tl.constexpr,
                                 SPLIT_Z: tl.constexpr, HALF: tl.constexpr):
        """:func:`_kron_act_kernel`'s math (single-pass tiles) for ``TB`` tokens at once: one load of the
        ``(TB, DL, DR)`` block, ``Z = P_l^T X`` as a batched dot, ``Y = Z P_r`` as one ``(TB * DL, DR)``
        dot, per-token maxima over the block, one store. More bytes in flight per program and
        larger dots than the token-by-token loop (``tuning={"path": "batched"}``; timed by
        ``experiments/bench_kernels.py``)."""
        d = d_l * d_r
        tok = tl.program_id(0).to(tl.int64) * TB + tl.arange(0, TB)
        il = tl.arange(0, DL)
        ir = tl.arange(0, DR)
        lmask = il < d_l
        rmask = ir < d_r
        tmask = tok < n_tokens
        flat = il[:, None] * d_r + ir[None, :]
        xmask2 = lmask[:, None] & rmask[None, :]
        m3 = tmask[:, None, None] & xmask2[None, :, :]
        x = tl.load(x_ptr + tok[:, None, None] * stride_x + flat[None, :, :], mask=m3, other=0.0)
        if HAS_SCALE:
            sv = tl.load(s_ptr + flat, mask=xmask2, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * sv[None, :, :]).to(x_ptr.dtype.element_ty)
        plt = tl.load(plt_ptr + il[:, None] * d_l + il[None, :], mask=lmask[:, None] & lmask[None, :], other=0.0)
        plt3 = tl.broadcast_to(plt[None, :, :], (TB, DL, DL))
        kr = tl.arange(0, DR)
        pr = tl.load(pr_ptr + kr[:, None] * d_r + ir[None, :], mask=(kr[:, None] < d_r) & rmask[None, :], other=0.0)
        if DOT_F32:
            z = tl.dot(plt3, x, input_precision="ieee")
            y = tl.dot(tl.reshape(z, (TB * DL, DR)), pr, input_precision="ieee")
        else:
            z = tl.dot(plt3, x)
            zc = z.to(x_ptr.dtype.element_ty)
            y = tl.dot(tl.reshape(zc, (TB * DL, DR)), pr)
            if SPLIT_Z:
                zlo = (z - zc.to(tl.float32)).to(x_ptr.dtype.element_ty)
                y += tl.dot(tl.reshape(zlo, (TB * DL, DR)), pr)
        y = _round_to(tl.reshape(y, (TB, DL, DR)) * out_mul, HALF)
        if HAS_MASK:
            mrow = tl.load(t_ptr + tok, mask=tmask, other=0).to(tl.int64) * d
            m = tl.load(m_ptr + mrow[:, None, None] + flat[None, :, :], mask=m3, other=0.0)
            y = y * m.to(tl.float32)
        offs = tok[:, None, None] * stride_o + flat[None, :, :]
        if MODE == 0:
            tl.store(o_ptr + offs, y.to(o_ptr.dtype.element_ty), mask=m3)
        else:
            amax = tl.max(tl.max(tl.abs(y), axis=2), axis=1)
            s = _scale_of(amax, clip, qmax, MODE, HALF)
            s3 = s[:, None, None]
            if MODE == 1:
                v = _round_to(y * tl.div_rn(1.0, s3), HALF)
                q = tl.minimum(tl.maximum(_rne(v), -qmax - 1.0), qmax)
                tl.store(o_ptr + offs, (q * s3).to(o_ptr.dtype.element_ty), mask=m3)
            else:
                tl.store(sc_ptr + tok, s, mask=tmask)
                q = tl.minimum(tl.maximum(_rne(y * tl.div_rn(1.0, s3)), -qmax - 1.0), qmax)
                tl.store(o_ptr + offs, q.to(tl.int8), mask=m3)


if triton is not None:

    @triton.jit
    def _row_quant_kernel(x_ptr, o_ptr, d, stride_x, stride_o, qmax, clip, BLOCK: tl.constexpr, NB: tl.constexpr,
                          HALF: tl.constexpr):
        """Per-token symmetric fake quant of one row per program, with eager's rounding points (as MODE 1 of
        :func:`_kron_act_kernel`, without a transform): one read and one write of the row when it fits one
        block (``NB == 1``); wider rows read twice (the maximum, then the codes)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        if NB == 1:
            m = cols < d
            y = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            s = _scale_of(tl.max(tl.abs(y), axis=0), clip, qmax, 1, HALF)
            q = tl.minimum(tl.maximum(_rne(_round_to(tl.div_rn(y, s), HALF)), -qmax - 1.0), qmax)
            tl.store(o_ptr + row * stride_o + cols, (q * s).to(o_ptr.dtype.element_ty), mask=m)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for b in range(NB):
                c = b * BLOCK + cols
                y = tl.load(x_ptr + row * stride_x + c, mask=c < d, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(y))
            s = _scale_of(tl.max(amax, axis=0), clip, qmax, 1, HALF)
            for b in range(NB):
                c = b * BLOCK + cols
                y = tl.load(x_ptr + row * stride_x + c, mask=c < d, other=0.0).to(tl.float32)
                q = tl.minimum(tl.maximum(_rne(_round_to(tl.div_rn(y, s), HALF)), -qmax - 1.0), qmax)
                tl.store(o_ptr + row * stride_o + c, (q * s).to(o_ptr.dtype.element_ty), mask=c < d)


_HALF_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def prepare_operands(P_l: Tensor, P_r: Tensor, in_scale, masks, dtype: torch.dtype, device,
                     owner: Tensor | None = None) -> dict:
    """The kernel's small operands in the input dtype on its device: ``P_l^T``, ``P_r``, scale, mask rows, and
    the masks' owner vector (:func:`mask_owner`) when the caller found one (int32)."""
    if dtype not in _HALF_CODE:
        raise TypeError(f"the kernel takes float32/float16/bfloat16 inputs, got {dtype}")
    conv = dict(device=device, dtype=dtype)
    return {"plt": P_l.detach().t().to(**conv).contiguous(), "pr": P_r.detach().to(**conv).contiguous(),
            "sv": in_scale.detach().reshape(-1).to(**conv).contiguous() if in_scale is not None else None,
            "mk": masks.detach().to(**conv).contiguous() if masks is not None else None,
            "own": owner.to(device=device, dtype=torch.int32).contiguous() if owner is not None else None,
            "d_l": P_l.shape[0], "d_r": P_r.shape[0]}


def mask_owner(masks: Tensor | None) -> Tensor | None:
    """The owner vector of type-mask rows ``(num_types, d)``, when they have that form (FreeAct's
    :class:`~freeact.transforms.typed.TypeMask`: each coordinate kept by every type, by exactly one, or by none):
    -1 shared, ``k`` unique to type ``k``, -2 kept by none; None for other masks (values other than 0 and 1, or a
    coordinate kept by some types but not all). The kernel then builds each token's mask from it and the
    token's type instead of reading a mask row per token."""
    if masks is None:
        return None
    m = masks.detach()
    if not bool(((m == 0) | (m == 1)).all()):
        return None
    keep = m == 1
    kept = keep.sum(0)
    n = keep.shape[0]
    if not bool(((kept == n) | (kept <= 1)).all()):
        return None
    own = keep.to(torch.int8).argmax(0).to(torch.int32)
    return torch.where(kept == n, -1, torch.where(kept == 1, own, -2)).to(torch.int32)


def tuned_tiling(d_l: int, d_r: int, tuning: dict | None = None) -> dict:
    """:func:`kernel_tiling` with launch choices overridden (what the benchmarks sweep): ``BN`` (a power of two
    from 16 to the padded ``d_r``; one pass when it is all of it), ``num_warps`` (1-16, a power of two) and
    ``tokens_per_prog`` (>= 1; None: :func:`tokens_per_program` decides per call), and ``path`` for fake quant:
    ``kernel`` (the fused kernel), ``batched`` (the fused kernel's math on ``tokens_per_prog`` tokens at once,
    a power of two, default :data:`BATCHED_TOKENS`; padded tiles up to 64 x 64), ``persistent`` (single-pass
    tiles: ``programs_per_sm`` programs a multiprocessor, default :data:`PERSISTENT_PROGRAMS`, striding over the
    tokens in a loop of ``stages`` pipelining stages, default :data:`PERSISTENT_STAGES`) or ``gemm`` (the
    transform as two cuBLAS products, eager's very ops, then the one-pass per-token quantizer
    :func:`fused_row_quant`: eager's numbers bit for bit); ``mask``: ``auto`` (type masks of FreeAct's form built
    from an owner vector, :func:`mask_owner`, in the token loop and the persistent layout) or ``rows`` (a mask row
    read per token). Default: ``gemm`` for the two-pass tiles, where the fused kernel was measured
    no faster than eager (d = 18944 as 128 x 148: README, Performance), ``kernel`` otherwise."""
    tiling = dict(kernel_tiling(d_l, d_r), tokens_per_prog=None, mask="auto")
    tiling["path"] = "gemm" if tiling["passes"] == 2 else "kernel"
    keys = {"BN", "num_warps", "tokens_per_prog", "path", "programs_per_sm", "stages", "mask"}
    unknown = set(tuning or {}) - keys
    if unknown:
        raise ValueError(f"unknown kernel tuning keys {sorted(unknown)}: {', '.join(sorted(keys))}")
    for key, value in (tuning or {}).items():
        if value is None:
            continue
        if key == "mask":
            if value not in ("auto", "rows"):
                raise ValueError(f"mask must be auto or rows, got {value!r}")
            tiling["mask"] = value
            continue
        if key == "path":
            if value not in PATHS:
                raise ValueError(f"path must be one of {', '.join(PATHS)}, got {value!r}")
            tiling["path"] = value
            continue
        value = int(value)
        if key == "BN" and not (16 <= value <= tiling["DR"] and value & (value - 1) == 0):
            raise ValueError(f"BN must be a power of two in 16..{tiling['DR']}, got {value}")
        if key == "num_warps" and value not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {value}")
        if key in ("tokens_per_prog", "programs_per_sm", "stages") and value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
        tiling[key] = value
    tiling["passes"] = 1 if tiling["BN"] == tiling["DR"] else 2
    if tiling["path"] == "batched":
        tb = tiling["tokens_per_prog"]
        if tiling["DL"] * tiling["DR"] > MAX_BATCHED_TILE:
            raise ValueError(f"path batched takes padded tiles up to {MAX_BATCHED_TILE} elements, "
                             f"got {tiling['DL']} x {tiling['DR']}")
        if tb is not None and tb & (tb - 1):
            raise ValueError(f"path batched takes a power of two tokens per program, got {tb}")
    if tiling["path"] == "persistent" and tiling["passes"] != 1:
        raise ValueError(f"path persistent takes single-pass tiles (BN = the padded d_r = {tiling['DR']}), "
                         f"got BN={tiling['BN']}")
    return tiling


def tokens_per_program(n_tokens: int, device, tile: int = 4096) -> int:
    """How many tokens one program takes: 1 while there are fewer than 8 tokens per multiprocessor,
    then up to 8 (the factors are loaded once per program, and each program has more independent loads
    in flight), a power of two, keeping at least 4 programs per multiprocessor. Tiles larger than 64 x 64
    (``tile`` = padded ``d_l * d_r``) keep 1: their factors, held across the loop, would crowd the
    registers that the tile itself needs (``experiments/bench_kernels.py`` times every choice)."""
    if device.type != "cuda" or tile > 4096:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tpp = 1
    while tpp < 8 and n_tokens >= 2 * tpp * 4 * sms:
        tpp *= 2
    return tpp


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch(x2: Tensor, ops: dict, types, mode: int, bits: int, clip: float, out_mul: float = 1.0,
            split_z: bool = False, tiling: dict | None = None):
    """Run the kernel on ``x2`` (tokens, d) with prepared operands. Returns the output (mode 0/1) or
    ``(codes, scales)`` (mode 2). ``types``: any integer tensor with one entry per token (read in place).
    ``tiling``: the launch choices (:func:`tuned_tiling`; default: its defaults for the factors)."""
    T, d = x2.shape
    dev, dt = x2.device, x2.dtype
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if ops["mk"] is not None:
        types = types.reshape(-1)
        if types.device != dev or types.dtype not in (torch.int32, torch.int64):
            types = types.to(device=dev, dtype=torch.int64)
        types = types.contiguous()
    if tiling is None:
        tiling = tuned_tiling(ops["d_l"], ops["d_r"])
    scales = None
    if mode == 2:
        out = torch.empty(T, d, device=dev, dtype=torch.int8)
        scales = torch.empty(T, device=dev, dtype=torch.float32)
    else:
        out = torch.empty(T, d, device=dev, dtype=dt)
    if T > 0:
        f32 = dt == torch.float32
        # the mask from the owner vector (read once per program) where the masks have that form and the kernel can
        owner = (ops["own"] is not None and tiling.get("mask", "auto") == "auto" and tiling["passes"] == 1
                 and tiling["path"] in ("kernel", "persistent"))
        mask_arg = ops["own"] if owner else ops["mk"]
        args = (x2, ops["plt"], ops["pr"], ops["sv"] if ops["sv"] is not None else x2,
                mask_arg if mask_arg is not None else x2, types if ops["mk"] is not None else x2, out,
                scales if scales is not None else out, T, ops["d_l"], ops["d_r"], x2.stride(0), out.stride(0),
                float(2 ** (bits - 1) - 1) if mode else 1.0, float(clip), float(out_mul))
        flags = dict(DL=tiling["DL"], DR=tiling["DR"], HAS_SCALE=ops["sv"] is not None,
                     HAS_MASK=ops["mk"] is not None and not owner, MODE=mode, DOT_F32=f32,
                     SPLIT_Z=bool(split_z and not f32), HALF=_HALF_CODE[dt], num_warps=tiling["num_warps"])
        if tiling["path"] == "batched":
            tb = tiling["tokens_per_prog"] or BATCHED_TOKENS
            _kron_act_batched_kernel[(triton.cdiv(T, tb),)](*args, TB=tb, **flags)
        elif tiling["path"] == "persistent":
            sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) if x2.is_cuda else 2
            programs = min(T, sms * (tiling.get("programs_per_sm") or PERSISTENT_PROGRAMS))
            _kron_act_persistent_kernel[(programs,)](*args, STAGES=tiling.get("stages") or PERSISTENT_STAGES,
                                                     OWNER=owner, **flags)
        else:
            tpp = tiling["tokens_per_prog"] or tokens_per_program(T, x2.device, tiling["DL"] * tiling["DR"])
            _kron_act_kernel[(triton.cdiv(T, tpp),)](*args, BN=tiling["BN"], TPP=tpp, OWNER=owner, **flags)
    return (out, scales) if mode == 2 else out


# ----------------------------------------------------------------------------- public API
def fused_act_quant(x: Tensor, P_l: Tensor, P_r: Tensor, masks: Tensor | None = None, types: Tensor | None = None,
                    bits: int = 4, clip: float = 1.0, backend: str = "auto", in_scale: Tensor | None = None,
                    out_mul: float = 1.0, split_z: bool = False) -> Tensor:
    """``fake_quant(kron_matmul(x * in_scale, [P_l, P_r]) * masks[types])`` per token (see the module doc).

    ``x``: ``(..., d)``; ``P_l``: ``(d_l, d_l)``, ``P_r``: ``(d_r, d_r)`` with ``d_l * d_r = d``;
    ``masks``: ``(num_types, d)`` 0/1 and ``types``: one type index per token (any shape with that many
    elements), or both None; ``bits >= 16``: transform and mask only. ``split_z`` carries ``P_l^T X`` in two
    half words (hi + lo) for near-float32 accuracy (exact +-1 Hadamard factors). ``backend``: "triton" (CUDA, or
    CPU under ``TRITON_INTERPRET=1``), "eager" (:func:`act_quant_eager`) or "auto" (Triton for CUDA
    fp16/bf16/fp32 inputs outside autograd, else eager). Returns a tensor shaped and typed like ``x``.
    """
    clip_f = float(clip)
    d = _check_inputs(x, P_l, P_r, masks, types, bits, clip_f, in_scale)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, P_l, P_r, in_scale))
    if _pick_backend(backend, x, needs_grad, P_l.shape[0], P_r.shape[0]) == "eager":
        return act_quant_eager(x, P_l, P_r, masks, types, bits, clip, in_scale, out_mul)
    ops = prepare_operands(P_l, P_r, in_scale, masks, x.dtype, x.device)
    y = _launch(x.reshape(-1, d), ops, types, 1 if bits < 16 else 0, int(bits), clip_f, out_mul, split_z)
    return y.reshape(x.shape)


def act_quant_int8(x: Tensor, P_l: Tensor, P_r: Tensor, masks: Tensor | None = None, types: Tensor | None = None,
                   clip: float = 1.0, backend: str = "auto", in_scale: Tensor | None = None, out_mul: float = 1.0,
                   split_z: bool = False, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Transform + mask + per-token symmetric quantization to integer codes: ``(q int8 (tokens, d),
    s float32 (tokens,))`` with ``x_q ~= q * s[:, None]``. ``split_z`` carries ``P_l^T X`` in two half
    words (hi + lo) for near-float32 accuracy of the transform (used for Hadamard factors)."""
    d = _check_inputs(x, P_l, P_r, masks, types, bits, clip, in_scale)
    if bits > 8:
        raise ValueError(f"int8 codes need bits <= 8, got {bits}")
    if _pick_backend(backend, x, False, P_l.shape[0], P_r.shape[0]) == "eager":
        return act_quant_int8_eager(x, P_l, P_r, masks, types, clip, in_scale, out_mul, bits)
    ops = prepare_operands(P_l, P_r, in_scale, masks, x.dtype, x.device)
    return _launch(x.reshape(-1, d), ops, types, 2, int(bits), float(clip), out_mul, split_z)


class KronActQuant:
    """:func:`fused_act_quant` / :func:`act_quant_int8` with fixed factors, scale and masks whose
    converted operands are kept per (dtype, device): repeated calls launch the kernel alone.
    (The factors are read once: rebuild after changing them.) ``tuning``: launch choices that override the
    defaults (:func:`tuned_tiling`: ``BN``, ``num_warps``, ``tokens_per_prog``), for benchmarks."""

    def __init__(self, P_l: Tensor, P_r: Tensor, in_scale: Tensor | None = None, masks: Tensor | None = None,
                 out_mul: float = 1.0, split_z: bool = False, tuning: dict | None = None):
        self.P_l, self.P_r, self.in_scale, self.masks = P_l, P_r, in_scale, masks
        self.out_mul, self.split_z = float(out_mul), bool(split_z)
        self.tiling = tuned_tiling(P_l.shape[0], P_r.shape[0], tuning)  # checked and computed once
        self._dims = (P_l.shape[0], P_r.shape[0])
        self._owner = mask_owner(masks)  # once (it reads the masks back to the host), not per dtype or call
        self._ops: dict = {}

    def _prepared(self, x: Tensor) -> dict:
        key = (x.dtype, x.device)
        if key not in self._ops:
            self._ops[key] = prepare_operands(self.P_l, self.P_r, self.in_scale, self.masks, x.dtype, x.device,
                                              self._owner)
        return self._ops[key]

    def __call__(self, x: Tensor, types: Tensor | None = None, bits: int = 4, clip: float = 1.0,
                 backend: str = "auto") -> Tensor:
        clip = float(clip)
        d = _check_inputs(x, self.P_l, self.P_r, self.masks, types, bits, clip, self.in_scale)
        if _pick_backend(backend, x, torch.is_grad_enabled() and x.requires_grad, *self._dims) == "eager":
            return act_quant_eager(x, self.P_l, self.P_r, self.masks, types, bits, clip, self.in_scale, self.out_mul)
        if self.tiling["path"] == "gemm":
            return self._gemm_path(x.reshape(-1, d), types, bits, clip).reshape(x.shape)
        y = _launch(x.reshape(-1, d), self._prepared(x), types, 1 if bits < 16 else 0, int(bits), clip,
                    self.out_mul, self.split_z, self.tiling)
        return y.reshape(x.shape)

    def _gemm_path(self, x2: Tensor, types, bits: int, clip: float) -> Tensor:
        """Eager's transform (the prepared operands are eager's ``.to(dtype)`` copies) through cuBLAS, then the
        one-pass quantizer kernel: :func:`act_quant_eager`'s numbers."""
        ops = self._prepared(x2)
        y = _transform_eager(x2, ops["plt"].t(), ops["pr"], ops["mk"], types, ops["sv"], self.out_mul)
        return fused_row_quant(y, bits, clip, backend="triton")

    def int8(self, x: Tensor, types: Tensor | None = None, clip: float = 1.0, backend: str = "auto",
             bits: int = 8) -> tuple[Tensor, Tensor]:
        d = _check_inputs(x, self.P_l, self.P_r, self.masks, types, bits, float(clip), self.in_scale)
        if bits > 8:
            raise ValueError(f"int8 codes need bits <= 8, got {bits}")
        if _pick_backend(backend, x, False, *self._dims) == "eager":
            return act_quant_int8_eager(x, self.P_l, self.P_r, self.masks, types, clip, self.in_scale, self.out_mul,
                                        bits)
        return _launch(x.reshape(-1, d), self._prepared(x), types, 2, int(bits), float(clip), self.out_mul,
                       self.split_z, self.tiling)


ROW_BLOCK = 8192  # the widest row one block holds; wider rows take two passes


def row_quant_eager(x: Tensor, bits: int = 4, clip: float = 1.0) -> Tensor:
    """The reference: the model's per-token symmetric fake quant (:func:`~freeact.quant.quantizer.fake_quant`)."""
    if bits >= 16:
        return x
    return fake_quant(x, QuantSpec(bits=int(bits), symmetric=True, granularity="row"), clip=clip)


def fused_row_quant(x: Tensor, bits: int = 4, clip: float = 1.0, backend: str = "auto",
                    block: int = ROW_BLOCK) -> Tensor:
    """Per-token symmetric fake quant of ``x`` (``(..., d)``) in one kernel: :func:`row_quant_eager`'s numbers
    (the input quantizer of a linear without an online transform: RTN, GPTQ, QuaRot's q/k/v and gate/up,
    SmoothQuant) in one read and one write of ``x`` instead of eager's passes. ``bits >= 16``: ``x`` itself.
    ``backend`` as in :func:`fused_act_quant`; ``block``: the widest row held at once (a power of two; wider
    rows take two passes)."""
    _check_quant_args(x, bits, clip)
    if bits >= 16:
        return x
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if _pick_backend(backend, x, needs_grad) == "eager":
        return row_quant_eager(x, bits, clip)
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    if x2.shape[0] > 0:
        block = min(_next_pow2(d), _next_pow2(block))
        _row_quant_kernel[(x2.shape[0],)](x2, out, d, x2.stride(0), out.stride(0), float(2 ** (bits - 1) - 1),
                                          float(clip), BLOCK=block, NB=triton.cdiv(d, block),
                                          HALF=_HALF_CODE[x.dtype], num_warps=4 if block <= 2048 else 8)
    return out.reshape(x.shape)


class RowActQuant:
    """:func:`fused_row_quant` behind :class:`KronActQuant`'s call signature (the token types are unused), for
    :class:`FusedInputQuantizer` on a linear whose input has no online transform."""

    def __call__(self, x: Tensor, types: Tensor | None = None, bits: int = 4, clip: float = 1.0,
                 backend: str = "auto") -> Tensor:
        return fused_row_quant(x, bits, clip, backend)


# ----------------------------------------------------------------------------- model integration
def kron_spec(transform) -> dict | None:
    """What the kernel needs from an online transform module, or None when it cannot run it.

    Recognised: a merged two-factor :class:`~freeact.transforms.affine.AffineSite` (FlatQuant; any
    per-channel ``1/s``), the same wrapped by :class:`~freeact.transforms.typed.TypeMask` (FreeAct;
    the ``keep`` rows and the model's token types), FlatQuant's merged per-head transform on ``o_proj``'s
    input (:class:`~freeact.transforms.affine.HeadwiseVO`: ``P_h (x) I``, the identity as the right factor),
    QuaRot's Hadamard across heads on ``o_proj``'s input (:class:`~freeact.transforms.rotation.HeadMixHadamard`:
    ``H_heads (x) I``, +-1 with ``out_mul = 1/sqrt(heads)``, the head signs as ``in_scale``), and an
    :class:`~freeact.transforms.hadamard.OnlineHadamard` of any supported order (QuaRot; a power of two or
    ``2^k m`` with a Paley base: :func:`~freeact.transforms.hadamard.hadamard_kron_factors` as unnormalized
    +-1 factors, ``out_mul = 1/sqrt(n)``, the signs as ``in_scale``; not block-diagonal ones).
    Returns ``{P_l, P_r, in_scale, masks, token_types, out_mul, split_z}``.
    """
    from ..transforms.affine import AffineSite, HeadwiseVO
    from ..transforms.hadamard import OnlineHadamard, block_hadamard_matrix
    from ..transforms.rotation import HeadMixHadamard
    from ..transforms.typed import TypeMask

    masks = token_types = None
    inner = transform
    if isinstance(transform, TypeMask):
        inner = transform.inner
        if transform.has_unique:
            masks, token_types = transform.keep, transform.token_types
    if isinstance(inner, AffineSite):
        if not inner.merged or inner.n_factors != 2:
            return None
        return {"P_l": inner.act_0, "P_r": inner.act_1, "in_scale": inner.inv_scale, "masks": masks,
                "token_types": token_types, "out_mul": 1.0, "split_z": False}
    if isinstance(inner, HeadwiseVO) and masks is None:
        if not (inner.merged and inner.has_heads):
            return None
        P_h = inner.heads_act
        return {"P_l": P_h, "P_r": torch.eye(inner.head_dim, dtype=P_h.dtype, device=P_h.device), "in_scale": None,
                "masks": None, "token_types": None, "out_mul": 1.0, "split_z": False}
    if isinstance(inner, HeadMixHadamard) and masks is None:
        n, mix = inner.n_heads, inner.mix
        if mix.block_size != n:
            return None
        H = (block_hadamard_matrix(n).T * math.sqrt(n)).round()  # the +-1 matrix the kernel applies exactly
        signs = None if mix.signs is None else mix.signs.to(torch.float64).repeat_interleave(inner.head_dim)
        return {"P_l": H, "P_r": torch.eye(inner.head_dim, dtype=torch.float64), "in_scale": signs, "masks": None,
                "token_types": None, "out_mul": 1.0 / math.sqrt(n), "split_z": True}
    if isinstance(inner, OnlineHadamard) and masks is None:
        n = inner.n
        factors = hadamard_factors(n) if n >= 4 else None  # None for block-diagonal Hadamards: they stay eager
        if factors is None:
            return None
        return {"P_l": factors[0], "P_r": factors[1], "in_scale": inner.signs, "masks": None, "token_types": None,
                "out_mul": 1.0 / math.sqrt(n), "split_z": True}
    return None


def hadamard_factors(n: int) -> tuple[Tensor, Tensor] | None:
    """The unnormalized +-1 factors the kernel applies for the width-``n`` Hadamard
    (:func:`~freeact.transforms.hadamard.hadamard_kron_factors`), or None when ``n`` is no order this project
    constructs or its padded tile exceeds :data:`MAX_TILE`."""
    from ..transforms.hadamard import hadamard_kron_factors, supported_block_size

    if n < 1 or supported_block_size(n) != n:
        return None
    P_l, P_r = hadamard_kron_factors(n)
    t = kernel_tiling(P_l.shape[0], P_r.shape[0])
    return (P_l, P_r) if t["DL"] * t["DR"] <= MAX_TILE else None


class FusedInputQuantizer(InputQuantizer):
    """An :class:`~freeact.quant.act.InputQuantizer` whose Kronecker transform, type mask and per-token
    fake quantization run as one kernel (:func:`fused_act_quant`; without an online transform, the per-token
    quantization alone: :func:`fused_row_quant`). Built from an installed one with the
    same spec, transform (kept as a submodule, unused in forward) and learned clip; ``set_act_quant``
    still switches its quantization. Inference only (the kernel has no backward). Linears that shared the
    original pipeline (q/k/v, gate/up) share the fused one, and its output as :class:`InputQuantizer`
    serves it.
    """

    def __init__(self, iq: InputQuantizer, backend: str = "auto"):
        spec = iq.spec
        if spec.enabled and not (spec.symmetric and spec.granularity == "row"):
            raise ValueError(f"the fused kernel quantizes per token, symmetric; got {spec}")
        ks = kron_spec(iq.transform) if iq.transform is not None else None
        if ks is None and iq.transform is not None:
            raise ValueError(f"no fused kernel for the transform {type(iq.transform).__name__}")
        super().__init__(spec, iq.transform, learnable_clip=False)
        self.clip_logit = iq.clip_logit
        self.quantize = iq.quantize
        self.backend = backend
        self.kron = ks  # None: no online transform, the per-token quantizer alone (RowActQuant)
        self.op = (KronActQuant(ks["P_l"], ks["P_r"], ks["in_scale"], ks["masks"], ks["out_mul"], ks["split_z"])
                   if ks is not None else RowActQuant())
        self._clip = None  # (clip_logit._version, float): read once, not at every call (a host sync)

    def _clip_value(self) -> float:
        """The clip ratio as a float, cached until the learned clip parameter changes."""
        if self.clip_logit is None:
            return float(self.spec.clip_ratio)
        version = self.clip_logit._version
        if self._clip is None or self._clip[0] != version:
            self._clip = (version, float(self.clip().detach().reshape(())))
        return self._clip[1]

    def _settings(self) -> tuple:
        """(token types, bits, clip) of this call."""
        k = self.kron
        types = k["token_types"].get() if (k is not None and k["masks"] is not None) else None
        return types, (self.spec.bits if (self.quantize and self.spec.enabled) else 16), self._clip_value()

    def state_key(self) -> tuple:
        return self._settings()

    def compute(self, x: Tensor) -> Tensor:
        types, bits, clip = self._settings()
        return self.op(x, types, bits=bits, clip=clip, backend=self.backend)


def fuse_input_quantizers(model: torch.nn.Module, backend: str = "auto") -> int:
    """Swap every installed input pipeline that the kernels can run for a :class:`FusedInputQuantizer` (a
    Kronecker / Hadamard / per-head transform with per-token quantization, or the per-token quantization alone;
    linears that shared one pipeline share the fused one); returns how many linears were switched (the others
    stay as they are)."""
    todo = []
    for lin in list(model.modules()):
        iq = getattr(lin, "_modules", {}).get("input_quantizer")
        if not isinstance(iq, InputQuantizer) or isinstance(iq, FusedInputQuantizer):
            continue
        spec = iq.spec
        if spec.enabled and not (spec.symmetric and spec.granularity == "row"):
            continue
        if iq.transform is None and not (spec.enabled and iq.quantize):
            continue  # nothing to run
        if iq.transform is not None and kron_spec(iq.transform) is None:
            continue
        todo.append((lin, iq))
    fused: dict[int, FusedInputQuantizer] = {}  # one fused pipeline per shared original (q/k/v, gate/up)
    for lin, iq in todo:
        if id(iq) not in fused:
            fused[id(iq)] = FusedInputQuantizer(iq, backend)
        attach_input_quantizer(lin, fused[id(iq)])
    return len(todo)


@contextlib.contextmanager
def input_quantizers_fused(model: torch.nn.Module, backend: str = "auto"):
    """:func:`fuse_input_quantizers` for the duration of a ``with`` block (yields how many linears were
    switched); the original pipelines are back afterwards, so a model saved later holds those."""
    originals = [(lin, lin._modules["input_quantizer"]) for lin in model.modules()
                 if isinstance(getattr(lin, "_modules", {}).get("input_quantizer"), InputQuantizer)]
    n = fuse_input_quantizers(model, backend)
    try:
        yield n
    finally:
        for lin, iq in originals:
            attach_input_quantizer(lin, iq)
