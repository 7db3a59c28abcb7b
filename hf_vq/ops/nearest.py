"""Nearest-code search in bounded memory.

PyTorch path (the reference, and the only one on CPU): rows are scored in chunks so no chunk's `(n, K)` score
matrix exceeds `chunk_bytes` (the arithmetic holds a second buffer of that size at its peak), with exactly
vector-quantize-pytorch 1.32's per-element arithmetic, so the indices equal vqp's on float32 input:

- euclidean: `d2 = clamp((|x|^2 + |c|^2) + (x.c * -2), 1e-8)` (vqp's `cdist` before its `sqrt`), winner =
  `argmin(sqrt(d2))` = vqp's `argmax(-cdist)`. The `sqrt` is kept on purpose: it maps neighbouring fp32
  values of `d2` to one value, which makes a tie that vqp resolves to the lowest index, so `argmin(d2)` alone
  would differ from vqp on such rows. The returned score is the winner's `d2` (the squared distance).
- cosine: `x.c` (the caller l2-normalizes), winner = argmax, score = `x.c`.
- dot: `x.c - offset_c` with a per-code `code_offset` (zero if not given), winner = argmax, score = that value.
  A search through a linear map folds into this form (`ops.projected`): `|Wx + b - c|^2` ranks the codes as
  `x.(W^T c) - (|c|^2 / 2 - b.c)` does.

Ties go to the lowest index (`torch.argmin`/`argmax` semantics). Float32 whatever the input dtype or autocast.
Bit-parity with vqp holds at vqp's own shape (one chunk): some CPU BLAS (seen: AMD EPYC, torch 2.13) round a
GEMM differently by its row count (~4e-6 at d24), so with smaller chunks a near-tie inside that rounding can
go to the other code (never a worse one).

CUDA path: the Triton kernel of `triton_nearest` (any feature dim; never a full `N x K` matrix: in-kernel dots up to
256 features, cuBLAS dots of bounded row blocks beyond). Its mode is the `mode`
argument, else the environment variable `HF_VQ_NEAREST_MODE`, else `"rerank"`:

- `"rerank"` (default): bf16 scores pick the best 7 candidates per row, fp32 `|x - c|^2` (summed from the
  differences) ranks them. No fallback and no host sync; the benchmarks measure its agreement with the float64
  argmin (it avoids the reference formula's cancellation of `|x|^2` against `2 x.c`, so it is closer to float64
  than the reference itself; it can still differ where the true gap is below fp32 resolution, or where bf16
  rounding pushed the winner out of the candidates).
- `"exact"`: the indices of this module's PyTorch path (vqp's fp32 arithmetic) on every row: an error bound
  proves the winner among the fp32-re-scored candidates, unproven rows are re-done by the PyTorch path (one host
  sync per call). Use it where bit-parity with vqp / the CPU path matters.
- `"fast"`: the bf16 argmin alone (~0.5% of rows differ from float64 on random data).

`HF_VQ_DISABLE_TRITON=1` turns the kernel off (every mode is then the PyTorch path).
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_nearest, triton_nearest_op
from .utils import autocast_off

DEFAULT_CHUNK_BYTES = 256 * 2**20
_METRICS = ("euclidean", "cosine")  # of the score functions; the search also takes "dot" (`nearest_code`)
SEARCH_METRICS = (*_METRICS, "dot")
MODE_ENV = "HF_VQ_NEAREST_MODE"
DEFAULT_MODE = "rerank"


def resolve_mode(mode: str | None = None, exact: bool | None = None) -> str:
    """The kernel mode: `exact=True/False` > `mode` > `$HF_VQ_NEAREST_MODE` > `"rerank"`."""
    if exact is not None:
        return "exact" if exact else "fast"
    mode = mode or os.environ.get(MODE_ENV) or DEFAULT_MODE
    if mode not in triton_nearest.MODES:
        raise ValueError(f"nearest-code mode must be one of {triton_nearest.MODES} (argument `mode` or "
                         f"${MODE_ENV}), got {mode!r}")
    return mode


def _check(x: Tensor, codebook: Tensor, metric: str, metrics: tuple[str, ...] = _METRICS) -> None:
    if metric not in metrics:
        raise ValueError(f"metric must be one of {metrics}, got {metric!r}")
    if x.dim() < 2 or codebook.dim() < 2:
        raise ValueError(f"x and codebook need at least 2 dims (N, D) / (K, D), got {tuple(x.shape)} and "
                         f"{tuple(codebook.shape)}")
    if x.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"feature dims differ: x has {x.shape[-1]}, codebook has {codebook.shape[-1]}")


def _rows_per_chunk(num_codes: int, heads: int, chunk_bytes: int) -> int:
    return max(1, int(chunk_bytes) // (4 * max(1, num_codes) * max(1, heads)))


def sq_norm(codebook: Tensor) -> Tensor:
    """`|c|^2` in float32 as the scores compute it (callers may cache it and pass `codebook_sq_norm`)."""
    return (codebook.float() ** 2).sum(-1)


def _sq_dist(x: Tensor, codebook: Tensor, c2: Tensor | None = None) -> Tensor:
    """vqp's squared distance `clamp((|x|^2 + |c|^2) + (x.c * -2), 1e-8)`, `(h, n, K)`, float32."""
    x, codebook = x.float(), codebook.float()
    x2 = (x**2).sum(-1)
    c2 = sq_norm(codebook) if c2 is None else c2.float()
    xc = torch.bmm(x, codebook.mT) * -2  # (einsum's own bmm, without its Python wrapper)
    dist = x2.unsqueeze(-1) + c2.unsqueeze(-2)
    if torch.is_grad_enabled() and (x.requires_grad or codebook.requires_grad):
        return (dist + xc).clamp(min=1e-8)
    return dist.add_(xc).clamp_(min=1e-8)


