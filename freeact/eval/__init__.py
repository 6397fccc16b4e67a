"""Evaluations. ``evaluate_text`` picks perplexity (AR) or the Monte-Carlo ELBO (dLLM);
``evaluate`` runs it and the lm-eval tasks of the ``eval`` config."""
from __future__ import annotations

from ..data.text import read_text, token_stream
from .cuda_graphs import GraphedForward
from .elbo import elbo
from .perplexity import perplexity


def text_field(data_cfg) -> str:
    """The text column of a dataset source: the optional ``text_field`` key (``eval.text_field=...``)."""
    return getattr(data_cfg, "text_field", None) or "text"


def evaluate_text(model, adapter, tokenizer, ecfg, device="cpu", progress=True) -> dict:
    """Perplexity (AR) or the Monte-Carlo ELBO (dLLM). ``eval.cuda_graph`` (on a GPU): the forwards are
    replayed from CUDA graphs, one per batch shape (:class:`~freeact.eval.cuda_graphs.GraphedForward`)."""
    ids = token_stream(tokenizer, read_text(ecfg.source, text_field=text_field(ecfg)))
    graphed = GraphedForward(model) if getattr(ecfg, "cuda_graph", False) and str(device).startswith("cuda") else None
    try:
        if adapter.objective == "mdm":
            res = elbo(model, adapter, ids, ecfg.seqlen, mc_num=ecfg.mc_num, seed=ecfg.seed,
                       batch_size=ecfg.batch_size, max_chunks=ecfg.max_chunks, device=device, progress=progress,
                       forward=graphed)
        else:
            res = perplexity(model, ids, ecfg.seqlen, batch_size=ecfg.batch_size, max_chunks=ecfg.max_chunks,
                             device=device, progress=progress, forward=graphed)
    finally:
        if graphed is not None:
            graphed.release()
    return {f"{ecfg.name}.{k}": v for k, v in res.items()}


def evaluate(model, adapter, tokenizer, ecfg, device="cpu", progress=True) -> dict:
    """All evaluations an ``eval`` config asks for: the text metric (unless ``text: false``) and,
    when ``tasks`` is non-empty, the lm-eval tasks (:mod:`freeact.eval.harness`)."""
    metrics = {}
    if getattr(ecfg, "text", True):
        metrics.update(evaluate_text(model, adapter, tokenizer, ecfg, device=device, progress=progress))
    if getattr(ecfg, "tasks", None):
        from .harness import run_harness_config  # imports lm-eval only when tasks are asked for

        metrics.update(run_harness_config(model, adapter, tokenizer, ecfg, progress=progress))
    return metrics


__all__ = ["evaluate", "evaluate_text", "elbo", "perplexity"]
