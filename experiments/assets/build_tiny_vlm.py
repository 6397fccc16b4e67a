"""Build the processor assets of the tiny Qwen2.5-VL shipped in ``freeact/assets/tiny_vlm/``.

The tiny vision-language model itself has random weights and is built from
``conf/model/tiny_vlm.yaml`` (``freeact.models.tiny.build_tiny("vlm", ...)``); this script
only writes what a processor needs, loadable offline with
``transformers.AutoProcessor.from_pretrained("freeact/assets/tiny_vlm")`` (transformers 5.x with
torchvision, which Qwen2.5-VL's video processor needs) or, without torchvision, with
``freeact.data.processor.load_processor`` (tokenizer + image processor, images only):

* the tokenizer is the shipped byte-level BPE (``freeact/assets/tokenizer``, ids 0..4095)
  extended with Qwen2.5-VL's chat and vision special tokens, ids 4096..4101:
  ``<|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>``;
  ``image_token`` / ``video_token`` / ``vision_start_token`` / ``vision_end_token`` are named
  in ``tokenizer_config.json`` so ``tokenizer.image_token_id`` works as for the real model;
* a Qwen2-VL style chat template (``chat_template.jinja``), no default system prompt;
* ``Qwen2VLImageProcessor`` with patch 14, spatial merge 2, temporal patch 2 and small
  ``min_pixels`` / ``max_pixels`` (56x56 .. 112x112): an image becomes at most 8x8 patches,
  i.e. at most 16 ``<|image_pad|>`` tokens after the 2x2 merge;
* ``Qwen2VLVideoProcessor`` settings of the same size and ``processor_config.json`` naming
  ``Qwen2_5_VLProcessor``.

Usage::

    python experiments/assets/build_tiny_vlm.py
"""

import json
from pathlib import Path

from transformers import AutoTokenizer

ASSETS = Path(__file__).resolve().parents[2] / "freeact" / "assets"
OUT = ASSETS / "tiny_vlm"
PATCH, MERGE, TEMPORAL = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
         "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_processor_assets(tok, out: Path, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> list[int]:
    """Add Qwen2.5-VL's special tokens to ``tok`` (those it lacks) and write the tokenizer, chat
    template and image/video processor files of a Qwen2.5-VL processor to ``out``. Returns the
    ids of :data:`SPECIAL`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    ids = tok.convert_tokens_to_ids(SPECIAL)
    tok.chat_template = None
    tok.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    for key in ("is_local", "local_files_only", "chat_template"):  # where it was loaded from, not a setting
        cfg.pop(key, None)
    cfg.update(NAMED, tokenizer_class="PreTrainedTokenizerFast")
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    grid = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                min_pixels=min_pixels, max_pixels=max_pixels,
                size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                image_mean=MEAN, image_std=STD, do_convert_rgb=True, do_normalize=True, do_rescale=True,
                do_resize=True, rescale_factor=1 / 255, resample=3)
    for name, obj in (("preprocessor_config.json", {"image_processor_type": "Qwen2VLImageProcessor",
                                                    "processor_class": "Qwen2_5_VLProcessor", **grid}),
                      ("video_preprocessor_config.json", {"video_processor_type": "Qwen2VLVideoProcessor",
                                                          "processor_class": "Qwen2_5_VLProcessor", **grid}),
                      ("processor_config.json", {"processor_class": "Qwen2_5_VLProcessor"})):
        (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    check = AutoTokenizer.from_pretrained(out)
    assert check.image_token_id == ids[SPECIAL.index(NAMED["image_token"])], check.image_token_id
    return ids


def main():
    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    ids = write_processor_assets(tok, OUT)
    assert ids == list(range(4096, 4096 + len(SPECIAL))), ids
    print(f"saved {OUT}: vocab {len(tok)}, special ids {dict(zip(SPECIAL, ids))}")


if __name__ == "__main__":
    main()