def scores(x: Tensor, codebook: Tensor, metric: str = "euclidean", codebook_sq_norm: Tensor | None = None) -> Tensor:
    """vqp's logits `(h, n, K)` for `x (h, n, D)`, `codebook (h, K, D)`: `-cdist` (euclidean, `-sqrt(d2)`) or
    `x.c` (cosine). Higher is better. (`iter_score_chunks` yields `-d2` instead, without the sqrt.)"""
    if metric == "cosine":
        return torch.einsum("hnd,hkd->hnk", x.float(), codebook.float())
    d2 = _sq_dist(x, codebook, codebook_sq_norm)
    if torch.is_grad_enabled() and d2.requires_grad:
        return -d2.sqrt()
    return d2.sqrt_().neg_()


def _as_heads(x: Tensor, codebook: Tensor, sqn: Tensor | None = None):
    lead = x.shape[:-2]
    x3 = x.reshape(math.prod(lead), *x.shape[-2:])  # explicit head count: N may be 0 (an empty rank)
    cb = codebook.reshape(math.prod(codebook.shape[:-2]), *codebook.shape[-2:])
    if cb.shape[0] != x3.shape[0] and cb.shape[0] != 1:
        raise ValueError(f"codebook heads {tuple(codebook.shape[:-2])} do not match input heads {tuple(lead)}")
    if sqn is not None:
        if sqn.shape[-1] != cb.shape[1] or sqn.numel() != cb.shape[0] * cb.shape[1]:
            raise ValueError(f"codebook_sq_norm shape {tuple(sqn.shape)} does not match codebook "
                             f"{tuple(codebook.shape)}")
        sqn = sqn.reshape(cb.shape[0], cb.shape[1])
    if cb.shape[0] == 1 and x3.shape[0] > 1:
        cb = cb.expand(x3.shape[0], -1, -1)
        sqn = None if sqn is None else sqn.expand(x3.shape[0], -1)
    return x3, cb, sqn, lead


def code_scores(x: Tensor, codebook: Tensor, metric: str = "euclidean",
                codebook_sq_norm: Tensor | None = None) -> Tensor:
    """Full vqp logits `(..., N, K)` (as `scores`) for small inputs."""
    _check(x, codebook, metric)
    x3, cb, sqn, lead = _as_heads(x, codebook, codebook_sq_norm)
    with torch.autocast(device_type=x.device.type, enabled=False):
        s = scores(x3, cb, metric, sqn)
    return s.reshape(*lead, *s.shape[-2:])


