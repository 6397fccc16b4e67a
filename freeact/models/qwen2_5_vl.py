"""Adapter for Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

Layout in transformers 5.x: ``model.model.visual`` (vision transformer whose ``merger`` is the
patch-merging projector), ``model.model.language_model`` (``Qwen2_5_VLTextModel``: Qwen2
decoder layers with q/k/v biases and multimodal RoPE), ``model.lm_head``. Image and video
features replace the ``image_token_id`` / ``video_token_id`` placeholders (151655 / 151656 in
the released checkpoints; read from the config).
"""
from __future__ import annotations

from transformers import Qwen2_5_VLForConditionalGeneration

from .adapter import register_adapter
from .vlm import VisionLanguageAdapter


@register_adapter(Qwen2_5_VLForConditionalGeneration)
class Qwen2_5_VLAdapter(VisionLanguageAdapter):
    def vision_tower(self):
        return self.model.model.visual

    def projector(self):
        return self.model.model.visual.merger

    def projector_out(self):
        return self.projector().mlp[-1]

    def vision_placeholder_ids(self):
        c = self.vlm_config
        return [c.image_token_id, c.video_token_id]
