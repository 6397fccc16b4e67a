"""Diffusion sampling for masked-diffusion LMs (LLaDA, Dream): prompt + ``gen_length`` mask
tokens, then ``steps`` denoising forwards that each commit the most confident predictions.

* **Semi-autoregressive blocks** (LLaDA): the answer is split into ``gen_length / block_length``
  blocks, denoised left to right; ``steps / num_blocks`` steps per block, each committing an
  equal share of the block's tokens (LLaDA's ``get_num_transfer_tokens``). With
  ``block_length == gen_length`` there is a single block (Dream's sampler has no blocks).
* **Confidence** of a still-masked position's prediction ("remasking" rule: what is NOT
  committed stays masked):
  ``low_confidence``: the probability of the argmax token (LLaDA's default);
  ``entropy``: the negative entropy of the predictive distribution (Dream's ``alg="entropy"``);
  ``random``: a random score (LLaDA's ``remasking="random"``);
  ``auto``: ``entropy`` when the adapter shifts logits (Dream-style, AR-initialised), else
  ``low_confidence``.
* **Dream's right shift**: :meth:`ModelAdapter.logits` already aligns logits so that position
  i scores token i, so one code path serves both families.
* ``temperature > 0`` samples with Gumbel noise (LLaDA's ``add_gumbel_noise``, in float64);
  0 is greedy. Confidence is always computed from the noise-free distribution.

Batches of prompts of different lengths are left-padded, with an attention mask and position ids
that give every row the same logits it would get alone.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

REMASKING = ("auto", "low_confidence", "entropy", "random")


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """How many tokens each of ``steps`` steps commits so that ``num_masked`` are committed in
    total: an even split, the remainder going to the first steps (LLaDA)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    base, rem = divmod(num_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def resolve_remasking(remasking: str, adapter) -> str:
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r} must be one of {REMASKING}")
    if remasking == "auto":
        return "entropy" if adapter.shift_logits else "low_confidence"
    return remasking


def check_schedule(gen_length: int, steps: int, block_length: int | None) -> tuple[int, int]:
    """Validate the sampler settings; returns (block_length, steps per block)."""
    block_length = block_length or gen_length
    if gen_length < 1:
        raise ValueError(f"gen_length={gen_length} must be >= 1")
    if block_length < 1 or gen_length % block_length:
        raise ValueError(f"block_length={block_length} must divide gen_length={gen_length}")
    num_blocks = gen_length // block_length
    if steps < num_blocks or steps % num_blocks:
        raise ValueError(f"steps={steps} must be a positive multiple of the number of blocks "
                         f"gen_length/block_length={num_blocks}")
    return block_length, steps // num_blocks


def confidence(logits: torch.Tensor, x0: torch.Tensor, rule: str, generator: torch.Generator | None) -> torch.Tensor:
    """Score of each predicted token ``x0`` under ``logits`` (higher = commit earlier)."""
    if rule == "random":
        return torch.rand(x0.shape, generator=generator).to(logits.device)
    p = F.softmax(logits.float(), dim=-1)
    if rule == "low_confidence":
        return p.gather(-1, x0[..., None]).squeeze(-1)
    return (p * torch.log(p + 1e-10)).sum(-1)  # entropy: negative entropy


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    noisy = logits.double().exp() / (-torch.log(u.clamp_min(1e-20))) ** temperature
    return noisy.argmax(-1)


@torch.no_grad()
def diffusion_generate(model, adapter, prompts: Sequence[Sequence[int]], gen_length: int, steps: int,
                       block_length: int | None = None, remasking: str = "auto", temperature: float = 0.0,
                       generator: torch.Generator | None = None, device: str = "cpu") -> torch.Tensor:
    """Generate ``gen_length`` tokens after each prompt. Returns a (len(prompts), gen_length)
    tensor of token ids (on CPU). Each step runs the whole sequence (no KV cache), as LLaDA does."""
    mask_id = adapter.mask_token_id
    if mask_id is None:
        raise ValueError("diffusion_generate needs a model with a mask token (a masked-diffusion LM)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("diffusion_generate needs non-empty prompts")
    block_length, steps_per_block = check_schedule(gen_length, steps, block_length)
    rule = resolve_remasking(remasking, adapter)

    P = max(len(p) for p in prompts)
    b = len(prompts)
    pad = getattr(adapter.config, "pad_token_id", None)
    x = torch.full((b, P + gen_length), mask_id, dtype=torch.long)
    valid = torch.ones(b, P + gen_length, dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding (never attended to)
        x[r, : P - len(p)] = 0 if pad is None else pad
        valid[r, : P - len(p)] = 0
        x[r, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
    kw = {}
    if not bool(valid.all()):
        kw = {"attention_mask": valid.to(device), "position_ids": (valid.cumsum(-1) - 1).clamp_min(0).to(device)}
    x = x.to(device)

    for blk in range(gen_length // block_length):
        lo, hi = P + blk * block_length, P + (blk + 1) * block_length
        for k in transfer_schedule(block_length, steps_per_block):
            if k == 0:  # more steps than tokens: nothing to commit, skip the forward
                continue
            logits = adapter.logits(model(input_ids=x, use_cache=False, **kw))[:, lo:hi]
            x0 = gumbel_argmax(logits, temperature, generator)
            conf = confidence(logits, x0, rule, generator)
            still = x[:, lo:hi] == mask_id
            conf = torch.where(still, conf, torch.full_like(conf, -float("inf")))
            pick = conf.topk(k, dim=-1).indices
            commit = torch.zeros_like(still).scatter_(1, pick, True) & still
            x[:, lo:hi] = torch.where(commit, x0, x[:, lo:hi])
    return x[:, P:].cpu()