def iter_score_chunks(
    x: Tensor, codebook: Tensor, metric: str = "euclidean", chunk_bytes: int = DEFAULT_CHUNK_BYTES, *,
    codebook_sq_norm: Tensor | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield `(row_slice, scores (..., n_chunk, K) float32)` over row chunks of `x (..., N, D)`; no block exceeds
    `chunk_bytes`. Scores are higher-is-better: `-squared distance` (vqp's arithmetic, before its sqrt) for
    euclidean, `x.c` for cosine. For chunked softmax / sampling without the full `N x K` logits."""
    _check(x, codebook, metric)
    x3, cb, sqn, lead = _as_heads(x, codebook, codebook_sq_norm)
    rows = _rows_per_chunk(cb.shape[-2], x3.shape[0], chunk_bytes)
    with torch.autocast(device_type=x.device.type, enabled=False):
        for start in range(0, x3.shape[-2], rows):
            sl = slice(start, min(start + rows, x3.shape[-2]))
            if metric == "cosine":
                s = torch.einsum("hnd,hkd->hnk", x3[:, sl].float(), cb.float())
            else:
                s = _sq_dist(x3[:, sl], cb, sqn)
                s = s.neg_() if not s.requires_grad else -s
            yield sl, s.reshape(*lead, *s.shape[-2:])


def _nearest_torch(x3: Tensor, cb: Tensor, sqn: Tensor | None, metric: str,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[Tensor, Tensor]:
    """The reference: `x3 (H, N, D)`, `cb (H or 1, K, D)`, `sqn (H or 1, K) | None` (euclidean: `|c|^2`; dot: the
    code offsets) -> `(H, N)` (index, score)."""
    if cb.shape[0] == 1 and x3.shape[0] > 1:
        cb = cb.expand(x3.shape[0], -1, -1)
        sqn = None if sqn is None else sqn.expand(x3.shape[0], -1)
    H, N = x3.shape[:2]
    rows = _rows_per_chunk(cb.shape[-2], H, chunk_bytes)
    with torch.no_grad(), autocast_off(x3.device.type):
        cf = cb.float()
        if rows >= N:  # one chunk: no output buffers to fill
            return _nearest_chunk(x3, cf, sqn, metric)
        indices = torch.empty(H, N, dtype=torch.long, device=x3.device)
        best = torch.empty(H, N, dtype=torch.float32, device=x3.device)
        for start in range(0, N, rows):
            sl = slice(start, min(start + rows, N))
            indices[:, sl], best[:, sl] = _nearest_chunk(x3[:, sl], cf, sqn, metric)
    return indices, best


def _nearest_chunk(x3: Tensor, cf: Tensor, sqn: Tensor | None, metric: str) -> tuple[Tensor, Tensor]:
    """`_nearest_torch` on one chunk of rows (`cf`: the float32 codebook)."""
    if metric != "euclidean":
        dots = torch.bmm(x3.float(), cf.mT)
        if metric == "dot" and sqn is not None:
            dots.sub_(sqn.float().unsqueeze(-2))
        best, indices = dots.max(dim=-1)
        return indices, best
    d2 = _sq_dist(x3, cf, sqn)
    # vqp's argmax(-sqrt(d2)) == argmin(sqrt(d2)) (negation is exact, both take the first extremum)
    indices = torch.sqrt(d2).argmin(dim=-1)
    return indices, d2.gather(-1, indices.unsqueeze(-1)).squeeze(-1)


def redo_rows(x: Tensor, cf: Tensor, c_sq: Tensor, redo: Tensor, metric: str, idx: Tensor, score: Tensor,
              out_codes: Tensor | None, stats: dict | None) -> None:
    """The kernel's exact mode: re-do the rows flagged in `redo (H, N)` with the PyTorch reference, writing `idx`,
    `score` (and `out_codes`) in place (one host sync for the count)."""
    n_redo = int(redo.sum())
    if stats is not None:
        stats["fallback_rows"] = n_redo
    if not n_redo:
        return
    for head in redo.any(1).nonzero().flatten().tolist():
        rows = redo[head].nonzero().flatten()
        ch = 0 if cf.shape[0] == 1 else head
        i_r, s_r = _nearest_torch(x[head : head + 1, rows], cf[ch : ch + 1], c_sq[ch : ch + 1], metric)
        idx[head, rows] = i_r[0]
        score[head, rows] = s_r[0]
        if out_codes is not None:
            out_codes[head, rows] = cf[ch, i_r[0]].to(out_codes.dtype)


def _per_code_values(cbt: Tensor, metric: str, codebook_sq_norm: Tensor | None, code_offset: Tensor | None,
                     shared_view: bool) -> Tensor:
    """The kernel's float32 `(heads, K)` per-code input for the codebook `cbt (heads, K, D)`: `|c|^2` (euclidean;
    the cached one unless the codebook was a shared view), the offsets (dot); cosine does not read it."""
    if metric == "dot":
        return code_offset.float().reshape(-1, cbt.shape[1])[: cbt.shape[0]]
    if metric != "euclidean":
        return cbt.new_empty(cbt.shape[:2], dtype=torch.float32)
    if codebook_sq_norm is None or shared_view:
        return sq_norm(cbt)
    return codebook_sq_norm.float().reshape(cbt.shape[0], -1)


def gather_codes(codebook: Tensor, indices: Tensor) -> Tensor:
    """`codebook (h or 1, K, d)`, `indices (H, N)` -> `(H, N, d)` by row lookup (no one-hot, no per-batch repeat):
    an embedding lookup for a shared codebook (no expanded index tensor; on an H200 it runs the same gather
    kernel, at the same speed), `gather` for per-head codebooks. Differentiable in `codebook`."""
    if codebook.shape[0] == 1:
        return F.embedding(indices, codebook[0])
    codebook = codebook.expand(indices.shape[0], -1, -1)
    return torch.gather(codebook, 1, indices.unsqueeze(-1).expand(-1, -1, codebook.shape[-1]))


def nearest_code(
    x: Tensor,
    codebook: Tensor,
    *,
    metric: str = "euclidean",
    mode: str | None = None,
    exact: bool | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    codebook_sq_norm: Tensor | None = None,
    code_offset: Tensor | None = None,
    return_codes: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Index of the nearest code for each row.

    Args:
        x: `(..., N, D)` features, any float dtype (cosine: already l2-normalized).
        codebook: `(..., K, D)` with the same leading (head) dims as `x`, or `(K, D)` shared by all.
        metric: `"euclidean"` (argmin of the squared distance), `"cosine"` (argmax of `x.c`) or `"dot"` (argmax of
            `x.c - code_offset`).
        mode: the kernel's `"rerank"` | `"exact"` | `"fast"` (module docstring); default `$HF_VQ_NEAREST_MODE`,
            else `"rerank"`. The PyTorch path (CPU, `HF_VQ_DISABLE_TRITON=1`) is always the fp32 reference.
        exact: the same as `mode`: `True` = `"exact"`, `False` = `"fast"`.
        chunk_bytes: memory budget of one chunk's score matrix on the PyTorch path.
        codebook_sq_norm: optional cached `(..., K)` float32 `|c|^2` (as `sq_norm(codebook)` computes it).
        code_offset: `(..., K)` float32 per-code offsets of the `"dot"` metric (zero if not given). `"exact"` mode
            runs the PyTorch path for it (the kernel's error bound does not cover the offsets).
        return_codes: also return the winners' codes `(..., N, D)` in the codebook's dtype (not differentiable;
            the kernel writes them as it finishes a row, which saves the lookup's own pass over memory).

    Returns:
        `(indices int64 (..., N), score float32 (..., N))`: the winner's squared distance (euclidean, vqp's
        arithmetic), `x.c` (cosine) or `x.c - offset` (dot). Ties go to the lowest index. With `return_codes`, the
        codes third.
    """
    _check(x, codebook, metric, SEARCH_METRICS)
    mode = resolve_mode(mode, exact)
    if code_offset is not None and metric != "dot":
        raise ValueError(f"code_offset is an argument of metric='dot', got metric={metric!r}")
    if metric == "dot" and code_offset is None:
        metric = "cosine"  # the same arithmetic: argmax of x.c
    x3, cb, sqn, lead = _as_heads(x, codebook, code_offset if metric == "dot" else codebook_sq_norm)
    kernel = not (metric == "dot" and mode == "exact")  # exact mode's bound does not cover the offsets
    if kernel and x3.shape[1] > 0 and x3.shape[0] > 0 and triton_nearest.available(x3):
        with torch.no_grad():
            cbt = codebook.reshape(-1, *codebook.shape[-2:])  # unexpanded: the kernel broadcasts a shared codebook
            shared_view = cbt.shape[0] > 1 and cbt.stride(0) == 0  # `embed.expand(h, ...)`: one codebook
            if shared_view:
                cbt = cbt[:1]
            sqn_t = _per_code_values(cbt, metric, codebook_sq_norm, code_offset, shared_view)
            if torch.compiler.is_compiling():  # one opaque op in the graph
                indices, best, codes = triton_nearest_op.nearest_code_op(x3, cbt, sqn_t, metric, mode, return_codes)
            else:
                codes = x3.new_empty(x3.shape, dtype=codebook.dtype) if return_codes else None
                indices, best = triton_nearest.nearest_code_triton(x3, cbt, sqn_t, metric=metric, mode=mode,
                                                                   out_codes=codes)
    else:
        # the choice is not differentiable: without no_grad autograd would keep every chunk's scores alive
        indices, best = _nearest_torch(x3, cb, sqn, metric, chunk_bytes)
        codes = gather_codes(cb.detach(), indices) if return_codes else None
    out = indices.reshape(*lead, -1), best.reshape(*lead, -1)
    return (*out, codes.reshape(*lead, *codes.shape[-2:])) if return_codes else out
