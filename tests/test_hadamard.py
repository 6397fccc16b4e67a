"""Tests for freeact.transforms.hadamard (CPU only, a few seconds)."""
import math
import sys
from pathlib import Path

import pytest
import torch

try:
    import freeact  # noqa: F401
except ImportError:  # repo not installed: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freeact.transforms import hadamard as had
from freeact.transforms.hadamard import (
    OnlineHadamard,
    block_hadamard_matrix,
    fast_hadamard_transform,
    hadamard_matrix,
    random_hadamard_matrix,
    supported_block_size,
)

F64 = torch.float64
LISTED_M = [12, 20, 28, 36, 40, 52, 60, 108, 140]  # generated; 156 and 172 are not
DENSE_GRAM_MAX = 2048  # above this, orthogonality is checked with random probes


def assert_orthogonal(H, tol=1e-10):
    n = H.shape[0]
    assert H.shape == (n, n) and H.dtype == F64
    if n <= DENSE_GRAM_MAX:
        err = (H @ H.T - torch.eye(n, dtype=F64)).abs().max()
    else:  # square H: H^T H = I <=> H H^T = I; (H^T H - I) V = 0 for random V only if it is 0 (a.s.)
        V = torch.randn(n, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
        err = (H.T @ (H @ V) - V).abs().max()
    assert err < tol, f"n={n}: orthogonality error {err}"


def assert_true_hadamard(H):
    n = H.shape[0]
    scaled = H * math.sqrt(n)
    assert (scaled.abs() - 1).abs().max() < 1e-12, f"n={n}: entries are not +-1/sqrt(n)"


def sylvester_reference(n):
    i = torch.arange(n)
    bits = (i[:, None] & i[None, :]).tolist()
    sign = torch.tensor([[(-1.0) ** bin(b).count("1") for b in row] for row in bits], dtype=F64)
    return sign / math.sqrt(n)


# ------------------------------------------------------------------------- dense matrices
@pytest.mark.parametrize("k", range(13))
def test_sylvester_sizes(k):
    n = 2**k
    H = hadamard_matrix(n)
    assert_orthogonal(H)
    assert_true_hadamard(H)
    assert torch.equal(H, H.T)
    if n <= 256:  # natural (scipy / CUDA kernel) order: H[i, j] = (-1)^popcount(i & j) / sqrt(n)
        assert torch.allclose(H, sylvester_reference(n), atol=1e-15)


@pytest.mark.parametrize("mult", [1, 2, 4])
@pytest.mark.parametrize("m", LISTED_M)
def test_generated_orders(m, mult):
    n = m * mult
    assert supported_block_size(n) == n
    H = hadamard_matrix(n)
    assert_orthogonal(H)
    assert_true_hadamard(H)


@pytest.mark.parametrize("q", [7, 11, 13, 25, 27, 49, 81, 125, 243])
def test_jacobsthal_prime_power_fields(q):
    Q = had._jacobsthal(q)
    eye, J = torch.eye(q, dtype=F64), torch.ones(q, q, dtype=F64)
    assert torch.equal(torch.diagonal(Q), torch.zeros(q, dtype=F64))
    assert torch.equal(Q @ Q.T, q * eye - J)
    assert torch.equal(Q @ torch.ones(q, dtype=F64), torch.zeros(q, dtype=F64))
    assert torch.equal(Q.T, Q if q % 4 == 1 else -Q)


def test_paley_one_base_is_not_symmetric():
    # orientation matters: for Paley-I bases H != H^T, so x @ H.T and x @ H differ
    for n in (12, 28, 28 * 4):
        H = hadamard_matrix(n) * math.sqrt(n)
        assert (H - H.T).abs().max() == 2


@pytest.mark.parametrize("n,expected", [(3584, 3584), (18944, 18944), (576, 576), (592, 592),
                                        (1536, 1536), (96, 96), (156, 52), (172, 4),
                                        (5000, 200), (368, 16), (6, 2), (7, 1), (1, 1)])
def test_supported_block_size(n, expected):
    assert supported_block_size(n) == expected
    for d in range(expected + 1, n + 1):  # no larger divisor is a supported order
        if n % d == 0:
            with pytest.raises(ValueError):
                had._dense_hadamard(d)


@pytest.mark.parametrize("n", [156, 172, 5000, 368, 6, 7, 0])
def test_unsupported_sizes_raise(n):
    with pytest.raises(ValueError):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [3584, 592, 576])
def test_large_true_hadamard_dense(n):
    H = hadamard_matrix(n)
    assert_orthogonal(H)
    assert_true_hadamard(H)


