"""FreeAct: token-typed activation transforms on FlatQuant's machinery.

Every transformed linear input (qkv, gate/up, down, o) gets one orthogonal weight-side basis ``Q``
(``= P_w^T``; dense ``d x d`` or Kronecker ``Q_l (x) Q_r``, kept orthogonal by
``torch.nn.utils.parametrizations.orthogonal`` with the Cayley map) split into a shared block and one
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
"""
from __future__ import annotations

import warnings

import torch

from ..models.token_types import TokenTypes, rules_from_names
from ..transforms.affine import AffineSite, HeadTransform, kron_matmul
from ..transforms.typed import TypeMask, other_type_energy, owner_from_ranks, ranks_from_ratio, typed_basis
from .base import QuantContext, register_method
from .flatquant import SITES, STAT_KEY, FlatQuant

INITS = ("random", "spectral")
RANK_MODES = ("fixed", "per_layer")
MISSING = ("error", "warn")


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
    """See the module docstring; config keys in ``conf/method/freeact.yaml``."""

    DEFAULTS = {**FlatQuant.DEFAULTS, "lr": 1e-3, "matrix": "orthogonal", "o_transform": "site",
                "token_types": ["mask", "unmasked"], "rank_ratio": 1 / 32, "rank_mode": "fixed",
                "energy_threshold": 0.01, "max_rank_ratio": 0.25, "init": "random", "spectral_mix": True,
                "typed_kv": True, "missing_type": "error"}
    loss_by_type = True

    def _check(self) -> None:
        c = self.cfg
        if c["matrix"] != "orthogonal":
            raise ValueError(f"method.matrix={c['matrix']!r}: FreeAct's weight-side basis is orthogonal")
        if c["init"] not in INITS:
            raise ValueError(f"method.init={c['init']!r} must be one of {INITS}")
        if c["rank_mode"] not in RANK_MODES:
            raise ValueError(f"method.rank_mode={c['rank_mode']!r} must be one of {RANK_MODES}")
        if c["missing_type"] not in MISSING:
            raise ValueError(f"method.missing_type={c['missing_type']!r} must be one of {MISSING}")
        if c["init"] == "spectral" and c["structure"] != "dense":
            raise ValueError("method.init=spectral needs method.structure=dense (eigen-directions are not "
                             "Kronecker-structured)")
        if not 0 <= float(c["rank_ratio"]) <= 1:
            raise ValueError(f"method.rank_ratio={c['rank_ratio']} must be in [0, 1]")
        if not 0 <= float(c["energy_threshold"]) < 1:
            raise ValueError(f"method.energy_threshold={c['energy_threshold']} must be in [0, 1)")
        super()._check()

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
        return self.cfg["init"] == "spectral" or self.cfg["rank_mode"] == "per_layer"

    # -- typed transforms -----------------------------------------------------------------------
    def _ranks_and_basis(self, d: int, covs, counts, generator):
        """(ranks, spectral basis or None, which types have statistics or None)."""
        n = self.token_types.num_types
        present = [int(c) > 0 for c in counts] if counts is not None else None
        if self.cfg["rank_mode"] == "fixed":
            ranks = ranks_from_ratio(d, float(self.cfg["rank_ratio"]), n)
        else:
            max_rank = int(float(self.cfg["max_rank_ratio"]) * d)
            ranks = typed_basis(covs, None, energy_threshold=float(self.cfg["energy_threshold"]),
                                max_rank=max_rank, present=present, mix=False).ranks
        basis = None
        if self.cfg["init"] == "spectral":
            basis = typed_basis(covs, ranks, present=present, mix=bool(self.cfg["spectral_mix"]), generator=generator)
        return ranks, basis, present

    def make_site(self, ctx, i: int, site_name: str, block, stats, scale, slot: int):
        d = getattr(block, SITES[site_name][-1]).in_features
        gen = self._generator(ctx, i, slot)
        covs = counts = None
        if self.wants_cov():
            acc = stats.cov[STAT_KEY[site_name]]
            covs = acc.scaled(None if scale is None else 1.0 / scale)
            counts = acc.count
        ranks, basis, present = self._ranks_and_basis(d, covs, counts, gen)
        common = dict(scale=scale, learn_scale=bool(self.cfg["learn_scale"]), dtype=stats.dtype)
        if basis is not None:
            inner = AffineSite(d, "orthogonal", "dense", factors_init=[basis.Q], **common)
            owner = basis.owner
        else:
            inner = AffineSite(d, "orthogonal", self.cfg["structure"], init=self.cfg["matrix_init"], generator=gen,
                               **common)
            owner = owner_from_ranks(d, ranks)
        site = TypeMask(inner, owner, self.token_types)
        site.info = {"ranks": "/".join(map(str, ranks))}
        if covs is not None:
            Q = self._dense_basis(inner)
            site.info["other_energy"] = round(max(other_type_energy(Q, owner, covs, present)), 6)
        return site

    @staticmethod
    @torch.no_grad()
    def _dense_basis(site: AffineSite) -> torch.Tensor:
        mats = site.frozen()["act"]
        return kron_matmul(torch.eye(site.d, dtype=torch.float64, device=mats[0].device), mats)

    def make_k_transform(self, ctx, i: int, head_dim: int, stats):
        gen = self._generator(ctx, i, 4)
        if not self.cfg["typed_kv"]:
            return super().make_k_transform(ctx, i, head_dim, stats)
        covs = counts = None
        if self.wants_cov():
            covs = _merge_qk(stats.q_cov, stats.k_cov)
            counts = stats.q_cov.count
        ranks, basis, present = self._ranks_and_basis(head_dim, covs, counts, gen)
        if basis is not None:
            inner = HeadTransform(head_dim, init_matrix=basis.Q, dtype=stats.dtype)
            owner = basis.owner
        else:
            inner = HeadTransform(head_dim, self.cfg["matrix_init"], gen, dtype=stats.dtype)
            owner = owner_from_ranks(head_dim, ranks)
        k = TypeMask(inner, owner, self.token_types)
        k.info = {"ranks": "/".join(map(str, ranks))}
        if covs is not None:
            k.info["other_energy"] = round(max(other_type_energy(inner.q.frozen()[0], owner, covs, present)), 6)
        return k


def _merge_qk(q_cov, k_cov) -> torch.Tensor:
    """Per type: trace-normalised query covariance + trace-normalised key covariance (both must be
    null on the other types' blocks for the typed Q/K transform to be exact)."""
    out = []
    for Cq, Ck in zip(q_cov.cov, k_cov.cov):
        tq, tk = torch.trace(Cq), torch.trace(Ck)
        out.append((Cq / tq if tq > 0 else Cq) + (Ck / tk if tk > 0 else Ck))
    return torch.stack(out)
