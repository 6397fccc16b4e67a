"""The post-RoPE hook point of attention: Q/K/V transforms and KV-cache quantization.

transformers routes every attention call through ``ALL_ATTENTION_FUNCTIONS`` keyed by
``config._attn_implementation``. We register one more implementation, ``"freeact"``, that
applies the attention module's ``qkv_hook`` (if any) to the post-RoPE query/key and the value,
then calls transformers' SDPA attention. Nothing is patched: the model simply selects this
attention function through its public ``set_attn_implementation`` API.
"""
from __future__ import annotations

from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .quantizer import QuantSpec, fake_quant

IMPL = "freeact"


class QKVHook(nn.Module):
    """Applied to (q, k, v) of shape (batch, heads, seq, head_dim) after RoPE.

    ``qk_transform``: optional module applied to q and k on the head dim (QuaRot's R3 Hadamard,
    FlatQuant's per-head K transform); it must be orthogonal so q k^T is unchanged.
    ``kv_spec``: fake quantization of K (after the transform) and V, over the head dim.
    """

    def __init__(self, kv_spec: QuantSpec | None = None, qk_transform: nn.Module | None = None):
        super().__init__()
        self.kv_spec = kv_spec
        self.qk_transform = qk_transform
        self.quantize_kv = True

    def forward(self, q, k, v):
        if self.qk_transform is not None:
            q, k = self.qk_transform(q), self.qk_transform(k)
        if self.quantize_kv and self.kv_spec is not None and self.kv_spec.enabled:
            k, v = fake_quant(k, self.kv_spec), fake_quant(v, self.kv_spec)
        return q, k, v


def _freeact_attention(module, query, key, value, attention_mask, **kwargs):
    hook = getattr(module, "qkv_hook", None)
    if hook is not None:
        query, key, value = hook(query, key, value)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPL, _freeact_attention)
AttentionMaskInterface.register(IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def install_qkv_hooks(model: nn.Module, attn_modules, make_hook) -> list[QKVHook]:
    """Give every attention module a ``qkv_hook = make_hook()`` and switch the model to the
    ``freeact`` attention implementation (SDPA underneath)."""
    hooks = []
    for attn in attn_modules:
        attn.qkv_hook = make_hook()
        hooks.append(attn.qkv_hook)
    if model.config._attn_implementation != IMPL:
        model.set_attn_implementation(IMPL)
    return hooks