@pytest.mark.parametrize("n", [156, 172, 368, 5000, 6, 7, 576])
def test_block_fallback(n):
    b = supported_block_size(n)
    H = block_hadamard_matrix(n)
    assert_orthogonal(H)
    blocks = H.reshape(n // b, b, n // b, b)
    for i in range(n // b):
        for j in (0, i, n // b - 1):
            expected = hadamard_matrix(b) if i == j else torch.zeros(b, b, dtype=F64)
            assert torch.equal(blocks[i, :, j, :], expected)
    if b == n:
        assert torch.equal(H, hadamard_matrix(n))


def test_cached_matrix_is_not_aliased():
    H = hadamard_matrix(28)
    H.zero_()
    assert_true_hadamard(hadamard_matrix(28))
    assert hadamard_matrix(28, dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------------- fast transform
@pytest.mark.parametrize("n", [1, 2, 28, 40, 52, 12 * 64, 20 * 32, 576, 1536, 3584,
                               156, 172, 368, 5000, 6, 7])
def test_fast_transform_matches_dense(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, dtype=F64, generator=gen)
    H = block_hadamard_matrix(n)
    y = fast_hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == F64
    assert (y - x @ H.T).abs().max() < 1e-10
    if (H - H.T).abs().max() > 1e-3:  # the transpose convention is really being tested
        assert (y - x @ H).abs().max() > 1e-3
    b = supported_block_size(n)
    y_raw = fast_hadamard_transform(x, scale=False)
    assert (y_raw - math.sqrt(b) * y).abs().max() < 1e-9
    assert torch.allclose(fast_hadamard_transform(x[0, 0]), y[0, 0], rtol=0, atol=1e-12)  # 1-D


def test_fast_transform_huge_size_without_dense_matrix():
    # 18944 = 128 * 148 (Paley II, q=73): a dense float64 matrix would be 2.8 GB, so check
    # rows of H (= transform of unit vectors) against the Kronecker formula instead.
    n, m = 18944, 148
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:12]
    units = torch.zeros(12, n, dtype=F64)
    units[torch.arange(12), idx] = 1.0
    rows = fast_hadamard_transform(units)  # rows[r] = H[idx[r], :]
    B = hadamard_matrix(m) * math.sqrt(m)
    j = torch.arange(n)
    for r, i in enumerate(idx.tolist()):
        syl = torch.tensor([(-1.0) ** bin((i // m) & c).count("1") for c in range(n // m)], dtype=F64)
        expected = syl[j // m] * B[i % m, j % m] / math.sqrt(n)
        assert (rows[r] - expected).abs().max() < 1e-12
    assert (rows @ rows.T - torch.eye(12, dtype=F64)).abs().max() < 1e-10
    x = torch.randn(4, n, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(fast_hadamard_transform(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [768, 28 * 8, 172])
def test_fast_transform_low_precision(dtype, n):
    x = torch.randn(5, n, dtype=F64, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = x.to(F64) @ block_hadamard_matrix(n).T  # exact transform of the rounded input
    y = fast_hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    err, scale = (y.to(F64) - ref).abs(), ref.abs().max()
    if dtype == torch.float32:
        assert err.max() / scale < 1e-6
    else:  # accumulated in float32 and rounded once: within one bf16 rounding (u = 2^-8)
        assert (err <= ref.abs() * 2.0**-8 + 1e-5 * scale).all()


def test_backend_selection():
    x = torch.randn(3, 64)
    assert torch.equal(fast_hadamard_transform(x, backend="torch"), fast_hadamard_transform(x))
    with pytest.raises(RuntimeError):
        fast_hadamard_transform(x, backend="cuda")  # CPU tensor
    with pytest.raises(ValueError):
        fast_hadamard_transform(x, backend="bogus")
    with pytest.raises(TypeError):
        fast_hadamard_transform(torch.ones(3, 64, dtype=torch.int64))


# ------------------------------------------------------------------------- randomized
@pytest.mark.parametrize("n", [64, 28 * 4, 156, 7, 1])
def test_random_hadamard(n):
    rng_state = torch.get_rng_state()
    R0, R0b, R1 = random_hadamard_matrix(n, 0), random_hadamard_matrix(n, 0), random_hadamard_matrix(n, 1)
    assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched
    assert torch.equal(R0, R0b)
    if n >= 7:
        assert not torch.equal(R0, R1)
    assert_orthogonal(R0)
    H = block_hadamard_matrix(n)
    s = torch.diagonal(H.T @ R0)  # R = H diag(s)  =>  H^T R = diag(s)
    assert torch.allclose(s.abs(), torch.ones(n, dtype=F64), atol=1e-12)
    assert torch.allclose(R0, H * s, atol=1e-12)
    assert random_hadamard_matrix(n, 0, dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------------- module
@pytest.mark.parametrize("seed", [None, 0, 5])
@pytest.mark.parametrize("n", [64, 28, 156, 768])
def test_online_hadamard_matches_matrix(n, seed):
    mod = OnlineHadamard(n, seed=seed)
    M = mod.matrix()
    assert M.dtype == F64 and M.shape == (n, n)
    assert_orthogonal(M)
    x = torch.randn(2, 3, n, dtype=F64, generator=torch.Generator().manual_seed(7))
    assert (mod(x) - x @ M).abs().max() < 1e-10
    if seed is None:
        assert torch.equal(M, block_hadamard_matrix(n).T)
        assert "signs" not in mod.state_dict()
    else:
        assert torch.equal(M, random_hadamard_matrix(n, seed).T)
        assert torch.equal(mod.state_dict()["signs"].abs(), torch.ones(n, dtype=torch.int8))
    # folding the rotation into a following linear layer keeps it invariant: W' = W @ M
    W = torch.randn(5, n, dtype=F64, generator=torch.Generator().manual_seed(8))
    assert (mod(x) @ (W @ M).T - x @ W.T).abs().max() < 1e-9


def test_online_hadamard_dtype_and_shape_checks():
    mod = OnlineHadamard(96, seed=3).to(torch.bfloat16)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    y = mod(x)
    assert y.dtype == torch.bfloat16
    ref = x.to(F64) @ mod.matrix()
    assert (y.to(F64) - ref).abs().max() / ref.abs().max() < 2e-2
    assert mod.signs.dtype == torch.int8
    with pytest.raises(ValueError):
        mod(torch.randn(4, 95, dtype=torch.bfloat16))
