"""Image-text data for multimodal LLMs: a local JSONL format, a synthetic VQA generator, the
model's processor, and batches for calibration and scoring.

Local format: a folder with one ``*.jsonl`` file (``data.jsonl`` if there are several), one JSON
object per line::

    {"image": "images/0001.png",   # path relative to the folder (or absolute)
     "prompt": "What colour is the shape?",
     "answer": "red",               # the reference answer
     "answers": ["red", ...],       # optional: several references (VQA annotators)
     "type": "open",                # open (VQA accuracy) | text (ANLS) | mc (multiple choice)
     "options": ["red", "blue"],    # type mc only; answer is one of them
     "id": "..."}                   # optional

``source: easy_vqa/train`` or ``easy_vqa/test`` stands for a split of the easy-vqa package
(:mod:`freeact.data.easy_vqa`). ``source: synthetic`` (calibration and evaluation configs) stands for a folder written by
:func:`generate_synthetic_vqa` into the cache (``$FREEACT_CACHE`` or ``~/.cache/freeact``):
rendered shapes, colours, numbers and bar charts with questions whose answers are known from
how the image was drawn, so calibration and an offline benchmark need no download.

Prompts go through the processor's chat template with one image, so the image placeholder
tokens are expanded by the processor exactly as the model expects. A batch is the dict the
processor returns (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``,
``mm_token_type_ids`` ...), right-padded; call the model with ``model(**batch)``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

RECORD_TYPES = ("open", "text", "mc")
SYNTHETIC = "synthetic"
SYNTHETIC_VERSION = 1  # part of the cache path: bump when generate_synthetic_vqa draws differently


# -- local JSONL folders ----------------------------------------------------------------------
def jsonl_file(source: str | os.PathLike) -> Path:
    """The JSONL file of a dataset folder (or the file itself)."""
    p = Path(source).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"multimodal data {source}: no such folder or JSONL file")
    files = sorted(p.glob("*.jsonl"))
    if (p / "data.jsonl").exists():
        return p / "data.jsonl"
    if len(files) != 1:
        raise FileNotFoundError(f"multimodal data {source}: expected data.jsonl or exactly one *.jsonl, "
                                f"found {[f.name for f in files]}")
    return files[0]


def load_records(source: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Read and check the records of a JSONL dataset; image paths become absolute."""
    path = jsonl_file(source)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            where = f"{path}:{lineno}"
            for key in ("image", "prompt", "answer"):
                if key not in r:
                    raise ValueError(f"{where}: record has no {key!r} field")
            r.setdefault("type", "open")
            if r["type"] not in RECORD_TYPES:
                raise ValueError(f"{where}: type={r['type']!r} must be one of {RECORD_TYPES}")
            if r["type"] == "mc" and r["answer"] not in r.get("options", []):
                raise ValueError(f"{where}: a multiple-choice record needs options that contain its answer")
            image = Path(r["image"]).expanduser()
            r["image"] = str(image if image.is_absolute() else path.parent / image)
            r.setdefault("id", str(lineno))
            records.append(r)
            if limit and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def load_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def record_images(record: dict) -> list:
    """The images of a record, in prompt order: ``image`` is a path, a PIL image, a list of
    them, or None (a text-only prompt)."""
    image = record.get("image")
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    return [load_image(im) if isinstance(im, (str, os.PathLike)) else im.convert("RGB") for im in images]


