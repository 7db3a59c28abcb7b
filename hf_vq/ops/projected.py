"""A codebook search behind an input projection, and a code lookup behind an output projection, folded into
per-head tables of the codebook.

vqp 1.32's `VectorQuantize` with projections searches `z = W_in x + b_in` (split into heads `z_h = W_h x + b_h`)
and returns `W_out [q_1, ..., q_H] + b_out` for the chosen codes `q_h`. Both linear maps fold into the codebook:

- search: `|z_h - c|^2 = |z_h|^2 + |c|^2 - 2 z_h.c`, so the codes of head `h` rank as `x.(W_h^T c) - (|c|^2 / 2 -
  b_h.c)` does (cosine ranks `z_h.c / |z_h|`, i.e. as `x.(W_h^T c) + b_h.c`): a `"dot"` search of the raw rows
  against `C_h W_h` with per-code offsets (`search_table`, then `nearest_code(metric="dot")`).
- lookup: `W_out [q_1, ..., q_H] + b_out = b_out + sum_h (C_h W_out,h^T)[i_h]`, a sum of one row per head of
  `lookup_table` (`lookup_sum`; differentiable in the weights and a learnable codebook, as the projection is).

The same ranking and the same output in exact arithmetic; in float32 they round differently (near-ties can go to
the other code, as between any two fp32 evaluations). A table costs `H K d_c D` multiply-adds against the
projection's `N D H d_c`: folding pays when the codebook has fewer codes than the call has rows (`folding_pays`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_projected
from .utils import kernel_ok


def folding_pays(rows: int, codebook_size: int) -> bool:
    """Whether a table of `codebook_size` codes per head costs less than projecting `rows` rows."""
    return codebook_size < rows


def search_table(codebook: Tensor, weight: Tensor, bias: Tensor | None, metric: str) -> tuple[Tensor, Tensor]:
    """`(table (H, K, D), offset (H, K))` (float32, or float64 weights' float64) such that `nearest_code(x, table, metric="dot",
    code_offset=offset)` ranks the codes as the `metric` search of `W x + b` split into `H` heads does.

    `codebook`: `(H or 1, K, d_c)` (one codebook shared by all heads, or one per head); `weight`: `(H d_c, D)`
    and `bias`: `(H d_c,)` of the input projection (`nn.Linear`), heads in consecutive blocks of `d_c` outputs."""
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    d_c = codebook.shape[-1]
    heads = weight.shape[0] // d_c
    dtype = torch.promote_types(weight.dtype, torch.float32)
    codes = codebook.to(dtype)
    table = torch.matmul(codes, weight.to(dtype).view(heads, d_c, -1))  # (H, K, D): W_h^T c for every code
    offset = (codes * codes).sum(-1) * 0.5 if metric == "euclidean" else codes.new_zeros(codes.shape[:2])
    if bias is not None:
        offset = offset - torch.matmul(codes, bias.to(dtype).view(heads, d_c, 1)).squeeze(-1)
    return table, offset.expand(heads, -1).contiguous()


def lookup_table(codebook: Tensor, weight: Tensor) -> Tensor:
    """`(H K, D)`: row `h K + k` is `W_out,h^T c_{h,k}`, head `h`'s code `k` through the output projection
    (`weight (D, H d_c)`, heads in consecutive blocks of `d_c` inputs)."""
    d_c = codebook.shape[-1]
    heads = weight.shape[1] // d_c
    w = weight.view(weight.shape[0], heads, d_c).permute(1, 2, 0)  # (H, d_c, D)
    return torch.matmul(codebook.to(weight.dtype), w).reshape(-1, weight.shape[0])


def lookup_sum(table: Tensor, indices: Tensor, bias: Tensor | None) -> Tensor:
    """`(N, D)`: `bias + sum_h table[h K + indices[h]]` for `indices (H, N)` (one gather-sum: no `(N, H d_c)`
    codes, no output GEMM). On CUDA, where no gradient is needed, a Triton kernel (`triton_projected`)."""
    needs_grad = torch.is_grad_enabled() and (table.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad and table.dtype == torch.float32 and kernel_ok(table):
        return triton_projected.lookup_sum_triton(table, indices, bias)
    heads, n = indices.shape
    if heads == 1:
        out = F.embedding(indices[0], table)
    else:
        codes_per_head = table.shape[0] // heads
        first = torch.arange(0, table.shape[0], codes_per_head, device=indices.device)
        out = F.embedding_bag((indices + first[:, None]).t(), table, mode="sum")
    if bias is None:
        return out
    return out.add_(bias) if not out.requires_grad else out + bias
