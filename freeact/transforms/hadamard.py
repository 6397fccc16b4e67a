"""Hadamard matrices and fast Hadamard transforms for rotation-based PTQ.

Conventions (matrices are *normalized*: entries +-1/sqrt(n), ``H @ H.T == I``):

* ``fast_hadamard_transform(x) == x @ hadamard_matrix(n).T`` over the last dim of
  ``x`` (each row vector ``v`` becomes ``H v``). Sylvester and Paley-II matrices
  are symmetric but Paley-I bases (12, 20, 28, ...) are not: the transpose matters.
* ``OnlineHadamard(n, seed)(x) == x @ module.matrix()``.

Supported orders are ``n = 2^k * m`` with ``H_n = kron(Sylvester(2^k), B_m)``, where
``m`` is 1 (pure Sylvester) or a Paley order ``<= MAX_BASE_ORDER`` (the dense
``m x m`` step stays cheap), the *smallest* such ``m`` being used for each ``n``:

* Paley I, ``m = q + 1``, ``q = p^r = 3 (mod 4)``: 12, 20, 28 (GF(3^3)), 44, 60,
  108, 140, 244 (GF(3^5)), ...;
* Paley II, ``m = 2(q + 1)``, ``q = p^r = 1 (mod 4)``: 36 (q=17), 52 (GF(5^2)),
  100 (GF(7^2)), 148 (q=73), ...

so e.g. 40 = 2 x 20, 576 = 16 x 36, 3584 = 128 x 28, 18944 = 128 x 148. GF(p^r) is
built by polynomial arithmetic modulo the first monic irreducible polynomial;
nothing is tabulated. Orders 156 and 172 (also 92, 116, 184, ...) have no Paley
construction: their known Hadamard matrices come from computer-searched
Williamson-type tables, which this module deliberately does not embed.

For unsupported ``n`` (e.g. 156, 172, 5000) ``hadamard_matrix`` raises
``ValueError``. ``block_hadamard_matrix(n)`` works for every ``n >= 1``: ``n / b``
diagonal copies of ``hadamard_matrix(b)``, ``b = supported_block_size(n)`` being
the largest supported divisor of ``n`` (largest blocks mix the most coordinates):
156 -> 3 x 52, 172 -> 43 x 4, 5000 -> 25 x 200, odd n without one -> identity.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor, nn

try:  # optional CUDA kernel (Dao-AILab), Sylvester order, power-of-two sizes
    from fast_hadamard_transform import hadamard_transform as _cuda_hadamard
except Exception:  # ImportError, or a broken CUDA extension
    _cuda_hadamard = None

MAX_BASE_ORDER = 256
_CUDA_MAX_DIM = 32768

__all__ = ["MAX_BASE_ORDER", "hadamard_matrix", "block_hadamard_matrix", "supported_block_size",
           "random_hadamard_matrix", "fast_hadamard_transform", "OnlineHadamard", "hadamard_kron_factors"]


def _prime_power(q: int) -> tuple[int, int] | None:
    """Return ``(p, r)`` with ``q == p**r`` and ``p`` prime, else ``None``."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    r = 0
    while q % p == 0:
        q, r = q // p, r + 1
    return (p, r) if q == 1 else None


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of ``a`` modulo monic ``f`` over GF(p); coefficients low -> high."""
    a, deg = list(a), len(f) - 1
    for d in range(len(a) - 1, deg - 1, -1):
        c = a[d] % p
        if c:
            for i, fi in enumerate(f):
                a[d - deg + i] -= c * fi
    return [c % p for c in a[:deg]] + [0] * max(0, deg - len(a))


def _irreducible(p: int, r: int) -> list[int]:
    """First monic irreducible polynomial of degree ``r`` over GF(p) (trial division)."""
    for low in itertools.product(range(p), repeat=r):
        f = list(low) + [1]
        if not any(not any(_polymod(f, list(g) + [1], p))
                   for d in range(1, r // 2 + 1) for g in itertools.product(range(p), repeat=d)):
            return f
    raise AssertionError("unreachable: irreducible polynomials exist for every degree")


def _jacobsthal(q: int) -> Tensor:
    """Jacobsthal matrix ``Q[a, b] = chi(a - b)`` of GF(q), chi = quadratic character."""
    p, r = _prime_power(q)  # element e <-> polynomial with base-p digits of e as coefficients
    f = _irreducible(p, r)
    digits = torch.tensor([[(e // p**i) % p for i in range(r)] for e in range(q)])
    weights = p ** torch.arange(r)
    squares = set()
    for d in digits[1:].tolist():
        prod = [sum(d[i] * d[k - i] for i in range(max(0, k - r + 1), min(k, r - 1) + 1))
                for k in range(2 * r - 1)]
        squares.add(sum(c * p**i for i, c in enumerate(_polymod(prod, f, p))))
    chi = torch.tensor([0.0] + [1.0 if e in squares else -1.0 for e in range(1, q)], dtype=torch.float64)
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[(diff * weights).sum(-1)]


def _paley_kind(m: int) -> tuple[str, int] | None:
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return "I", m - 1
    if m % 2 == 0 and _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II", m // 2 - 1
    return None


@functools.lru_cache(maxsize=None)
def _decompose(n: int) -> tuple[int, int] | None:
    """``(2^k, m)`` with ``n == 2^k * m`` and the smallest constructible base ``m``."""
    if n < 1:
        return None
    a = (n & -n).bit_length() - 1  # n = 2^a * odd
    odd = n >> a
    if odd == 1:
        return n, 1
    for b in range(2, a + 1):  # Paley orders are multiples of 4
        m = odd << b
        if m > MAX_BASE_ORDER:
            break
        if _paley_kind(m):
            return n // m, m
    return None


@functools.lru_cache(maxsize=None)
def _base_matrix(m: int) -> Tensor:
    """Unnormalized +-1 Hadamard matrix of order ``m`` (1 or a Paley order), float64 CPU."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    kind, q = _paley_kind(m)
    Q, ones = _jacobsthal(q), torch.ones(q, dtype=torch.float64)
    if kind == "I":  # skew conference matrix S (S^T = -S, S S^T = qI); H = I + S
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = ones, -ones, Q
        H = torch.eye(m, dtype=torch.float64) + S
    else:  # symmetric conference matrix C; H = C (x) [[1,1],[1,-1]] + I (x) [[1,-1],[-1,-1]]
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = ones, ones, Q
        H = (torch.kron(C, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
             + torch.kron(torch.eye(q + 1, dtype=torch.float64),
                          torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)))
    if not torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64)):
        raise AssertionError(f"Paley {kind} construction of order {m} failed")
    return H


