"""Adapter for InternVL in the transformers-native format (``InternVLForConditionalGeneration``,
the ``*-hf`` checkpoints such as ``OpenGVLab/InternVL2_5-8B-MPO-hf``).

Layout in transformers 5.x: ``model.model.vision_tower`` (InternViT),
``model.model.multi_modal_projector`` (LayerNorm -> linear_1 -> GELU -> linear_2),
``model.model.language_model`` (an ``AutoModel`` of ``text_config``: a LLaMA-layout decoder,
Qwen2 or InternLM2 converted to LLaMA names), ``model.lm_head``. Image features replace the
``<IMG_CONTEXT>`` placeholders, ``config.image_token_id``.
"""
from __future__ import annotations

from transformers import InternVLForConditionalGeneration

from .adapter import register_adapter
from .vlm import VisionLanguageAdapter


@register_adapter(InternVLForConditionalGeneration)
class InternVLAdapter(VisionLanguageAdapter):
    def vision_tower(self):
        return self.model.model.vision_tower

    def projector(self):
        return self.model.model.multi_modal_projector

    def projector_out(self):
        return self.projector().linear_2

    def vision_placeholder_ids(self):
        return [self.vlm_config.image_token_id]
