"""Methods without transforms: full precision, round-to-nearest, GPTQ."""
from __future__ import annotations

from .base import Method
from .registry import register_method


@register_method("fp16")
class FullPrecision(Method):
    """No quantization at all (the row's bit settings are ignored)."""

    quantizes = False


@register_method("rtn")
class RTN(Method):
    """Round-to-nearest weights (``weight_algo``) and activations, no transform."""


@register_method("gptq")
class GPTQ(Method):
    """GPTQ weights (the default ``weight_algo`` of its settings), RTN activations, no transform."""
