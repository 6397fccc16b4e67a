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

* **Schedule** (``schedule``): ``llada`` = the even split above; ``dream`` = Dream's
  ``diffusion_generate`` timesteps ``t = linspace(1, eps, steps + 1)`` (eps 1e-3, float32): step s
  commits ``int(N * (1 - t[s+1] / t[s]))`` of the N still-masked tokens of the block, the last step
  everything left; ``auto`` = ``dream`` when the adapter shifts logits, else ``llada``.
* **Dream's token sampler** (``schedule=dream``): logits / ``temperature``, then ``top_p`` /
  ``top_k`` filtering, softmax; x0 is sampled from it (argmax at temperature 0) and ``alg`` scores
  it on these probabilities: ``maskgit_plus`` = probability of x0, ``topk_margin`` = top-1 minus
  top-2 probability, ``entropy`` = negative entropy; ``origin`` commits each masked position with
  probability ``1 - t[s+1]/t[s]`` (all at the last step) instead of the most confident.
  ``alg_temp`` > 0 draws the positions to commit from softmax(confidence / alg_temp) without
  replacement instead of taking the top k. (``schedule=llada`` keeps LLaDA's Gumbel sampler and
  ``remasking``; ``top_p`` / ``top_k`` then filter the logits before the Gumbel draw.)
* **Classifier-free guidance** (``cfg`` > 0, LLaDA's ``cfg_scale``): every forward also runs the
  sequence with the prompt tokens replaced by the mask token, and the logits become
  ``un + (cfg + 1) * (cond - un)``. ``cfg = 0`` runs no extra forward.

Batches of prompts of different lengths are left-padded, with an attention mask and position ids
that give every row the same logits it would get alone.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

REMASKING = ("auto", "low_confidence", "entropy", "random")
SCHEDULES = ("auto", "llada", "dream")
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
DREAM_EPS = 1e-3


def dream_timesteps(steps: int, eps: float = DREAM_EPS) -> torch.Tensor:
    return torch.linspace(1, eps, steps + 1)


def dream_transfer_schedule(num_masked: int, steps: int, eps: float = DREAM_EPS) -> list[int]:
    """Tokens committed per step by Dream's schedule (see the module docstring), computed as Dream
    does in float32; the last step commits whatever is left."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    t = dream_timesteps(steps, eps)
    out, left = [], num_masked
    for s in range(steps):
        k = left if s == steps - 1 else int(torch.tensor(float(left)) * (1 - t[s + 1] / t[s]))
        out.append(k)
        left -= k
    return out


def family_choice(key: str, value: str, choices: tuple[str, ...], adapter, dream: str, llada: str) -> str:
    """``value`` checked against ``choices``; ``auto`` becomes the family's own: ``dream`` for
    shifted-logits models (Dream), ``llada`` otherwise."""
    if value == "auto":
        return dream if adapter.shift_logits else llada
    if value not in choices:
        raise ValueError(f"{key}={value!r} must be auto or one of {tuple(c for c in choices if c != 'auto')}")
    return value


def resolve_schedule(schedule: str, adapter) -> str:
    return family_choice("schedule", schedule, SCHEDULES, adapter, dream="dream", llada="llada")


def check_sampling(alg: str = "entropy", alg_temp: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, cfg: float = 0.0, temperature: float | None = None) -> None:
    if alg not in ALGS:
        raise ValueError(f"alg={alg!r} must be one of {ALGS}")
    if alg_temp is not None and alg_temp < 0:
        raise ValueError(f"alg_temp={alg_temp} must be >= 0 (or null)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or null)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or null)")
    if cfg < 0:
        raise ValueError(f"cfg={cfg} must be >= 0")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (or null)")


def filter_logits(logits: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Nucleus (keep the smallest prefix of the sorted distribution whose mass reaches top_p,
    always the top token) then top-k filtering; removed entries get the dtype's minimum."""
    low = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        srt, idx = logits.sort(-1, descending=True)
        cum = F.softmax(srt, dim=-1).cumsum(-1)
        drop = torch.zeros_like(cum, dtype=torch.bool)
        drop[..., 1:] = cum[..., :-1] > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), low)
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, low)
    return logits


