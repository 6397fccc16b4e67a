"""Adapters for LLaMA-layout decoders (LLaMA, Qwen2/2.5, SmolLM2) and the dLLMs built on them."""
from __future__ import annotations

from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from .adapter import Block, ModelAdapter, register_adapter
from .dllm import DreamModelLM, LLaDAModelLM


@register_adapter(LlamaForCausalLM, Qwen2ForCausalLM)
class LlamaLikeAdapter(ModelAdapter):
    objective = "ar"

    def decoder(self):
        return self.model.model

    def layers(self):
        return self.model.model.layers

    def block(self, i):
        L = self.layers()[i]
        a, m = L.self_attn, L.mlp
        return Block(L, a, L.input_layernorm, a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                     L.post_attention_layernorm, m.gate_proj, m.up_proj, m.down_proj)

    def embeddings(self):
        return self.model.model.embed_tokens

    def final_norm(self):
        return self.model.model.norm

    def lm_head(self):
        return self.model.lm_head


@register_adapter(LLaDAModelLM)
class LLaDAAdapter(LlamaLikeAdapter):
    objective = "mdm"
    shift_logits = False


@register_adapter(DreamModelLM)
class DreamAdapter(LlamaLikeAdapter):
    objective = "mdm"
    shift_logits = True
