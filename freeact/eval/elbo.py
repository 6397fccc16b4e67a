"""Monte-Carlo ELBO of a masked-diffusion LM (LLaDA's likelihood estimator), batched over draws.

For a sequence ``x`` of length ``L`` whose positions ``target`` are scored, one draw picks a
number of masked target tokens ``k``, masks ``k`` random target positions, and scores
``sum_{masked} -log p(x_i | x_masked) / (k / L_target)``. Draws of one sequence are stratified
over ``k`` (evenly spaced from a random start, as LLaDA's ``forward_process``), so the estimate
has lower variance than i.i.d. draws; averaging ``mc_num`` draws gives an unbiased bound on the
negative log-likelihood. All randomness comes from one seeded generator.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.text import chunks


def stratified_masks(target: torch.Tensor, draws: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``target``: (L,) bool of scorable positions. Returns (draws, L) bool masks and p_mask (draws,)."""
    L = int(target.sum())
    k0 = torch.randint(1, L + 1, (1,), generator=generator).item()
    k = (torch.round(torch.linspace(k0, k0 + (draws - 1) * L / draws, draws)).long() - 1) % L + 1
    scores = torch.rand(draws, target.numel(), generator=generator)
    scores[:, ~target] = 2.0  # never masked
    ranks = scores.argsort(dim=1).argsort(dim=1)
    masks = ranks < k[:, None]
    return masks, k.float() / L


@torch.no_grad()
def sequence_nll(model, adapter, ids: torch.Tensor, target: torch.Tensor, mc_num: int, generator: torch.Generator,
                 batch_size: int = 32, device: str = "cpu") -> float:
    """Monte-Carlo estimate of ``-log p(ids[target] | ids[~target])`` for one sequence."""
    masks, p = stratified_masks(target, mc_num, generator)
    mask_id = adapter.mask_token_id
    total = 0.0
    for i in range(0, mc_num, batch_size):
        m = masks[i : i + batch_size].to(device)
        x = ids.to(device).expand(len(m), -1)
        xin = torch.where(m, torch.full_like(x, mask_id), x)
        logits = adapter.logits(model(input_ids=xin, use_cache=False)).float()
        ce = F.cross_entropy(logits[m], x[m], reduction="none")
        rows = m.nonzero()[:, 0]
        total += (ce / p[i : i + batch_size].to(device)[rows]).sum().item()
    return total / mc_num


@torch.no_grad()
def elbo(model, adapter, ids: torch.Tensor, seqlen: int, mc_num: int = 8, seed: int = 0, batch_size: int = 32,
         max_chunks: int | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Per-token NLL bound of the text ``ids`` cut into ``seqlen`` chunks, and its perplexity bound."""
    data = chunks(ids, seqlen, max_chunks)
    g = torch.Generator().manual_seed(seed)
    target = torch.ones(seqlen, dtype=torch.bool)
    nll = 0.0
    for x in tqdm(data, desc="elbo", disable=not progress, leave=False):
        nll += sequence_nll(model, adapter, x, target, mc_num, g, batch_size, device)
    per_tok = nll / data.numel()
    return {"nll": per_tok, "ppl": math.exp(per_tok), "eval_tokens": data.numel()}
