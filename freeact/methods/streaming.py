"""Layer-wise streaming calibration: the model stays on the CPU, one decoder layer at a time on the device.

Block-by-block methods (GPTQ, FlatQuant, FreeAct, and QuaRot's GPTQ step) only ever need the
current decoder layer and the cached hidden states on the compute device. With
``QuantContext(streaming=True)`` every :meth:`Method.apply` runs inside :func:`streaming_context`:

* the modules outside the decoder layers (embeddings, rotary tables, final norm, LM head) move to
  ``ctx.device``; the decoder layers stay on (or move to) the CPU;
* a forward pre-hook on every decoder layer pages it in when it is called (the previously resident
  layer goes back to the CPU first), so exactly one layer is on the device at any time and a
  block-wise loop moves each layer once; :meth:`LayerStreamer.resident` pages a layer in explicitly
  for work that calls no forward (RTN, GPTQ's Hessians);
* calibration hidden states stay where the capture put them: on the device (``stream_cache="device"``,
  the default) or, for GPTQ, in pinned CPU memory (``stream_cache="pinned"``): the hook then moves a
  layer's CPU input to the device and returns its output to pinned CPU memory (outside autograd; the
  learned methods keep their cache on the device). Everything stays in the model's dtype (bf16 on a
  GPU), as the non-streaming path keeps it;
* on exit the resident layer and the other modules go back to the CPU: the model ends where it began.

The numbers are those of the non-streaming path (same modules, same order, same device for the
arithmetic). Full-model forwards (SmoothQuant's statistics, SpinQuant's training) also work but page
every layer in once per forward.

:class:`LayerTimeline` records, for cost measurements, when each decoder layer first completes a
forward (its calibration starts there) without moving anything.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn
from torch.profiler import record_function

__all__ = ["CACHES", "LayerStreamer", "LayerTimeline", "active_streamer", "streaming_context", "resident"]

CACHES = ("device", "pinned")
_ATTR = "_freeact_streamer"


def active_streamer(model: nn.Module) -> "LayerStreamer | None":
    """The streamer currently managing ``model``, if any."""
    return model.__dict__.get(_ATTR)


def _move_own_tensors(module: nn.Module, device) -> None:
    """Move the parameters and buffers owned directly by ``module`` (not its children), in place."""
    for p in module._parameters.values():
        if p is not None and p.device != torch.device(device):
            p.data = p.data.to(device)
    for k, b in module._buffers.items():
        if b is not None and b.device != torch.device(device):
            module._buffers[k] = b.to(device)


def _to(obj, device, pinned: bool = False):
    """Move every tensor in ``obj`` (tensor, tuple, list, dict) to ``device``."""
    if torch.is_tensor(obj):
        if pinned and device == "cpu":
            buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=torch.cuda.is_available())
            return buf.copy_(obj)
        return obj.to(device, non_blocking=obj.is_pinned())
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, pinned) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, pinned) for k, v in obj.items()}
    return obj


def _has_cpu_tensor(obj) -> bool:
    if torch.is_tensor(obj):
        return obj.device.type == "cpu"
    if isinstance(obj, (tuple, list)):
        return any(_has_cpu_tensor(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_cpu_tensor(o) for o in obj.values())
    return False


class LayerStreamer:
    """Context manager: keep ``model`` on the CPU and page decoder layers onto ``device`` one at a time."""

    def __init__(self, model: nn.Module, adapter, device, cache: str = "device"):
        if cache not in CACHES:
            raise ValueError(f"stream_cache must be one of {CACHES}, got {cache!r}")
        self.model, self.adapter, self.device, self.cache = model, adapter, torch.device(device), cache
        self.layers = list(adapter.layers())
        self.index = {id(l): i for i, l in enumerate(self.layers)}
        self.current: nn.Module | None = None
        self.page_ins = 0
        self._handles = []
        self._cpu_input = {}

    # -- paging -----------------------------------------------------------------------------------
    def page_in(self, layer: nn.Module) -> None:
        if layer is self.current:
            return
        if id(layer) not in self.index:
            raise ValueError("not a decoder layer of the streamed model")
        with record_function("streaming.page_in"):  # named in a profile (bench_cost --profile-calib)
            if self.current is not None:
                self.current.to("cpu")
            layer.to(self.device)
        self.current = layer
        self.page_ins += 1

    @contextmanager
    def resident(self, layer: nn.Module):
        """Page ``layer`` in for work that calls no forward (it stays resident afterwards)."""
        self.page_in(layer)
        yield layer

    # -- hooks ------------------------------------------------------------------------------------
    def _pre(self, layer, args, kwargs):
        self.page_in(layer)
        if self.cache == "pinned" and (_has_cpu_tensor(args) or _has_cpu_tensor(kwargs)):
            if torch.is_grad_enabled():
                raise RuntimeError("stream_cache='pinned' serves no-grad passes (GPTQ); block-wise training "
                                   "keeps its cache on the device (stream_cache='device')")
            self._cpu_input[id(layer)] = True
            return _to(args, self.device), _to(kwargs, self.device)
        self._cpu_input[id(layer)] = False
        return None

    def _post(self, layer, args, kwargs, output):
        if self._cpu_input.pop(id(layer), False):
            return _to(output, "cpu", pinned=True)
        return None

    # -- context ----------------------------------------------------------------------------------
    def _outside_modules(self):
        inside = {id(m) for l in self.layers for m in l.modules()}
        return [m for m in self.model.modules() if id(m) not in inside]

    def __enter__(self) -> "LayerStreamer":
        if active_streamer(self.model) is not None:
            raise RuntimeError("the model is streamed already")
        for m in self._outside_modules():
            _move_own_tensors(m, self.device)
        for l in self.layers:
            l.to("cpu")
        for l in self.layers:
            self._handles.append(l.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(l.register_forward_hook(self._post, with_kwargs=True))
        self.model.__dict__[_ATTR] = self
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.current is not None:
            self.current.to("cpu")
            self.current = None
        for m in self._outside_modules():
            _move_own_tensors(m, "cpu")
        self.model.__dict__.pop(_ATTR, None)


@contextmanager
def streaming_context(ctx):
    """Stream ``ctx.model`` while the block is open when ``ctx.streaming`` is set (re-entrant: an
    already streamed model is left to the outer context); otherwise do nothing."""
    if not getattr(ctx, "streaming", False) or active_streamer(ctx.model) is not None:
        yield active_streamer(ctx.model)
        return
    with LayerStreamer(ctx.model, ctx.adapter, ctx.device, getattr(ctx, "stream_cache", "device")) as s:
        yield s


@contextmanager
def resident(model: nn.Module, layer: nn.Module):
    """Page ``layer`` in when ``model`` is streamed; a no-op otherwise."""
    s = active_streamer(model)
    if s is None:
        yield layer
    else:
        with s.resident(layer):
            yield layer


class LayerTimeline:
    """Context manager recording when each decoder layer's calibration starts: the time of the first
    call of that layer whose forward completes (a capture that stops inside the layer's pre-hook does
    not count). ``segments()`` gives per-layer seconds (the last runs to :meth:`stop`)."""

    def __init__(self, adapter, sync: bool = True):
        self.layers = list(adapter.layers())
        self.sync = sync and torch.cuda.is_available()
        self.start: dict[int, float] = {}
        self._pending: dict[int, float] = {}
        self._handles = []
        self.t0 = self.t_end = None

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self) -> "LayerTimeline":
        for i, l in enumerate(self.layers):
            self._handles.append(l.register_forward_pre_hook(lambda m, a, i=i: self._pre(i), prepend=True))
            self._handles.append(l.register_forward_hook(lambda m, a, o, i=i: self._post(i)))
        self.t0 = self._now()
        return self

    def _pre(self, i: int) -> None:
        if i not in self.start:
            self._pending[i] = self._now()

    def _post(self, i: int) -> None:
        if i not in self.start and i in self._pending:
            self.start[i] = self._pending.pop(i)

    def stop(self) -> None:
        self.t_end = self._now()

    def __exit__(self, *exc) -> None:
        if self.t_end is None:
            self.stop()
        for h in self._handles:
            h.remove()
        self._handles = []

    def prefix(self) -> float:
        """Seconds before the first layer started (capture, fusions, rotations ...)."""
        first = min(self.start.values(), default=self.t_end)
        return first - self.t0

    def segments(self) -> list[float]:
        """Seconds from each started layer to the next one (the last one to :meth:`stop`)."""
        order = sorted(self.start.items(), key=lambda kv: kv[1])
        times = [t for _, t in order] + [self.t_end]
        return [b - a for a, b in zip(times[:-1], times[1:])]
