"""FreeAct: token-typed activation transforms on FlatQuant's machinery.

Every transformed linear input (qkv, gate/up, down, o) gets one orthogonal weight-side basis ``Q``
(``= P_w^T``; dense ``d x d`` or Kronecker ``Q_l (x) Q_r``, kept orthogonal by
:class:`~freeact.transforms.affine.CayleyOrthogonal`, the Cayley map) split into a shared block and one
unique block of rank ``r_k`` per token type; a type-k token's activation ``(x / s) Q`` has the
coordinates unique to the other types zeroed (:class:`~freeact.transforms.typed.TypeMask`, online,
before the activation quantizer). The weight side ``W diag(s) Q`` is one static matrix merged into
the weights (float64) before weight quantization. With KV-cache quantization, the post-RoPE Q/K
transform is typed the same way (a query/key of type k keeps the shared and type-k coordinates:
exact when each type has no energy on the others' blocks). FlatQuant's per-head ``P_v`` (orthogonal)
stays fused into v_proj/o_proj, so the V cache is quantized in that basis; o_proj's input then gets its
own typed site (``o_transform: site``) in place of FlatQuant's online ``P_h``.

Token types come from ``token_types`` (``[mask, unmasked]`` for a dLLM; any N names the adapter
knows plus one "rest" name; an entry may also be ``{name: ..., ids: [...]}`` for an explicit id
list). A :class:`~freeact.models.token_types.TokenTypes` is attached to the model, so every typed
transform of every layer (and the KV path) reads the type tensor of the current forward.

Ranks: ``rank_mode: fixed`` gives ``r_k = round(d * rank_ratio)`` (1/32 default; 1/16, 1/64, 1/4, 0
by config); ``rank_mode: per_layer`` gives the largest ``r_k <= max_rank_ratio * d`` whose other-type
energy fraction stays under ``energy_threshold``, from the calibration covariances. ``init: random``
(random orthogonal, the paper's) or ``init: spectral`` (``U_k`` = low-energy eigen-directions of the
other types' covariance; needs ``structure: dense``). Training is FlatQuant's block-wise training
with the per-type MSE summed over the types (lr 1e-3).

Where the typed coordinates live (``typed_basis``):

* ``transform`` (the paper's description): the typed basis IS the learnable orthogonal transform; with
  the Kronecker structure the unique blocks are the last ``sum(r_k)`` coordinates of ``Q_l (x) Q_r``, so
  each unique direction is a column of ``Q_l`` times part of ``Q_r`` and cannot align freely with a
  type's null space;
* ``dense``: FlatQuant's transform (any ``matrix``/``structure``, e.g. invertible Kronecker) followed
  by a dense learnable orthogonal ``R`` that holds the typed coordinates, ``x -> ((x / s) P R) * keep_k``
  and ``W -> W diag(s) P^{-T} R``; with ``init: spectral`` ``R`` starts from the eigen-directions of the
  covariances of ``(x / s) P`` (the unique blocks start nearly exact).

Every run with more than one token type logs, per layer and site and per type, the fraction of that
type's activation energy on the coordinates owned by the other types (what the zeroing removes; 0 =
exact) at initialisation and after training: ``layer{i}.{site}.energy_init.{type}`` and
``energy_final.{type}``; block training adds ``layer{i}.err.{type}``.
"""
from __future__ import annotations

import warnings

import torch

from ..models.adapter import INPUT_SITES
from ..models.token_types import TokenTypes, rules_from_names
from ..transforms.affine import (AffineSite, HeadTransform, initial_matrix, kron_matmul, most_square_factors,
                                 random_orthogonal)
from ..transforms.typed import TypeMask, owner_from_ranks, ranks_from_ratio, typed_basis, zeroed_energy
from .context import QuantContext
from .registry import register_method
from .flatquant import STAT_KEY, FlatQuant


