"""Throughput of the dLLM Monte-Carlo likelihood: draws batched into shared forwards
(:func:`freeact.eval.elbo.sequences_nll`, what ``freeact_dllm`` runs) vs a per-sample loop that
runs one forward per draw (LLaDA's ``get_loglikelihood`` with ``batch_size=1``; Dream's and most
re-implementations' evaluation loops).

Both score the same requests with the same masks, so their estimates must agree; the script
checks that and prints tokens/s (model input tokens: draws x sequence length) for both and the
ratio. Default workload: a tiny random LLaDA (``conf/model/tiny_llada.yaml``), 8 requests of a
96-token context + 32-token continuation, 32 draws each, on CPU.

    python experiments/bench_mc_likelihood.py [--mc-num 32] [--batch-size 32] [--requests 8]
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from freeact.eval.elbo import sequences_nll, stratified_masks
from freeact.models import get_adapter
from freeact.models.loading import build_tiny, load_tokenizer

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


@torch.no_grad()
def per_sample_nll(model, adapter, ids: torch.Tensor, target: torch.Tensor, mc_num: int, g: torch.Generator) -> float:
    """The straightforward estimator: one forward per Monte-Carlo draw."""
    masks, p = stratified_masks(target, mc_num, g)
    total = 0.0
    for m, pj in zip(masks, p.tolist()):
        xin = torch.where(m, torch.full_like(ids, adapter.mask_token_id), ids)[None]
        logits = adapter.logits(model(input_ids=xin, use_cache=False))[0, m].float()
        total += F.cross_entropy(logits, ids[m], reduction="sum").item() / pj
    return total / mc_num


def best_time(fn, repeats: int):
    out, best = None, float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_llada", help="a conf/model/*.yaml with source: tiny and a mask token")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--context", type=int, default=96, help="context tokens per request")
    ap.add_argument("--continuation", type=int, default=32, help="continuation (scored) tokens per request")
    ap.add_argument("--mc-num", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward of the batched estimator")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest is reported")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    mcfg = OmegaConf.load(CONF / f"{args.model}.yaml")
    tok = load_tokenizer(None)
    model = build_tiny(mcfg.family, OmegaConf.to_container(mcfg.arch), tok, seed=args.seed).eval()
    adapter = get_adapter(model)
    L = args.context + args.continuation
    g = torch.Generator().manual_seed(args.seed)
    seqs = [torch.randint(2, len(tok), (L,), generator=g) for _ in range(args.requests)]
    target = torch.arange(L) >= args.context
    gens = lambda: [torch.Generator().manual_seed(args.seed + i) for i in range(args.requests)]  # noqa: E731

    batched = lambda: sequences_nll(model, adapter, seqs, [target] * len(seqs), args.mc_num, gens(),  # noqa: E731
                                    batch_size=args.batch_size)[0]
    looped = lambda: [per_sample_nll(model, adapter, s, target, args.mc_num, gi) for s, gi in zip(seqs, gens())]  # noqa: E731
    batched(), looped()  # warm-up
    nll_b, t_b = best_time(batched, args.repeats)
    nll_l, t_l = best_time(looped, args.repeats)
    worst = max(abs(a - b) / abs(b) for a, b in zip(nll_b, nll_l))
    tokens = args.requests * args.mc_num * L

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"machine: {platform.machine()} {platform.processor() or ''} | {os.cpu_count()} CPUs | "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads | load avg {os.getloadavg()[0]:.2f}")
    print(f"workload: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
          f"{args.requests} requests x {args.mc_num} draws, {args.context}+{args.continuation} tokens, "
          f"batch {args.batch_size} rows; best of {args.repeats}")
    print(f"estimates agree: max relative difference {worst:.2e}")
    print(f"per-sample loop (1 draw / forward): {tokens / t_l:10.0f} tokens/s  ({t_l:.3f} s)")
    print(f"batched draws ({args.batch_size} rows / forward): {tokens / t_b:10.0f} tokens/s  ({t_b:.3f} s)")
    print(f"speed-up: {t_l / t_b:.1f}x")
    if worst > 1e-4:
        sys.exit("the two estimators disagree: the batched path is wrong")


if __name__ == "__main__":
    main()