# -- synthetic VQA ----------------------------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 50, 170), "orange": (245, 130, 20), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
KINDS = ("colour", "shape", "count", "number", "bar_chart", "colour_choice")


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _synthetic_item(kind: str, rng: random.Random, size: int):
    """One image and its question/answer; the answer follows from how the image was drawn."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    m = size // 8
    if kind in ("colour", "shape", "colour_choice"):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        s = rng.randint(size // 2, size - 2 * m)
        x, y = rng.randint(m, size - m - s), rng.randint(m, size - m - s)
        _draw_shape(draw, shape, (x, y, x + s, y + s), COLOURS[colour])
        if kind == "shape":
            return im, {"prompt": "What shape is in the image? Answer with one word.", "answer": shape}
        if kind == "colour":
            return im, {"prompt": "What colour is the shape? Answer with one word.", "answer": colour}
        options = rng.sample(sorted(set(COLOURS) - {colour}), 3) + [colour]
        rng.shuffle(options)
        return im, {"prompt": "What colour is the shape?", "answer": colour, "options": options, "type": "mc"}
    if kind == "count":
        n, colour = rng.randint(1, 4), rng.choice(sorted(COLOURS))
        cells = rng.sample(range(4), n)  # one shape per quadrant: they never overlap
        half = size // 2
        for c in cells:
            cx, cy = (c % 2) * half, (c // 2) * half
            s = rng.randint(half // 2, half - m)
            x, y = cx + rng.randint(m // 2, half - s - m // 2), cy + rng.randint(m // 2, half - s - m // 2)
            _draw_shape(draw, rng.choice(SHAPES), (x, y, x + s, y + s), COLOURS[colour])
        return im, {"prompt": "How many shapes are there? Answer with a number.", "answer": str(n),
                    "answers": [str(n), NUMBER_WORDS[n]]}
    if kind == "number":
        number = str(rng.randint(0, 999))
        font = ImageFont.load_default(size=size // 3)
        draw.text((size // 2, size // 2), number, fill=(0, 0, 0), font=font, anchor="mm")
        return im, {"prompt": "What number is written in the image?", "answer": number, "type": "text"}
    if kind == "bar_chart":
        labels = ["A", "B", "C", "D"][: rng.randint(3, 4)]
        heights = rng.sample(range(2, 10), len(labels))  # distinct: one tallest bar
        font = ImageFont.load_default(size=max(8, size // 10))
        w = (size - 2 * m) // len(labels)
        base = size - m - size // 10
        for i, (lab, h) in enumerate(zip(labels, heights)):
            x0 = m + i * w + w // 6
            top = base - h * (base - m) // 10
            draw.rectangle((x0, top, x0 + 2 * w // 3, base), fill=COLOURS["blue"])
            draw.text((x0 + w // 3, base + 1), lab, fill=(0, 0, 0), font=font, anchor="mt")
        answer = labels[heights.index(max(heights))]
        return im, {"prompt": "Which bar is the tallest?", "answer": answer, "options": labels, "type": "mc"}
    raise ValueError(f"unknown synthetic item kind {kind!r}; known: {KINDS}")


def generate_synthetic_vqa(out_dir: str | os.PathLike, n: int, seed: int, size: int = 112) -> Path:
    """Write ``n`` synthetic VQA items (``images/*.png`` + ``data.jsonl``) to ``out_dir``.

    Kinds cycle through :data:`KINDS` (colour, shape, count: open VQA; number: text / ANLS;
    bar chart and colour choice: multiple choice). Same ``(n, seed, size)``, same files."""
    if n <= 0:
        raise ValueError(f"n={n} must be > 0")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        im, rec = _synthetic_item(kind, rng, size)
        name = f"images/{i:05d}.png"
        im.save(out / name)
        lines.append(json.dumps({"id": f"{kind}-{i}", "image": name, "type": "open", "kind": kind, **rec}))
    tmp = out / "data.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out / "data.jsonl")  # written last: a folder with data.jsonl is complete
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("FREEACT_CACHE", Path.home() / ".cache" / "freeact")).expanduser()


def resolve_source(source: str, n: int | None, seed: int) -> Path:
    """A dataset folder for ``source``: ``synthetic`` (generated once into the cache),
    ``easy_vqa/train`` / ``easy_vqa/test`` (the installed easy-vqa package's split, written once
    into the cache) or a path."""
    from . import easy_vqa

    if easy_vqa.is_easy_vqa(source):
        split = source[len(easy_vqa.PREFIX):]
        out = cache_dir() / "easy_vqa" / split
        return out if (out / "data.jsonl").exists() else easy_vqa.write_split(split, out)
    if source != SYNTHETIC:
        return jsonl_file(source).parent
    if not n:
        raise ValueError("a synthetic multimodal set needs nsamples > 0")
    out = cache_dir() / "synthetic_vqa" / f"v{SYNTHETIC_VERSION}_n{n}_seed{seed}"
    if not (out / "data.jsonl").exists():
        generate_synthetic_vqa(out, n, seed)
    return out


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


def encode_with_continuations(processor, records: list[dict], continuations: list[str]) -> tuple[dict, list]:
    """Batch of ``prompt(record) + continuation`` rows, right-padded, and per row the
    ``(start, end)`` positions of the continuation tokens.

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
    width = max(end for _, end in spans)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = dict(enc)
    for k in per_token:
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.stack([torch.nn.functional.pad(r[k], (0, width - r[k].numel()), value=fill) for r in rows])
    out["attention_mask"] = torch.stack([torch.arange(width) < end for _, end in spans]).long()
    return out, spans


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class MultimodalCalibSet:
    """Calibration data for a VLM: each item is one image with its prompt and reference answer.
    ``batches(n)`` yields processor dicts (call ``model(**batch)``), right-padded."""

    records: list[dict]
    processor: object

    def __len__(self) -> int:
        return len(self.records)

    def batches(self, batch_size: int):
        for i in range(0, len(self.records), batch_size):
            chunk = self.records[i : i + batch_size]
            yield encode_with_continuations(self.processor, chunk, [r["answer"] for r in chunk])[0]

    @cached_property
    def input_ids(self) -> torch.Tensor:
        """Token ids of every calibration sequence (right-padded), for token statistics such as
        the count of each token type. A forward pass needs the images too: use :meth:`batches`."""
        return next(self.batches(len(self.records)))["input_ids"]

    @property
    def targets(self) -> torch.Tensor:  # autoregressive: the inputs are the targets
        return self.input_ids


def build_mm_calib_set(processor, source: str, nsamples: int, seed: int) -> MultimodalCalibSet:
    """``nsamples`` records from ``source`` (``synthetic`` or a JSONL folder), a seeded sample
    when the folder has more."""
    records = load_records(resolve_source(source, nsamples, seed))
    if len(records) > nsamples:
        records = random.Random(seed).sample(records, nsamples)
    return MultimodalCalibSet(records, processor)
