"""The common method interface and the pipeline every method shares.

A method = optional transforms (``Method.transform``) + weight quantization (RTN or GPTQ) +
online activation / KV-cache quantization. ``Method.apply`` runs them in that order:

1. ``transform(ctx)``: rewrite weights (fusions, rotations, smoothing) and register online
   input transforms with ``ctx.input_transforms[linear] = module`` and a post-RoPE Q/K transform
   factory with ``ctx.qk_transform``;
2. attach an :class:`InputQuantizer` (transform + activation fake-quant) to every block linear;
3. quantize every block linear's weight (the LM head and embeddings stay in full precision);
4. install the KV-cache / post-RoPE hook when KV quantization or a Q/K transform is asked for.

With ``ctx.streaming`` the whole of ``apply`` (a subclass's own ``pipeline`` too) runs inside
:func:`~freeact.methods.streaming.streaming_context`: the model stays on the CPU and one decoder layer
at a time is paged onto ``ctx.device`` (see :mod:`freeact.methods.streaming`).
"""
from __future__ import annotations

from ..config.methods import GPTQSettings, as_dict, parse_settings
from ..models.adapter import INPUT_SITES
from ..quant.act import InputQuantizer, attach_input_quantizer
from ..quant.kv import QKVHook, install_qkv_hooks
from .context import QuantContext
from .streaming import streaming_context
from .weight_quant import gptq_weights, rtn_weights

__all__ = ["GPTQ_DEFAULTS", "Method"]

GPTQ_DEFAULTS = GPTQSettings()


class Method:
    name = "base"
    quantizes = True

    def __init__(self, cfg: dict | None = None):
        """``cfg``: the method's settings (``freeact.config.methods``); missing keys take their defaults,
        unknown keys and bad values raise :class:`~freeact.config.methods.SettingsError`."""
        self.settings = parse_settings({**(cfg or {}), "name": self.name})
        self.cfg = as_dict(self.settings)

    def apply(self, ctx: QuantContext) -> dict:
        """Quantize ``ctx.model`` in place; returns info for the result row. Runs :meth:`pipeline` inside
        :func:`~freeact.methods.streaming.streaming_context` (a no-op unless ``ctx.streaming``); methods
        override :meth:`transform` or :meth:`pipeline`, not this."""
        with streaming_context(ctx):
            return self.pipeline(ctx)

    # -- to override ------------------------------------------------------------------------
    def transform(self, ctx: QuantContext) -> dict:
        """Apply the method's transforms; return info for the result row."""
        return {}

    def pipeline(self, ctx: QuantContext) -> dict:
        """transform -> input quantizers on every block linear -> weight quantization -> KV / Q-K hooks."""
        if not self.quantizes:
            return {}
        info = dict(self.transform(ctx) or {})
        for block in ctx.adapter.blocks():
            lins = block.linears()
            for names in INPUT_SITES.values():
                # linears of one input site with the same transform share one pipeline (an evaluation
                # forward then quantizes their input once); a learned clip belongs to its own linear
                shared: dict[int, InputQuantizer] = {}
                for lin in (lins[n] for n in names if n in lins):
                    t = ctx.input_transforms.get(lin)
                    if ctx.learnable_act_clip or id(t) not in shared:
                        shared[id(t)] = InputQuantizer(ctx.quant.act, t, learnable_clip=ctx.learnable_act_clip)
                    attach_input_quantizer(lin, shared[id(t)])
        self.quantize_weights(ctx)
        if ctx.quant.kv.enabled or ctx.qk_transform is not None:
            make_qk = ctx.qk_transform or (lambda: None)
            install_qkv_hooks(ctx.model, [b.attn for b in ctx.adapter.blocks()],
                              lambda: QKVHook(ctx.quant.kv, make_qk()))
        return info

    def quantize_weights(self, ctx: QuantContext) -> None:
        """Quantize every block linear's weight with the configured ``weight_algo``."""
        algo = self.cfg["weight_algo"]
        if ctx.quant.weight.enabled and algo != "none":
            self.gptq(ctx) if algo == "gptq" else self.rtn(ctx)

    def rtn(self, ctx: QuantContext) -> None:
        rtn_weights(ctx, self.cfg["mse_clip"])

    def gptq(self, ctx: QuantContext) -> None:
        # methods whose settings have no GPTQ options (RTN, SmoothQuant with weight_algo=gptq) take GPTQ's own
        opts = {k: self.cfg.get(k, getattr(GPTQ_DEFAULTS, k)) for k in ("damp", "block_size", "act_order")}
        gptq_weights(ctx, **opts, mse_clip=self.cfg["mse_clip"])
