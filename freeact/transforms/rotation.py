"""Offline rotations of a decoder (QuaRot / SpinQuant), fused into the weights in float64.

Conventions: a linear computes ``y = x W^T + b`` with ``W`` of shape ``(d_out, d_in)`` and ``x`` a
row vector; a rotation ``Q`` acts on row vectors from the right, ``x -> x Q``, ``Q^T Q = I``.

**Residual rotation R1 = Q (d x d).** Run the model on the rotated residual stream ``h Q``:

* embeddings produce rows of the residual: ``E <- E Q``;
* linears that READ the residual (after a fused, scale-free RMSNorm, which commutes with ``Q``
  because ``rms(h Q) = rms(h)``): ``q, k, v, gate, up`` and the LM head: ``W <- W Q``, since
  ``(h Q)(W Q)^T = h W^T``; their biases are untouched (Dream's q/k/v biases stay as they are);
* linears that WRITE the residual: ``o`` and ``down``: ``W <- Q^T W`` and ``b <- b Q``, so that
  they output ``y Q``.

Norm scales must have been fused first (:func:`freeact.transforms.fusion.fuse_norms`).

**Head-wise rotation R2 = R (head_dim x head_dim), fused into v and o.** Attention is linear in
the values of each head: head ``j``'s output is ``A_j V_{g(j)}`` where ``g(j) = j // (H / H_kv)``
is the KV head it reads (GQA; transformers' ``repeat_kv`` order). Rotating every KV head's values
``V_g -> V_g R_g`` (``W_v[g] <- R_g^T W_v[g]``, ``b_v[g] <- b_v[g] R_g``) makes head ``j`` output
``A_j V_{g(j)} R_{g(j)}``; ``o`` undoes it on its input columns: ``W_o[:, j] <- W_o[:, j] R_{g(j)}``.
``R`` may be one matrix for every KV head or one per KV head, shape ``(H_kv, hd, hd)``.

**Online rotations.** A module ``T`` with ``T(x) = x M`` applied to a linear's input at run time
(an :class:`~freeact.quant.act.InputQuantizer` transform) is undone offline by ``W <- W M``
(:func:`fuse_online_rotation`). QuaRot's o_proj input: after the head-wise Hadamard ``R_v`` the
attention output is ``z (I (x) R_v)``; an online ``M`` makes o read ``z (I (x) R_v) M`` and the
fusion gives ``W_o <- W_o (I (x) R_v) M``, exact for any orthogonal ``M``. With QuaRot's
``M = H_heads (x) I_hd`` (:class:`HeadMixHadamard`) the activation o sees is
``z (H_heads (x) R_v)``, a full-width Hadamard of the attention output computed with only a
cross-head transform at run time; when the head count has no Hadamard matrix (7 heads), a
full-width :class:`~freeact.transforms.hadamard.OnlineHadamard` is used instead.

The tensor maps here are differentiable (no in-place ops; only ``apply_residual_rotation`` and
``fuse_online_rotation`` write into the model), so SpinQuant's training step builds its rotated
weights with the same code that fuses them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .hadamard import OnlineHadamard, supported_block_size

__all__ = [
    "rotate_input_side", "rotate_output_side", "rotate_output_bias", "headwise_output_side",
    "headwise_output_bias", "headwise_input_side", "expand_kv_rotation", "rotated_block_params",
    "apply_residual_rotation", "fuse_online_rotation", "HeadMixHadamard", "attention_output_transform",
    "check_orthogonal",
]


# ------------------------------------------------------------------------ pure tensor maps
def rotate_input_side(W: Tensor, Q: Tensor) -> Tensor:
    """``W Q``: the linear reads ``x Q`` instead of ``x``."""
    return W @ Q


def rotate_output_side(W: Tensor, Q: Tensor) -> Tensor:
    """``Q^T W``: the linear writes ``y Q`` instead of ``y``."""
    return Q.transpose(-1, -2) @ W


def rotate_output_bias(b: Tensor, Q: Tensor) -> Tensor:
    return b @ Q


def _per_head(R: Tensor, n: int, hd: int) -> Tensor:
    if R.shape[-2:] != (hd, hd) or R.dim() not in (2, 3) or (R.dim() == 3 and R.shape[0] not in (1, n)):
        raise ValueError(f"head rotation must be ({hd}, {hd}) or ({n}, {hd}, {hd}), got {tuple(R.shape)}")
    return R


def headwise_output_side(W: Tensor, R: Tensor, n_heads: int) -> Tensor:
    """``W[h] <- R_h^T W[h]`` for each output block of ``head_dim`` rows (v_proj)."""
    hd = W.shape[0] // n_heads
    R = _per_head(R, n_heads, hd)
    return (R.transpose(-1, -2) @ W.reshape(n_heads, hd, -1)).reshape(W.shape)


def headwise_output_bias(b: Tensor, R: Tensor, n_heads: int) -> Tensor:
    hd = b.shape[0] // n_heads
    R = _per_head(R, n_heads, hd)
    return (b.reshape(n_heads, 1, hd) @ R).reshape(b.shape)


def headwise_input_side(W: Tensor, R: Tensor, n_heads: int) -> Tensor:
    """``W[:, h] <- W[:, h] R_h`` for each input block of ``head_dim`` columns (o_proj)."""
    hd = W.shape[1] // n_heads
    R = _per_head(R, n_heads, hd)
    Wh = W.reshape(W.shape[0], n_heads, hd).transpose(0, 1)  # (n, d_out, hd)
    return (Wh @ R).transpose(0, 1).reshape(W.shape)


def expand_kv_rotation(R: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """Per-KV-head rotations ``(H_kv, hd, hd)`` -> per-query-head ``(H, hd, hd)`` (GQA groups)."""
    if R.dim() == 2 or R.shape[0] == 1:
        return R
    if R.shape[0] != n_kv_heads or n_heads % n_kv_heads:
        raise ValueError(f"{R.shape[0]} head rotations for {n_kv_heads} KV heads / {n_heads} heads")
    return R.repeat_interleave(n_heads // n_kv_heads, dim=0)


def rotated_block_params(block, adapter, Q: Tensor | None = None, R: Tensor | None = None,
                         dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """New weights/biases of one block under residual rotation ``Q`` and head rotation ``R``.

    Keys are ``"<linear>.<weight|bias>"`` with ``<linear>`` one of the :class:`Block` linear
    names; only changed tensors are returned. Computed in ``dtype`` (differentiable).
    """
    lins = block.linears()
    out: dict[str, Tensor] = {}

    def cur(key: str) -> Tensor:
        if key in out:
            return out[key]
        name, attr = key.split(".")
        return getattr(lins[name], attr).to(dtype)

    if Q is not None:
        Q = Q.to(dtype)
        for n in ("q", "k", "v", "gate", "up"):
            if n in lins:
                out[f"{n}.weight"] = rotate_input_side(cur(f"{n}.weight"), Q)
        for n in ("o", "down"):
            out[f"{n}.weight"] = rotate_output_side(cur(f"{n}.weight"), Q)
            if lins[n].bias is not None:
                out[f"{n}.bias"] = rotate_output_bias(cur(f"{n}.bias"), Q)
    if R is not None:
        R = R.to(dtype)
        h, hkv = adapter.num_heads, adapter.num_kv_heads
        out["v.weight"] = headwise_output_side(cur("v.weight"), R, hkv)
        if lins["v"].bias is not None:
            out["v.bias"] = headwise_output_bias(cur("v.bias"), R, hkv)
        out["o.weight"] = headwise_input_side(cur("o.weight"), expand_kv_rotation(R, h, hkv), h)
    return out


# ------------------------------------------------------------------------ in-place fusion
@torch.no_grad()
def _assign(param: Tensor, value: Tensor) -> None:
    param.copy_(value.to(device=param.device, dtype=param.dtype))


@torch.no_grad()
def apply_residual_rotation(adapter, Q: Tensor | None, R: Tensor | list | None = None) -> None:
    """Fuse ``Q`` (residual, d x d) and per-layer head rotations ``R`` into the model (float64).

    ``R``: None, one matrix for every layer, or a list with one entry per layer (each ``(hd, hd)``
    or ``(H_kv, hd, hd)``, or None). Norms must be fused already (:func:`fuse_norms`).
    """
    blocks = adapter.blocks()
    if R is None or isinstance(R, Tensor):
        R = [R] * len(blocks)
    if len(R) != len(blocks):
        raise ValueError(f"{len(R)} head rotations for {len(blocks)} layers")
    if Q is not None:
        check_orthogonal(Q, "residual rotation")
        _check_unit_norms(adapter)
        if adapter.lm_head().weight.data_ptr() == adapter.embeddings().weight.data_ptr():
            raise ValueError("the LM head shares the embedding matrix: fuse_norms (which unties them) first")
        emb = adapter.embeddings().weight
        _assign(emb, rotate_input_side(emb.to(torch.float64), Q.to(emb.device, torch.float64)))
        for writer in adapter.residual_writers():  # e.g. a VLM's projector: its output enters the residual
            Qd = Q.to(writer.weight.device, torch.float64)
            _assign(writer.weight, rotate_output_side(writer.weight.to(torch.float64), Qd))
            if writer.bias is not None:
                _assign(writer.bias, rotate_output_bias(writer.bias.to(torch.float64), Qd))
    for block, r in zip(blocks, R):
        if r is not None:
            check_orthogonal(r, "head rotation")
        dev = block.q.weight.device
        new = rotated_block_params(block, adapter, None if Q is None else Q.to(dev),
                                   None if r is None else r.to(dev))
        lins = block.linears()
        for key, value in new.items():
            name, attr = key.split(".")
            _assign(getattr(lins[name], attr), value)
    if Q is not None:
        head = adapter.lm_head()
        _assign(head.weight, rotate_input_side(head.weight.to(torch.float64), Q.to(head.weight.device,
                                                                                     torch.float64)))


def _check_unit_norms(adapter) -> None:
    norms = [adapter.final_norm()] + [n for b in adapter.blocks() for n in (b.attn_norm, b.mlp_norm)]
    for n in norms:
        w = getattr(n, "weight", None)
        if w is not None and not torch.all(w == 1):
            raise ValueError("rotating the residual stream needs scale-free norms: call fuse_norms first")


@torch.no_grad()
def fuse_online_rotation(linear: nn.Linear, transform: nn.Module) -> None:
    """``W <- W M`` where the online ``transform(x) == x @ transform.matrix()`` runs on the input."""
    M = transform.matrix().to(device=linear.weight.device, dtype=torch.float64)
    if M.shape != (linear.in_features, linear.in_features):
        raise ValueError(f"online transform of size {tuple(M.shape)} for a linear with {linear.in_features} inputs")
    _assign(linear.weight, linear.weight.to(torch.float64) @ M)


def check_orthogonal(M: Tensor, what: str = "matrix", tol: float = 1e-6) -> None:
    eye = torch.eye(M.shape[-1], dtype=torch.float64, device=M.device)
    err = (M.to(torch.float64).transpose(-1, -2) @ M.to(torch.float64) - eye).abs().max().item()
    if M.shape[-1] != M.shape[-2] or err > tol:
        raise ValueError(f"{what} is not orthogonal (max |M^T M - I| = {err:.2e}, shape {tuple(M.shape)})")


# ------------------------------------------------------------------------ online modules
class HeadMixHadamard(nn.Module):
    """QuaRot's online transform on o_proj's input: a Hadamard ACROSS heads, ``H_heads (x) I_hd``.

    ``forward(x) == x @ self.matrix()`` over the last dim ``n_heads * head_dim``.
    """

    def __init__(self, n_heads: int, head_dim: int, seed: int | None = None):
        super().__init__()
        self.n_heads, self.head_dim = int(n_heads), int(head_dim)
        self.mix = OnlineHadamard(self.n_heads, seed=seed)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if shape[-1] != self.n_heads * self.head_dim:
            raise ValueError(f"expected last dim {self.n_heads * self.head_dim}, got {shape[-1]}")
        x = x.reshape(*shape[:-1], self.n_heads, self.head_dim).transpose(-1, -2)
        return self.mix(x).transpose(-1, -2).reshape(shape)

    def matrix(self) -> Tensor:
        return torch.kron(self.mix.matrix(), torch.eye(self.head_dim, dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}"


def attention_output_transform(n_heads: int, head_dim: int, mode: str = "auto", seed: int | None = None):
    """The online rotation on o_proj's input.

    ``heads``: :class:`HeadMixHadamard` (QuaRot; needs a Hadamard of order ``n_heads``);
    ``full``: an :class:`OnlineHadamard` of the full width ``n_heads * head_dim``;
    ``auto``: ``heads`` when ``n_heads`` is a Hadamard order, else ``full``; ``none``: None.
    """
    if mode == "none":
        return None
    if mode == "auto":
        mode = "heads" if supported_block_size(n_heads) == n_heads and n_heads > 1 else "full"
    if mode == "heads":
        if supported_block_size(n_heads) != n_heads:
            raise ValueError(f"no Hadamard matrix of order {n_heads} (the head count): use o_online=full")
        return HeadMixHadamard(n_heads, head_dim, seed)
    if mode == "full":
        return OnlineHadamard(n_heads * head_dim, seed=seed)
    raise ValueError(f"o_online must be auto, heads, full or none, got {mode!r}")
