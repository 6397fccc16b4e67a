"""FlatQuant's learnable pieces: affine transforms of a linear's input, weight and activation clipping.

A transformed linear input ("site") of width ``d`` computes, for every linear that reads it,

    y = x W^T = ((x / s) P) (W diag(s) P^{-T})^T

* ``P`` is learnable and invertible: ``P = P_l (x) P_r`` with ``d = d_l * d_r`` the most square
  factorisation of ``d`` (``structure="kronecker"``; any ``d``: 224 = 14 x 16, 592 = 16 x 37, a
  prime stays 1 x d) or one dense ``d x d`` matrix (``structure="dense"``);
* each factor is ``U diag(sigma) V^T`` with ``U, V`` orthogonal (``kind="invertible"``, FlatQuant's
  SVD form, so ``P^{-1} = V diag(1/sigma) U^T`` is exact and cheap) or just ``U``
  (``kind="orthogonal"``, FreeAct). ``U`` and ``V`` are kept orthogonal by
  :class:`CayleyOrthogonal` (the **Cayley** map with dynamic trivialisation, as
  ``torch.nn.utils.parametrizations.orthogonal``, without its host synchronisation): the initial matrix
  is stored as ``base`` and the learnable skew part starts at zero, so training starts exactly at the
  initial matrix;
* ``s`` is a learnable per-channel scale (SmoothQuant-style init ``max|x_j|^a / max|W_j|^(1-a)``).

``x @ (A (x) B)`` is computed as ``A^T X B`` on ``x`` reshaped to ``(..., d_l, d_r)``
(:func:`kron_matmul`), never by building the ``d x d`` Kronecker product.

Modes of every transform module here:

* ``calibrating``: the matrices are functions of learnable parameters; the activation side runs
  online and the weight side is applied on the fly by :class:`CalibratingWeight`, a
  ``torch.nn.utils.parametrize`` parametrization of ``linear.weight`` (transform, learnable clip,
  fake quantization), so gradients reach the transform from both sides;
* ``merged``: :meth:`merge` evaluates the matrices once in float64, the weight side is written into
  ``linear.weight`` (see :func:`merge_linear`) and the activation side keeps only frozen buffers.

Other pieces: :class:`HeadwiseVO` (FlatQuant's V/O pair: a per-head ``P_v`` fused into ``v_proj``'s
output and ``o_proj``'s input, and an online ``P_h`` across heads on ``o_proj``'s input),
:class:`HeadTransform` (orthogonal per-head transform applied to post-RoPE Q and K; orthogonal so
``q k^T`` is unchanged by applying the same matrix to both), :class:`WeightClip` (FlatQuant's
learnable per-output-channel clamp ``[sigmoid(a) min_row, sigmoid(b) max_row]``).
"""
from __future__ import annotations

import copy
import functools
import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..quant.quantizer import QuantSpec, fake_quant

__all__ = ["most_square_factors", "kron_matmul", "random_orthogonal", "initial_matrix", "smooth_scale",
           "CayleyOrthogonal", "LearnableSquare", "AffineSite", "HeadwiseVO", "HeadTransform", "WeightClip",
           "CalibratingWeight", "merge_linear", "OnlineMemo"]

KINDS = ("invertible", "orthogonal")
STRUCTURES = ("kronecker", "dense")


# ----------------------------------------------------------------------------- helpers
def most_square_factors(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b == n``, ``a <= b`` and ``a`` the largest divisor ``<= sqrt(n)``."""
    if n < 1:
        raise ValueError(f"width must be positive, got {n}")
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def kron_matmul(x: Tensor, mats: list[Tensor]) -> Tensor:
    """``x @ M`` for ``M = mats[0]`` (dense) or ``M = mats[0] (x) mats[1]`` (Kronecker), last dim."""
    if len(mats) == 1:
        return x @ mats[0]
    A, B = mats
    shape = x.shape
    X = x.reshape(*shape[:-1], A.shape[0], B.shape[0])
    return (A.transpose(0, 1) @ X @ B).reshape(shape)


def random_orthogonal(n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """Haar-random ``n x n`` orthogonal matrix (QR of a Gaussian with the sign fix)."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(dtype)


def smooth_scale(x_absmax: Tensor, w_absmax: Tensor, alpha: float, eps: float = 1e-5) -> Tensor:
    """SmoothQuant's per-channel scale ``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)`` (act: ``x / s``)."""
    x = x_absmax.double().clamp(min=eps)
    w = w_absmax.double().clamp(min=eps)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=eps)