@functools.lru_cache(maxsize=8)
def _dense_hadamard(n: int) -> Tensor:
    dec = _decompose(n)
    if dec is None:
        raise ValueError(f"no Hadamard construction for n={n}; use block_hadamard_matrix "
                         f"(block size {supported_block_size(n) if n >= 1 else '-'})")
    p2, m = dec
    H = _base_matrix(m)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(p2.bit_length() - 1):  # Sylvester: S_2N = [[1,1],[1,-1]] (x) S_N
        H = torch.kron(h2, H)
    return H / math.sqrt(n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Normalized ``n x n`` Hadamard matrix ``kron(Sylvester(2^k), B_m) / sqrt(n)``.

    Raises ``ValueError`` if ``n`` is not a supported order (see module docstring).
    The float64 CPU result is cached (last 8 sizes); a fresh copy is returned.
    """
    return _dense_hadamard(int(n)).to(dtype=dtype, device=device, copy=True)


def supported_block_size(n: int) -> int:
    """Largest divisor ``b`` of ``n`` for which ``hadamard_matrix(b)`` exists (``b == n`` if supported)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    divisors = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
    return next(d for d in sorted(divisors, reverse=True) if _decompose(d) is not None)


def block_hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Block-diagonal orthogonal matrix of ``n / b`` copies of ``hadamard_matrix(b)``,
    ``b = supported_block_size(n)``; equals ``hadamard_matrix(n)`` when ``n`` is supported."""
    b = supported_block_size(n)
    H = torch.kron(torch.eye(n // b, dtype=torch.float64), _dense_hadamard(b))
    return H.to(dtype=dtype, device=device)


def _random_signs(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float64)


def random_hadamard_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """QuaRot-style randomized Hadamard ``H @ diag(s)``, ``s`` in {+-1}^n drawn from a local
    generator seeded with ``seed``. ``H = block_hadamard_matrix(n)``, so any ``n >= 1`` works."""
    return (block_hadamard_matrix(n) * _random_signs(n, seed)).to(dtype)


def fast_hadamard_transform(x: Tensor, scale: bool = True, backend: str = "auto") -> Tensor:
    """Apply ``block_hadamard_matrix(n)`` over the last dim in O(n (log n + m)).

    Returns ``x @ block_hadamard_matrix(n).T`` (``== x @ hadamard_matrix(n).T`` for supported
    ``n``), times ``sqrt(b)`` if ``scale=False`` (unnormalized +-1 transform). Per block of
    size ``b = 2^k * m``: a dense ``m x m`` matmul then log2(2^k) vectorised butterfly stages.
    Half-precision inputs are computed in float32; the output keeps the input dtype.
    ``backend``: "torch", "cuda" (the ``fast_hadamard_transform`` package; non-float64 CUDA
    tensor and power-of-two ``n`` required) or "auto" (cuda when possible, else torch).
    """
    if backend not in ("auto", "torch", "cuda"):
        raise ValueError(f"unknown backend {backend!r}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    cuda_ok = (_cuda_hadamard is not None and x.is_cuda and x.dtype != torch.float64
               and n & (n - 1) == 0 and n <= _CUDA_MAX_DIM)
    if backend == "cuda" and not cuda_ok:
        raise RuntimeError("cuda backend needs the fast_hadamard_transform package, a CUDA fp32/"
                           f"fp16/bf16 tensor and a power-of-two size <= {_CUDA_MAX_DIM} (got n={n})")
    if backend != "torch" and cuda_ok:
        return _cuda_hadamard(x, 1.0 / math.sqrt(n) if scale else 1.0)

    b = supported_block_size(n)
    p2, m = _decompose(b)
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    lead = (*x.shape[:-1], n // b)
    y = work.reshape(*lead, p2, m)
    if m > 1:  # y[.., i, r] <- sum_s y[.., i, s] B[r, s]
        y = y @ _base_matrix(m).to(device=y.device, dtype=y.dtype).T
    h = 1
    while h < p2:  # butterflies pairing rows i and i + h: Sylvester order, any stage order
        y = y.reshape(*lead, p2 // (2 * h), 2, h, m)
        top, bottom = y.select(-3, 0), y.select(-3, 1)
        y = torch.stack((top + bottom, top - bottom), dim=-3)
        h *= 2
    y = y.reshape(x.shape)
    if scale:
        y = y * (1.0 / math.sqrt(b))
    return y.to(x.dtype)


class OnlineHadamard(nn.Module):
    """Online (activation-side) Hadamard rotation over the last dim.

    ``forward(x) == x @ self.matrix()`` with ``matrix() = diag(s) @ H.T`` where
    ``H = block_hadamard_matrix(n)`` and ``s`` are fixed random signs (all ones when
    ``seed is None``). Equivalently ``matrix() == random_hadamard_matrix(n, seed).T``. To keep
    a linear layer ``y = x @ W.T`` invariant after rotating its input, fold the inverse
    rotation into the weight: ``W' = W @ matrix()`` (orthogonal, so inverse = transpose).
    """

    def __init__(self, n: int, seed: int | None = None, backend: str = "auto"):
        super().__init__()
        self.n, self.seed, self.backend = int(n), seed, backend
        self.block_size = supported_block_size(self.n)
        signs = None if seed is None else _random_signs(self.n, seed).to(torch.int8)
        self.register_buffer("signs", signs)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"expected last dim {self.n}, got {x.shape[-1]}")
        if self.signs is not None:
            x = x * self.signs.to(x.dtype)
        return fast_hadamard_transform(x, scale=True, backend=self.backend)

    def matrix(self) -> Tensor:
        """Dense float64 CPU ``M`` with ``forward(x) == x @ M``."""
        M = block_hadamard_matrix(self.n).T
        if self.signs is not None:
            M = self.signs.to(device="cpu", dtype=torch.float64)[:, None] * M
        return M.contiguous()

    def extra_repr(self) -> str:
        return f"n={self.n}, block_size={self.block_size}, seed={self.seed}, backend={self.backend!r}"


@functools.lru_cache(maxsize=None)
def _kron_pair(n: int) -> tuple[Tensor, Tensor]:
    p2, m = _decompose(n)
    k = p2.bit_length() - 1
    # H_n = S_2^k (x) B_m = S_2^a (x) (S_2^(k-a) (x) B_m): the most square split (the smaller left on a tie)
    a = min(range(k + 1), key=lambda a: abs(math.log2((1 << a) / (n >> a))))
    left = (hadamard_matrix(1 << a) * math.sqrt(1 << a)).round()
    right = torch.kron((hadamard_matrix(1 << (k - a)) * math.sqrt(1 << (k - a))).round(), _base_matrix(m))
    return left, right.T.contiguous()


def hadamard_kron_factors(n: int) -> tuple[Tensor, Tensor]:
    """``(P_l, P_r)``: unnormalized +-1 float64 factors with ``x @ hadamard_matrix(n).T ==
    kron_matmul(x, [P_l, P_r]) / sqrt(n)``, i.e. ``P_l (x) P_r = sqrt(n) H_n^T``, for every supported ``n``
    (powers of two and ``2^k m`` with a Paley base ``m``): ``P_l`` a Sylvester factor, ``P_r`` the rest of the
    Sylvester part with the base, transposed (e.g. 12288 = 128 x 96, 18944 = 128 x 148). One Kronecker kernel
    applies either size in one pass over ``x`` (:mod:`freeact.kernels.hadamard`)."""
    if _decompose(int(n)) is None:
        raise ValueError(f"no Hadamard construction for n={n}")
    P_l, P_r = _kron_pair(int(n))
    return P_l.clone(), P_r.clone()


def sylvester_factors(n: int) -> tuple[Tensor, Tensor]:
    """``(H_a, H_b)``: unnormalized +-1 Sylvester matrices (float64) with ``H_n = H_a (x) H_b``,
    ``a <= b`` the most square power-of-two split of ``n`` (:func:`hadamard_kron_factors` of a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two, got {n}")
    return hadamard_kron_factors(n)
