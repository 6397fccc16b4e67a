"""Norm fusion: fold every RMSNorm scale into the linears that read the norm's output.

An RMSNorm computes ``n(x) = g * x / rms(x)``. A linear that reads it computes
``n(x) W^T = (x / rms(x)) (W diag(g))^T``, so ``W <- W diag(g)`` and ``g <- 1`` leave the model's
function unchanged. After fusion the norms are pure ``x / rms(x)``, which commutes with any
orthogonal ``Q`` (``rms(x Q) = rms(x)``): the precondition for rotating the residual stream.

Which norm feeds which linears comes from the adapter only:

* ``block.attn_norm`` -> ``q, k, v``;
* ``block.mlp_norm``  -> ``gate, up``;
* ``adapter.final_norm()`` -> ``adapter.lm_head()``.

Tied embeddings are untied first (the LM head gets its own copy of the embedding matrix), since
the head's weight changes and the embedding's must not. All arithmetic is float64.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["untie_embeddings", "fuse_norm_into_linears", "fuse_norms"]


def untie_embeddings(adapter) -> bool:
    """Give the LM head its own weight if it shares the embedding's. Returns True if it did."""
    emb, head = adapter.embeddings(), adapter.lm_head()
    if head.weight is not emb.weight and head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    if hasattr(adapter.config, "tie_word_embeddings"):
        adapter.config.tie_word_embeddings = False  # so nothing re-ties them later (save/load)
    return True


def _norm_scale(norm: nn.Module) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    if w is None:
        raise TypeError(f"{type(norm).__name__} has no scale ('weight') to fuse")
    if getattr(norm, "bias", None) is not None:
        raise TypeError(f"{type(norm).__name__} has a bias (mean-centring LayerNorm); only RMSNorm-style "
                        "norms (x / rms(x) * weight) can be fused by freeact")
    return w


@torch.no_grad()
def fuse_norm_into_linears(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """``W <- W diag(g)`` for every linear, then ``g <- 1`` (float64 arithmetic)."""
    g = _norm_scale(norm)
    g64 = g.detach().to(torch.float64)
    for lin in linears:
        if lin.in_features != g.numel():
            raise ValueError(f"cannot fuse a norm of width {g.numel()} into a linear with {lin.in_features} inputs")
        w = lin.weight
        w.copy_((w.detach().to(torch.float64) * g64.to(w.device)).to(w.dtype))
    g.fill_(1.0)


def fuse_norms(adapter) -> dict:
    """Fuse every block's attention / MLP norm and the final norm (see the module docstring)."""
    untied = untie_embeddings(adapter)
    for block in adapter.blocks():
        fuse_norm_into_linears(block.attn_norm, [block.q, block.k, block.v])
        fuse_norm_into_linears(block.mlp_norm, [l for l in (block.gate, block.up) if l is not None])
    fuse_norm_into_linears(adapter.final_norm(), [adapter.lm_head()])
    return {"untied_embeddings": untied}
