"""Block-wise training of learnable transforms (FlatQuant, and FreeAct on the same machinery).

For every decoder layer in turn:

1. run the full-precision layer on the cached inputs: its outputs are the targets (and the next
   layer's inputs: the full-precision chain, as FlatQuant does); hooks collect the statistics the
   transforms are initialised from (per-channel max |x|, per-type covariances, post-RoPE Q/K);
2. the method builds a :class:`LayerPlan` (its transforms, clips, quantizers) and installs it in
   calibrating mode: online activation transforms + activation fake quant, weights transformed,
   clipped and fake-quantized on the fly;
3. AdamW on ``MSE(target, quantized layer output)`` (for FreeAct: per-type MSEs summed over the
   token types), cosine learning-rate schedule, clipping parameters at ``lr * clip_lr_mult``;
   padding tokens of multimodal calibration batches (``attention_mask == 0``) enter neither the
   loss nor any statistic (their token type is ``-1``);
4. the plan merges: weight sides into the weights (float64), activation sides frozen.

A non-finite loss raises :class:`NonFiniteLossError` naming the layer and the epoch, or with
``on_nonfinite="keep_last"`` restores the parameters of the last finite step, stops training that
layer and reports it in the returned info.
"""
from __future__ import annotations

import logging
import math
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn
from torch.profiler import record_function
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..config.methods import NONFINITE_MODES
from ..quant.kv import IMPL
from ..transforms.affine import OnlineMemo
from ..transforms.typed import TypeCovariance
from .blockwise import (capture_inputs, capture_layer0_inputs, layer_output, real_rows, real_token_masks,
                        types_in_use)
from .captured_step import CapturedStep, layout


log = logging.getLogger(__name__)

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class TrainConfig:
    epochs: int = 2
    lr: float = 5e-3
    clip_lr_mult: float = 10.0
    weight_decay: float = 0.0
    batch_size: int = 4
    min_lr_ratio: float = 1e-3  # cosine schedule ends at lr * min_lr_ratio (FlatQuant: 1e-3)
    on_nonfinite: str = "raise"
    loss_by_type: bool = False  # FreeAct: sum over token types of the per-type MSE
    amp: str = "off"  # the quantized layer's forward under autocast: bf16 | fp16 | off (loss in float32)
    cuda_graph: object = "auto"  # replay each step from a CUDA graph: auto (when possible) | True (required) | False
    layers_in_flight: int = 1  # layers trained at once, interleaved step by step (each on its own CUDA stream)

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0 or self.clip_lr_mult <= 0:
            raise ValueError(f"lr ({self.lr}) and clip_lr_mult ({self.clip_lr_mult}) must be positive")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.layers_in_flight < 1:
            raise ValueError(f"layers_in_flight must be >= 1, got {self.layers_in_flight}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {self.amp!r}")
        if self.on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {self.on_nonfinite!r}")


class LayerPlan(Protocol):
    """What a method builds for one layer."""

    info: dict

    def install(self) -> None: ...

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(transform parameters, clipping parameters)."""
        ...

    def merge(self) -> None: ...


# ----------------------------------------------------------------------------- statistics
@dataclass
class LayerStats:
    """Inputs statistics of one layer's linears (keyed by linear name: q, o, up, down)."""

    absmax: dict = field(default_factory=dict)
    cov: dict = field(default_factory=dict)  # name -> TypeCovariance (when asked for)
    q_cov: TypeCovariance | None = None  # post-RoPE queries / keys, per head vector
    k_cov: TypeCovariance | None = None
    dtype: torch.dtype = torch.float32


class _QKRecorder(nn.Module):
    """Stands in as ``attn.qkv_hook`` during the full-precision pass to record post-RoPE Q and K."""

    def __init__(self, stats: LayerStats, token_types, num_types: int):
        super().__init__()
        self.stats, self.token_types, self.num_types = stats, token_types, num_types

    def forward(self, q, k, v):
        t = _current_types(self.token_types, q.shape[0], q.shape[2], q.device)
        for x, name in ((q, "q_cov"), (k, "k_cov")):
            acc = getattr(self.stats, name)
            if acc is None:
                acc = TypeCovariance(x.shape[-1], self.num_types, x.device)
                setattr(self.stats, name, acc)
            h = x.shape[1]
            acc.add(x.transpose(1, 2), t.unsqueeze(-1).expand(-1, -1, h))
        return q, k, v


