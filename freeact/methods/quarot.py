"""QuaRot (Ashkboos et al., 2024): fixed Hadamard rotations, nothing learned.

Pipeline of :meth:`RotationMethod.transform` (shared with SpinQuant, which only changes where
R1/R2 come from):

1. override the activation / KV quantizer settings the method was published with
   (``act_clip_ratio`` 0.9, ``kv_clip_ratio`` 0.95; ``null`` keeps the quant config's value);
2. fuse every RMSNorm scale into the following linears, untie the LM head (float64);
3. R4: online Hadamard on down_proj's input (``ctx.input_transforms[down]``), ``W_down <- W_down H``;
4. R3 (``rotate_qk``): online Hadamard on the post-RoPE queries and keys (``ctx.qk_transform``);
   ``auto`` = on exactly when the KV cache is quantized;
5. R1 (random Hadamard, d x d) on the residual stream and R2 (Hadamard, head_dim) on every
   layer's values / o_proj input, fused in float64 (:mod:`freeact.transforms.rotation`);
6. the online rotation M on o_proj's input (``o_online``: ``auto`` = QuaRot's cross-head Hadamard
   when the head count is a Hadamard order, else a full-width one; ``none``). It is registered
   before step 5 (so SpinQuant's training sees it) and fused after R2: ``W_o <- W_o (I (x) R2) M``.

Then the shared pipeline quantizes activations (after the online transforms) and weights
(GPTQ by default, ``weight_algo: rtn`` for RTN).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..transforms.fusion import fuse_norms
from ..transforms.hadamard import OnlineHadamard, block_hadamard_matrix, random_hadamard_matrix
from ..transforms.rotation import apply_residual_rotation, attention_output_transform, fuse_online_rotation
from .base import Method
from .context import QuantContext
from .registry import register_method

def _flag(value, auto: bool, key: str) -> bool:
    if value in ("auto", None):
        return auto
    if isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be auto, true or false, got {value!r}")


class RotationMethod(Method):
    """QuaRot's structure; subclasses choose R1 (residual) and R2 (per-layer head) rotations."""

    # -- to override ------------------------------------------------------------------------
    def rotations(self, ctx: QuantContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(R1, [R2 per layer])`` in float64; the model is norm-fused, R3/R4 are installed."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def seed(self, ctx: QuantContext) -> int:
        s = self.cfg["rotation_seed"]
        return ctx.seed if s is None else int(s)

    def override_quant_settings(self, ctx: QuantContext) -> None:
        act, kv = ctx.quant.act, ctx.quant.kv
        if self.cfg["act_clip_ratio"] is not None:
            act = act.with_(clip_ratio=float(self.cfg["act_clip_ratio"]))
        if self.cfg["act_symmetric"] is not None:
            act = act.with_(symmetric=bool(self.cfg["act_symmetric"]))
        if self.cfg["kv_clip_ratio"] is not None:
            kv = kv.with_(clip_ratio=float(self.cfg["kv_clip_ratio"]))
        ctx.quant = replace(ctx.quant, act=act, kv=kv)

    def transform(self, ctx: QuantContext) -> dict:
        adapter, dev, seed = ctx.adapter, ctx.device, self.seed(ctx)
        self.override_quant_settings(ctx)
        info = fuse_norms(adapter)
        blocks = adapter.blocks()
        if self.cfg["down_online"]:
            for i, b in enumerate(blocks):
                had = OnlineHadamard(b.down.in_features, seed=seed + 1000 + i).to(dev)
                fuse_online_rotation(b.down, had)
                ctx.input_transforms[b.down] = had
        rotate_qk = _flag(self.cfg["rotate_qk"], ctx.quant.kv.enabled, "rotate_qk")
        if rotate_qk:
            hd = adapter.head_dim
            ctx.qk_transform = lambda: OnlineHadamard(hd, seed=None).to(dev)
        o_mode = self.cfg["o_online"]
        o_transforms = {}
        for b in blocks:  # registered now (training sees them), fused after R2 (W_o <- W_o R2 M)
            t = attention_output_transform(adapter.num_heads, adapter.head_dim, o_mode, seed=None)
            if t is not None:
                o_transforms[b.o] = ctx.input_transforms[b.o] = t.to(dev)
        R1, R2 = self.rotations(ctx)
        apply_residual_rotation(adapter, R1, R2)
        for o, t in o_transforms.items():
            fuse_online_rotation(o, t)
        o_kind = type(next(iter(o_transforms.values()))).__name__ if o_transforms else "none"
        return {**info, "rotate_qk": rotate_qk, "o_online": o_kind, "down_online": self.cfg["down_online"],
                "act_clip_ratio": ctx.quant.act.clip_ratio, "kv_clip_ratio": ctx.quant.kv.clip_ratio}


@register_method("quarot")
class QuaRot(RotationMethod):
    """R1 = random Hadamard (``H diag(s)``, any width via the block-diagonal fallback);
    R2 = the (non-random) Hadamard of head_dim for every layer, as QuaRot's code does."""

    def rotations(self, ctx):
        a = ctx.adapter
        R1 = random_hadamard_matrix(a.hidden_size, seed=self.seed(ctx))
        R2 = block_hadamard_matrix(a.head_dim)
        return R1, [R2] * len(a.layers())
