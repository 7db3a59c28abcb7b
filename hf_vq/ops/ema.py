"""Codebook statistics for EMA updates and k-means (`hf_vq.ops.kmeans`): counts via `bincount`, sums via
`index_add_`.

Never an N x K one-hot: memory is O(N + K*D).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor



def code_counts(flat: Tensor, num_bins: int, weights: Tensor | None = None) -> Tensor:
    """float32 `bincount(flat, weights, minlength=num_bins)` for indices in `[0, num_bins)`. On CUDA by
    `index_add_`: `bincount` reads `max(flat)` back to the host (a sync per call); the sums are exact integers
    (or sums of 0/1 weights) below 2^24 either way, so the values are the same."""
    if flat.is_cuda:
        ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device) if weights is None else weights.float()
        return torch.zeros(num_bins, dtype=torch.float32, device=flat.device).index_add_(0, flat, ones)
    return torch.bincount(flat, weights=weights, minlength=num_bins).to(torch.float32)


def head_code_ids(indices: Tensor, num_codes: int) -> Tensor:
    """`(H, N)` codes to `(H * N,)` ids in one flat space (`head * K + code`), so a single bincount/index_add_
    serves every head."""
    if indices.shape[0] == 1:
        return indices.reshape(-1)
    return (indices + torch.arange(indices.shape[0], device=indices.device).unsqueeze(1) * num_codes).reshape(-1)


def cluster_stats(x: Tensor, indices: Tensor, num_codes: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-code counts and feature sums.

    Args:
        x: `(H, N, D)` or `(N, D)` features.
        indices: `(H, N)` or `(N,)` code index of each row.
        num_codes: K.
        mask: `(H, N)` / `(N,)` bool, rows to count (default all).

    Returns:
        counts `(H, K)` / `(K,)` and sums `(H, K, D)` / `(K, D)`, float32.
    """
    single = x.ndim == 2
    if single:
        x, indices = x.unsqueeze(0), indices.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    heads, _, dim = x.shape
    x = x.float()
    flat = head_code_ids(indices, num_codes)
    rows = x.reshape(-1, dim)
    weights = None
    if mask is not None:
        weights = mask.reshape(-1).to(x.dtype)
        rows = rows * weights.unsqueeze(1)
    counts = code_counts(flat, heads * num_codes, weights)
    sums = torch.zeros(heads * num_codes, dim, dtype=torch.float32, device=x.device).index_add_(0, flat, rows)
    counts, sums = counts.view(heads, num_codes), sums.view(heads, num_codes, dim)
    return (counts[0], sums[0]) if single else (counts, sums)


def ema_update_(moving: Tensor | tuple[Tensor, ...], new: Tensor | tuple[Tensor, ...], decay: float,
                weight: Tensor | None = None) -> None:
    """`moving <- decay * moving + (1 - decay) * new`, in place (lerp, as vector-quantize-pytorch); tuples update
    several buffers at once (one multi-tensor kernel on CUDA, the same lerp arithmetic).

    `weight` (`(K,)` or `(H, K)`) scales the step per code, as vqp's `ema_update_weight`."""
    moving = (moving,) if isinstance(moving, Tensor) else tuple(moving)
    new = tuple(n.to(m) for n, m in zip((new,) if isinstance(new, Tensor) else new, moving))
    if weight is None:
        torch._foreach_lerp_(moving, new, 1.0 - decay)
        return
    for m, n in zip(moving, new):
        w = weight.to(m).expand(m.shape[:2])
        m.lerp_(n, (1.0 - decay) * w.reshape(*w.shape, *([1] * (m.ndim - 2))))


def codebooks_from_ema_(cluster_sizes: list[Tensor], embed_avgs: list[Tensor], embeds: list[Tensor],
                        eps: float) -> None:
    """`embed <- embed_avg / smoothed cluster size` for several codebooks at once (each `(H, K)` sizes, `(H, K, d)`
    averages and codebooks, all of one shape), with vqp's Laplace smoothing `(c + eps) / (sum c + K eps) * sum c`
    of the sizes."""
    sizes = torch.stack(cluster_sizes) if len(cluster_sizes) > 1 else cluster_sizes[0].unsqueeze(0)
    total = sizes.sum(dim=-1, keepdim=True)
    smoothed = (laplace_smoothing(sizes, sizes.shape[-1], eps, total) * total).unsqueeze(-1)
    torch._foreach_copy_(embeds, torch._foreach_div(embed_avgs, list(smoothed.unbind(0))))


def laplace_smoothing(counts: Tensor, num_codes: int, eps: float, total: Tensor | None = None) -> Tensor:
    """Additive smoothing of code counts along the last dim: `(c + eps) / (sum c + K eps)` (`total`: the sum, when
    the caller has it)."""
    total = counts.sum(dim=-1, keepdim=True) if total is None else total
    return (counts + eps) / (total + num_codes * eps)


def require_finite(stats: Tensor, what: str) -> None:
    """Raise `ValueError` when `stats` (a state update's batch statistics: per-code sums, a k-means sample, affine
    moments) hold NaN or Inf, so the caller can stop before writing them into any buffer. One host read of a
    small tensor; inside a compiled graph an assert op instead (it raises when it runs, before the update).
    Eagerly the sum is read first, as a host float (one reduction and one read: no device-side `isfinite`
    ops): a finite sum means every entry is finite (a NaN or Inf entry makes the sum NaN or Inf); only a
    non-finite sum (a bad value, or finite values that overflow when summed) pays for the entry-wise check."""
    message = f"the batch had NaN or Inf values ({what}); the codebook state was not updated"
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(stats).all(), message)
    elif not math.isfinite(stats.sum().item()) and not bool(torch.isfinite(stats).all()):
        raise ValueError(message)


def require_all_finite(stats: list[Tensor], what: str) -> None:
    """`require_finite` for several tensors with one host read."""
    if len(stats) == 1:
        require_finite(stats[0], what)
    elif stats:
        require_finite(torch.stack([torch.isfinite(s).all() for s in stats]).float(), what)
