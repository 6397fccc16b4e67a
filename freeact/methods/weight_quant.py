"""Weight quantization of every block linear, layer by layer: RTN, or GPTQ on the inputs each linear sees
in the (already transformed, partly quantized) model, in GPTQ's "true sequential" order."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..quant.act import set_act_quant
from ..quant.gptq import HessianAccumulator, gptq_quantize_weight
from ..quant.rtn import rtn_quantize_weight
from .blockwise import capture_inputs, capture_layer0_inputs, real_rows, real_token_masks, run_layer
from .context import QuantContext
from .streaming import resident

# Linears of one block in GPTQ's "true sequential" order.
SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def rtn_weights(ctx: QuantContext, mse_clip: bool) -> None:
    """Round every block linear's weight to ``ctx.quant.weight`` (``mse_clip``: search the clip ratio)."""
    for block in tqdm(ctx.adapter.blocks(), desc="rtn", disable=not ctx.progress, leave=False):
        with resident(ctx.model, block.layer):
            for lin in block.linears().values():
                lin.weight.data = rtn_quantize_weight(lin.weight.data, ctx.quant.weight, mse_clip=mse_clip)


def layer_hessians(block, names, hidden: list, kwargs: list, types: list | None, valid: list | None,
                   token_types=None) -> dict[str, HessianAccumulator]:
    """GPTQ's ``H = 2 X^T X / n`` of each linear in ``names`` over the inputs it sees when ``block.layer`` runs on
    the cached batches; ``valid``: per batch the (batch, seq) mask of real tokens (padding stays out)."""
    lins = block.linears()
    todo = {n: lins[n] for n in names if n in lins}
    acc = {n: HessianAccumulator(lin.in_features, lin.weight.device) for n, lin in todo.items()}
    current = {"valid": None}
    with capture_inputs(todo, lambda n, x: acc[n].add(real_rows(x, current["valid"]))):
        for i, (h, kw) in enumerate(zip(hidden, kwargs)):
            current["valid"] = None if valid is None else valid[i]
            run_layer(block.layer, [h], [kw], None if types is None else [types[i]], token_types)
    return acc


@torch.no_grad()
def gptq_weights(ctx: QuantContext, damp: float, block_size: int, act_order: bool, mse_clip: bool) -> None:
    """GPTQ every block linear's weight (activation quantization off while the Hessians are collected;
    padding tokens of multimodal batches enter no Hessian)."""
    if ctx.calib is None:
        raise ValueError("GPTQ needs calibration data")
    model, adapter = ctx.model, ctx.adapter
    set_act_quant(model, False)
    offload = ctx.streaming and ctx.stream_cache == "pinned"
    batches = list(ctx.calib.batches(ctx.batch_size))
    valid = real_token_masks(batches)
    hidden, kwargs, types = capture_layer0_inputs(model, adapter, batches, ctx.device, offload=offload)
    tt = getattr(model, "freeact_token_types", None)
    opts = {"damp": damp, "block_size": block_size, "act_order": act_order, "mse_clip": mse_clip}
    for block in tqdm(adapter.blocks(), desc="gptq", disable=not ctx.progress, leave=False):
        with resident(model, block.layer):  # streaming: this layer on the device (Hessians too)
            lins = block.linears()
            for group in SEQUENTIAL_GROUPS:
                acc = layer_hessians(block, group, hidden, kwargs, types, valid, tt)
                for n, a in acc.items():
                    lins[n].weight.data = gptq_quantize_weight(lins[n].weight.data, a.H, ctx.quant.weight, **opts)
            hidden = run_layer(block.layer, hidden, kwargs, types, tt)
    set_act_quant(model, True)