class _Matrix(nn.Module):
    """Holds one square matrix as ``weight`` (so the parametrizations can attach to it)."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.clone())


class CayleyOrthogonal(nn.Module):
    """Parametrization ``weight = base @ (I - A/2)^{-1} (I + A/2)`` with ``A = tril(X) - tril(X)^T``: the
    Cayley map with dynamic trivialisation of ``torch.nn.utils.parametrizations.orthogonal`` (the same
    function of the same parameter), solved with ``torch.linalg.solve_ex``: no host synchronisation for
    the error check, so a training step can be captured in a CUDA graph. ``base`` is the initial
    (orthogonal) matrix and ``X`` starts at zero, so training starts exactly at it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("base", None)  # set by right_inverse when the parametrization is registered

    def forward(self, X: Tensor) -> Tensor:
        L = X.tril()
        A = L - L.mT
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        Q, _ = torch.linalg.solve_ex(eye - 0.5 * A, eye + 0.5 * A)
        return self.base @ Q

    def right_inverse(self, Q: Tensor) -> Tensor:
        self.base = Q.detach().clone()
        return torch.zeros_like(Q)


def _orthogonal(init: Tensor) -> nn.Module:
    m = _Matrix(init)
    parametrize.register_parametrization(m, "weight", CayleyOrthogonal(), unsafe=True)
    return m


# ----------------------------------------------------------------------------- learnable matrices
class LearnableSquare(nn.Module):
    """A learnable ``n x n`` matrix ``P``: ``U diag(sigma) V^T`` (invertible) or ``U`` (orthogonal).

    ``init`` (orthogonal) is the initial ``U``; ``V`` starts at the identity and ``sigma`` at ones, so
    ``P`` starts at ``init`` in both kinds.
    """

    def __init__(self, n: int, kind: str = "invertible", init: Tensor | None = None, dtype=torch.float32):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.n, self.kind = n, kind
        init = torch.eye(n, dtype=torch.float64) if init is None else init
        if init.shape != (n, n):
            raise ValueError(f"initial matrix must be {n} x {n}, got {tuple(init.shape)}")
        self.u = _orthogonal(init.to(dtype))
        if kind == "invertible":
            self.v = _orthogonal(torch.eye(n, dtype=dtype))
            self.sigma = nn.Parameter(torch.ones(n, dtype=dtype))

    def matrix(self) -> Tensor:
        if self.kind == "orthogonal":
            return self.u.weight
        return (self.u.weight * self.sigma) @ self.v.weight.T

    def inverse_t(self) -> Tensor:
        """``P^{-T}`` (``= P`` for an orthogonal ``P``)."""
        if self.kind == "orthogonal":
            return self.u.weight
        return (self.u.weight / self.sigma) @ self.v.weight.T

    @torch.no_grad()
    def frozen(self, dtype=torch.float64) -> tuple[Tensor, Tensor]:
        """``(P, P^{-T})`` evaluated with every parameter cast to ``dtype`` (float64 for merging)."""
        m = copy.deepcopy(self).to(dtype)
        return m.matrix().detach(), m.inverse_t().detach()


def initial_matrix(n: int, init: str, generator) -> Tensor:
    if init == "random":
        return random_orthogonal(n, generator)
    if init == "identity":
        return torch.eye(n, dtype=torch.float64)
    raise ValueError(f"matrix init must be 'random' or 'identity', got {init!r}")


class OnlineMemo:
    """Mixin for online activation transforms that several linears read (q/k/v, gate/up): each linear's
    input quantizer calls the transform with the same tensor, so a call with the very tensor of the
    previous call (same object, not modified in place), unchanged parameters / buffers / mode and
    the same token-type tensor returns the previous output instead of recomputing it.
    :meth:`clear_memo` drops the cached tensors; they are never pickled."""

    _memo = None

    def _memo_types(self):
        return None

    def _memo_key(self):
        versions = tuple(t._version for t in self.parameters()) + tuple(t._version for t in self.buffers())
        return (torch.is_grad_enabled(), getattr(self, "mode", None), versions)

    def _cached(self, x: Tensor, compute) -> Tensor:
        key, types, memo = self._memo_key(), self._memo_types(), self._memo
        if memo is not None and memo[0] is x and memo[1] == x._version and memo[2] == key and memo[3] is types:
            return memo[4]
        out = compute(x)
        self._memo = (x, x._version, key, types, out)
        return out

    def clear_memo(self) -> None:
        self._memo = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_memo", None)
        return state


