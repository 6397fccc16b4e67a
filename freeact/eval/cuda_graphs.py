"""A model's forward replayed from CUDA graphs, one per input shape.

A fake-quantized forward launches more, smaller kernels than a bf16 one, and at a few thousand tokens the
host can fall behind the GPU (the operators' host time then shows as GPU idle time). Captured once per input
shape, a forward costs one graph launch on the host, and its time is the GPU's. Evaluations whose batches
repeat a shape (fixed-length likelihood batches, benchmarks) gain; a shape seen once only pays the capture.

Requirements of the captured forward, as for any CUDA graph: no host synchronisation inside it (the
fake-quant pipelines read their learned clip once, outside; the token types are tensor ops) and no
tensors created on the host per call. The returned logits live in the graphs' shared memory pool and are
valid until the next call (of any shape: the graphs share one pool, so a replay may write where another
graph's output lies): copy them to keep them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GraphedForward"]


class GraphedForward:
    """``GraphedForward(model)(input_ids)`` returns ``model(input_ids=..., use_cache=False).logits``, from a
    CUDA graph captured at the first call with that shape (after ``warmup`` eager forwards on a side stream,
    as CUDA graph capture needs). On a CPU input it is the plain forward. ``release()`` frees the graphs."""

    def __init__(self, model: nn.Module, warmup: int = 2):
        self.model = model
        self.warmup = int(warmup)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self._pool = None

    def _forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> Tensor:
        if not input_ids.is_cuda:
            return self._forward(input_ids)
        key = (tuple(input_ids.shape), input_ids.dtype, input_ids.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(input_ids)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(input_ids)
        graph.replay()
        return static_out

    def _capture(self, input_ids: Tensor):
        static_in = input_ids.clone()
        side = torch.cuda.Stream(device=input_ids.device)
        side.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._forward(static_in)
        torch.cuda.current_stream(input_ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._forward(static_in)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, static_in, static_out

    @property
    def shapes(self) -> list[tuple]:
        """The input shapes captured so far."""
        return [k[0] for k in self._graphs]

    def release(self) -> None:
        self._graphs.clear()
        self._pool = None