def dream_sample(logits: torch.Tensor, alg: str, temperature: float, top_p: float | None, top_k: int | None,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, confidence) by Dream's token sampler (see the module docstring)."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    probs = F.softmax(filter_logits(logits, top_p, top_k), dim=-1)
    if temperature > 0:
        flat = probs.reshape(-1, probs.shape[-1]).cpu()
        x0 = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1]).to(probs.device)
        conf = probs.gather(-1, x0[..., None]).squeeze(-1)
    else:
        conf, x0 = probs.max(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif alg == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    return x0, conf


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """How many tokens each of ``steps`` steps commits so that ``num_masked`` are committed in
    total: an even split, the remainder going to the first steps (LLaDA)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    base, rem = divmod(num_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def resolve_remasking(remasking: str, adapter) -> str:
    return family_choice("remasking", remasking, REMASKING, adapter, dream="entropy", llada="low_confidence")


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


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
                  top_p: float | None = None, top_k: int | None = None) -> torch.Tensor:
    if top_p is not None or top_k is not None:
        logits = filter_logits(logits.float(), top_p, top_k)
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    noisy = logits.double().exp() / (-torch.log(u.clamp_min(1e-20))) ** temperature
    return noisy.argmax(-1)


def _pick(conf: torch.Tensor, k: int, alg_temp: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of the k positions to commit: the top k, or (alg_temp > 0) k draws without
    replacement from softmax(conf / alg_temp)."""
    if not alg_temp:
        return conf.topk(k, dim=-1).indices
    w = F.softmax(conf.double() / alg_temp, dim=-1).cpu()
    return torch.multinomial(w, k, replacement=False, generator=generator).to(conf.device)


@torch.no_grad()
def diffusion_generate(model, adapter, prompts: Sequence[Sequence[int]], gen_length: int, steps: int,
                       block_length: int | None = None, remasking: str = "auto", temperature: float = 0.0,
                       generator: torch.Generator | None = None, device: str = "cpu", *, schedule: str = "llada",
                       alg: str = "entropy", alg_temp: float | None = None, top_p: float | None = None,
                       top_k: int | None = None, cfg: float = 0.0) -> torch.Tensor:
    """Generate ``gen_length`` tokens after each prompt. Returns a (len(prompts), gen_length)
    tensor of token ids (on CPU). Each step runs the whole sequence (no KV cache), as LLaDA does.
    ``schedule`` / ``alg`` / ``alg_temp`` / ``top_p`` / ``top_k`` / ``cfg``: see the module docstring
    (``remasking`` is read by the ``llada`` schedule, ``alg`` and ``alg_temp`` by ``dream``)."""
    mask_id = adapter.mask_token_id
    if mask_id is None:
        raise ValueError("diffusion_generate needs a model with a mask token (a masked-diffusion LM)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("diffusion_generate needs non-empty prompts")
    block_length, steps_per_block = check_schedule(gen_length, steps, block_length)
    check_sampling(alg, alg_temp, top_p, top_k, cfg)
    sched = resolve_schedule(schedule, adapter)
    rule = resolve_remasking(remasking, adapter)

    P = max(len(p) for p in prompts)
    b = len(prompts)
    pad = getattr(adapter.config, "pad_token_id", None)
    x = torch.full((b, P + gen_length), mask_id, dtype=torch.long)
    valid = torch.ones(b, P + gen_length, dtype=torch.long)
    prompt_pos = torch.zeros(b, P + gen_length, dtype=torch.bool)
    for r, p in enumerate(prompts):  # left padding (never attended to)
        x[r, : P - len(p)] = 0 if pad is None else pad
        valid[r, : P - len(p)] = 0
        x[r, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
        prompt_pos[r, P - len(p) : P] = True
    kw = {}
    if not bool(valid.all()):
        kw = {"attention_mask": valid.to(device), "position_ids": (valid.cumsum(-1) - 1).clamp_min(0).to(device)}
    x = x.to(device)
    prompt_pos = prompt_pos.to(device)

    def forward(lo: int, hi: int) -> torch.Tensor:
        if cfg <= 0:
            return adapter.logits(model(input_ids=x, use_cache=False, **kw))[:, lo:hi]
        un_x = x.masked_fill(prompt_pos, mask_id)
        kw2 = {k: torch.cat([v, v]) for k, v in kw.items()}
        both = adapter.logits(model(input_ids=torch.cat([x, un_x]), use_cache=False, **kw2))[:, lo:hi]
        cond, un = both[:b], both[b:]
        return un + (cfg + 1) * (cond - un)

    t = dream_timesteps(steps_per_block)
    for blk in range(gen_length // block_length):
        lo, hi = P + blk * block_length, P + (blk + 1) * block_length
        if sched == "llada":
            plan = transfer_schedule(block_length, steps_per_block)
        else:  # Dream: recomputed from what is still masked (all rows alike; 'origin' is per position)
            plan = [None] * steps_per_block
        for s, k in enumerate(plan):
            still = x[:, lo:hi] == mask_id
            if sched == "dream":
                last = s == steps_per_block - 1
                if alg == "origin":
                    p_commit = 1.0 if last else float(1 - t[s + 1] / t[s])
                    if not bool(still.any()):
                        continue
                    logits = forward(lo, hi)
                    x0, _ = dream_sample(logits, "maskgit_plus", temperature, top_p, top_k, generator)
                    u = torch.rand(still.shape, generator=generator).to(still.device)
                    commit = still & (u < p_commit)
                    x[:, lo:hi] = torch.where(commit, x0, x[:, lo:hi])
                    continue
                n = int(still[0].sum())
                k = n if last else int(torch.tensor(float(n)) * (1 - t[s + 1] / t[s]))
            if k == 0:  # nothing to commit this step: skip the forward
                continue
            logits = forward(lo, hi)
            if sched == "llada":
                x0 = gumbel_argmax(logits, temperature, generator, top_p, top_k)
                conf = confidence(logits, x0, rule, generator)
            else:
                x0, conf = dream_sample(logits, alg, temperature, top_p, top_k, generator)
            conf = torch.where(still, conf, torch.full_like(conf, -float("inf")))
            pick = _pick(conf, k, alg_temp if sched == "dream" else None, generator)
            commit = torch.zeros_like(still).scatter_(1, pick, True) & still
            x[:, lo:hi] = torch.where(commit, x0, x[:, lo:hi])
    return x[:, P:].cpu()
