"""Masked-diffusion LMs (LLaDA, Dream) as bidirectional versions of transformers' own classes.

LLaDA is a LLaMA decoder (RMSNorm, RoPE, SwiGLU, no biases) with full attention and a mask
token; Dream is a Qwen2.5 decoder with full attention, a mask token, and logits shifted right
by one. transformers builds a bidirectional mask when ``config.is_causal`` is False, so the
model classes below only fix their config: the modeling code is transformers' own.
Real checkpoints load through :mod:`freeact.models.loading` (LLaDA's own key names included).
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def _bidirectional(model):
    model.config.is_causal = False
    for m in model.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False


class LLaDAConfig(LlamaConfig):
    model_type = "freeact_llada"

    def __init__(self, mask_token_id: int = 126336, **kwargs):
        super().__init__(**kwargs)
        self.mask_token_id = mask_token_id
        self.is_causal = False


class LLaDAModelLM(LlamaForCausalLM):
    config_class = LLaDAConfig

    def __init__(self, config):
        super().__init__(config)
        _bidirectional(self)


class DreamConfig(Qwen2Config):
    model_type = "freeact_dream"

    def __init__(self, mask_token_id: int = 151666, **kwargs):
        super().__init__(**kwargs)
        self.mask_token_id = mask_token_id
        self.is_causal = False


class DreamModelLM(Qwen2ForCausalLM):
    config_class = DreamConfig

    def __init__(self, config):
        super().__init__(config)
        _bidirectional(self)


for _cfg, _model in ((LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModelLM)):
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, _model, exist_ok=True)
