"""Monte-Carlo ELBO of a masked-diffusion LM (LLaDA's likelihood estimator, or Dream's with
``estimator="dream"``, optionally with classifier-free guidance), batched over draws.

For a sequence ``x`` of length ``L`` whose positions ``target`` are scored, one draw picks a
number of masked target tokens ``k``, masks ``k`` random target positions, and scores
``sum_{masked} -log p(x_i | x_masked) / (k / L_target)``. Draws of one sequence are stratified
over ``k`` (evenly spaced from a random start, as LLaDA's ``forward_process``), so the estimate
has lower variance than i.i.d. draws; averaging ``mc_num`` draws gives an unbiased bound on the
negative log-likelihood. All randomness comes from seeded generators.

Draws are rows of one forward pass: :func:`masked_token_nll` packs the rows of many draws (of
one sequence or of many sequences of different lengths, right-padded under an attention mask)
into batches of ``batch_size`` rows, so a tiny model on CPU or a large one on GPU runs few,
full forwards instead of one forward per draw.
"""
from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.text import chunks


def stratified_masks(target: torch.Tensor, draws: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``target``: (L,) bool of scorable positions. Returns (draws, L) bool masks and p_mask (draws,)."""
    L = int(target.sum())
    if L == 0:
        raise ValueError("stratified_masks: the target has no position to score")
    if draws < 1:
        raise ValueError(f"stratified_masks: draws={draws} must be >= 1")
    k0 = torch.randint(1, L + 1, (1,), generator=generator).item()
    k = (torch.round(torch.linspace(k0, k0 + (draws - 1) * L / draws, draws)).long() - 1) % L + 1
    scores = torch.rand(draws, target.numel(), generator=generator)
    scores[:, ~target] = 2.0  # never masked
    ranks = scores.argsort(dim=1).argsort(dim=1)
    masks = ranks < k[:, None]
    return masks, k.float() / L


def bernoulli_masks(target: torch.Tensor, draws: int, generator: torch.Generator, eps: float = 1e-3,
                    t: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's masking: each draw picks a time ``t`` (stratified over the draws: ``(u + i/draws) mod 1``
    for one uniform ``u``, unless ``t`` is given) and masks every position of ``target``
    independently with probability ``p = eps + (1 - eps) t``. A draw may mask nothing (it then
    scores 0). Returns (draws, L) bool masks and p (draws,)."""
    if int(target.sum()) == 0:
        raise ValueError("bernoulli_masks: the target has no position to score")
    if draws < 1:
        raise ValueError(f"bernoulli_masks: draws={draws} must be >= 1")
    if t is None:
        u = torch.rand(1, generator=generator).item()
        ts = (u + torch.arange(draws, dtype=torch.float64) / draws) % 1.0
    else:
        ts = torch.full((draws,), float(t), dtype=torch.float64)
    p = eps + (1.0 - eps) * ts
    coins = torch.rand(draws, target.numel(), generator=generator, dtype=torch.float64)
    masks = (coins < p[:, None]) & target[None, :]
    return masks, p


ESTIMATORS = ("llada", "dream")


def _pad_id(adapter) -> int:
    pad = getattr(adapter.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` takes transformers' ``logits_to_keep`` (a boolean 2-D mask is
    understood by transformers' ``slice_logits_to_keep``; older versions lack it)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _masked_logits(model, adapter, xin: torch.Tensor, m: torch.Tensor, kw: dict, restrict: bool,
                   forward=None) -> torch.Tensor:
    """Logits scoring the tokens at the True positions of ``m`` (row-major order), aligned as
    :meth:`ModelAdapter.logits` aligns them. With ``restrict`` the LM head runs only at the
    positions needed (transformers' boolean ``logits_to_keep``): for a shifted-logits model
    (Dream) position ``i`` is scored by the output at ``max(i - 1, 0)``, as ``adapter.logits``
    does; this saves the head's compute and the (batch, length, vocab) logits tensor.
    ``forward``: a callable ``input_ids -> logits`` of the whole batch (a
    :class:`~freeact.eval.cuda_graphs.GraphedForward`), used for batches without padding instead of
    the restricted head (its shape would change with every mask)."""
    if forward is not None and not kw:
        return adapter.align_logits(forward(xin))[m]
    if not (restrict and accepts_logits_to_keep(model)):
        return adapter.logits(model(input_ids=xin, use_cache=False, **kw))[m]
    b, width = m.shape
    rows, cols = m.nonzero(as_tuple=True)
    src = (cols - 1).clamp_min(0) if adapter.shift_logits else cols  # output position scoring each token
    keep = torch.zeros_like(m)
    keep[rows, src] = True
    kept = model(input_ids=xin, use_cache=False, logits_to_keep=keep, **kw).logits  # (keep.sum(), vocab)
    if kept.dim() != 2 or kept.shape[0] != int(keep.sum()):
        raise RuntimeError(f"{type(model).__name__} ignored a boolean logits_to_keep (logits {tuple(kept.shape)}); "
                           "score with restrict_logits=False")
    slot = keep.flatten().cumsum(0) - 1  # row-major rank of each kept position
    return kept.reshape(-1, kept.shape[-1])[slot[rows * width + src]]


@torch.no_grad()
def masked_token_nll(model, adapter, rows: Sequence[tuple[torch.Tensor, ...]], batch_size: int = 32,
                     device: str = "cpu", progress: bool = False, restrict_logits: bool = True,
                     cfg: float = 0.0, forward=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Score masked positions: for every row ``(ids (L,), mask (L,) bool)`` the positions in
    ``mask`` are replaced by the mask token and the model predicts them from the rest.

    Rows are packed ``batch_size`` at a time (longest first; shorter rows right-padded and
    excluded by the attention mask, which leaves their logits unchanged). Returns, per row in
    the input order, the cross-entropy (nats, float32, CPU) at each masked position and whether
    the argmax prediction there equals the true token. ``restrict_logits`` computes logits only
    where they are scored (see :func:`_masked_logits`; off = full logits, as reference code does).

    ``cfg > 0`` (classifier-free guidance, LLaDA's convention): every row carries a third element,
    the (L,) bool prompt positions; the row is scored a second time with those positions masked
    too (same masked answer positions) and the logits combined ``un + (cfg + 1) (cond - un)``
    before the cross-entropy. ``cfg = 0`` runs one forward per batch, exactly as before.
    ``forward``: see :func:`_masked_logits` (full logits from, e.g., CUDA-graph replays).
    """
    if cfg < 0:
        raise ValueError(f"cfg={cfg} must be >= 0")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    mask_id = adapter.mask_token_id
    if mask_id is None:
        raise ValueError("masked_token_nll needs a model with a mask token (a masked-diffusion LM)")
    order = sorted(range(len(rows)), key=lambda i: -rows[i][0].numel())  # stable: equal lengths keep order
    out: list = [None] * len(rows)
    pad = _pad_id(adapter)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="mc-likelihood", disable=not progress, leave=False):
        idx = order[s : s + batch_size]
        lens = [rows[i][0].numel() for i in idx]
        width = max(lens)
        x = torch.full((len(idx), width), pad, dtype=torch.long)
        m = torch.zeros(len(idx), width, dtype=torch.bool)
        for r, i in enumerate(idx):
            x[r, : lens[r]] = rows[i][0]
            m[r, : lens[r]] = rows[i][1]
        kw = {}
        if min(lens) < width:
            kw["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lens)[:, None]).long().to(device)
        x, m = x.to(device), m.to(device)
        xin = torch.where(m, torch.full_like(x, mask_id), x)
        logits = _masked_logits(model, adapter, xin, m, kw, restrict_logits, forward).float()
        if cfg:  # classifier-free guidance: also score with the prompt masked, same answer masks
            u = torch.zeros_like(m)
            for r, i in enumerate(idx):
                u[r, : lens[r]] = rows[i][2]
            xun = torch.where(m | u.to(device), torch.full_like(x, mask_id), x)
            un = _masked_logits(model, adapter, xun, m, kw, restrict_logits, forward).float()
            logits = un + (cfg + 1.0) * (logits - un)
        ce = F.cross_entropy(logits, x[m], reduction="none").cpu()
        hit = (logits.argmax(-1) == x[m]).cpu()
        counts = m.sum(1).tolist()
        for r, (c, h) in enumerate(zip(ce.split(counts), hit.split(counts))):
            out[idx[r]] = (c, h)
    return out


@torch.no_grad()
def sequences_nll(model, adapter, seqs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], mc_num: int,
                  generator: torch.Generator | Sequence[torch.Generator], batch_size: int = 32, device: str = "cpu",
                  check_greedy: bool = False, progress: bool = False, restrict_logits: bool = True,
                  estimator: str = "llada", cfg: float = 0.0, prompts: Sequence[torch.Tensor] | None = None,
                  sampling_eps: float = 1e-3, forward=None) -> tuple[list[float], list[bool] | None]:
    """Monte-Carlo ELBO estimates of ``-log p(ids[target] | ids[~target])`` for many sequences.

    ``generator`` is one generator consumed sequence by sequence, or one per sequence (then each
    estimate is independent of which other sequences share the call). All ``mc_num`` draws of
    all sequences are scored in shared batches of ``batch_size`` rows.

    ``check_greedy`` adds one row per sequence with the WHOLE target masked and reports whether
    the argmax prediction matches every target token in that single forward (lm-eval's
    ``is_greedy``; LLaDA's reference instead unmasks one token per forward, len(target) forwards).

    ``estimator``: ``llada`` (stratified counts of masked target tokens, weight ``L_target / k``)
    or ``dream`` (:func:`bernoulli_masks`: independent masks at a stratified time ``t``, weight
    ``1 / p``, ``sampling_eps`` the smallest ``p``; draws that mask nothing score 0 and cost no
    forward). ``cfg`` is classifier-free guidance (:func:`masked_token_nll`); the prompt masked
    in the unconditional pass is ``prompts[i]`` (default: every position outside the target).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} must be one of {ESTIMATORS}")
    if prompts is None:
        prompts = [~t for t in targets]
    if len(prompts) != len(seqs):
        raise ValueError(f"{len(seqs)} sequences but {len(prompts)} prompt masks")
    if len(seqs) != len(targets):
        raise ValueError(f"{len(seqs)} sequences but {len(targets)} targets")
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(seqs)
    if len(gens) != len(seqs):
        raise ValueError(f"{len(seqs)} sequences but {len(gens)} generators")
    rows, draws_of = [], []  # draws_of[j]: (row index or None for an empty mask, p) per draw
    for ids, target, prompt, g in zip(seqs, targets, prompts, gens):
        if ids.shape != target.shape or ids.dim() != 1 or prompt.shape != target.shape:
            raise ValueError(f"ids {tuple(ids.shape)}, target {tuple(target.shape)} and prompt "
                             f"{tuple(prompt.shape)} must be equal 1-D shapes")
        if estimator == "llada":
            masks, p = stratified_masks(target, mc_num, g)
        else:
            masks, p = bernoulli_masks(target, mc_num, g, sampling_eps)
        mine = []
        for mk, pj in zip(masks, p.tolist()):
            if mk.any():
                mine.append((len(rows), pj))
                rows.append((ids, mk, prompt))
            else:
                mine.append((None, pj))
        draws_of.append(mine)
    n_draw_rows = len(rows)
    if check_greedy:
        rows += [(ids, target, prompt) for ids, target, prompt in zip(seqs, targets, prompts)]
    scored = masked_token_nll(model, adapter, rows, batch_size, device, progress, restrict_logits, cfg=cfg,
                              forward=forward)
    nlls = [sum(scored[r][0].sum().item() / pj for r, pj in mine if r is not None) / mc_num for mine in draws_of]
    greedy = None
    if check_greedy:
        greedy = [bool(hit.all()) for _, hit in scored[n_draw_rows:]]
    return nlls, greedy


@torch.no_grad()
def sequence_nll(model, adapter, ids: torch.Tensor, target: torch.Tensor, mc_num: int, generator: torch.Generator,
                 batch_size: int = 32, device: str = "cpu", forward=None) -> float:
    """Monte-Carlo estimate of ``-log p(ids[target] | ids[~target])`` for one sequence."""
    return sequences_nll(model, adapter, [ids], [target], mc_num, generator, batch_size, device,
                         forward=forward)[0][0]


@torch.no_grad()
def elbo(model, adapter, ids: torch.Tensor, seqlen: int, mc_num: int = 8, seed: int = 0, batch_size: int = 32,
         max_chunks: int | None = None, device: str = "cpu", progress: bool = True,
         bos_id: int | None = None, forward=None) -> dict:
    """Per-token NLL bound of the text ``ids`` cut into ``seqlen`` chunks, and its perplexity bound.
    With ``bos_id`` every chunk is that token followed by ``seqlen - 1`` text tokens; the first
    position is never masked or scored (a model trained with a start token at position 0).
    ``forward``: full-batch logits from another callable (:class:`~freeact.eval.cuda_graphs.GraphedForward`)."""
    data = chunks(ids, seqlen - (bos_id is not None), max_chunks)
    target = torch.ones(seqlen, dtype=torch.bool)
    if bos_id is not None:
        data = torch.cat([torch.full((len(data), 1), bos_id, dtype=data.dtype), data], 1)
        target[0] = False
    g = torch.Generator().manual_seed(seed)
    nll = 0.0
    for x in tqdm(data, desc="elbo", disable=not progress, leave=False):
        nll += sequence_nll(model, adapter, x, target, mc_num, g, batch_size, device, forward=forward)
    n = int(target.sum()) * len(data)
    per_tok = nll / n
    return {"nll": per_tok, "ppl": math.exp(per_tok), "eval_tokens": n}
