"""Nearest-code search in bounded memory.

The PyTorch path scores rows in chunks so no chunk's `(n, K)` score matrix exceeds `chunk_bytes`, with the
same per-row arithmetic as vector-quantize-pytorch (`-sqrt(clamp(|x|^2 + |c|^2 - 2 x.c, 1e-8))` for
euclidean, `x.c` for cosine on normalized inputs), so indices match it exactly on float32 input.
Distances are float32 whatever the input dtype or autocast state.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

DEFAULT_CHUNK_BYTES = 256 * 2**20
_METRICS = ("euclidean", "cosine")


def _check(x: Tensor, codebook: Tensor, metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if x.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"feature dims differ: x has {x.shape[-1]}, codebook has {codebook.shape[-1]}")


def _rows_per_chunk(num_codes: int, heads: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * max(1, num_codes) * max(1, heads)))


def scores(x: Tensor, codebook: Tensor, metric: str = "euclidean") -> Tensor:
    """Higher-is-better scores `(h, n, K)` for `x (h, n, D)` and `codebook (h, K, D)` (vqp's arithmetic)."""
    x, codebook = x.float(), codebook.float()
    if metric == "cosine":
        return torch.einsum("hnd,hkd->hnk", x, codebook)
    x2 = (x**2).sum(-1)
    c2 = (codebook**2).sum(-1)
    xc = torch.einsum("hnd,hkd->hnk", x, codebook) * -2
    dist = x2.unsqueeze(-1) + c2.unsqueeze(-2)
    # same rounding as vqp's `(x2 + c2 + xc).clamp(1e-8).sqrt()`, in place where autograd allows it
    if torch.is_grad_enabled() and (x.requires_grad or codebook.requires_grad):
        return -(dist + xc).clamp(min=1e-8).sqrt()
    return dist.add_(xc).clamp_(min=1e-8).sqrt_().neg_()


def _as_heads(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    lead = x.shape[:-2]
    x3 = x.reshape(math.prod(lead), *x.shape[-2:])  # explicit head count: N may be 0 (an empty rank)
    cb = codebook.reshape(math.prod(codebook.shape[:-2]), *codebook.shape[-2:])
    if cb.shape[0] == 1 and x3.shape[0] > 1:
        cb = cb.expand(x3.shape[0], -1, -1)
    if cb.shape[0] != x3.shape[0]:
        raise ValueError(f"codebook heads {tuple(codebook.shape[:-2])} do not match input heads {tuple(lead)}")
    return x3, cb, lead


def iter_score_chunks(
    x: Tensor, codebook: Tensor, *, metric: str = "euclidean", chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[slice, Tensor]]:
    """Yield `(row_slice, scores (h, n_chunk, K))` over row chunks of `x (h, N, D)` (higher is better)."""
    _check(x, codebook, metric)
    rows = _rows_per_chunk(codebook.shape[-2], x.shape[0], chunk_bytes)
    for start in range(0, x.shape[-2], rows):
        sl = slice(start, start + rows)
        yield sl, scores(x[:, sl], codebook, metric)


def nearest_code(
    x: Tensor,
    codebook: Tensor,
    *,
    metric: str = "euclidean",
    exact: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[Tensor, Tensor]:
    """Index of the nearest code for each row.

    Args:
        x: `(..., N, D)` features (cosine: already l2-normalized).
        codebook: `(..., K, D)` with the same leading (head) dims as `x`, or `(K, D)` shared by all.
        metric: `"euclidean"` or `"cosine"`.
        exact: float32 scoring (the default and, on CPU, the only mode; kept for the fused-kernel signature).
        chunk_bytes: memory budget of one chunk's score matrix.

    Returns:
        `(indices int64 (..., N), best score float32 (..., N))`; the score is `-distance` (euclidean) or
        the cosine similarity. Ties go to the lowest index, as with `torch.argmax`.
    """
    _check(x, codebook, metric)
    # the choice is not differentiable: without no_grad autograd would keep every chunk's scores alive
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        x3, cb, lead = _as_heads(x, codebook)
        indices = torch.empty(x3.shape[:2], dtype=torch.long, device=x.device)
        best = torch.empty(x3.shape[:2], dtype=torch.float32, device=x.device)
        for sl, s in iter_score_chunks(x3, cb, metric=metric, chunk_bytes=chunk_bytes):
            best[:, sl], indices[:, sl] = s.max(dim=-1)
    return indices.reshape(*lead, -1), best.reshape(*lead, -1)
