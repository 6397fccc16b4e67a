"""The common adapter of vision-language models: a vision tower, a projector, a decoder-only LM.

Methods quantize the LANGUAGE model: ``layers()``, ``blocks()``, ``embeddings()``,
``final_norm()`` and ``lm_head()`` are the language model's, and the geometry
(``hidden_size``, heads, ``head_dim``) is read from the text config. The vision tower and the
projector stay in full precision unless a run asks for them (``vision_linears()``).

One thing is new compared with a text-only LM: the residual stream has a second writer
besides the token embeddings. The projector's last linear (``projector_out()``) writes the
image features into the positions of the image placeholder tokens, so a transform of the
residual stream (QuaRot / SpinQuant's R1) must be applied to that linear's output side exactly
as it is applied to the embedding rows. ``residual_writers()`` lists it.

Token types: ``token_type_ids()`` gives ``{"vision": [image/video placeholder ids]}``, so
``rules_from_names(adapter, ["vision", "text"])`` splits a sequence into image and text tokens.
"""
from __future__ import annotations

from torch import nn

from .adapter import ModelAdapter
from .llama import llama_block


class VisionLanguageAdapter(ModelAdapter):
    objective = "ar"
    shift_logits = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.vlm_config = model.config
        self.config = model.config.text_config  # geometry of the language model

    # -- where the parts live (subclasses) -----------------------------------------------------
    def language_model(self) -> nn.Module:
        """The decoder stack (``embed_tokens``, ``layers``, ``norm``)."""
        return self.model.model.language_model

    def vision_tower(self) -> nn.Module:
        raise NotImplementedError

    def projector(self) -> nn.Module:
        raise NotImplementedError

    def projector_out(self) -> nn.Linear:
        """The linear whose output is scattered into the residual stream at image positions."""
        raise NotImplementedError

    def vision_placeholder_ids(self) -> list[int]:
        raise NotImplementedError

    # -- ModelAdapter API ----------------------------------------------------------------------
    def decoder(self):
        return self.language_model()

    def layers(self):
        return self.language_model().layers

    def block(self, i):
        return llama_block(self.layers()[i])

    def embeddings(self):
        return self.language_model().embed_tokens

    def final_norm(self):
        return self.language_model().norm

    def lm_head(self):
        return self.model.lm_head

    @property
    def mask_token_id(self):
        return None

    def token_type_ids(self) -> dict[str, list[int]]:
        return {"vision": self.vision_placeholder_ids()}

    # -- vision side ---------------------------------------------------------------------------
    def residual_writers(self) -> list[nn.Linear]:
        """Linears outside the decoder blocks whose outputs enter the residual stream directly
        (besides the embedding table): rotate their output side with the residual stream."""
        return [self.projector_out()]

    def vision_linears(self) -> dict[str, nn.Linear]:
        """Every linear of the vision tower and the projector, by module name (for a run that
        also quantizes the vision side)."""
        out, seen = {}, set()
        for prefix, part in (("vision_tower", self.vision_tower()), ("projector", self.projector())):
            for name, mod in part.named_modules():
                if isinstance(mod, nn.Linear) and id(mod) not in seen:  # Qwen's projector is inside its tower
                    seen.add(id(mod))
                    out[f"{prefix}.{name}"] = mod
        return out
