"""Optional quantization of a VLM's vision side (``model.quantize_vision: true``).

The paper quantizes the language model only; the vision tower and the projector stay in full
precision. With the switch on, every linear of the vision tower and projector gets the same
activation fake-quant as the language model's linears (no transform) and round-to-nearest
weights, after the method has run on the language model.
"""
from __future__ import annotations

from ..quant.act import InputQuantizer, attach_input_quantizer
from ..quant.rtn import rtn_quantize_weight


def quantize_vision_rtn(adapter, quant) -> dict:
    """RTN weights (``quant.weight``) and activation fake-quant (``quant.act``) on
    ``adapter.vision_linears()``; returns info for the result row."""
    if not hasattr(adapter, "vision_linears"):
        raise TypeError(f"{type(adapter).__name__} has no vision side to quantize")
    linears = adapter.vision_linears()
    for lin in linears.values():
        attach_input_quantizer(lin, InputQuantizer(quant.act))
        lin.weight.data = rtn_quantize_weight(lin.weight.data, quant.weight)
    return {"vision_linears_quantized": len(linears)}
