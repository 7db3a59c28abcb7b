"""Codebook statistics for EMA updates and k-means: counts via `bincount`, sums via `index_add_`.

Never an N x K one-hot: memory is O(N + K*D).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .nearest import nearest_code


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
    # one flat index space (head * K + code) so a single bincount/index_add_ serves every head
    flat = (indices + torch.arange(heads, device=x.device).unsqueeze(1) * num_codes).reshape(-1)
    rows = x.reshape(-1, dim)
    weights = None
    if mask is not None:
        weights = mask.reshape(-1).to(x.dtype)
        rows = rows * weights.unsqueeze(1)
    counts = torch.bincount(flat, weights=weights, minlength=heads * num_codes).to(torch.float32)
    sums = torch.zeros(heads * num_codes, dim, dtype=torch.float32, device=x.device).index_add_(0, flat, rows)
    counts, sums = counts.view(heads, num_codes), sums.view(heads, num_codes, dim)
    return (counts[0], sums[0]) if single else (counts, sums)


def ema_update_(moving: Tensor, new: Tensor, decay: float) -> Tensor:
    """`moving <- decay * moving + (1 - decay) * new`, in place (lerp, as vector-quantize-pytorch)."""
    return moving.lerp_(new.to(moving), 1.0 - decay)


def laplace_smoothing(counts: Tensor, num_codes: int, eps: float) -> Tensor:
    """Additive smoothing of code counts along the last dim: `(c + eps) / (sum c + K eps)`."""
    return (counts + eps) / (counts.sum(dim=-1, keepdim=True) + num_codes * eps)


def sample_rows(samples: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """`num` rows of `samples (N, D)`: without replacement when N >= num, else with replacement."""
    n = samples.shape[0]
    if n >= num:
        idx = torch.randperm(n, device=samples.device, generator=generator)[:num]
    else:
        idx = torch.randint(0, n, (num,), device=samples.device, generator=generator)
    return samples[idx]


def kmeans(
    samples: Tensor,
    num_clusters: int,
    num_iters: int = 10,
    *,
    metric: str = "euclidean",
    init: Tensor | None = None,
    all_reduce=None,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means per head. `samples (H, N, D)`; returns means `(H, K, D)` and counts `(H, K)`.

    `init` gives the starting means (default: rows sampled from `samples`); `all_reduce(*tensors)` sums
    counts and sums across processes so every rank computes the same means. Empty clusters keep their mean.
    """
    heads = samples.shape[0]
    means = init if init is not None else torch.stack([sample_rows(s, num_clusters) for s in samples])
    counts = torch.zeros(heads, num_clusters, device=samples.device)
    for _ in range(num_iters):
        buckets, _ = nearest_code(samples, means, metric=metric)
        counts, sums = cluster_stats(samples, buckets, num_clusters)
        if all_reduce is not None:
            all_reduce(counts, sums)
        empty = counts == 0
        new_means = sums / counts.masked_fill(empty, 1).unsqueeze(-1)
        if metric == "cosine":
            new_means = torch.nn.functional.normalize(new_means, dim=-1, eps=1e-6)
        means = torch.where(empty.unsqueeze(-1), means, new_means.to(means.dtype))
    return means, counts
