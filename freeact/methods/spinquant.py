"""SpinQuant (Liu et al., 2024): QuaRot's structure with LEARNED R1 and R2.

R1 (residual, d x d) and one R2 per layer (head_dim x head_dim, fused into v/o) start at random
Hadamard matrices and are trained with Cayley SGD on the Stiefel manifold
(:class:`~freeact.transforms.cayley.CayleySGD`, lr 1.5, cosine schedule, ``steps`` steps; the
paper uses 100) to minimise the cross-entropy of the fake-quantized model on the calibration
set. R3 (post-RoPE Q/K) and R4 (down_proj input) stay online Hadamards, installed before
training so the loss sees them.

The training step does not copy any modeling code: the rotated (and, for RTN runs, fake-quantized)
weights are computed from R1/R2 as differentiable tensors
(:func:`~freeact.transforms.rotation.rotated_block_params`) and substituted for the model's
parameters with :func:`torch.func.functional_call`; activations are fake-quantized by the same
:class:`~freeact.quant.act.InputQuantizer` hooks (and KV hooks) the final model uses.

Loss: AR models, next-token cross-entropy on ``ctx.calib.input_ids``; masked-diffusion models
(``adapter.objective == "mdm"``), cross-entropy of the masked positions of ``ctx.calib.input_ids``
against ``ctx.calib.targets``, each divided by its sequence's masking ratio (the dLLM ELBO
weighting), with ``adapter.logits`` aligning Dream's shifted logits.

Weights in the loss (``train_weight_quant``): ``auto`` fake-quantizes them (RTN) only when the
final weight quantizer is RTN; with GPTQ the rotations are learned with activation-only
quantization, as the SpinQuant README prescribes. After training the rotations are fused in
float64 exactly as QuaRot's, and the shared pipeline quantizes the weights.
``save_rotations: <path>`` writes ``{"R1", "R2", "meta"}`` with ``torch.save``;
``load_rotations: <path>`` skips training and reuses such a file.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..quant.act import InputQuantizer, attach_input_quantizer, detach_input_quantizer
from ..quant.kv import QKVHook, install_qkv_hooks
from ..quant.quantizer import QuantSpec, fake_quant
from ..transforms.cayley import CayleySGD
from ..transforms.hadamard import random_hadamard_matrix
from ..transforms.rotation import check_orthogonal, rotate_input_side, rotated_block_params
from ..config.methods import resolve_amp
from .context import QuantContext
from .registry import register_method
from .quarot import RotationMethod, _flag


# ------------------------------------------------------------------------------- loss
def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def calibration_loss(adapter, out, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Cross-entropy of one batch (see the module docstring); None if nothing is scored."""
    if adapter.objective == "mdm":
        masked = input_ids == adapter.mask_token_id
        if not masked.any():
            return None
        logits = _upcast(adapter.logits(out))
        ratio = masked.float().mean(dim=1)  # per-sequence masking ratio t
        rows = masked.nonzero()[:, 0]
        ce = F.cross_entropy(logits[masked], targets[masked], reduction="none") / ratio[rows]
        return ce.sum() / input_ids.numel()
    logits = _upcast(out.logits)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


# ------------------------------------------------------------------------------- training
@contextmanager
def quantized_forward(ctx: QuantContext):
    """Install the activation / KV pipeline the final model will have, for training; remove it after."""
    model, adapter = ctx.model, ctx.adapter
    blocks = adapter.blocks()
    for b in blocks:
        for lin in b.linears().values():
            attach_input_quantizer(lin, InputQuantizer(ctx.quant.act, ctx.input_transforms.get(lin)))
    prev_impl = model.config._attn_implementation
    hooked = ctx.quant.kv.enabled or ctx.qk_transform is not None
    if hooked:
        make_qk = ctx.qk_transform or (lambda: None)
        install_qkv_hooks(model, [b.attn for b in blocks], lambda: QKVHook(ctx.quant.kv, make_qk()))
    try:
        yield
    finally:
        for b in blocks:
            for lin in b.linears().values():
                detach_input_quantizer(lin)
            if hooked and "qkv_hook" in b.attn._modules:
                del b.attn._modules["qkv_hook"]
        if model.config._attn_implementation != prev_impl:
            model.set_attn_implementation(prev_impl)


def rotated_parameters(ctx: QuantContext, R1: torch.Tensor, R2: list[torch.Tensor],
                       weight_spec: QuantSpec | None, names: dict) -> dict[str, torch.Tensor]:
    """Differentiable ``{parameter name: rotated (fake-quantized) tensor}`` for functional_call."""
    adapter = ctx.adapter
    emb, head = adapter.embeddings(), adapter.lm_head()
    cdtype = torch.float64 if emb.weight.dtype == torch.float64 else torch.float32
    Q = R1.to(cdtype)
    params = {
        f"{names[emb]}.weight": rotate_input_side(emb.weight.to(cdtype), Q).to(emb.weight.dtype),
        f"{names[head]}.weight": rotate_input_side(head.weight.to(cdtype), Q).to(head.weight.dtype),
    }
    for block, r in zip(adapter.blocks(), R2):
        lins = block.linears()
        new = rotated_block_params(block, adapter, Q, r.to(cdtype), dtype=cdtype)
        o_online = ctx.input_transforms.get(block.o)
        if o_online is not None:  # fused after R2 at the end: W_o R2 M
            new["o.weight"] = new["o.weight"] @ o_online.matrix().to(new["o.weight"])
        for key, value in new.items():
            name, attr = key.split(".")
            lin = lins[name]
            if attr == "weight" and weight_spec is not None:
                value = fake_quant(value, weight_spec)
            params[f"{names[lin]}.{attr}"] = value.to(getattr(lin, attr).dtype)
    return params