def _current_types(token_types, b: int, s: int, device) -> torch.Tensor:
    if token_types is None or token_types.current is None:
        return torch.zeros(b, s, dtype=torch.long, device=device)
    return token_types.current


@contextmanager
def _temp_attr(obj, name, value):
    had = name in obj.__dict__ or name in getattr(obj, "_modules", {})
    old = getattr(obj, name, None)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@torch.no_grad()
def full_precision_pass(block, hidden, kwargs, types, token_types, num_types: int, want_cov: bool,
                        want_qk_cov: bool, valid: list | None = None) -> tuple[list, LayerStats]:
    """Targets (the layer's outputs) and the statistics of its linears' inputs. ``valid``: per batch
    a ``(batch, seq)`` bool mask of real tokens (None: all real); padding enters no statistic."""
    stats = LayerStats(dtype=hidden[0].dtype)
    lins = {"q": block.q, "o": block.o, "up": block.up, "down": block.down}
    current = {"valid": None}

    def record(name, x):
        m = real_rows(x, current["valid"]).abs().amax(0).to(torch.float64)
        stats.absmax[name] = torch.maximum(stats.absmax[name], m) if name in stats.absmax else m
        if want_cov:
            if name not in stats.cov:
                stats.cov[name] = TypeCovariance(x.shape[-1], num_types, x.device)
            stats.cov[name].add(x, _current_types(token_types, x.shape[0], x.shape[1], x.device))

    recorder = _QKRecorder(stats, token_types, num_types) if want_qk_cov else None
    ctx = _temp_attr(block.attn, "qkv_hook", recorder) if recorder is not None else nullcontext()
    outs = []
    with capture_inputs(lins, record), ctx:
        for i, (h, kw) in enumerate(zip(hidden, kwargs)):
            current["valid"] = None if valid is None else valid[i]
            with types_in_use(token_types, None if types is None else types[i]):
                outs.append(layer_output(block.layer(h, **kw)))
    return outs, stats


# ----------------------------------------------------------------------------- loss
def blockwise_loss(out: torch.Tensor, target: torch.Tensor, types: torch.Tensor | None = None,
                   num_types: int = 1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over the real tokens (``valid``: ``(batch, seq)`` bool, None = all), or (``types`` given)
    the sum over token types of the per-type MSE: absent types add 0, type ``-1`` (padding) adds
    nothing. No host synchronisation."""
    per_tok = (out - target).pow(2).mean(-1)
    if types is None:
        if valid is None:
            return per_tok.mean()
        w = valid.to(per_tok)
        return (per_tok * w).sum() / w.sum().clamp(min=1)
    t = types.to(per_tok.device)
    if valid is not None:
        t = t.masked_fill(~valid.to(t.device), -1)
    loss = per_tok.new_zeros(())
    for k in range(num_types):
        sel = (t == k).to(per_tok)
        loss = loss + (per_tok * sel).sum() / sel.sum().clamp(min=1)
    return loss


def _type_index(types: torch.Tensor | None, valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Per token: its type (0 when untyped), -1 for padding."""
    t = torch.zeros(like.shape[:-1], dtype=torch.long, device=like.device) if types is None else types.to(like.device)
    return t if valid is None else t.masked_fill(~valid.to(t.device), -1)


# ----------------------------------------------------------------------------- training
def _cast_kwargs(kw: dict, dtype) -> dict:
    def cast(v):
        if torch.is_tensor(v) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, tuple):
            return tuple(cast(u) for u in v)
        return v

    return {k: cast(v) for k, v in kw.items()}


