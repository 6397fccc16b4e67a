"""Calibration data for multimodal LLMs: image-text records (:mod:`freeact.data.vqa_records`, from a
source of :mod:`freeact.data.vqa_sources`) encoded by the model's processor (:mod:`freeact.data.processor`)
with their reference answers appended, right-padded, one batch at a time.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

import torch

from .processor import encode_with_continuations
from .vqa_records import load_records
from .vqa_sources import resolve_source


@dataclass
class MultimodalCalibSet:
    """Calibration data for a VLM: each item is one image with its prompt and reference answer.
    ``batches(n)`` yields processor dicts (call ``model(**batch)``), every one right-padded to the longest
    item of the set (:attr:`width`): batches of one shape, so that a block-training step captured once as a
    CUDA graph serves them all; the padding enters no loss and no statistic (``attention_mask``)."""

    records: list[dict]
    processor: object

    def __len__(self) -> int:
        return len(self.records)

    def batches(self, batch_size: int):
        for chunk in self._chunks(batch_size):
            yield encode_with_continuations(self.processor, chunk, [r["answer"] for r in chunk], width=self.width)[0]

    def _chunks(self, batch_size: int):
        return (self.records[i : i + batch_size] for i in range(0, len(self.records), batch_size))

    @cached_property
    def width(self) -> int:
        """Tokens of the longest prompt + answer of the set."""
        return max(end for chunk in self._chunks(16)
                   for _, end in encode_with_continuations(self.processor, chunk, [r["answer"] for r in chunk])[1])

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
