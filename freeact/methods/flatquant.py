"""FlatQuant (Sun et al., 2024): learnable affine transforms per linear input, trained block by block.

Per decoder layer (see :mod:`freeact.transforms.affine` for the pieces):

* ``qkv``: ``x -> (x / s) (P_l (x) P_r)`` online on the input of q/k/v, weight side fused into q/k/v;
* ``mlp``: the same on the input of gate/up; ``down``: the same on the input of down_proj;
* ``vo``: per-head ``P_v`` fused into v_proj (output) and o_proj (input), and on o_proj's input
  either FlatQuant's online ``P_h`` across heads (``o_transform: heads``) or a full site like the
  three above (``o_transform: site``; what FreeAct types);
* ``k``: orthogonal per-head transform of post-RoPE Q and K (installed when the KV cache is
  quantized, or ``kv_transform: true``), through the attention's :class:`~freeact.quant.kv.QKVHook`;
* learnable per-channel scaling (SmoothQuant init, ``smooth_alpha`` 0.3), learnable weight clipping
  (per output channel) and activation clipping (one learnable ratio per linear, as FlatQuant); the
  linears of one site share its transform module, and its output (see ``OnlineMemo``);

trained with :func:`~freeact.methods.block_training.train_blockwise`. After training every weight
side is merged in float64 (the deployed model is the merged one: the activation side stays online).

**Learned weight clipping and weight quantization.** As in FlatQuant's own ``reparameterize``, the
merge clamps each row to its learned range; the shared pipeline then quantizes the merged weights
(``weight_algo``): RTN computes its scale from the clamped row, which is exactly the quantizer used
during training; GPTQ sees the clamped rows, so its ranges are the learned ones too.

This method overrides :meth:`apply`: the base pipeline would replace the trained activation
quantizers (their learned clip) and the per-layer Q/K hooks; here they stay as trained, and only
the weight quantization step of the pipeline runs afterwards.
"""
from __future__ import annotations

import torch

from ..config.methods import resolve_amp
from ..models.adapter import INPUT_SITES
from ..quant.act import InputQuantizer, attach_input_quantizer
from ..quant.kv import IMPL, QKVHook
from ..transforms.affine import (AffineSite, CalibratingWeight, HeadTransform, HeadwiseVO,
                                 WeightClip, merge_linear, smooth_scale)
from ..transforms.fusion import fuse_norm_into_linears
from .base import Method
from .context import QuantContext
from .registry import register_method
from .block_training import TrainConfig, train_blockwise

STAT_KEY = {"qkv": "q", "mlp": "up", "down": "down", "o": "o"}  # whose input the statistics were taken from


def _inner(site):
    """The :class:`AffineSite` under an optional wrapper (FreeAct's type mask)."""
    return getattr(site, "inner", site)


def _compose(first, second):
    if first is None:
        return second
    if second is None:
        return first
    return lambda w: second(first(w))