def float_layer(layer: nn.Module, hidden: list, kwargs: list) -> tuple[torch.dtype, list, list]:
    """Cast ``layer`` to float32 (float32 / float64 stay) for full-precision work, with its cached inputs;
    returns the layer's original dtype (cast it back afterwards) and the cast inputs."""
    orig = next(layer.parameters()).dtype
    dtype = orig if orig in (torch.float32, torch.float64) else torch.float32
    layer.to(dtype)
    return orig, [h.to(dtype) for h in hidden], [_cast_kwargs(k, dtype) for k in kwargs]


def _cosine(total: int, min_ratio: float):
    return lambda step: min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _set_lr(opt, base: list[float], factor: float) -> None:
    """Each group's learning rate = its base x ``factor`` (a tensor learning rate is filled in place: no
    host synchronisation, and a captured optimizer step reads the new value)."""
    for g, b in zip(opt.param_groups, base):
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(b * factor)
        else:
            g["lr"] = b * factor


def graph_obstacle(cfg: TrainConfig, hidden, kwargs, targets, types, valid) -> str | None:
    """Why the steps of this layer cannot be replayed from one CUDA graph (None: they can)."""
    if cfg.cuda_graph is False:
        return "method.cuda_graph=false"
    if cfg.on_nonfinite == "keep_last":
        return "on_nonfinite=keep_last checks every step on the host"
    if cfg.amp == "fp16":
        return "fp16 loss scaling checks every step on the host"
    first = layout((hidden[0], kwargs[0], targets[0], None if types is None else types[0],
                     None if valid is None else valid[0]))
    for j in range(1, len(hidden)):
        if layout((hidden[j], kwargs[j], targets[j], None if types is None else types[j],
                    None if valid is None else valid[j])) != first:
            return f"calibration batch {j} differs in shape from batch 0"
    if not hidden[0].is_cuda:
        return "not on a CUDA device"
    return None


GRAPH_WARMUP = 3  # eager steps (on a side stream) before the capture, as CUDA-graph capture asks


def layer_steps(layer: nn.Module, plan: LayerPlan, hidden, kwargs, types, targets, cfg: TrainConfig,
                index: int, token_types=None, num_types: int = 1, valid: list | None = None):
    """Optimise ``plan``'s parameters on one layer (``cfg.amp``: the layer's forward under autocast, the
    parameters, the optimizer and the loss in float32), as a generator that yields after every optimizer step
    (so that several layers' trainings can be interleaved: :func:`train_blockwise`, ``cfg.layers_in_flight``)
    and returns loss / step info, and ``err``: per token type (one entry when untyped), the relative
    block-output error ``sum |out - y|^2 / sum |y|^2`` over the last epoch. The host waits for the device once
    per layer (``on_nonfinite="raise"``: a non-finite loss is reported with its first epoch) or once per step
    (``keep_last``: the last finite step is restored). On a GPU, when every calibration batch has the same
    shapes, the steps after the first :data:`GRAPH_WARMUP` are replayed from a CUDA graph
    (:class:`CapturedStep`; ``cfg.cuda_graph``). Nothing of one step's state survives a yield but the layer's
    own: the token types in use and the parametrization cache are set and cleared within a step."""
    main, clips = plan.param_groups()
    base_lr = [lr for params, lr in ((main, cfg.lr), (clips, cfg.lr * cfg.clip_lr_mult)) if params]
    total = cfg.epochs * len(hidden)
    info = {"loss_first_epoch": float("nan"), "loss_last_epoch": float("nan"), "steps": 0, "nonfinite": None,
            "err": {}, "cuda_graph": "off", "seconds": 0.0}
    if not base_lr or total == 0:
        return info
    obstacle = graph_obstacle(cfg, hidden, kwargs, targets, types, valid)
    if cfg.cuda_graph is True and obstacle is not None:
        raise ValueError(f"method.cuda_graph=true but layer {index} cannot be captured: {obstacle}")
    if obstacle is None and total <= GRAPH_WARMUP:
        obstacle = f"{total} steps: all of them eager warm-up steps"
    graphed = obstacle is None
    device = hidden[0].device
    # a captured optimizer step reads its learning rate from a tensor the schedule fills in place
    lr = (lambda v: torch.tensor(v, dtype=torch.float32, device=device)) if graphed else float
    groups = [{"params": params, "lr": lr(b)} for params, b in zip([g for g in (main, clips) if g], base_lr)]
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    fused = all(p.is_cuda and p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused or None, capturable=graphed)
    amp_dtype = AMP_DTYPES[cfg.amp]
    autocast = ((lambda: torch.autocast(device.type, dtype=amp_dtype, cache_enabled=False))
                if amp_dtype is not None else nullcontext)
    # float16 needs loss scaling against gradient underflow; bfloat16 has float32's range
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    schedule = _cosine(total, cfg.min_lr_ratio)
    _set_lr(opt, base_lr, schedule(0))
    per_step = cfg.on_nonfinite == "keep_last"
    last_good = [p.detach().clone() for p in params] if per_step else None
    err_num = torch.zeros(max(num_types, 1), dtype=torch.float64, device=device)
    err_den = torch.zeros_like(err_num)

    memos = [m for m in layer.modules() if isinstance(m, OnlineMemo)]

    def step(h, kw, y, t, v):
        """Forward, loss, backward, update; ``t``: the batch's token types (None: untyped). Nothing of the
        step's autograd graph outlives it (detached outputs, memos cleared): a graph kept alive would tie the
        parameters' gradient accumulators to the stream it was built on, which a CUDA-graph capture cannot use."""
        try:
            return _step(h, kw, y, t, v)
        finally:
            for m in memos:
                m.clear_memo()

    def _step(h, kw, y, t, v):
        with parametrize.cached(), types_in_use(token_types, t):
            with autocast():
                out = layer_output(layer(h, **kw))
            out = out.to(y.dtype)  # the loss in the targets' (full) precision
            loss = blockwise_loss(out, y, t if cfg.loss_by_type else None, num_types, v)
            if per_step:
                if not torch.isfinite(loss):
                    return out.detach(), None
                with torch.no_grad():
                    for p, good in zip(params, last_good):
                        good.copy_(p)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return out.detach(), loss.detach()

    captured, side = None, (torch.cuda.Stream(device) if graphed else None)
    step_no = 0
    t_start = time.perf_counter()
    epoch_loss = torch.zeros(cfg.epochs, dtype=torch.float64, device=device)  # summed batch losses per epoch
    try:
        for epoch in range(cfg.epochs):
            running = epoch_loss[epoch]
            last_epoch = epoch == cfg.epochs - 1
            for j, (h, kw, y) in enumerate(zip(hidden, kwargs, targets)):
                batch = (h, kw, y, None if types is None else types[j], None if valid is None else valid[j])
                with record_function("block_training.step"):  # named in a profile (bench_cost --profile-calib)
                    if not graphed:
                        out, loss = step(*batch)
                    elif step_no < GRAPH_WARMUP:
                        side.wait_stream(torch.cuda.current_stream(device))
                        with torch.cuda.stream(side):
                            out, loss = step(*batch)
                        torch.cuda.current_stream(device).wait_stream(side)
                    else:
                        if captured is None:
                            try:
                                captured = CapturedStep(step, batch)
                            except RuntimeError as e:  # something in the step cannot be captured
                                if cfg.cuda_graph is True:
                                    raise
                                obstacle = f"capture failed: {str(e).splitlines()[0][:120]}"
                                first = e.__context__ or e  # the op that broke the capture, when it raised first
                                log.warning(f"layer {index}: {obstacle}; the remaining steps run eagerly\n"
                                            + "".join(traceback.format_exception(first)[-12:]))
                                graphed = False
                        out, loss = captured(batch) if graphed else step(*batch)
                if loss is None:  # keep_last: restore the last finite parameters, stop this layer
                    with torch.no_grad():
                        for p, good in zip(params, last_good):
                            p.copy_(good)
                    info["nonfinite"] = f"layer {index}, epoch {epoch}, batch {j} (step {step_no})"
                    info["steps"] = step_no
                    return info
                if last_epoch:
                    with torch.no_grad():
                        ti = _type_index(batch[3], batch[4], out)
                        e = (out.detach() - y).pow(2).sum(-1).to(torch.float64)
                        ref = y.pow(2).sum(-1).to(torch.float64)
                        keep = ti >= 0  # padding (-1) adds nothing; no boolean indexing: no host sync
                        ti = ti.clamp(min=0).flatten()
                        err_num.index_add_(0, ti, (e * keep).flatten())
                        err_den.index_add_(0, ti, (ref * keep).flatten())
                step_no += 1
                _set_lr(opt, base_lr, schedule(step_no))
                running += loss.detach()
                yield
        means = [v / len(hidden) for v in epoch_loss.tolist()]  # one host sync per layer
        info["seconds"] = time.perf_counter() - t_start  # to that sync: every step of this layer has run
        bad = next((e for e, v in enumerate(means) if not math.isfinite(v)), None)
        if bad is not None:
            raise NonFiniteLossError(f"non-finite block loss in layer {index}, epoch {bad}; "
                                     "lower method.lr or set method.on_nonfinite=keep_last")
        info["loss_first_epoch"], info["loss_last_epoch"] = means[0], means[-1]
    finally:
        del captured  # the graph's memory pool
        for p in params:
            p.grad = None
    info["steps"] = step_no
    info["cuda_graph"] = "on" if graphed else obstacle
    names = token_types.names if (token_types is not None and types is not None) else ["all"]
    rel = (err_num / err_den.clamp(min=1e-300)).tolist()
    info["err"] = {n: rel[k] for k, n in enumerate(names) if err_den[k] > 0}
    return info


@dataclass
class _LayerJob:
    index: int
    layer: nn.Module
    plan: LayerPlan
    orig: torch.dtype  # the layer's dtype before training (cast back after the merge)


class _Interleaved:
    """Up to ``width`` layers in training at once, advanced one optimizer step each in turn; on a CUDA
    device each layer runs on its own stream, so that the small kernels (or graph replays) of several
    layers overlap on the GPU. A layer that has run all its steps is handed to ``finish`` (after its
    stream's work, in the order layers end). With ``width`` 1 this is plain sequential training."""

    def __init__(self, width: int, device, finish: Callable, on_step: Callable | None = None):
        self.width, self.finish, self.jobs = width, finish, []
        self.on_step = on_step or (lambda: None)
        device = torch.device(device)
        self.cuda = device.type == "cuda" and width > 1
        self.device = device

    def add(self, job: _LayerJob, steps) -> None:
        stream = None
        if self.cuda:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the layer's inputs are ready
        self.jobs.append((job, steps, stream))
        while len(self.jobs) >= self.width:
            self._round()

    def drain(self) -> None:
        while self.jobs:
            self._round()

    def _round(self) -> None:
        """One step of every layer in flight; layers that ended are finished and leave."""
        for entry in list(self.jobs):
            job, steps, stream = entry
            try:
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    next(steps)
                self.on_step()
                continue
            except StopIteration as done:
                res = done.value
            except BaseException:
                self._abandon()
                raise
            self.jobs.remove(entry)
            if stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(stream)
            self.finish(job, res)

    def _abandon(self) -> None:
        for _, steps, _ in self.jobs:
            steps.close()
        self.jobs = []
        if self.cuda:
            torch.cuda.synchronize(self.device)


