"""Where image-text records come from: ``source: synthetic`` stands for a folder written by
:func:`generate_synthetic_vqa` into the cache (``$FREEACT_CACHE`` or ``~/.cache/freeact``): rendered shapes,
colours, numbers and bar charts with questions whose answers are known from how the image was drawn, so
calibration and an offline benchmark need no download; ``easy_vqa/train`` or ``easy_vqa/test`` stands for a
split of the easy-vqa package (:mod:`freeact.data.easy_vqa`); anything else is a folder in the JSONL format of
:mod:`freeact.data.vqa_records`.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from .vqa_records import jsonl_file

SYNTHETIC = "synthetic"
SYNTHETIC_VERSION = 1  # part of the cache path: bump when generate_synthetic_vqa draws differently


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
