"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, per channel.

For a group of linears reading the same input ``X``, with ``j`` the input channel:

    s_j = max|X_j|^alpha / max_{linears, rows} |W_{:, j}|^(1 - alpha)      (clamped to >= 1e-5)
    X  <- X diag(1/s),   W <- W diag(s)                                     (X W^T unchanged)

``max|X_j|`` comes from forward hooks on the linears' inputs over the calibration set (one pass
of the unquantized model). ``1/s`` is folded into what produces ``X``:

* ``q, k, v``  <- ``attn_norm`` (``g <- g / s``);
* ``gate, up`` <- ``mlp_norm``;
* ``o``        <- ``v`` (``smooth_vo``): o's input channel ``(head j, c)`` is head ``j``'s
  attention-weighted values, linear in v's output channel ``(g(j), c)`` of its KV head
  ``g(j)``, so ``W_v[(g, c), :] <- W_v / s_{g,c}``, ``b_v <- b_v / s`` and
  ``W_o[:, (j, c)] <- W_o * s_{g(j), c}``. With GQA one ``s`` serves all the query heads of a KV
  group: its statistics are maxima over the group.

Down_proj's input (after the SwiGLU product) has no linear producer to fold into and is left
alone, as in SmoothQuant. All folding is float64. ``alpha`` 0.5 by default.
"""
from __future__ import annotations

import torch

from .base import Method
from .context import QuantContext
from .registry import register_method
from .blockwise import capture_inputs, model_inputs, real_rows, real_tokens

MIN_SCALE = 1e-5


@torch.no_grad()
def input_absmax(ctx: QuantContext, linears: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` of every linear over the calibration set (float32)."""
    if ctx.calib is None:
        raise ValueError("SmoothQuant needs calibration data")
    stats: dict[str, torch.Tensor] = {}

    current = {"valid": None}

    def record(name, x):
        m = real_rows(x, current["valid"]).abs().amax(dim=0).float()
        stats[name] = m if name not in stats else torch.maximum(stats[name], m)

    with capture_inputs(linears, record):
        for batch in ctx.calib.batches(ctx.batch_size):
            current["valid"] = real_tokens(batch)  # padding tokens of multimodal batches: not counted
            ctx.model(**model_inputs(batch, ctx.device), use_cache=False)
    return stats


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` in float64, clamped to ``>= MIN_SCALE``."""
    x = x_absmax.to(torch.float64).clamp(min=MIN_SCALE)
    w = w_absmax.to(torch.float64).clamp(min=MIN_SCALE)
    return (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=MIN_SCALE)


def _scale_columns(lin: torch.nn.Linear, s: torch.Tensor) -> None:
    w = lin.weight
    w.copy_((w.to(torch.float64) * s.to(w.device)).to(w.dtype))


@torch.no_grad()
def smooth_norm_linears(norm, linears: list, x_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Fold ``1/s`` into the norm's scale and ``s`` into the linears' input columns."""
    w_absmax = torch.stack([l.weight.detach().abs().amax(dim=0).float() for l in linears]).amax(dim=0)
    s = smoothing_scales(x_absmax, w_absmax.cpu(), alpha)
    g = norm.weight
    if getattr(norm, "bias", None) is not None:
        raise TypeError(f"{type(norm).__name__} has a bias: SmoothQuant folding needs an RMSNorm-style norm")
    g.copy_((g.to(torch.float64) / s.to(g.device)).to(g.dtype))
    for lin in linears:
        _scale_columns(lin, s)
    return s


@torch.no_grad()
def smooth_v_o(v, o, x_absmax: torch.Tensor, n_heads: int, n_kv_heads: int, alpha: float) -> torch.Tensor:
    """Fold ``1/s`` into v's output rows (and bias) and ``s`` into o's input columns (GQA-aware)."""
    hd = o.in_features // n_heads
    rep = n_heads // n_kv_heads
    if v.out_features != n_kv_heads * hd:
        raise ValueError(f"v_proj has {v.out_features} outputs, expected {n_kv_heads} x {hd}")
    x = x_absmax.reshape(n_kv_heads, rep, hd).amax(dim=1)
    w = o.weight.detach().abs().amax(dim=0).float().cpu().reshape(n_kv_heads, rep, hd).amax(dim=1)
    s = smoothing_scales(x, w, alpha)  # (n_kv, hd)
    s_v = s.reshape(-1).to(v.weight.device)
    v.weight.copy_((v.weight.to(torch.float64) / s_v[:, None]).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_((v.bias.to(torch.float64) / s_v).to(v.bias.dtype))
    _scale_columns(o, s.repeat_interleave(rep, dim=0).reshape(-1))
    return s


@register_method("smoothquant")
class SmoothQuant(Method):
    def transform(self, ctx: QuantContext) -> dict:
        alpha, smooth_vo = self.cfg["alpha"], self.cfg["smooth_vo"]
        a = ctx.adapter
        blocks = a.blocks()
        watch = {}
        for i, b in enumerate(blocks):
            watch[f"{i}.qkv"], watch[f"{i}.mlp"] = b.q, (b.gate if b.gate is not None else b.up)
            if smooth_vo:
                watch[f"{i}.o"] = b.o
        stats = {k: v.cpu() for k, v in input_absmax(ctx, watch).items()}
        ratios = []
        for i, b in enumerate(blocks):
            s1 = smooth_norm_linears(b.attn_norm, [b.q, b.k, b.v], stats[f"{i}.qkv"], alpha)
            s2 = smooth_norm_linears(b.mlp_norm, [l for l in (b.gate, b.up) if l is not None], stats[f"{i}.mlp"], alpha)
            ratios += [float(s1.max() / s1.min()), float(s2.max() / s2.min())]
            if smooth_vo:
                smooth_v_o(b.v, b.o, stats[f"{i}.o"], a.num_heads, a.num_kv_heads, alpha)
        return {"alpha": alpha, "smooth_vo": smooth_vo, "max_scale_ratio": max(ratios) if ratios else None}
