"""easy-VQA (PyPI ``easy-vqa`` 1.0, MIT): 64x64 images of one coloured shape each, with
yes/no, colour and shape questions; 4,000 train / 1,000 test images, 38,575 / 9,673 questions,
13 one-word answers. The package ships the images, so this is a real benchmark that needs no
download; it trains and scores ``testbed_vlm``.

``source: easy_vqa/train`` or ``easy_vqa/test`` in a calibration or evaluation config stands for
the records of that split (:func:`freeact.data.vqa_sources.resolve_source` writes them once as a
JSONL folder into the cache; the image paths point into the installed package).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

SPLITS = ("train", "test")
PREFIX = "easy_vqa/"
# answers by question kind (from the package's answers.txt)
YES_NO = ("yes", "no")
SHAPES = ("circle", "rectangle", "triangle")


def is_easy_vqa(source: str) -> bool:
    return str(source).startswith(PREFIX)


def _package():
    try:
        import easy_vqa
    except ImportError as e:
        raise ImportError("easy-vqa is not installed: pip install -e .[real] (or pip install easy-vqa==1.0)") from e
    return easy_vqa


def answer_kind(answer: str) -> str:
    return "yes/no" if answer in YES_NO else "shape" if answer in SHAPES else "colour"


def records(split: str) -> list[dict]:
    """The questions of ``split`` as freeact multimodal records (``type: open``), in the
    package's order; ``id`` is ``split-index``, ``image_id`` the package's image number."""
    if split not in SPLITS:
        raise ValueError(f"easy-vqa split {split!r} must be one of {SPLITS}")
    ev = _package()
    questions, answers, image_ids = getattr(ev, f"get_{split}_questions")()
    paths = getattr(ev, f"get_{split}_image_paths")()
    return [{"id": f"{split}-{i}", "image": paths[im], "image_id": im, "prompt": q[0].upper() + q[1:],
             "answer": a, "kind": answer_kind(a), "type": "open"}
            for i, (q, a, im) in enumerate(zip(questions, answers, image_ids))]


def write_split(split: str, out_dir: str | Path) -> Path:
    """``out_dir/data.jsonl`` with the records of ``split`` (written last: a folder with it is complete)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "data.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records(split)), encoding="utf-8")
    tmp.replace(out / "data.jsonl")
    return out


def chance_accuracy(split: str = "test") -> dict:
    """Baselines without the image: a uniform guess among the answers of the question's kind,
    and the train split's most frequent answer for each question text."""
    test = records(split)
    kinds = Counter(r["kind"] for r in test)
    n_choices = {"yes/no": 2, "shape": len(SHAPES), "colour": 13 - 2 - len(SHAPES)}
    uniform = sum(c / n_choices[k] for k, c in kinds.items()) / len(test)
    by_q: dict[str, Counter] = {}
    for r in records("train"):
        by_q.setdefault(r["prompt"], Counter())[r["answer"]] += 1
    prior = sum(by_q.get(r["prompt"], Counter()).most_common(1)[0][0] == r["answer"]
                if r["prompt"] in by_q else 0 for r in test) / len(test)
    return {"uniform_within_kind": uniform, "question_prior": prior, "kinds": dict(kinds)}
