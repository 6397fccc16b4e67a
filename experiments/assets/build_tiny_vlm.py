"""Build the processor assets of the tiny Qwen2.5-VL shipped in ``freeact/assets/tiny_vlm/``.

The tiny vision-language model itself has random weights and is built from
``conf/model/tiny_vlm.yaml`` (``freeact.models.loading.build_tiny("vlm", ...)``); this script
only writes what a processor needs, loadable offline with
``transformers.AutoProcessor.from_pretrained("freeact/assets/tiny_vlm")`` (transformers 5.x with
torchvision, which Qwen2.5-VL's video processor needs) or, without torchvision, with
``freeact.data.multimodal.load_processor`` (tokenizer + image processor, images only):

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


def write_json(name: str, obj: dict) -> None:
    (OUT / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    ids = tok.convert_tokens_to_ids(SPECIAL)
    assert ids == list(range(4096, 4096 + len(SPECIAL))), ids
    tok.save_pretrained(OUT)
    cfg = json.loads((OUT / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):  # where it was loaded from, not a setting
        cfg.pop(key, None)
    cfg.update(NAMED, tokenizer_class="PreTrainedTokenizerFast")
    write_json("tokenizer_config.json", cfg)
    (OUT / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    grid = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
                image_mean=MEAN, image_std=STD, do_convert_rgb=True, do_normalize=True, do_rescale=True,
                do_resize=True, rescale_factor=1 / 255, resample=3)
    write_json("preprocessor_config.json", {"image_processor_type": "Qwen2VLImageProcessor",
                                            "processor_class": "Qwen2_5_VLProcessor", **grid})
    write_json("video_preprocessor_config.json", {"video_processor_type": "Qwen2VLVideoProcessor",
                                                  "processor_class": "Qwen2_5_VLProcessor", **grid})
    write_json("processor_config.json", {"processor_class": "Qwen2_5_VLProcessor"})
    check = AutoTokenizer.from_pretrained(OUT)
    assert check.image_token_id == ids[SPECIAL.index(NAMED["image_token"])], check.image_token_id
    print(f"saved {OUT}: vocab {len(check)}, special ids {dict(zip(SPECIAL, ids))}")


if __name__ == "__main__":
    main()
