"""Online activation pipeline on a linear layer's input: optional transform, then fake quant.

One hook point per linear: :func:`attach_input_quantizer` registers an :class:`InputQuantizer`
as the child ``input_quantizer`` of an ``nn.Linear`` plus a forward pre-hook that replaces the
input by ``input_quantizer(x)``. The weight-side counterpart of any transform is fused into the
weight offline by the method that installed it, so the model's module tree and weight names
stay those of the original model.
"""
from __future__ import annotations

import torch
from torch import nn

from .quantizer import QuantSpec, fake_quant

_HOOK_ATTR = "_freeact_input_hook"


class InputQuantizer(nn.Module):
    """``x -> Q(transform(x))``. ``learnable_clip`` adds FlatQuant's scalar clip ``sigmoid(logit)``."""

    def __init__(self, spec: QuantSpec, transform: nn.Module | None = None, learnable_clip: bool = False,
                 clip_init: float = 4.0):
        super().__init__()
        self.spec = spec
        self.transform = transform
        self.quantize = True  # switched off while collecting full-precision targets
        self.clip_logit = nn.Parameter(torch.tensor([clip_init])) if learnable_clip else None

    def clip(self):
        return None if self.clip_logit is None else torch.sigmoid(self.clip_logit) * self.spec.clip_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = self.transform(x)
        if self.quantize and self.spec.enabled:
            x = fake_quant(x, self.spec, clip=self.clip())
        return x

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, sym={self.spec.symmetric}, gran={self.spec.granularity}"


def _pre_hook(module: nn.Linear, args):
    return (module.input_quantizer(args[0]),) + tuple(args[1:])


def attach_input_quantizer(linear: nn.Linear, iq: InputQuantizer) -> InputQuantizer:
    """Install (or replace) the input pipeline of ``linear``."""
    linear.input_quantizer = iq
    if getattr(linear, _HOOK_ATTR, None) is None:
        setattr(linear, _HOOK_ATTR, linear.register_forward_pre_hook(_pre_hook))
    return iq


def detach_input_quantizer(linear: nn.Linear) -> None:
    handle = getattr(linear, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(linear, _HOOK_ATTR)
    if "input_quantizer" in linear._modules:
        del linear._modules["input_quantizer"]


def input_quantizers(model: nn.Module):
    """All installed input pipelines, by the name of the linear that owns them."""
    return {n[: -len(".input_quantizer")]: m for n, m in model.named_modules() if isinstance(m, InputQuantizer)}


def set_act_quant(model: nn.Module, enabled: bool) -> None:
    """Switch activation quantization on or off everywhere (transforms stay on)."""
    for m in model.modules():
        if isinstance(m, InputQuantizer):
            m.quantize = enabled
        elif hasattr(m, "quantize_kv"):  # the KV-cache quantizer of a QKVHook
            m.quantize_kv = enabled
