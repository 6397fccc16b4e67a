"""Block-by-block calibration: capture the inputs of the first decoder layer once, then push
them through one layer at a time. GPTQ, FlatQuant and FreeAct all calibrate this way, so only
the current layer (and the cached hidden states) need be on the compute device.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class _Stop(Exception):
    pass


def model_inputs(batch, device) -> dict:
    """Keyword arguments of the model for a calibration batch (ids tensor or dict of inputs)."""
    from ..data.processor import to_device

    return {"input_ids": batch.to(device)} if torch.is_tensor(batch) else to_device(batch, device)


@torch.no_grad()
def capture_layer0_inputs(model, adapter, batches, device="cpu", offload: bool = False):
    """Run the model up to its first decoder layer for each batch: a tensor of input ids, or a
    dict of model inputs (a VLM's processor output: input_ids, pixel_values, ...).

    Returns ``(hidden, kwargs, types)``: per batch, the hidden states entering layer 0, the
    keyword arguments the layers are called with (RoPE cos/sin, attention mask ...), and the
    token-type tensor (None unless the model carries :class:`~freeact.models.token_types.TokenTypes`).
    ``offload``: keep the hidden states in pinned CPU memory (layer-wise streaming moves each batch to
    the device when a layer is called; see :mod:`freeact.methods.streaming`).
    """
    layer0 = adapter.layers()[0]
    tt = getattr(model, "freeact_token_types", None)
    hidden, kwargs, types = [], [], []

    def hook(_, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        if offload:
            h = torch.empty(h.shape, dtype=h.dtype, pin_memory=torch.cuda.is_available()).copy_(h)
        hidden.append(h)
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        types.append(None if tt is None else tt.current)
        raise _Stop

    h = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**model_inputs(batch, device), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return hidden, kwargs, types


def real_tokens(batch) -> torch.Tensor | None:
    """``(batch, seq)`` bool mask of real (not padding) tokens of a calibration batch, or None when
    the batch has no padding (a tensor of ids, or a dict without ``attention_mask``)."""
    if isinstance(batch, dict) and batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    return None


def real_token_masks(batches: list, device=None) -> list | None:
    """:func:`real_tokens` of every calibration batch (on ``device`` if given), or None when none has padding."""
    masks = [real_tokens(b) for b in batches]
    if all(m is None for m in masks):
        return None
    return masks if device is None else [m.to(device) for m in masks]


def real_rows(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``x`` (batch, seq, d) as ``(tokens, d)`` rows of its real tokens (``valid``: (batch, seq) bool; None: all)."""
    return x.reshape(-1, x.shape[-1]) if valid is None else x[valid.to(x.device)]


def layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_layer(layer: nn.Module, hidden: list, kwargs: list, types: list | None = None, token_types=None) -> list:
    """Outputs of ``layer`` for every cached batch (no grad), with each batch's token types set."""
    outs = []
    with torch.no_grad():
        for i, (h, kw) in enumerate(zip(hidden, kwargs)):
            with types_in_use(token_types, None if types is None else types[i]):
                outs.append(layer_output(layer(h, **kw)))
    return outs


@contextmanager
def types_in_use(token_types, types: torch.Tensor | None):
    """``types`` (one batch's token types) are the current ones while the context is open; a no-op without
    token types."""
    if token_types is None or types is None:
        yield
    else:
        with token_types.use(types):
            yield


@contextmanager
def capture_inputs(linears: dict[str, nn.Linear], fn):
    """Call ``fn(name, x)`` with the input every linear in ``linears`` receives (after any
    input pipeline the linear carries) while the context is open."""
    handles = [lin.register_forward_hook(lambda m, a, o, n=n: fn(n, a[0].detach())) for n, lin in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
