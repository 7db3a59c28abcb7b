"""Gradient estimators through the (non-differentiable) code choice, and Gumbel sampling of codes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_rotation


def straight_through(x: Tensor, codes: Tensor) -> Tensor:
    """Value of `codes`, gradient of identity to `x`."""
    return x + (codes - x).detach()


def _unit(t: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    norm = t.norm(dim=-1, keepdim=True)
    return t / norm.clamp(min=eps), norm


def rotate_to(x: Tensor, codes: Tensor) -> Tensor:
    """Rotation trick (arXiv:2410.06424, sec. 4.2): the value of `codes`, with the gradient carried to `x`
    through the rotation (and rescaling) that maps `x` onto `codes`, treated as a constant.

    Per-row `(1, d) @ (d, 1)` products in vqp's order, so float32 results match it to the last bit. On CUDA the
    fused kernel of `triton_rotation` (same formula, row-wise dots: no batched tiny GEMMs) does it instead."""
    if x.is_cuda and triton_rotation.available(x):
        return triton_rotation.rotate_to_fused(x, codes)
    u, x_norm = _unit(x)
    q, c_norm = _unit(codes)
    w = F.normalize(u + q, p=2, dim=-1, eps=1e-6).detach()
    e = x.unsqueeze(-2)
    rotated = (
        e
        - 2 * (e @ w.unsqueeze(-1) @ w.unsqueeze(-2))
        + 2 * (e @ u.detach().unsqueeze(-1) @ q.detach().unsqueeze(-2))
    ).squeeze(-2)
    return rotated * (c_norm / x_norm.clamp(min=1e-6)).detach()


def rotate_to_with_commitment(x: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """`(rotate_to(x, codes), mse_loss(codes.detach(), x))`: the rotation trick and the commitment loss, which
    read the same two tensors; on CUDA one fused kernel each way (the loss then sums in another order than
    `mse_loss`: equal up to float32 rounding)."""
    if x.is_cuda and triton_rotation.available(x):
        return triton_rotation.rotate_to_with_commitment(x, codes)
    return rotate_to(x, codes), F.mse_loss(codes.detach(), x)


def gumbel_noise(t: Tensor) -> Tensor:
    noise = torch.zeros_like(t).uniform_(0, 1)
    return -noise.clamp(min=1e-20).log().neg().clamp(min=1e-20).log()


def gumbel_select(
    logits: Tensor, temperature: float, *, straight_through: bool = False, reinmax: bool = False,
    stochastic: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Sample a code per row from `softmax(logits / temperature)` (Gumbel-max; `stochastic=False`: the argmax).

    Returns `(indices, weights)`: `weights` is `None`, or with `straight_through` the `(…, K)` soft
    distribution whose gradient the caller routes through (`hard + soft - soft.detach()`); `reinmax` uses
    ReinMax's second-order weights (arXiv:2304.08612) instead of the plain softmax.
    """
    indices = (logits / temperature + gumbel_noise(logits) if stochastic else logits).argmax(dim=-1)
    if not straight_through:
        return indices, None
    soft = (logits / temperature).softmax(dim=-1)
    if not reinmax:
        return indices, soft
    hard = torch.zeros_like(logits).scatter_(-1, indices.unsqueeze(-1), 1.0)
    pi0 = logits.softmax(dim=-1)
    pi1 = ((hard + soft) / 2).clamp(min=1e-20).log()
    pi1 = ((pi1 - logits).detach() + logits).softmax(dim=-1)
    return indices, 2 * pi1 - 0.5 * pi0


def directional_reparam(x: Tensor, codes: Tensor, noise_variance: float = 5e-3) -> Tensor:
    """DiVeQ (openreview KRVnpTbx7R, fig. 1): `x` moved by the (detached, noised) unit direction to its code,
    scaled by the differentiable distance, so the codebook and `x` both get gradients."""
    error = codes - x
    error_norm = error.norm(dim=-1, keepdim=True)
    noised = error + noise_variance**0.5 * torch.randn_like(error)
    return x + F.normalize(noised, p=2, dim=-1, eps=1e-6).detach() * error_norm