def token_type_rules(adapter, entries) -> list[tuple[str, list[int] | None]]:
    """Config entries (names, or ``{name, ids}`` mappings) -> :class:`TokenTypes` rules, in order."""
    if not entries:
        raise ValueError("method.token_types must list at least one token type")
    names = [e for e in entries if isinstance(e, str)]
    known = dict(rules_from_names(adapter, names)) if names else {}
    rules = []
    for e in entries:
        if isinstance(e, str):
            rules.append((e, known[e]))
        elif isinstance(e, dict) and "name" in e and "ids" in e:
            ids = [int(i) for i in e["ids"]]
            if not ids:
                raise ValueError(f"token type {e['name']!r}: 'ids' is empty")
            rules.append((str(e["name"]), ids))
        else:
            raise ValueError(f"method.token_types entries are names or {{name, ids}} mappings, got {e!r}")
    return rules  # one type = no token split: the shared orthogonal transform alone (an AR model)


@register_method("freeact")
class FreeAct(FlatQuant):
    """See the module docstring; settings: :class:`~freeact.config.methods.FreeActSettings`."""

    loss_by_type = True

    # -- token types ------------------------------------------------------------------------------
    def prepare(self, ctx: QuantContext) -> dict:
        rules = token_type_rules(ctx.adapter, list(self.cfg["token_types"]))
        old = getattr(ctx.model, "freeact_token_types", None)
        if old is not None:
            old.detach()
        self.token_types = TokenTypes(rules).attach(ctx.model)
        counts = self.token_types.counts(self.token_types.compute(ctx.calib.input_ids))
        missing = [n for n, c in counts.items() if c == 0]
        if missing:
            msg = (f"token type(s) {missing} never occur in the {ctx.calib.input_ids.numel()} calibration tokens "
                   f"(counts {counts}); for dLLMs check calib.mask_t_min/max, or set method.missing_type=warn")
            if self.cfg["missing_type"] == "error":
                raise ValueError(msg)
            warnings.warn(msg)
        return {f"type_tokens.{n}": c for n, c in counts.items()}

    def wants_cov(self) -> bool:
        typed = self.token_types is not None and self.token_types.num_types > 1
        return typed or self.cfg["init"] == "spectral" or self.cfg["rank_mode"] == "per_layer"

    # -- typed transforms -----------------------------------------------------------------------
    def _ranks_and_basis(self, d: int, covs, present, generator):
        """(ranks, spectral basis or None) from covariances in the coordinates the typed basis acts on."""
        n = self.token_types.num_types
        if self.cfg["rank_mode"] == "fixed":
            ranks = ranks_from_ratio(d, float(self.cfg["rank_ratio"]), n)
        else:
            max_rank = int(float(self.cfg["max_rank_ratio"]) * d)
            ranks = typed_basis(covs, None, energy_threshold=float(self.cfg["energy_threshold"]),
                                max_rank=max_rank, present=present, mix=False).ranks
        basis = None
        if self.cfg["init"] == "spectral":
            basis = typed_basis(covs, ranks, present=present, mix=bool(self.cfg["spectral_mix"]), generator=generator)
        return ranks, basis

    def _energies(self, when: str, M: torch.Tensor, owner, covs, present, right=None) -> dict:
        vals = zeroed_energy(M, owner, covs, present, right)
        return {f"energy_{when}.{n}": round(v, 6) for n, v in zip(self.token_types.names, vals) if v is not None}

    def make_site(self, ctx, i: int, site_name: str, block, stats, scale, slot: int):
        d = getattr(block, INPUT_SITES[site_name][-1]).in_features
        gen = self._generator(ctx, i, slot)
        c = self.cfg
        covs = present = None
        if self.wants_cov():
            acc = stats.cov[STAT_KEY[site_name]]
            covs, present = acc.cov, [int(k) > 0 for k in acc.count]
        common = dict(scale=scale, learn_scale=bool(c["learn_scale"]), dtype=stats.dtype)
        # ``pre``: what acts before the typed basis (the scaling; with typed_basis=dense also P)
        pre = torch.eye(d, dtype=torch.float64) if scale is None else torch.diag(1.0 / scale.to(torch.float64))
        factors = None
        if c["typed_basis"] == "dense":
            dims = most_square_factors(d) if c["structure"] == "kronecker" else (d,)
            factors = [initial_matrix(n, c["matrix_init"], gen) for n in dims]
            pre = kron_matmul(pre, factors)
        seen = None  # the covariances in the coordinates the typed basis acts on: x pre
        if covs is not None and (c["rank_mode"] != "fixed" or c["init"] == "spectral"):
            if c["typed_basis"] == "dense":
                seen = pre.T.to(covs) @ covs @ pre.to(covs)
            else:  # pre is diagonal: the same congruence elementwise, in the dense product's order
                inv = torch.diagonal(pre).to(covs)
                seen = (inv[:, None] * covs) * inv[None, :]
        ranks, basis = self._ranks_and_basis(d, seen, present, gen)
        if c["typed_basis"] == "dense":
            post = basis.Q if basis is not None else random_orthogonal(d, gen)
            inner = AffineSite(d, c["matrix"], c["structure"], factors_init=factors, post_init=post, **common)
        elif basis is not None:
            inner = AffineSite(d, "orthogonal", "dense", factors_init=[basis.Q], **common)
        else:
            inner = AffineSite(d, "orthogonal", c["structure"], init=c["matrix_init"], generator=gen, **common)
        owner = basis.owner if basis is not None else owner_from_ranks(d, ranks)
        site = TypeMask(inner, owner, self.token_types)
        site.info = {"ranks": "/".join(map(str, ranks))}
        if covs is not None:
            fr = inner.frozen()
            site.info.update(self._energies("init", AffineSite.frozen_act_matrix(fr), owner, covs, present,
                                            lambda C: AffineSite.apply_frozen_act(fr, C)))
            site.energy_stats = (covs, present)
        return site

    def build_layer(self, ctx, i: int, block, stats):
        plan = super().build_layer(ctx, i, block, stats)
        typed = {name: site for name, site in plan.sites.items() if hasattr(site, "energy_stats")}

        def final_energies(frozen: dict) -> dict:
            out = {}
            for name, site in typed.items():
                covs, present = site.energy_stats
                fr = frozen[name]
                vals = self._energies("final", AffineSite.frozen_act_matrix(fr), site.owner, covs, present,
                                      lambda C: AffineSite.apply_frozen_act(fr, C))
                out.update({f"{name}.{k}": v for k, v in vals.items()})
                del site.energy_stats  # (num_types, d, d) float64: not kept past the layer
            return out

        if typed:
            plan.before_merge = final_energies
        return plan

    def make_k_transform(self, ctx, i: int, head_dim: int, stats):
        gen = self._generator(ctx, i, 4)
        if not self.cfg["typed_kv"]:
            return super().make_k_transform(ctx, i, head_dim, stats)
        covs = present = None
        if self.wants_cov():
            covs = _merge_qk(stats.q_cov, stats.k_cov)
            present = [int(c) > 0 for c in stats.q_cov.count]
        ranks, basis = self._ranks_and_basis(head_dim, covs, present, gen)
        if basis is not None:
            inner = HeadTransform(head_dim, init_matrix=basis.Q, dtype=stats.dtype)
            owner = basis.owner
        else:
            inner = HeadTransform(head_dim, self.cfg["matrix_init"], gen, dtype=stats.dtype)
            owner = owner_from_ranks(head_dim, ranks)
        k = TypeMask(inner, owner, self.token_types)
        k.info = {"ranks": "/".join(map(str, ranks))}
        if covs is not None:
            k.info.update(self._energies("init", inner.q.frozen()[0], owner, covs, present))
        return k


def _merge_qk(q_cov, k_cov) -> torch.Tensor:
    """Per type: trace-normalised query covariance + trace-normalised key covariance (both must be
    null on the other types' blocks for the typed Q/K transform to be exact)."""
    out = []
    for Cq, Ck in zip(q_cov.cov, k_cov.cov):
        tq, tk = torch.trace(Cq), torch.trace(Ck)
        out.append((Cq / tq if tq > 0 else Cq) + (Ck / tk if tk > 0 else Ck))
    return torch.stack(out)
