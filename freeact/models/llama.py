"""Adapters for LLaMA-layout decoders (LLaMA, Qwen2/2.5, SmolLM2) and the dLLMs built on them."""
from __future__ import annotations

from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from .adapter import Block, ModelAdapter, register_adapter
from .dllm import DreamModelLM, LLaDAModelLM


def llama_block(L) -> Block:
    """The parts of a LLaMA-layout decoder layer (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)."""
    a, m = L.self_attn, L.mlp
    return Block(L, a, L.input_layernorm, a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                 L.post_attention_layernorm, m.gate_proj, m.up_proj, m.down_proj)


@register_adapter(LlamaForCausalLM, Qwen2ForCausalLM)
class LlamaLikeAdapter(ModelAdapter):
    objective = "ar"

    def decoder(self):
        return self.model.model

    def layers(self):
        return self.model.model.layers

    def block(self, i):
        return llama_block(self.layers()[i])

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
