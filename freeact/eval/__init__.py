"""Evaluations. ``evaluate_text`` picks perplexity (AR) or the Monte-Carlo ELBO (dLLM)."""
from __future__ import annotations

from ..data.text import read_text, token_stream
from .elbo import elbo
from .perplexity import perplexity


def evaluate_text(model, adapter, tokenizer, ecfg, device="cpu", progress=True) -> dict:
    ids = token_stream(tokenizer, read_text(ecfg.source))
    if adapter.objective == "mdm":
        res = elbo(model, adapter, ids, ecfg.seqlen, mc_num=ecfg.mc_num, seed=ecfg.seed,
                   batch_size=ecfg.batch_size, max_chunks=ecfg.max_chunks, device=device, progress=progress)
    else:
        res = perplexity(model, ids, ecfg.seqlen, batch_size=ecfg.batch_size, max_chunks=ecfg.max_chunks,
                         device=device, progress=progress)
    return {f"{ecfg.name}.{k}": v for k, v in res.items()}


__all__ = ["evaluate_text", "elbo", "perplexity"]
