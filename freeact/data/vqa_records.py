"""Image-text records for multimodal LLMs in a local JSONL format.

A dataset is a folder with one ``*.jsonl`` file (``data.jsonl`` if there are several), one JSON object per
line::

    {"image": "images/0001.png",   # path relative to the folder (or absolute)
     "prompt": "What colour is the shape?",
     "answer": "red",               # the reference answer
     "answers": ["red", ...],       # optional: several references (VQA annotators)
     "type": "open",                # open (VQA accuracy) | text (ANLS) | mc (multiple choice)
     "options": ["red", "blue"],    # type mc only; answer is one of them
     "id": "..."}                   # optional

Where the folders come from (a synthetic generator, the easy-vqa package): :mod:`freeact.data.vqa_sources`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

RECORD_TYPES = ("open", "text", "mc")


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