class LayerTransforms:
    """The learnable transforms of one decoder layer, and how they attach to its linears.

    ``sites``: name (qkv, mlp, down, optionally o) -> online activation module (an
    :class:`AffineSite`, possibly wrapped by FreeAct's type mask); ``vo``: the V/O pair (its ``P_v``
    acts on ``o_proj``'s input before an ``o`` site, if any); ``k_transform``: post-RoPE Q/K.
    """

    def __init__(self, block, sites: dict, vo: HeadwiseVO | None, k_transform, quant, lwc: bool, lac: bool,
                 info: dict | None = None, compiled: bool = False):
        self.block, self.sites, self.vo, self.k_transform, self.quant = block, sites, vo, k_transform, quant
        self.compiled = compiled  # the weights' clip + fake quant through torch.compile
        self.lins = block.linears()
        self.clips = {n: WeightClip(l.out_features, dtype=l.weight.dtype).to(l.weight.device)
                      for n, l in self.lins.items()} if (lwc and quant.weight.enabled) else {}
        learn = lac and quant.act.enabled
        online = {n: sites.get(self._site_of(n)) for n in self.lins}
        if "o" not in sites:
            online["o"] = vo if (vo is not None and vo.has_heads) else None
        # one input quantizer (own learnable clip) per linear; linears of a site share its transform
        self.iqs = {n: InputQuantizer(quant.act, online[n], learnable_clip=learn).to(l.weight.device)
                    for n, l in self.lins.items()}
        self.info = info or {}
        self.before_merge = None  # optional: frozen site values -> info entries (FreeAct's energies)

    def _site_of(self, name: str) -> str:
        return next(s for s, names in INPUT_SITES.items() if name in names)

    # -- calibrating mode ----------------------------------------------------------------------
    def _input_side(self, name):
        site = self.sites.get(self._site_of(name))
        f = _inner(site).transform_weight if site is not None else None
        if name == "o" and self.vo is not None:
            return _compose(self.vo.transform_o_weight, f)
        return f

    def install(self) -> None:
        from torch.nn.utils import parametrize

        for n, lin in self.lins.items():
            attach_input_quantizer(lin, self.iqs[n])
            out = self.vo.transform_v_weight if (n == "v" and self.vo is not None) else None
            parametrize.register_parametrization(
                lin, "weight", CalibratingWeight(self._input_side(n), out, self.clips.get(n), self.quant.weight,
                                                 compiled=self.compiled))
            if n == "v" and self.vo is not None and lin.bias is not None:
                bias_side = CalibratingWeight(output_side=self.vo.transform_v_bias)
                parametrize.register_parametrization(lin, "bias", bias_side)
        if self.k_transform is not None or self.quant.kv.enabled:
            self.block.attn.qkv_hook = QKVHook(self.quant.kv, self.k_transform)

    def param_groups(self):
        mods = [_inner(s) for s in self.sites.values()] + [self.vo, self.k_transform]
        main = [p for m in mods if m is not None for p in m.parameters()]
        clips = [p for c in self.clips.values() for p in c.parameters()]
        clips += [iq.clip_logit for iq in self.iqs.values() if iq.clip_logit is not None]
        return main, clips

    # -- merged mode ---------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        frozen = {name: _inner(site).frozen() for name, site in self.sites.items()}
        if self.before_merge is not None:
            self.info.update(self.before_merge(frozen))
        fvo = self.vo.frozen() if self.vo is not None else None
        for n, lin in self.lins.items():
            fr = frozen.get(self._site_of(n))
            inp = (lambda w, f=fr: AffineSite.apply_frozen_weight(f, w)) if fr is not None else None
            out = bias = None
            if fvo is not None and n == "v":
                out = bias = (lambda w: self.vo.apply_frozen_v(fvo, w))
            if fvo is not None and n == "o":
                inp = _compose(lambda w: HeadwiseVO.apply_frozen_o(fvo, w), inp)
            merge_linear(lin, inp, out, bias, self.clips.get(n), self.quant.weight)
        for name, site in self.sites.items():
            site.merge(frozen[name])
        if self.vo is not None:
            self.vo.merge(fvo)
        if self.k_transform is not None:
            self.k_transform.merge()


