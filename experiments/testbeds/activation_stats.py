"""Input-channel outlier statistics of every block linear, optionally split by token type.

For one linear, the magnitude of input channel ``j`` is ``c_j = max_t |x_tj|`` over the tokens
``t`` seen; its outlier ratio is ``max_j c_j / median_j c_j`` (1 for a flat spectrum; LLMs reach
tens to thousands). Linears that share an input (q/k/v, gate/up) are reported once, as ``qkv``
and ``gate_up``. ``types`` (a (batch, seq) int tensor per batch) splits the tokens, e.g. masked
vs unmasked positions of a masked-diffusion LM.
"""
from __future__ import annotations

from collections import defaultdict

import torch

INPUT_GROUPS = {"qkv": "q", "o": "o", "gate_up": "up", "down": "down"}


class _Stat:
    def __init__(self):
        self.chan_max = None  # (d,) running max |x| per channel
        self.abs_sum = 0.0
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().abs().float().reshape(-1, x.shape[-1])
        if x.numel() == 0:
            return
        m = x.amax(0)
        self.chan_max = m if self.chan_max is None else torch.maximum(self.chan_max, m)
        self.abs_sum += x.sum().item()
        self.count += x.numel()

    def summary(self) -> dict:
        c = self.chan_max
        med = c.median().item()
        return {"ratio": c.max().item() / max(med, 1e-12), "max": c.max().item(), "median": med,
                "top_channel": int(c.argmax()), "mean_abs": self.abs_sum / max(self.count, 1)}


@torch.no_grad()
def input_channel_stats(model, adapter, batches: list[torch.Tensor], types: list[torch.Tensor] | None = None,
                        type_names: tuple[str, ...] = ()) -> dict:
    """``{(layer, group, type_name): summary}``; type_name ``"all"`` covers every token."""
    stats = defaultdict(_Stat)
    current = {}
    handles = []
    for i, block in enumerate(adapter.blocks()):
        for group, attr in INPUT_GROUPS.items():
            lin = getattr(block, attr)

            def hook(mod, args, i=i, group=group):
                x = args[0]
                stats[(i, group, "all")].add(x)
                t = current.get("types")
                if t is not None:
                    for k, name in enumerate(type_names):
                        stats[(i, group, name)].add(x[t == k])

            handles.append(lin.register_forward_pre_hook(hook))
    try:
        for b, x in enumerate(batches):
            current["types"] = None if types is None else types[b]
            model(input_ids=x, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v.summary() for k, v in stats.items() if v.chan_max is not None}
