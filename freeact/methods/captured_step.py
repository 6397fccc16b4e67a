"""A training step captured once in a CUDA graph and replayed for every batch: the host launches one graph
instead of each of the step's hundreds of small operators (block-wise training of small layers is launch
bound). Used by :func:`freeact.methods.block_training.layer_steps`."""
from __future__ import annotations

from typing import Callable

import torch


def tensors(obj) -> list:
    """The tensors of a (nested) kwargs structure, in a fixed order."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors(v)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in tensors(obj[k])]
    return []


def layout(obj):
    """What must agree between batches for one captured step to serve them all: structure, tensor shapes,
    dtypes and devices, and the non-tensor values."""
    if torch.is_tensor(obj):
        return ("T", tuple(obj.shape), obj.dtype, str(obj.device))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(layout(v) for v in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, layout(obj[k])) for k in sorted(obj)))
    return ("V", repr(obj))


class CapturedStep:
    """One training step (forward, loss, backward, optimizer update) captured once in a CUDA graph and then
    replayed, each batch copied into the graph's static inputs first: the host launches one graph instead of
    every operator of the step. ``step(h, kw, y, types, valid) -> (out, loss)`` is the eager step; it must not
    synchronise with the host. The optimizer must be ``capturable`` with tensor learning rates."""

    def __init__(self, step: Callable, batch: tuple):
        self.static = tuple(_clone(x) for x in batch)
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, stream=capture_stream()):
            self.out, self.loss = step(*self.static)

    def __call__(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        for dst, src in zip(tensors(self.static), tensors(batch)):
            if dst is not src:
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.out, self.loss


def capture_stream() -> torch.cuda.Stream | None:
    """The stream to capture on: the current one when it is a stream of its own (layers in flight), else
    None (torch's capture stream). A captured matrix product keeps the cuBLAS workspace of the stream it was
    captured on; two graphs captured on one stream and replayed at once on two streams would share it (a race
    that corrupts both layers' steps). Capturing each layer on its own stream, and replaying it there, cannot."""
    current = torch.cuda.current_stream()
    return None if current == torch.cuda.default_stream(current.device) else current


def _clone(obj):
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_clone(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj
