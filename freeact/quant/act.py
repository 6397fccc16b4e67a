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
    """``x -> Q(transform(x))``. ``learnable_clip`` adds FlatQuant's scalar clip ``sigmoid(logit)``.

    Linears that read the same input (q/k/v, gate/up) may share one instance (``consumers``: how many
    linears it is attached to). Without autograd, the output computed for the first of them is served to
    the others when they are called with the very same tensor (same object, not modified in place) and
    nothing else changed, then dropped once every consumer had it.
    """

    def __init__(self, spec: QuantSpec, transform: nn.Module | None = None, learnable_clip: bool = False,
                 clip_init: float = 4.0):
        super().__init__()
        self.spec = spec
        self.transform = transform
        self.quantize = True  # switched off while collecting full-precision targets
        self.clip_logit = nn.Parameter(torch.tensor([clip_init])) if learnable_clip else None
        self.consumers = 0  # linears it is attached to (attach_input_quantizer counts them)
        self._served = None  # (input, its version, state key, output, times served)

    def clip(self):
        return None if self.clip_logit is None else torch.sigmoid(self.clip_logit) * self.spec.clip_ratio

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The pipeline itself (no sharing)."""
        if self.transform is not None:
            x = self.transform(x)
        if self.quantize and self.spec.enabled:
            x = fake_quant(x, self.spec, clip=self.clip())
        return x

    def state_key(self) -> tuple:
        """Everything besides the input that the output depends on (a subclass adds its own)."""
        types = getattr(self.transform, "_memo_types", lambda: None)()
        return (self.quantize, types, tuple(t._version for t in self.parameters()),
                tuple(t._version for t in self.buffers()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.consumers <= 1 or (torch.is_grad_enabled() and x.requires_grad):
            return self.compute(x)
        key, c = self.state_key(), self._served
        if c is not None and c[0] is x and c[1] == x._version and _same_key(c[2], key):
            served = c[4] + 1
            self._served = None if served >= self.consumers else (*c[:4], served)
            return c[3]
        out = self.compute(x)
        self._served = (x, x._version, key, out, 1) if not out.requires_grad else None
        return out

    def __getstate__(self):
        state = super().__getstate__()
        state["_served"] = None
        return state

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, sym={self.spec.symmetric}, gran={self.spec.granularity}"


def _same_key(a: tuple, b: tuple) -> bool:
    """Equal state keys: tensors (token types) by identity, the rest by value."""
    return len(a) == len(b) and all(x is y or (not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor)
                                               and x == y) for x, y in zip(a, b))


def _pre_hook(module: nn.Linear, args):
    return (module.input_quantizer(args[0]),) + tuple(args[1:])


def attach_input_quantizer(linear: nn.Linear, iq: InputQuantizer) -> InputQuantizer:
    """Install (or replace) the input pipeline of ``linear``; one pipeline may serve several linears."""
    old = linear._modules.get("input_quantizer")
    if old is iq:
        return iq
    if isinstance(old, InputQuantizer):
        old.consumers -= 1
    linear.input_quantizer = iq
    iq.consumers += 1
    if getattr(linear, _HOOK_ATTR, None) is None:
        setattr(linear, _HOOK_ATTR, linear.register_forward_pre_hook(_pre_hook))
    return iq


def detach_input_quantizer(linear: nn.Linear) -> None:
    handle = getattr(linear, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(linear, _HOOK_ATTR)
    if "input_quantizer" in linear._modules:
        linear._modules.pop("input_quantizer").consumers -= 1


def input_quantizers(model: nn.Module):
    """All installed input pipelines, by the name of the linear that owns them (a shared one under each)."""
    return {n[: -len(".input_quantizer")]: m for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, InputQuantizer) and n.endswith(".input_quantizer")}


def set_act_quant(model: nn.Module, enabled: bool) -> None:
    """Switch activation quantization on or off everywhere (transforms stay on)."""
    for m in model.modules():
        if isinstance(m, InputQuantizer):
            m.quantize = enabled
        elif hasattr(m, "quantize_kv"):  # the KV-cache quantizer of a QKVHook
            m.quantize_kv = enabled
