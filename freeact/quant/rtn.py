"""Round-to-nearest weight quantization (optionally with the MSE-optimal clip search)."""
from __future__ import annotations

import torch

from .quantizer import QuantSpec, fake_quant, search_clip


@torch.no_grad()
def rtn_quantize_weight(w: torch.Tensor, spec: QuantSpec, mse_clip: bool = False) -> torch.Tensor:
    """Return the dequantized RTN weight (same dtype as ``w``); computed in float32."""
    if not spec.enabled:
        return w
    wf = w.float()
    clip = search_clip(wf, spec) if mse_clip else None
    return fake_quant(wf, spec, clip=clip).to(w.dtype)
