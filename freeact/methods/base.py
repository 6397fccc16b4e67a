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

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.calib import CalibSet
from ..config.methods import GPTQSettings, as_dict, parse_settings
from ..models.adapter import ModelAdapter
from ..quant.act import InputQuantizer, attach_input_quantizer, set_act_quant
from ..quant.gptq import HessianAccumulator, gptq_quantize_weight
from ..quant.kv import QKVHook, install_qkv_hooks
from ..quant.quantizer import QuantSpec
from ..quant.rtn import rtn_quantize_weight
from .blockwise import capture_inputs, capture_layer0_inputs, run_layer
from .streaming import CACHES, resident, streaming_context

_METHODS: dict[str, type["Method"]] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str, cfg: dict) -> "Method":
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {method_names()}")
    return _METHODS[name](cfg)


@dataclass
class QuantSettings:
    weight: QuantSpec
    act: QuantSpec
    kv: QuantSpec


@dataclass
class QuantContext:
    model: nn.Module
    adapter: ModelAdapter
    quant: QuantSettings
    calib: CalibSet | None
    device: str = "cpu"
    batch_size: int = 4
    seed: int = 0
    progress: bool = True
    input_transforms: dict = field(default_factory=dict)  # nn.Linear -> nn.Module
    qk_transform: object = None  # callable () -> nn.Module applied to post-RoPE q and k
    learnable_act_clip: bool = False
    streaming: bool = False  # keep the model on the CPU, page one decoder layer at a time onto `device`
    stream_cache: str = "device"  # streaming: calibration hidden states on the device or in "pinned" CPU memory

    def __post_init__(self):
        if self.stream_cache not in CACHES:
            raise ValueError(f"stream_cache must be one of {CACHES}, got {self.stream_cache!r}")


GPTQ_DEFAULTS = GPTQSettings()

# Linears of one block in GPTQ's "true sequential" order.
SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


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
            for lin in block.linears().values():
                attach_input_quantizer(lin, InputQuantizer(ctx.quant.act, ctx.input_transforms.get(lin),
                                                           learnable_clip=ctx.learnable_act_clip))
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
        mse = self.cfg["mse_clip"]
        for block in tqdm(ctx.adapter.blocks(), desc="rtn", disable=not ctx.progress, leave=False):
            with resident(ctx.model, block.layer):
                for lin in block.linears().values():
                    lin.weight.data = rtn_quantize_weight(lin.weight.data, ctx.quant.weight, mse_clip=mse)

    @torch.no_grad()
    def gptq(self, ctx: QuantContext) -> None:
        if ctx.calib is None:
            raise ValueError("GPTQ needs calibration data")
        model, adapter = ctx.model, ctx.adapter
        set_act_quant(model, False)
        offload = ctx.streaming and ctx.stream_cache == "pinned"
        hidden, kwargs, types = capture_layer0_inputs(model, adapter, ctx.calib.batches(ctx.batch_size), ctx.device,
                                                      offload=offload)
        tt = getattr(model, "freeact_token_types", None)
        # methods whose settings have no GPTQ options (RTN, SmoothQuant with weight_algo=gptq) take GPTQ's own
        opts = {k: self.cfg.get(k, getattr(GPTQ_DEFAULTS, k)) for k in ("damp", "block_size", "act_order")}
        opts["mse_clip"] = self.cfg["mse_clip"]
        for i, block in enumerate(tqdm(adapter.blocks(), desc="gptq", disable=not ctx.progress, leave=False)):
            with resident(model, block.layer):  # streaming: this layer on the device (Hessians too)
                lins = block.linears()
                for group in SEQUENTIAL_GROUPS:
                    todo = {n: lins[n] for n in group if n in lins}
                    acc = {n: HessianAccumulator(l.in_features, l.weight.device) for n, l in todo.items()}
                    with capture_inputs(todo, lambda n, x: acc[n].add(x)):
                        run_layer(block.layer, hidden, kwargs, types, tt)
                    for n, lin in todo.items():
                        lin.weight.data = gptq_quantize_weight(lin.weight.data, acc[n].H, ctx.quant.weight, **opts)
                hidden = run_layer(block.layer, hidden, kwargs, types, tt)
        set_act_quant(model, True)
