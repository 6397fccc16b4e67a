"""Methods without transforms: full precision, round-to-nearest, GPTQ."""
from __future__ import annotations

from .base import Method, register_method


@register_method("fp16")
class FullPrecision(Method):
    """No quantization at all (the row's bit settings are ignored)."""

    quantizes = False


@register_method("rtn")
class RTN(Method):
    def __init__(self, cfg=None):
        super().__init__({"weight_algo": "rtn", **(cfg or {})})


@register_method("gptq")
class GPTQ(Method):
    def __init__(self, cfg=None):
        super().__init__({"weight_algo": "gptq", **(cfg or {})})