@register_method("flatquant")
class FlatQuant(Method):
    """See the module docstring; settings: :class:`~freeact.config.methods.FlatQuantSettings`."""

    loss_by_type = False

    def train_config(self, device: str = "cpu") -> TrainConfig:
        c = self.cfg
        return TrainConfig(epochs=int(c["epochs"]), lr=float(c["lr"]), clip_lr_mult=float(c["clip_lr_mult"]),
                           weight_decay=float(c["weight_decay"]), batch_size=int(c["batch_size"]),
                           on_nonfinite=c["on_nonfinite"], loss_by_type=self.loss_by_type,
                           amp=resolve_amp(c["amp"], device), cuda_graph=c["cuda_graph"],
                           layers_in_flight=int(c["layers_in_flight"]))

    def compiles(self, device) -> bool:
        """Whether the weights' clip + fake quant go through torch.compile (``method.compile``; auto: on a GPU)."""
        c = self.cfg["compile"]
        return torch.device(device).type == "cuda" if c == "auto" else bool(c)

    def uses_k_transform(self, ctx: QuantContext) -> bool:
        kt = self.cfg["kv_transform"]
        return ctx.quant.kv.enabled if kt == "auto" else bool(kt)

    # -- pipeline -------------------------------------------------------------------------------
    def pipeline(self, ctx: QuantContext) -> dict:
        """The transforms install their own input quantizers (calibrating mode, then merged)."""
        info = dict(self.transform(ctx) or {})
        self.quantize_weights(ctx)
        return info

    def transform(self, ctx: QuantContext) -> dict:
        if ctx.calib is None:
            raise ValueError(f"{self.name} needs calibration data")
        if self.cfg["fuse_norms"]:
            for b in ctx.adapter.blocks():
                fuse_norm_into_linears(b.attn_norm, [b.q, b.k, b.v])
                fuse_norm_into_linears(b.mlp_norm, [l for l in (b.gate, b.up) if l is not None])
        info = self.prepare(ctx)
        q = ctx.quant
        quantized = q.weight.enabled or q.act.enabled or q.kv.enabled
        tcfg = self.train_config(ctx.device)
        if ctx.model.config._attn_implementation != IMPL:
            ctx.model.set_attn_implementation(IMPL)
        info.update(train_blockwise(ctx, lambda i, block, stats: self.build_layer(ctx, i, block, stats), tcfg,
                                    token_types=self.token_types, want_cov=self.wants_cov(),
                                    want_qk_cov=self.wants_cov() and self.uses_k_transform(ctx),
                                    train=quantized and tcfg.epochs > 0))
        return info

    # -- hooks for FreeAct ---------------------------------------------------------------------
    token_types = None

    def prepare(self, ctx: QuantContext) -> dict:
        """Before training (FreeAct attaches the token types here)."""
        return {}

    def wants_cov(self) -> bool:
        return False

    def _generator(self, ctx, layer: int, slot: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(ctx.seed) * 1_000_003 + layer * 101 + slot)

    def site_scale(self, block, site_name: str, stats) -> torch.Tensor | None:
        alpha = self.cfg["smooth_alpha"]
        if alpha is None or site_name == "o":  # o_proj's input: no scaling (as FlatQuant)
            return None
        lins = [getattr(block, n) for n in INPUT_SITES[site_name] if getattr(block, n) is not None]
        w_absmax = torch.cat([l.weight.detach() for l in lins], 0).abs().amax(0).to(torch.float64)
        return smooth_scale(stats.absmax[STAT_KEY[site_name]].cpu(), w_absmax.cpu(), float(alpha))

    def make_site(self, ctx, i: int, site_name: str, block, stats, scale, slot: int):
        d = getattr(block, INPUT_SITES[site_name][-1]).in_features
        return AffineSite(d, self.cfg["matrix"], self.cfg["structure"], scale=scale,
                          learn_scale=bool(self.cfg["learn_scale"]), init=self.cfg["matrix_init"],
                          generator=self._generator(ctx, i, slot), dtype=stats.dtype)

    def make_k_transform(self, ctx, i: int, head_dim: int, stats):
        return HeadTransform(head_dim, self.cfg["matrix_init"], self._generator(ctx, i, 4), dtype=stats.dtype)

    def site_names(self) -> list[str]:
        return ["qkv", "mlp", "down"] + (["o"] if self.cfg["o_transform"] == "site" else [])

    def build_layer(self, ctx, i: int, block, stats) -> LayerTransforms:
        device = block.q.weight.device
        a = ctx.adapter
        vo = None
        if self.cfg["vo_transform"]:
            vo = HeadwiseVO(a.num_heads, a.num_kv_heads, a.head_dim, self.cfg["matrix"], self.cfg["matrix_init"],
                            self._generator(ctx, i, 3), heads=self.cfg["o_transform"] == "heads",
                            dtype=stats.dtype).to(device)
            if "o" in stats.cov:  # o_proj's input arrives in the P_v basis: move its statistics there
                pv = vo.value.frozen()[0]
                stats.cov["o"].cov = _per_head_congruence(stats.cov["o"].cov, pv, a.num_heads)
        info, sites = {}, {}
        slots = {"qkv": 0, "mlp": 1, "down": 2, "o": 5}
        for name in self.site_names():
            scale = self.site_scale(block, name, stats)
            sites[name] = self.make_site(ctx, i, name, block, stats, scale, slots[name]).to(device)
            info.update({f"{name}.{k}": v for k, v in getattr(sites[name], "info", {}).items()})
        k = self.make_k_transform(ctx, i, a.head_dim, stats) if self.uses_k_transform(ctx) else None
        if k is not None:
            k = k.to(device)
            info.update({f"k.{kk}": v for kk, v in getattr(k, "info", {}).items()})
        return LayerTransforms(block, sites, vo, k, ctx.quant, bool(self.cfg["lwc"]), bool(self.cfg["lac"]), info,
                               compiled=self.compiles(ctx.device))


def _per_head_congruence(cov: torch.Tensor, pv: torch.Tensor, heads: int) -> torch.Tensor:
    """``K^T C K`` for ``K = I_heads (x) P_v`` and every covariance ``C`` of the batch ``cov`` (T, d, d)."""
    T, d, _ = cov.shape
    hd = d // heads
    C = cov.reshape(T, heads, hd, heads, hd)
    pv = pv.to(cov)
    C = torch.einsum("thaib,ac,bd->thcid", C, pv, pv)
    return C.reshape(T, d, d)
