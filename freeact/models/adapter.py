"""Model adapters: where an architecture family keeps its embeddings, norms, linears and head.

One adapter class per architecture family, found by the MODEL CLASS (walking its MRO), never
by a name string. Methods only talk to a model through its adapter, so adding a family means
writing one adapter, not touching any method.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_REGISTRY: dict[type, type["ModelAdapter"]] = {}


def register_adapter(*model_classes: type):
    def deco(adapter_cls):
        for c in model_classes:
            _REGISTRY[c] = adapter_cls
        return adapter_cls

    return deco


def get_adapter(model: nn.Module) -> "ModelAdapter":
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](model)
    known = ", ".join(sorted(c.__name__ for c in _REGISTRY))
    raise TypeError(f"no freeact adapter for {type(model).__name__}; known model classes: {known}")


#: the linears of a block that read the same input, by the name of that input site
INPUT_SITES = {"qkv": ("q", "k", "v"), "mlp": ("gate", "up"), "down": ("down",), "o": ("o",)}


@dataclass
class Block:
    """The parts of one decoder layer that methods touch."""

    layer: nn.Module
    attn: nn.Module
    attn_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_norm: nn.Module
    gate: nn.Linear | None
    up: nn.Linear
    down: nn.Linear

    def linears(self) -> dict[str, nn.Linear]:
        names = ("q", "k", "v", "o", "gate", "up", "down")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class ModelAdapter:
    """Base adapter. Subclasses fill in the structure accessors."""

    #: "ar" (next-token) or "mdm" (masked diffusion: bidirectional, mask token, ELBO)
    objective: str = "ar"
    #: Dream-style dLLMs predict token i from position i-1 (AR-initialised); LLaDA does not
    shift_logits: bool = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- structure --------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        raise NotImplementedError

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def block(self, i: int) -> Block:
        raise NotImplementedError

    def blocks(self) -> list[Block]:
        return [self.block(i) for i in range(len(self.layers()))]

    def embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def lm_head(self) -> nn.Linear:
        raise NotImplementedError

    def residual_writers(self) -> list[nn.Linear]:
        """Linears outside the decoder blocks whose outputs enter the residual stream directly
        (besides the embedding table), e.g. a VLM's projector. Residual rotations rotate them too."""
        return []

    # -- geometry ---------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    # -- tokens -----------------------------------------------------------------------------
    @property
    def mask_token_id(self) -> int | None:
        return getattr(self.config, "mask_token_id", None)

    def token_type_ids(self) -> dict[str, list[int]]:
        """Input ids that define token types (e.g. ``{"mask": [126336]}``); empty for plain LMs."""
        return {"mask": [self.mask_token_id]} if self.objective == "mdm" else {}

    def logits(self, model_out) -> "torch.Tensor":  # noqa: F821
        """Logits aligned so that position i scores token i (mdm) or token i+1 (ar)."""
        return self.align_logits(model_out.logits)

    def align_logits(self, logits: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
        """:meth:`logits` for a ``(batch, length, vocab)`` logits tensor itself."""
        if self.shift_logits:
            import torch

            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits
