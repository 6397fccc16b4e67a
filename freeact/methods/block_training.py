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
4. the plan merges: weight sides into the weights (float64), activation sides frozen.

A non-finite loss raises :class:`NonFiniteLossError` naming the layer and the step, or with
``on_nonfinite="keep_last"`` restores the parameters of the last finite step, stops training that
layer and reports it in the returned info.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..quant.kv import IMPL
from ..transforms.typed import TypeCovariance
from .blockwise import capture_inputs, capture_layer0_inputs, layer_output

NONFINITE_MODES = ("raise", "keep_last")


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

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0 or self.clip_lr_mult <= 0:
            raise ValueError(f"lr ({self.lr}) and clip_lr_mult ({self.clip_lr_mult}) must be positive")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
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
def _batch_types(token_types, types, i):
    if token_types is None or types is None or types[i] is None:
        yield
    else:
        with token_types.use(types[i]):
            yield


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
                        want_qk_cov: bool) -> tuple[list, LayerStats]:
    """Targets (the layer's outputs) and the statistics of its linears' inputs."""
    stats = LayerStats(dtype=hidden[0].dtype)
    lins = {"q": block.q, "o": block.o, "up": block.up, "down": block.down}

    def record(name, x):
        m = x.reshape(-1, x.shape[-1]).abs().amax(0).to(torch.float64)
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
            with _batch_types(token_types, types, i):
                outs.append(layer_output(block.layer(h, **kw)))
    return outs, stats


# ----------------------------------------------------------------------------- loss
def blockwise_loss(out: torch.Tensor, target: torch.Tensor, types: torch.Tensor | None = None,
                   num_types: int = 1) -> torch.Tensor:
    """Plain MSE, or (``types`` given) the sum over token types of the per-type MSE (absent types add 0)."""
    err = (out - target).pow(2)
    if types is None:
        return err.mean()
    per_tok = err.mean(-1)
    t = types.to(per_tok.device)
    loss = per_tok.new_zeros(())
    for k in range(num_types):
        sel = t == k
        if sel.any():
            loss = loss + per_tok[sel].mean()
    return loss


# ----------------------------------------------------------------------------- training
def _cast_kwargs(kw: dict, dtype) -> dict:
    def cast(v):
        if torch.is_tensor(v) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, tuple):
            return tuple(cast(u) for u in v)
        return v

    return {k: cast(v) for k, v in kw.items()}


def _cosine(total: int, min_ratio: float):
    return lambda step: min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_layer(layer: nn.Module, plan: LayerPlan, hidden, kwargs, types, targets, cfg: TrainConfig,
                index: int, token_types=None, num_types: int = 1) -> dict:
    """Optimise ``plan``'s parameters on one layer; returns loss / step info."""
    main, clips = plan.param_groups()
    groups = [g for g in ({"params": main, "lr": cfg.lr}, {"params": clips, "lr": cfg.lr * cfg.clip_lr_mult})
              if g["params"]]
    total = cfg.epochs * len(hidden)
    info = {"loss_first_epoch": float("nan"), "loss_last_epoch": float("nan"), "steps": 0, "nonfinite": None}
    if not groups or total == 0:
        return info
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total, cfg.min_lr_ratio))
    last_good = [p.detach().clone() for p in params]
    step = 0
    for epoch in range(cfg.epochs):
        running = 0.0
        for j, (h, kw, y) in enumerate(zip(hidden, kwargs, targets)):
            with parametrize.cached(), _batch_types(token_types, types, j):
                out = layer_output(layer(h, **kw))
                t = types[j] if (cfg.loss_by_type and types is not None) else None
                loss = blockwise_loss(out, y, t, num_types)
                if not torch.isfinite(loss):
                    where = f"layer {index}, epoch {epoch}, batch {j} (step {step})"
                    if cfg.on_nonfinite == "raise":
                        raise NonFiniteLossError(f"non-finite block loss {loss.item()} in {where}; "
                                                 "lower method.lr or set method.on_nonfinite=keep_last")
                    with torch.no_grad():
                        for p, good in zip(params, last_good):
                            p.copy_(good)
                    info["nonfinite"] = where
                    info["steps"] = step
                    return info
                with torch.no_grad():
                    for p, good in zip(params, last_good):
                        good.copy_(p)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
        mean = running / len(hidden)
        if epoch == 0:
            info["loss_first_epoch"] = mean
        info["loss_last_epoch"] = mean
    info["steps"] = step
    return info


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
    hidden, kwargs, types = capture_layer0_inputs(model, adapter, ctx.calib.batches(cfg.batch_size), ctx.device)
    if token_types is None:
        types = None
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in requires:
        p.requires_grad_(False)
    losses, info = [], {}
    try:
        for i, block in enumerate(tqdm(adapter.blocks(), desc="block-wise", disable=not ctx.progress, leave=False)):
            layer = block.layer
            orig = next(layer.parameters()).dtype
            dtype = orig if orig in (torch.float32, torch.float64) else torch.float32
            layer.to(dtype)
            hidden = [h.to(dtype) for h in hidden]
            kw = [_cast_kwargs(k, dtype) for k in kwargs]
            targets, stats = full_precision_pass(block, hidden, kw, types, token_types, num_types, want_cov,
                                                 want_qk_cov)
            plan = build(i, block, stats)
            plan.install()
            res = {"loss_first_epoch": float("nan"), "loss_last_epoch": float("nan"), "steps": 0, "nonfinite": None}
            if train:
                res = train_layer(layer, plan, hidden, kw, types, targets, cfg, i, token_types, num_types)
            for p in plan.param_groups()[0] + plan.param_groups()[1]:
                p.requires_grad_(False)
            plan.merge()
            layer.to(orig)
            losses.append(res)
            for k, v in getattr(plan, "info", {}).items():
                info[f"layer{i}.{k}"] = v
            if res["nonfinite"]:
                info.setdefault("nonfinite", []).append(res["nonfinite"])
            hidden = targets  # the full-precision chain feeds the next layer
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
    first = [r["loss_first_epoch"] for r in losses]
    last = [r["loss_last_epoch"] for r in losses]
    info.update({
        "train_seconds": round(time.time() - t0, 3),
        "train_steps": sum(r["steps"] for r in losses),
        "loss_first_epoch": "|".join(f"{v:.4g}" for v in first),
        "loss_last_epoch": "|".join(f"{v:.4g}" for v in last),
        "nonfinite": "; ".join(info.get("nonfinite", [])) or "none",
    })
    return info
