"""Cayley SGD on the Stiefel manifold (Li, Fuxin & Todorovic, ICLR 2020), as SpinQuant uses it.

Every parameter is a matrix ``X`` of shape ``(..., n, p)``, ``n >= p``, with orthonormal columns
(``X^T X = I``; square rotations are the case ``n == p``). One step with learning rate ``lr``,
momentum ``beta`` and Euclidean gradient ``G``:

    M     <- beta M - G                          (momentum, Euclidean)
    W_hat  = M X^T - 1/2 X (X^T M X^T)
    W      = W_hat - W_hat^T                     (skew-symmetric, n x n)
    M     <- W X                                 (momentum projected on the tangent space)
    alpha  = min(lr, 1 / (||W||_1 + eps))        (SpinQuant / Li et al. step cap; ``cap_step``)
    X     <- (I - alpha/2 W)^-1 (I + alpha/2 W) X (the Cayley transform)

For ``X`` square and ``beta = 0``, ``W X = -1/2 (G - X G^T X)``: a descent direction on the
manifold. The Cayley transform of a skew matrix is orthogonal, so ``X`` stays on the manifold up
to rounding. Unlike the published code, which approximates the Cayley transform with 5
fixed-point iterations (and re-orthonormalises by QR at random steps), the transform here is an
exact linear solve in float64; ``retract_tol`` optionally re-projects ``X`` onto the manifold
(polar decomposition) whenever rounding has moved it further than that.

It is a plain :class:`torch.optim.Optimizer`: ``torch.optim.lr_scheduler.CosineAnnealingLR`` (or
any scheduler that edits ``param_groups[i]["lr"]``) works with it.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CayleySGD", "orthogonality_error"]


def orthogonality_error(X: Tensor) -> float:
    """``max |X^T X - I|`` (over a batch of matrices too), computed in float64."""
    X = X.detach().to(torch.float64)
    eye = torch.eye(X.shape[-1], dtype=torch.float64, device=X.device)
    return (X.transpose(-1, -2) @ X - eye).abs().max().item()


def _polar(X: Tensor) -> Tensor:
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


class CayleySGD(torch.optim.Optimizer):
    """SGD with momentum on the Stiefel manifold via the Cayley transform (see module docstring)."""

    def __init__(self, params, lr: float = 1.5, momentum: float = 0.0, eps: float = 1e-8,
                 cap_step: bool = True, retract_tol: float | None = None):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, cap_step=cap_step,
                                      retract_tol=retract_tol))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2 or p.shape[-2] < p.shape[-1]:
                    raise ValueError(f"CayleySGD needs (..., n, p) parameters with n >= p, got {tuple(p.shape)}")
                err = orthogonality_error(p)
                if err > 1e-4:
                    raise ValueError(f"CayleySGD parameter of shape {tuple(p.shape)} does not have orthonormal "
                                     f"columns (max |X^T X - I| = {err:.2e}); initialise it on the manifold")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, eps = group["lr"], group["momentum"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                X = p.detach().to(torch.float64)
                G = p.grad.detach().to(torch.float64)
                state = self.state[p]
                M = state.get("momentum_buffer")
                M = -G if M is None else beta * M - G
                Xt = X.transpose(-1, -2)
                W_hat = M @ Xt - 0.5 * X @ (Xt @ M @ Xt)
                W = W_hat - W_hat.transpose(-1, -2)
                state["momentum_buffer"] = W @ X
                alpha = torch.full(W.shape[:-2] + (1, 1), float(lr), dtype=torch.float64, device=W.device)
                if group["cap_step"]:
                    norm1 = W.abs().sum(dim=-2).amax(dim=-1)[..., None, None]  # max column sum
                    alpha = torch.minimum(alpha, 1.0 / (norm1 + eps))
                eye = torch.eye(W.shape[-1], dtype=torch.float64, device=W.device)
                X_new = torch.linalg.solve(eye - 0.5 * alpha * W, X + 0.5 * alpha * (W @ X))
                tol = group["retract_tol"]
                if tol is not None and orthogonality_error(X_new.to(p.dtype)) > tol:
                    X_new = _polar(X_new)
                p.copy_(X_new.to(p.dtype))
                state["step"] = state.get("step", 0) + 1
        return loss
