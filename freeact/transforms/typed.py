"""FreeAct's token-typed transform: one orthogonal weight-side basis, one activation slice per type.

For a linear input of width ``d`` FreeAct keeps one orthogonal ``Q`` (``Q = P_w^T``: its columns,
the rows of ``P_w``, are the basis) whose coordinates are owned either by all token types
(the shared block ``U``) or by exactly one type ``k`` (the unique block ``U_k``, rank ``r_k``):

    weight side (static, merged offline):   W -> W diag(s) Q
    activation side of a type-k token:      x -> ((x / s) Q) * keep_k

``keep_k`` is 1 on the coordinates of ``U`` and ``U_k`` and 0 on those unique to the OTHER types
(``P_k = Q diag(keep_k)`` is a slice of ``Q``: nothing extra is stored). Hence
``x_k P_k Q^T = x_k (I - sum_{j != k} U_j U_j^T)``: exact when type-k activations have no energy on
the other types' blocks, approximate otherwise. With every ``r_k = 0`` the mask is all ones and
the transform is the plain orthogonal one (FlatQuant restricted to orthogonal factors).

**Where the zeroing happens**: :class:`TypeMask` wraps the online activation-side module (an
:class:`~freeact.transforms.affine.AffineSite`, or the post-RoPE
:class:`~freeact.transforms.affine.HeadTransform`) and multiplies its output by
``keep[types]`` before the activation quantizer; the token-type tensor comes from the model's
:class:`~freeact.models.token_types.TokenTypes` (``token_types.get()``) at run time. The mask
gather handles all types at once, so types absent from a batch cost nothing. Type ``-1`` (padding
during calibration) keeps every coordinate.

**What the split can and cannot do.** For a type-k row ``z = (x / s) Q``, the zeroing changes ``z``
only on coordinates where it is not already zero. If type k has no energy on the other types'
blocks (the exact case), ``z * keep_k = z`` and the quantized activation is bit-for-bit that of the
untyped transform with the same ``Q``. Otherwise each zeroed coordinate's error ``|z_i|`` is at least
its round-to-nearest error (``|z_i|`` below half a step rounds to 0 anyway; above it, rounding errs by
at most half a step), so with the per-token scale unchanged the zeroing never lowers the activation
error coordinate by coordinate (``tests/test_freeact.py`` checks both statements). Gains over the
untyped basis can therefore come only from a changed per-token scale or from training dynamics.

Initial bases (:func:`typed_basis`, ``init="spectral"``): for each type ``k`` in turn, ``U_k`` are
the lowest-energy eigen-directions of the OTHER types' (trace-normalised) activation covariance,
restricted to the orthogonal complement of the blocks already chosen; ``U`` is what remains.
Inside each block the basis is then mixed by a random orthogonal matrix (it changes neither the
blocks' spans nor exactness, and spreads energy over coordinates as a random rotation does).
``rank_mode="per_layer"`` picks, for each type, the largest ``r_k`` whose other-type energy
fraction (summed over the other types) stays under ``energy_threshold``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .affine import OnlineMemo, random_orthogonal

__all__ = ["ranks_from_ratio", "owner_from_ranks", "keep_masks", "TypeMask", "TypeCovariance", "TypedBasis",
           "typed_basis", "zeroed_energy"]


# ----------------------------------------------------------------------------- ranks and masks
def ranks_from_ratio(d: int, ratio: float, num_types: int) -> list[int]:
    """``r_k = round(d * ratio)`` for every type (at least 1 when ``ratio > 0``)."""
    if ratio < 0:
        raise ValueError(f"rank_ratio must be >= 0, got {ratio}")
    r = 0 if ratio == 0 else max(1, int(round(d * ratio)))
    if r * num_types > d:
        raise ValueError(f"rank_ratio={ratio}: {num_types} unique blocks of rank {r} do not fit in width {d}")
    return [r] * num_types


def owner_from_ranks(d: int, ranks: list[int]) -> Tensor:
    """Coordinate owners: ``-1`` (shared) for the first ``d - sum(r)``, then ``r_k`` times ``k``."""
    if sum(ranks) > d or min(ranks, default=0) < 0:
        raise ValueError(f"ranks {ranks} do not fit in width {d}")
    parts = [torch.full((d - sum(ranks),), -1, dtype=torch.long)]
    parts += [torch.full((r,), k, dtype=torch.long) for k, r in enumerate(ranks)]
    return torch.cat(parts)


def keep_masks(owner: Tensor, num_types: int) -> Tensor:
    """``(num_types, d)`` 0/1: row ``k`` keeps the shared coordinates and those of type ``k``."""
    k = torch.arange(num_types).unsqueeze(1)
    return ((owner.unsqueeze(0) == -1) | (owner.unsqueeze(0) == k)).to(torch.float32)


class TypeMask(OnlineMemo, nn.Module):
    """``x -> inner(x) * keep[types]``: zero the coordinates unique to the OTHER token types.

    ``token_types``: the model's :class:`~freeact.models.token_types.TokenTypes`; its ``(batch, seq)``
    tensor is read at every call. ``x`` is ``(batch, seq, d)`` (a linear's input) or
    ``(batch, heads, seq, d)`` (post-RoPE Q/K).
    """

    def __init__(self, inner: nn.Module, owner: Tensor, token_types, num_types: int | None = None):
        super().__init__()
        num_types = num_types or token_types.num_types
        if owner.max() >= num_types:
            raise ValueError(f"owner names type {int(owner.max())} but there are {num_types} types")
        self.inner = inner
        self.token_types = token_types
        self.register_buffer("owner", owner.clone())
        self.register_buffer("keep", keep_masks(owner, num_types))
        # row -1 (type -1: padding) keeps every coordinate
        self.register_buffer("keep_ext", torch.cat([self.keep, torch.ones(1, owner.numel())]), persistent=False)
        self.has_unique = bool((owner >= 0).any())

    @property
    def ranks(self) -> list[int]:
        return [int((self.owner == k).sum()) for k in range(self.keep.shape[0])]

    def _memo_types(self):
        return self.token_types.current

    def forward(self, x: Tensor) -> Tensor:
        return self._cached(x, self._masked)

    def _masked(self, x: Tensor) -> Tensor:
        z = self.inner(x)
        if not self.has_unique:
            return z
        t = self.token_types.get()
        keep = self.keep_ext[t.to(self.keep_ext.device)]  # (batch, seq, d); -1 -> the keep-all row
        if z.dim() == t.dim() + 2:  # (batch, heads, seq, d)
            keep = keep.unsqueeze(1)
            lead = (z.shape[0], z.shape[2])
        else:
            lead = tuple(z.shape[:-1])
        if lead != tuple(t.shape):
            raise ValueError(f"token types of shape {tuple(t.shape)} do not match activations of shape "
                             f"{tuple(z.shape)}; the type tensor must be (batch, seq) of the current forward")
        return z * keep.to(z.dtype)

    def merge(self, *args) -> None:
        self.clear_memo()
        self.inner.merge(*args)

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}"


# ----------------------------------------------------------------------------- statistics
COV_BLOCK = 4096  # the widest column block of a covariance accumulated at once (TypeCovariance)


class TypeCovariance:
    """Per-type second moments ``sum x^T x`` (float64) and token counts of one activation site.

    Wide sites accumulate by column blocks of at most ``block`` (default :data:`COV_BLOCK`) and only the blocks on
    and above the diagonal (``B (B + 1) / 2`` of ``B^2`` products: 60% of the work at d = 18944); the blocks
    below are copied from their mirror images when :attr:`cov` is read."""

    def __init__(self, d: int, num_types: int, device=None, block: int | None = None):
        self._cov = torch.zeros(num_types, d, d, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_types, dtype=torch.long)
        nb = -(-d // (block or COV_BLOCK))
        edges = [round(i * d / nb) for i in range(nb + 1)]
        self._blocks = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
        self._mirrored = True

    @property
    def cov(self) -> Tensor:
        """``(num_types, d, d)`` float64, symmetric."""
        if not self._mirrored:
            for i, bi in enumerate(self._blocks):
                for bj in self._blocks[i + 1:]:
                    self._cov[:, bj, bi] = self._cov[:, bi, bj].transpose(-1, -2)
            self._mirrored = True
        return self._cov

    @cov.setter
    def cov(self, value: Tensor) -> None:
        self._cov, self._mirrored = value, True

    @torch.no_grad()
    def add(self, x: Tensor, types: Tensor) -> None:
        """``x``: (..., d) rows, ``types``: matching leading shape (or broadcastable by flattening)."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        t = types.reshape(-1).to(x.device)
        if t.numel() != x.shape[0]:
            raise ValueError(f"{t.numel()} token types for {x.shape[0]} activation rows")
        for k in range(self._cov.shape[0]):
            xk = x[t == k]
            if not len(xk):
                continue
            for i, bi in enumerate(self._blocks):  # one block: the whole matrix
                for bj in self._blocks[i:]:
                    self._cov[k, bi, bj].addmm_(xk[:, bi].T, xk[:, bj])
            self._mirrored = len(self._blocks) == 1
            self.count[k] += len(xk)


def _normalised(covs: Tensor, present: list[bool]) -> list[Tensor | None]:
    out = []
    for C, p in zip(covs, present):
        tr = torch.trace(C)
        out.append(C / tr if p and tr > 0 else None)
    return out


def zeroed_energy(M: Tensor, owner: Tensor, covs: Tensor, present: list[bool] | None = None,
                  right: Callable[[Tensor], Tensor] | None = None) -> list[float | None]:
    """For each type ``j``: the fraction of its transformed activation energy (``z = x M``,
    ``M`` the whole activation side, ``covs`` the second moments of ``x``) on coordinates owned by
    OTHER types, i.e. what the zeroing removes from type-j tokens (0 = exact). None for a type
    without statistics. ``right``: ``X -> X M`` by the transform's own structure (a Kronecker product costs
    ``d^2 (d_l + d_r)`` instead of a dense ``d^3`` product); the per-coordinate energy ``diag(M^T C M)`` is
    then ``sum_a M[a, c] (C M)[a, c]``, one structured product per type."""
    n = covs.shape[0]
    present = present or [True] * n
    M = M.to(torch.float64).to(covs.device)
    owner = owner.to(covs.device)
    right = right or (lambda C: C @ M)
    out = []
    for j in range(n):
        if not present[j]:
            out.append(None)
            continue
        E = (M * right(covs[j])).sum(0)  # per-coordinate energy of type j: diag(M^T C_j M)
        total = E.sum()
        other = (owner >= 0) & (owner != j)
        out.append(float(E[other].sum() / total) if total > 0 else 0.0)
    return out


# ----------------------------------------------------------------------------- initial bases
@dataclass
class TypedBasis:
    Q: Tensor  # (d, d) orthogonal, float64; columns are the basis
    owner: Tensor  # (d,) -1 shared, k unique to type k
    ranks: list[int]
    energy: list[float]  # per type: summed other-type energy fraction on U_k


def typed_basis(covs: Tensor, ranks: list[int] | None = None, *, energy_threshold: float = 0.01,
                max_rank: int | None = None, present: list[bool] | None = None, mix: bool = True,
                generator: torch.Generator | None = None) -> TypedBasis:
    """Spectral basis from per-type covariances ``covs`` (num_types, d, d).

    ``ranks`` fixed, or None for per-layer ranks (largest ``r_k <= max_rank`` with other-type energy
    fraction ``<= energy_threshold``). ``present[k] = False`` drops type ``k``'s statistics (a type
    absent from calibration contributes no energy to the others' choice).
    """
    n, d, _ = covs.shape
    present = present or [True] * n
    norm = _normalised(covs, present)
    max_rank = d if max_rank is None else max_rank
    B = torch.eye(d, dtype=torch.float64, device=covs.device)  # orthonormal basis of what is left
    blocks, chosen, energy = [], [], []
    for k in range(n):
        others = [norm[j] for j in range(n) if j != k and norm[j] is not None]
        C = sum(others) if others else torch.zeros(d, d, dtype=torch.float64, device=covs.device)
        lam, V = torch.linalg.eigh(B.T @ C @ B)
        lam = lam.clamp(min=0)
        cum = torch.cumsum(lam, 0)
        if ranks is None:
            limit = min(max_rank, B.shape[1] - 1)
            r = int((cum[:limit] <= energy_threshold).sum())
        else:
            r = ranks[k]
            if r > B.shape[1]:
                raise ValueError(f"ranks {ranks} do not fit in width {d}")
        blocks.append(B @ V[:, :r])
        B = B @ V[:, r:]
        chosen.append(r)
        energy.append(float(cum[r - 1]) if r > 0 else 0.0)
    if mix:
        B = B @ random_orthogonal(B.shape[1], generator).to(B.device) if B.shape[1] else B
        blocks = [U @ random_orthogonal(U.shape[1], generator).to(U.device) if U.shape[1] else U for U in blocks]
    Q = torch.cat([B] + blocks, dim=1)
    return TypedBasis(Q, owner_from_ranks(d, chosen), chosen, energy)