class _Mergeable(nn.Module):
    """Shared mode bookkeeping: ``calibrating`` until :meth:`merge` freezes the matrices."""

    mode = "calibrating"

    @property
    def merged(self) -> bool:
        return self.mode == "merged"

    def _check_calibrating(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is merged: its {what} is in the weights already")


# ----------------------------------------------------------------------------- one linear input
class AffineSite(OnlineMemo, _Mergeable):
    """One transformed linear input: ``x -> (x / s) P`` online, ``W -> W diag(s) P^{-T}`` offline.

    ``scale``: the initial per-channel ``s`` (None = no scaling); ``learn_scale`` makes it a
    parameter. ``init`` of the factors: "random" (random orthogonal, FlatQuant) or "identity";
    ``factors_init`` overrides it with explicit orthogonal matrices (one per factor).
    ``post_init``: an optional dense orthogonal ``d x d`` matrix ``R`` applied after ``P`` (learnable,
    Cayley-parametrized): ``x -> (x / s) P R`` and ``W -> W diag(s) P^{-T} R``. FreeAct's
    ``typed_basis: dense`` puts its token-typed coordinates in ``R``, so the unique blocks are free to
    align with each type's null space whatever the structure of ``P``.
    """

    def __init__(self, d: int, kind: str = "invertible", structure: str = "kronecker", scale: Tensor | None = None,
                 learn_scale: bool = True, init: str = "random", generator: torch.Generator | None = None,
                 factors_init: list[Tensor] | None = None, post_init: Tensor | None = None,
                 dtype=torch.float32):
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        self.d, self.kind, self.structure = d, kind, structure
        dims = most_square_factors(d) if structure == "kronecker" else (d,)
        if factors_init is None:
            factors_init = [initial_matrix(n, init, generator) for n in dims]
        if [tuple(m.shape) for m in factors_init] != [(n, n) for n in dims]:
            raise ValueError(f"factors_init shapes {[tuple(m.shape) for m in factors_init]} do not match {dims}")
        self.factors = nn.ModuleList(LearnableSquare(n, kind, m, dtype) for n, m in zip(dims, factors_init))
        self.post = None if post_init is None else LearnableSquare(d, "orthogonal", post_init, dtype)
        if scale is None:
            self.scale = None
        elif learn_scale:
            self.scale = nn.Parameter(scale.detach().to(dtype).clone())
        else:
            self.register_buffer("scale", scale.detach().to(dtype).clone())

    @property
    def dims(self) -> tuple[int, ...]:
        if self.merged:
            return tuple(m.shape[0] for m in self._act_mats())
        return tuple(f.n for f in self.factors)

    def _act_mats(self) -> list[Tensor]:
        if self.merged:
            return [getattr(self, f"act_{i}") for i in range(self.n_factors)]
        return [f.matrix() for f in self.factors]

    def _post_mat(self) -> Tensor | None:
        if self.merged:
            return self.post_act
        return None if self.post is None else self.post.matrix()

    # -- activation side (online) ------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self._cached(x, self._act)

    def _act(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d:
            raise ValueError(f"{type(self).__name__} of width {self.d} got an input of width {x.shape[-1]}")
        if self.merged:
            if self.inv_scale is not None:
                x = x * self.inv_scale.to(x.dtype)
        elif self.scale is not None:
            x = x / self.scale.to(x.dtype)
        x = kron_matmul(x, [m.to(x.dtype) for m in self._act_mats()])
        post = self._post_mat()
        return x if post is None else x @ post.to(x.dtype)

    # -- weight side --------------------------------------------------------------------------
    def transform_weight(self, w: Tensor) -> Tensor:
        """``W diag(s) P^{-T}`` (differentiable; calibrating mode)."""
        self._check_calibrating("weight side")
        if self.scale is not None:
            w = w * self.scale.to(w.dtype)
        w = kron_matmul(w, [f.inverse_t().to(w.dtype) for f in self.factors])
        return w if self.post is None else w @ self.post.matrix().to(w.dtype)

    @torch.no_grad()
    def frozen(self) -> dict:
        """Everything in float64: act-side factors, weight-side factors (``P^{-T}``), the scale and
        the post-rotation ``R`` (None without one)."""
        self._check_calibrating("transform")
        pairs = [f.frozen(torch.float64) for f in self.factors]
        s = None if self.scale is None else self.scale.detach().to(torch.float64)
        post = None if self.post is None else self.post.frozen(torch.float64)[0]
        return {"act": [p for p, _ in pairs], "weight": [q for _, q in pairs], "scale": s, "post": post}

    @staticmethod
    def apply_frozen_weight(frozen: dict, w: Tensor) -> Tensor:
        if frozen["scale"] is not None:
            w = w * frozen["scale"].to(w.device)
        w = kron_matmul(w, [m.to(w.device) for m in frozen["weight"]])
        post = frozen.get("post")
        return w if post is None else w @ post.to(w.device)

    @staticmethod
    def apply_frozen_act(frozen: dict, x: Tensor) -> Tensor:
        """``x M`` for rows ``x`` (any float dtype; computed in ``x``'s), ``M`` the whole activation side of
        ``frozen``, through its structure (scale, Kronecker factors, post-rotation): ``d (d_l + d_r)``
        multiply-adds a row for two factors instead of ``d^2``."""
        if frozen["scale"] is not None:
            x = x / frozen["scale"].to(x).unsqueeze(0)
        x = kron_matmul(x, [m.to(x) for m in frozen["act"]])
        post = frozen.get("post")
        return x if post is None else x @ post.to(x)

    @staticmethod
    def frozen_act_matrix(frozen: dict) -> Tensor:
        """The whole activation side as one ``d x d`` float64 matrix ``M``: ``x -> x M``."""
        d = math.prod(m.shape[0] for m in frozen["act"])
        return AffineSite.apply_frozen_act(frozen, torch.eye(d, dtype=torch.float64, device=frozen["act"][0].device))

    @torch.no_grad()
    def merge(self, frozen: dict | None = None) -> None:
        """Switch to merged mode: keep only the activation side, as buffers (the weight side must
        have been merged with :func:`merge_linear` using the same ``frozen`` values)."""
        if self.merged:
            return
        self.clear_memo()
        frozen = frozen or self.frozen()
        dtype = next(self.factors.parameters()).dtype
        self.n_factors = len(frozen["act"])
        for i, m in enumerate(frozen["act"]):
            self.register_buffer(f"act_{i}", m.to(dtype))
        del self.factors
        post = frozen.get("post")
        if self.post is not None:
            del self.post
        self.register_buffer("post_act", None if post is None else post.to(dtype))
        if self.scale is not None:
            del self.scale
            self.register_buffer("inv_scale", (1.0 / frozen["scale"]).to(dtype))
        else:
            self.inv_scale = None
        self.mode = "merged"

    def extra_repr(self) -> str:
        return f"d={self.d}, dims={self.dims}, kind={self.kind}, mode={self.mode}"


# ----------------------------------------------------------------------------- V/O per head
class HeadwiseVO(_Mergeable):
    """FlatQuant's V/O pair. ``P_v`` (head_dim) is fused into ``v_proj``'s output rows (``v -> v P_v``
    per KV head, weight and bias) so attention outputs arrive in the ``P_v`` basis; with ``heads=True``
    ``o_proj``'s input also gets ``P_h`` (num_heads) across heads online. ``o_proj``'s weight gets
    ``(P_h (x) P_v)^{-T}`` (``P_h = I`` without heads). Every query head of a KV group shares that KV
    head's ``P_v``, so GQA needs nothing special.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, kind: str = "invertible",
                 init: str = "random", generator: torch.Generator | None = None, heads: bool = True,
                 dtype=torch.float32):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.kind, self.has_heads = kind, heads
        self.heads = None
        if heads:
            self.heads = LearnableSquare(num_heads, kind, initial_matrix(num_heads, init, generator), dtype)
        self.value = LearnableSquare(head_dim, kind, initial_matrix(head_dim, init, generator), dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``o_proj``'s input ``(..., heads * head_dim) -> x (P_h (x) I)`` (identity without heads)."""
        if not self.has_heads:
            return x
        P = (self.heads_act if self.merged else self.heads.matrix()).to(x.dtype)
        shape = x.shape
        X = x.reshape(*shape[:-1], self.num_heads, self.head_dim)
        return (P.transpose(0, 1) @ X).reshape(shape)

    @staticmethod
    def _v_rows(w: Tensor, Pv: Tensor, kv: int) -> Tensor:
        hd = Pv.shape[0]
        W = w.reshape(kv, hd, *w.shape[1:])
        return torch.einsum("ij,ki...->kj...", Pv.to(w.dtype), W).reshape(w.shape)

    def _heads_inv_t(self, like: Tensor) -> Tensor:
        if self.has_heads:
            return self.heads.inverse_t().to(like.dtype)
        return torch.eye(self.num_heads, dtype=like.dtype, device=like.device)

    def transform_v_weight(self, w: Tensor) -> Tensor:
        self._check_calibrating("v weight side")
        return self._v_rows(w, self.value.matrix(), self.num_kv_heads)

    def transform_v_bias(self, b: Tensor) -> Tensor:
        self._check_calibrating("v bias side")
        return self._v_rows(b, self.value.matrix(), self.num_kv_heads)

    def transform_o_weight(self, w: Tensor) -> Tensor:
        self._check_calibrating("o weight side")
        return kron_matmul(w, [self._heads_inv_t(w), self.value.inverse_t().to(w.dtype)])

    @torch.no_grad()
    def frozen(self) -> dict:
        self._check_calibrating("transform")
        pv, pv_it = self.value.frozen()
        if self.has_heads:
            ph, ph_it = self.heads.frozen()
        else:
            ph = ph_it = torch.eye(self.num_heads, dtype=torch.float64)
        return {"heads": ph, "value": pv, "o_weight": [ph_it, pv_it]}

    def apply_frozen_v(self, frozen: dict, w: Tensor) -> Tensor:
        return self._v_rows(w, frozen["value"].to(w.device), self.num_kv_heads)

    @staticmethod
    def apply_frozen_o(frozen: dict, w: Tensor) -> Tensor:
        return kron_matmul(w, [m.to(w.device) for m in frozen["o_weight"]])

    @torch.no_grad()
    def merge(self, frozen: dict | None = None) -> None:
        if self.merged:
            return
        frozen = frozen or self.frozen()
        dtype = next(self.value.parameters()).dtype
        if self.has_heads:
            self.register_buffer("heads_act", frozen["heads"].to(dtype))
        del self.heads, self.value
        self.mode = "merged"

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"online_heads={self.has_heads}, mode={self.mode}")


# ----------------------------------------------------------------------------- post-RoPE Q/K
class HeadTransform(_Mergeable):
    """Orthogonal learnable ``head_dim x head_dim`` matrix applied to post-RoPE Q and K (``x @ Q``).

    The same module transforms both (that is how :class:`~freeact.quant.kv.QKVHook` calls it), which
    is exact because ``(q Q)(k Q)^T = q k^T`` for orthogonal ``Q``; that is why it is orthogonal
    rather than FlatQuant's invertible K transform with its inverse on Q.
    """

    def __init__(self, head_dim: int, init: str = "random", generator: torch.Generator | None = None,
                 init_matrix: Tensor | None = None, dtype=torch.float32):
        super().__init__()
        m = initial_matrix(head_dim, init, generator) if init_matrix is None else init_matrix
        self.head_dim = head_dim
        self.q = LearnableSquare(head_dim, "orthogonal", m, dtype)

    def forward(self, x: Tensor) -> Tensor:
        Q = self.matrix_buf if self.merged else self.q.matrix()
        return x @ Q.to(x.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        dtype = next(self.q.parameters()).dtype
        self.register_buffer("matrix_buf", self.q.frozen()[0].to(dtype))
        del self.q
        self.mode = "merged"


# ----------------------------------------------------------------------------- clipping
class WeightClip(nn.Module):
    """FlatQuant's learnable weight clipping: per output channel, clamp the row to
    ``[sigmoid(a) * min(row), sigmoid(b) * max(row)]`` (``a = b = 4`` at init: ratio 0.982).
    Applied right before the weight quantizer, so it sets the quantizer's range."""

    def __init__(self, d_out: int, init: float = 4.0, dtype=torch.float32):
        super().__init__()
        self.logit_max = nn.Parameter(torch.full((d_out, 1), init, dtype=dtype))
        self.logit_min = nn.Parameter(torch.full((d_out, 1), init, dtype=dtype))

    def forward(self, w: Tensor) -> Tensor:
        return clip_rows(w, self.logit_max, self.logit_min)


def clip_rows(w: Tensor, logit_max: Tensor, logit_min: Tensor) -> Tensor:
    """:class:`WeightClip`'s clamp as a function of tensors."""
    hi = w.amax(dim=1, keepdim=True) * torch.sigmoid(logit_max).to(w.dtype)
    lo = w.amin(dim=1, keepdim=True) * torch.sigmoid(logit_min).to(w.dtype)
    return torch.clamp(w, min=lo, max=hi)


def clipped_fake_quant(w: Tensor, logit_max: Tensor | None, logit_min: Tensor | None, spec: QuantSpec) -> Tensor:
    """The training forward of a weight after its transform: the learned clip (when given), then the fake
    quantizer. A function of tensors and a spec only, so that one compiled version serves every layer."""
    if logit_max is not None:
        w = clip_rows(w, logit_max, logit_min)
    return fake_quant(w, spec)


@functools.cache
def compiled_clipped_fake_quant():
    """:func:`clipped_fake_quant` through ``torch.compile`` (made once; shapes that change are recompiled as
    dynamic): on a GPU, its dozen elementwise passes over the weight, forward and backward, become a few fused
    kernels. Block training at 8B spends most of a step in those passes (README, Performance)."""
    return torch.compile(clipped_fake_quant, fullgraph=True)


# ----------------------------------------------------------------------------- calibrating mode
class CalibratingWeight(nn.Module):
    """Parametrization of ``linear.weight`` (or ``.bias``) while calibrating:
    ``W -> Q_w(clip(out(in(W))))`` with ``in`` the input-side transform (``W diag(s) P^{-T}``),
    ``out`` an output-side transform (``v_proj``'s rows), ``clip`` a :class:`WeightClip` and ``Q_w``
    the weight fake-quantizer. Clip and quantizer act only when ``spec`` is enabled; ``compiled``: clip and
    quantizer through :func:`compiled_clipped_fake_quant` (the same function, fused by ``torch.compile``)."""

    def __init__(self, input_side=None, output_side=None, clip: WeightClip | None = None,
                 spec: QuantSpec | None = None, compiled: bool = False):
        super().__init__()
        self.input_side = input_side  # callable W -> W (bound method of a transform module)
        self.output_side = output_side
        self.clip = clip
        self.spec = spec
        self.quantize = True
        self.compiled = compiled

    def forward(self, w: Tensor) -> Tensor:
        if self.input_side is not None:
            w = self.input_side(w)
        if self.output_side is not None:
            w = self.output_side(w)
        if self.spec is not None and self.spec.enabled:
            if not self.quantize:
                return self.clip(w) if self.clip is not None else w
            a, b = (self.clip.logit_max, self.clip.logit_min) if self.clip is not None else (None, None)
            fn = compiled_clipped_fake_quant() if self.compiled else clipped_fake_quant
            w = fn(w, a, b, self.spec)
        return w


@torch.no_grad()
def merge_linear(linear: nn.Linear, input_side=None, output_side=None, bias_side=None,
                 clip: WeightClip | None = None, spec: QuantSpec | None = None) -> None:
    """Write the weight side into ``linear`` in float64 and drop its calibrating parametrizations.

    ``input_side`` / ``output_side`` / ``bias_side``: float64 callables ``W -> W``. The learned clip
    is applied (as a clamp, when ``spec`` quantizes) so the pipeline's weight quantizer (RTN: the
    very quantizer used in training; GPTQ: ranges from the clamped rows) honours it.
    """
    for name in ("weight", "bias"):
        if parametrize.is_parametrized(linear, name):
            parametrize.remove_parametrizations(linear, name, leave_parametrized=False)
    w = linear.weight.data
    w64 = w.to(torch.float64)
    if input_side is not None:
        w64 = input_side(w64)
    if output_side is not None:
        w64 = output_side(w64)
    if clip is not None and spec is not None and spec.enabled:
        w64 = clip(w64)
    linear.weight.data = w64.to(w.dtype)
    if bias_side is not None and linear.bias is not None:
        b = linear.bias.data
        linear.bias.data = bias_side(b.to(torch.float64)).to(b.dtype)