def train_blockwise(ctx, build: Callable, cfg: TrainConfig, token_types=None, want_cov: bool = False,
                    want_qk_cov: bool = False, train: bool = True) -> dict:
    """Run the whole model layer by layer. ``build(i, block, stats) -> LayerPlan``.

    ``train=False`` builds, installs and merges the initial transforms without optimising them
    (nothing is quantized, or ``epochs == 0``). Returns flat info for the result row.
    """
    model, adapter = ctx.model, ctx.adapter
    if ctx.calib is None:
        raise ValueError("block-wise training needs calibration data (ctx.calib)")
    t0 = time.time()
    if model.config._attn_implementation != IMPL:
        model.set_attn_implementation(IMPL)  # the post-RoPE hook point (SDPA underneath)
    num_types = token_types.num_types if token_types is not None else 1
    batches = list(ctx.calib.batches(cfg.batch_size))
    valid = real_token_masks(batches, ctx.device)
    hidden, kwargs, types = capture_layer0_inputs(model, adapter, batches, ctx.device)
    if token_types is None:
        types = None
    elif valid is not None:  # padding is no token type: out of the loss and of every statistic
        types = [t.masked_fill(~v.to(t.device), -1) for t, v in zip(types, valid)]
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in requires:
        p.requires_grad_(False)
    losses, info = {}, {}

    # the bar counts optimizer steps (layers in flight advance together, so a count of finished layers would
    # stand still for minutes); a layer that ends early or has nothing to train adds its missing steps at its end
    n_layers = len(adapter.layers())
    per_layer = cfg.epochs * len(batches) if train else 0
    bar = tqdm(total=n_layers * per_layer if per_layer else n_layers, desc="block-wise",
               unit="step" if per_layer else "layer", disable=not ctx.progress, leave=False)
    bar.set_postfix_str(f"layers done 0/{n_layers}", refresh=False)

    def finish(job: _LayerJob, res: dict) -> None:
        """A layer whose training ended: frozen, merged, cast back, its info recorded (and the bar moves)."""
        i, plan = job.index, job.plan
        bar.set_postfix_str(f"layers done {len(losses) + 1}/{n_layers}", refresh=False)
        bar.update(per_layer - res["steps"] if per_layer else 1)
        for p in plan.param_groups()[0] + plan.param_groups()[1]:
            p.requires_grad_(False)
        with record_function("block_training.merge"):
            plan.merge()
        with record_function("block_training.cast"):
            job.layer.to(job.orig)
        losses[i] = res
        for k, v in getattr(plan, "info", {}).items():
            info[f"layer{i}.{k}"] = v
        for name, v in res.get("err", {}).items():
            info[f"layer{i}.err.{name}"] = round(v, 6)
        if res["nonfinite"]:
            info.setdefault("nonfinite", []).append(res["nonfinite"])

    flight = _Interleaved(cfg.layers_in_flight if train else 1, ctx.device, finish, lambda: bar.update(1))
    try:
        for i, block in enumerate(adapter.blocks()):
            layer = block.layer
            with record_function("block_training.cast"):
                orig, hidden, kw = float_layer(layer, hidden, kwargs)
            with record_function("block_training.full_precision_pass"):
                targets, stats = full_precision_pass(block, hidden, kw, types, token_types, num_types, want_cov,
                                                     want_qk_cov, valid)
            with record_function("block_training.build"):
                plan = build(i, block, stats)
                plan.install()
            job = _LayerJob(i, layer, plan, orig)
            if train:
                flight.add(job, layer_steps(layer, plan, hidden, kw, types, targets, cfg, i, token_types, num_types,
                                            valid))
            else:
                finish(job, {"loss_first_epoch": float("nan"), "loss_last_epoch": float("nan"), "steps": 0,
                             "nonfinite": None})
            hidden = targets  # the full-precision chain feeds the next layer: layers train independently
        flight.drain()
    finally:
        bar.close()
        for p, r in requires.items():
            p.requires_grad_(r)
    losses = [losses[i] for i in sorted(losses)]
    first = [r["loss_first_epoch"] for r in losses]
    last = [r["loss_last_epoch"] for r in losses]
    info.update({
        "train_seconds": round(time.time() - t0, 3),
        "amp": cfg.amp,
        "train_steps": sum(r["steps"] for r in losses),
        # per layer, first step to the layer's last step done (layers in flight overlap: their times do too)
        "train_layer_seconds": "|".join(f"{r.get('seconds', 0.0):.3f}" for r in losses),
        "loss_first_epoch": "|".join(f"{v:.4g}" for v in first),
        "loss_last_epoch": "|".join(f"{v:.4g}" for v in last),
        "nonfinite": "; ".join(info.get("nonfinite", [])) or "none",
        "cuda_graph": "; ".join(sorted({str(r.get("cuda_graph", "off")) for r in losses})),
        "layers_in_flight": cfg.layers_in_flight,
    })
    return info