def learn_rotations(ctx: QuantContext, R1: torch.Tensor, R2: list[torch.Tensor], steps: int, lr: float = 1.5,
                    momentum: float = 0.0, batch_size: int | None = None,
                    weight_spec: QuantSpec | None = None,
                    amp: str = "off") -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """Cayley-SGD training of R1 / R2 (cosine lr schedule). Returns float64 CPU matrices and losses.
    ``amp="bf16"``: the model's forward under bfloat16 autocast (the float64 rotation algebra is left
    alone: autocast does not cast float64; the loss is taken from float32 logits)."""
    if amp not in ("off", "bf16"):
        raise ValueError(f"amp must be off or bf16, got {amp!r}")
    if ctx.calib is None:
        raise ValueError("SpinQuant needs calibration data to learn its rotations (or load_rotations)")
    if getattr(ctx, "streaming", False):
        raise ValueError("SpinQuant's rotation training runs the whole model on the device: use streaming=false "
                         "(or load_rotations to skip training)")
    model, adapter = ctx.model, ctx.adapter
    device = adapter.embeddings().weight.device
    R1p = nn.Parameter(R1.to(device=device, dtype=torch.float64).clone())
    R2p = [nn.Parameter(r.to(device=device, dtype=torch.float64).clone()) for r in R2]
    opt = CayleySGD([R1p, *R2p], lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    names = {m: n for n, m in model.named_modules()}
    bs = batch_size or ctx.batch_size
    ids_all, tgt_all = ctx.calib.input_ids, ctx.calib.targets
    order = itertools.cycle(range(0, len(ids_all), bs))
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    losses: list[float] = []
    try:
        with quantized_forward(ctx):
            bar = tqdm(range(steps), desc="spinquant", disable=not ctx.progress, leave=False)
            for _ in bar:
                i = next(order)
                ids, tgt = ids_all[i : i + bs].to(device), tgt_all[i : i + bs].to(device)
                params = rotated_parameters(ctx, R1p, R2p, weight_spec, names)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                    out = functional_call(model, params, args=(), kwargs={"input_ids": ids, "use_cache": False})
                loss = calibration_loss(adapter, out, ids, tgt)
                opt.zero_grad(set_to_none=True)
                if loss is not None:
                    if not math.isfinite(loss.item()):
                        raise FloatingPointError(f"SpinQuant loss is {loss.item()} at step {len(losses)}")
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                sched.step()
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return R1p.detach().cpu(), [r.detach().cpu() for r in R2p], losses


# ------------------------------------------------------------------------------- files
def save_rotations(path, R1: torch.Tensor, R2: list[torch.Tensor], meta: dict | None = None) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"R1": R1.detach().cpu().to(torch.float64),
                "R2": [r.detach().cpu().to(torch.float64) for r in R2], "meta": dict(meta or {})}, path)
    return path


def load_rotations(path, adapter) -> tuple[torch.Tensor, list[torch.Tensor]]:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"load_rotations: {path} does not exist")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "R1" not in data or "R2" not in data:
        raise ValueError(f"load_rotations: {path} is not a rotation file (needs keys R1, R2)")
    R1, R2 = data["R1"].to(torch.float64), [r.to(torch.float64) for r in data["R2"]]
    d, hd, n = adapter.hidden_size, adapter.head_dim, len(adapter.layers())
    if tuple(R1.shape) != (d, d):
        raise ValueError(f"load_rotations: R1 is {tuple(R1.shape)}, the model needs ({d}, {d})")
    if len(R2) != n or any(r.shape[-2:] != (hd, hd) for r in R2):
        raise ValueError(f"load_rotations: need {n} R2 matrices of ({hd}, {hd}), got "
                         f"{[tuple(r.shape) for r in R2]}")
    check_orthogonal(R1, "loaded R1")
    for r in R2:
        check_orthogonal(r, "loaded R2")
    return R1, R2


# ------------------------------------------------------------------------------- method
@register_method("spinquant")
class SpinQuant(RotationMethod):
    """Settings: :class:`~freeact.config.methods.SpinQuantSettings`."""

    def rotations(self, ctx: QuantContext):
        a, cfg, seed = ctx.adapter, self.cfg, self.seed(ctx)
        self.train_info = {}
        if cfg["load_rotations"]:
            R1, R2 = load_rotations(cfg["load_rotations"], a)
            self.train_info = {"rotations_from": str(cfg["load_rotations"])}
        else:
            R1 = random_hadamard_matrix(a.hidden_size, seed=seed)
            R2 = [random_hadamard_matrix(a.head_dim, seed=seed + 1 + i) for i in range(len(a.layers()))]
            steps = cfg["steps"]
            if steps:
                train_wq = _flag(cfg["train_weight_quant"], cfg["weight_algo"] == "rtn", "train_weight_quant")
                wspec = ctx.quant.weight if train_wq and ctx.quant.weight.enabled else None
                amp = resolve_amp(cfg["amp"], ctx.device)
                R1, R2, losses = learn_rotations(ctx, R1, R2, steps, lr=cfg["lr"], momentum=cfg["momentum"],
                                                 batch_size=cfg["train_batch_size"], weight_spec=wspec, amp=amp)
                self.train_info = {"train_steps": len(losses), "train_weight_quant": wspec is not None, "amp": amp,
                                   "loss_first": losses[0] if losses else None,
                                   "loss_last": losses[-1] if losses else None}
        if cfg["save_rotations"]:
            p = save_rotations(cfg["save_rotations"], R1, R2, {"seed": seed, **self.train_info})
            self.train_info["rotations_file"] = str(p)
        return R1, R2

    def transform(self, ctx: QuantContext) -> dict:
        info = super().transform(ctx)
        return {**info, **self.train_info}
