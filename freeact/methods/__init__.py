"""Quantization methods: one file per method, one interface (:class:`Method`)."""
from . import baselines  # noqa: F401  (registers fp16, rtn, gptq)
from . import quarot, smoothquant, spinquant  # noqa: F401  (registers quarot, smoothquant, spinquant)
from . import flatquant, freeact  # noqa: F401  (registers flatquant, freeact)
from .base import Method
from .context import QuantContext, QuantSettings
from .registry import get_method, method_names, register_method

__all__ = ["Method", "QuantContext", "QuantSettings", "get_method", "method_names", "register_method"]
