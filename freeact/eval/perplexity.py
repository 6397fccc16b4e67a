"""Autoregressive perplexity, the papers' protocol: the test text concatenated (the shipped files
join articles with blank lines, i.e. "\\n\\n"), tokenized once, cut into ``seqlen`` chunks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.text import chunks


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, batch_size: int = 4, max_chunks: int | None = None,
               device: str = "cpu", progress: bool = True, forward=None) -> dict:
    """``forward``: a callable ``input_ids -> logits`` in place of the model's forward (a
    :class:`~freeact.eval.cuda_graphs.GraphedForward`)."""
    data = chunks(ids, seqlen, max_chunks)
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(data), batch_size), desc="ppl", disable=not progress, leave=False):
        x = data[i : i + batch_size].to(device)
        logits = (forward(x) if forward is not None else model(input_ids=x, use_cache=False).logits).float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    return {"nll": nll / count, "ppl": math.exp(nll / count), "eval_tokens": count}
