"""lm-eval task YAMLs that run offline: ``dataset_path: json`` with ``data_files`` pointing at the
JSONL files in ``data/`` (paths relative to the YAML; :mod:`freeact.eval.harness` rewrites them
to absolute paths at run time). See ``data/LICENSES.md`` for where the data come from.

* ``freeact_mc``: multiple choice, ARC/HellaSwag/PIQA style (hand-written, 32 questions);
* ``freeact_mmlu_dev``: the 282 real MMLU dev questions, MMLU style;
* ``freeact_gsm8k``: the 1,319 real GSM8K test problems, exact match on the final number;
* ``freeact_humaneval``: HumanEval-style code completion, executed against unit tests
  (:mod:`freeact.eval.tasks.utils`), 12 hand-written problems.
"""
