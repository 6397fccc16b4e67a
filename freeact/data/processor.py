"""The model's processor and batches of image-text prompts.

Prompts go through the processor's chat template with their images, so the image placeholder tokens are
expanded by the processor exactly as the model expects. A batch is the dict the processor returns
(``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` ...); call the
model with ``model(**batch)``.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .vqa_records import record_images


# -- processor --------------------------------------------------------------------------------
def load_processor(path: str | os.PathLike):
    """The model's processor (``AutoProcessor``). Qwen2-VL-family processors also need a video
    processor, which needs torchvision; without torchvision this returns an images-only
    :class:`GridImageProcessor` built from the same tokenizer and image processor files."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(str(path))
    image_processor = AutoImageProcessor.from_pretrained(str(path))
    if getattr(image_processor, "merge_size", None) is None:
        raise RuntimeError(f"the processor of {path} needs torchvision (pip install torchvision); the "
                           "torchvision-free fallback only knows grid image processors (Qwen2-VL family)")
    return GridImageProcessor(image_processor, AutoTokenizer.from_pretrained(str(path)))


class GridImageProcessor:
    """Images + text for Qwen2-VL-family models, without a video processor.

    Does what ``Qwen2_5_VLProcessor`` does for images: each image placeholder token in the text
    is repeated ``prod(image_grid_thw) / merge_size**2`` times (the number of merged patches the
    vision tower produces), then the text is tokenized; ``mm_token_type_ids`` is 1 at image
    placeholders and 0 elsewhere. On ``freeact/assets/tiny_vlm`` its outputs were checked to be
    identical to ``Qwen2_5_VLProcessor``'s (transformers 5.17 with torchvision), for 112x112 and
    for odd-sized images.
    """

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def __call__(self, images=None, text=None, padding=False, padding_side=None, return_tensors="pt", **kwargs):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        data = {}
        if images:
            data.update(self.image_processor(images=images, return_tensors=return_tensors))
            merge = self.image_processor.merge_size ** 2
            counts = iter((data["image_grid_thw"].prod(-1) // merge).tolist())
            try:
                texts = ["".join(part if i == 0 else self.image_token * next(counts) + part
                                 for i, part in enumerate(t.split(self.image_token))) for t in texts]
            except StopIteration:
                raise ValueError("more image placeholders in the text than images") from None
            if next(counts, None) is not None:
                raise ValueError("more images than image placeholders in the text")
        kw = {"padding_side": padding_side} if padding_side else {}
        enc = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **kw)
        data.update(enc)
        data["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return BatchFeature(data)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def prompt_text(processor, question: str, n_images: int = 1) -> str:
    """The model's chat prompt for ``n_images`` images then a question, ending where the answer starts."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# -- batches ----------------------------------------------------------------------------------
def encode_prompts(processor, records: list[dict], padding_side: str = "left") -> dict:
    """Prompt-only batch (for generation: left padding)."""
    images = [record_images(r) for r in records]
    return dict(processor(images=[im for ims in images for im in ims] or None,
                          text=[prompt_text(processor, r["prompt"], len(ims)) for r, ims in zip(records, images)],
                          padding=True, padding_side=padding_side, return_tensors="pt"))


def encode_with_continuations(processor, records: list[dict], continuations: list[str],
                              width: int | None = None) -> tuple[dict, list]:
    """Batch of ``prompt(record) + continuation`` rows, right-padded (to the longest row, or to ``width``
    when that is longer), and per row the ``(start, end)`` positions of the continuation tokens.

    The prompt (with its image) goes through the processor; the continuation is tokenized on
    its own and appended, so its tokens are the same whatever precedes them. Every per-token
    integer tensor the processor returns (same shape as ``input_ids``) is extended:
    ``attention_mask`` with 1, the others (e.g. ``mm_token_type_ids``) with 0 = text.
    """
    tok = tokenizer_of(processor)
    enc = encode_prompts(processor, records, padding_side="right")
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    per_token = [k for k, v in enc.items() if torch.is_tensor(v) and v.shape == ids.shape
                 and not v.is_floating_point() and k != "attention_mask"]
    rows, spans = [], []
    for b, cont in enumerate(continuations):
        c = torch.tensor(tok(cont, add_special_tokens=False)["input_ids"], dtype=ids.dtype)
        if c.numel() == 0:
            raise ValueError(f"record {records[b].get('id')}: empty continuation {cont!r}")
        n = int(mask[b].sum())
        rows.append({k: torch.cat([enc[k][b][mask[b]], torch.zeros_like(c) if k != "input_ids" else c])
                     for k in per_token})
        spans.append((n, n + c.numel()))
    width = max(max(end for _, end in spans), width or 0)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = dict(enc)
    for k in per_token:
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.stack([torch.nn.functional.pad(r[k], (0, width - r[k].numel()), value=fill) for r in rows])
    out["attention_mask"] = torch.stack([torch.arange(width) < end for _, end in spans]).long()
    return out, spans


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
