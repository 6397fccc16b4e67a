"""Calibration sets: token windows from text, masked for diffusion LMs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .text import mask_tokens, random_windows, read_text, token_stream


@dataclass
class CalibSet:
    """``input_ids`` (n, seqlen) as the model sees them (masked for dLLMs) and the clean ``targets``."""

    input_ids: torch.Tensor
    targets: torch.Tensor

    def batches(self, batch_size: int):
        for i in range(0, len(self.input_ids), batch_size):
            yield self.input_ids[i : i + batch_size]


def build_calib_set(tokenizer, source: str, nsamples: int, seqlen: int, seed: int,
                    mask_token_id: int | None = None, t_min: float = 0.0, t_max: float = 1.0,
                    max_chars: int | None = None, text_field: str = "text") -> CalibSet:
    """``nsamples`` random windows of ``seqlen`` tokens from ``source`` (its first ``max_chars``
    characters if given; ``text_field``: the column of a dataset source); masked with t ~ U(t_min, t_max) per sequence when ``mask_token_id`` is set."""
    ids = token_stream(tokenizer, read_text(source, max_chars, text_field))
    clean = random_windows(ids, nsamples, seqlen, seed)
    if mask_token_id is None:
        return CalibSet(clean, clean)
    g = torch.Generator().manual_seed(seed + 1)
    masked, _ = mask_tokens(clean, mask_token_id, g, t_min, t_max)
    return CalibSet(masked, clean)
