"""k-means codebook initialization and the row sampling shared with dead-code replacement.

Across processes the sample is the one a single process would draw from the concatenation of every rank's
rows, without gathering those rows: only the chosen rows travel (O(num * D) per rank, not O(N_total * D)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed
from .ema import cluster_stats
from .nearest import nearest_code


def sample_positions(n: int, num: int, device, generator: torch.Generator | None = None) -> Tensor:
    """`num` positions in `[0, n)`: without replacement when n >= num, else with replacement (as vqp)."""
    if n >= num:
        return torch.randperm(n, device=device, generator=generator)[:num]
    return torch.randint(0, n, (num,), device=device, generator=generator)


def sample_rows(samples: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """`num` rows of `samples (N, D)`: without replacement when N >= num, else with replacement."""
    return samples[sample_positions(samples.shape[0], num, samples.device, generator)]


def global_row_count(samples: Tensor, sync: bool) -> int:
    """Rows of `samples` summed over ranks (local count without `sync`)."""
    if not (sync and distributed.is_distributed()):
        return samples.shape[0]
    return sum(distributed.all_sizes(samples.shape[0], samples.device))


def sample_rows_across_ranks(samples: Tensor, num: int, sync: bool, sizes: list[int] | None = None) -> Tensor:
    """`num` rows drawn from the union of every rank's `samples (n_rank, D)`, identical on every rank and
    equal to `sample_rows` on the rank-ordered concatenation with rank 0's random state.

    Rank 0's positions are broadcast; each rank writes the chosen rows it owns into a zero buffer and one
    all-reduce sum assembles them. `sizes`: every rank's row count, when the caller knows them (else one
    all-gather). Every rank must call this (ranks with no rows included), with the same `num`."""
    if not (sync and distributed.is_distributed()):
        return sample_rows(samples, num)
    if sizes is None:
        sizes = distributed.all_sizes(samples.shape[0], samples.device)
    positions = sample_positions(sum(sizes), num, samples.device)
    distributed.broadcast_(positions)
    out = own_rows(samples, positions, sum(sizes[: distributed.rank()]))
    distributed.all_reduce_sum_(out, shapes_agreed=True)  # (num is the same on every rank)
    return out.to(samples.dtype)


def own_rows(samples: Tensor, positions: Tensor, start: int) -> Tensor:
    """float32 `(len(positions), D)`: the rows of `samples (n, D)` at global `positions` that this rank holds (its
    rows are `start .. start + n` of the ranks' concatenation), zeros elsewhere; summed over ranks, every chosen
    row. Selected without reading the positions on the host."""
    out = samples.new_zeros(positions.shape[0], samples.shape[-1], dtype=torch.float32)
    n = samples.shape[0]
    if n:
        mine = (positions >= start) & (positions < start + n)
        rows = samples[(positions - start).clamp(0, n - 1)].float()
        out = torch.where(mine.unsqueeze(-1), rows, out)
    return out


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
    counts and sums across processes so every rank computes the same means (vqp instead sums per-rank means).
    Empty clusters keep their mean.
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
            new_means = F.normalize(new_means, dim=-1, eps=1e-6)
        means = torch.where(empty.unsqueeze(-1), means, new_means.to(means.dtype))
    return means, counts
