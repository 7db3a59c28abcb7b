"""The sum of one projected code per head (`ops.projected.lookup_sum`) on CUDA: each program gathers its rows' table
rows head by head into registers and writes the output once (embedding_bag's CUDA kernel runs several times
slower at these shapes). Forward only: a call that needs the table's gradient takes embedding_bag."""

from __future__ import annotations

import torch
from torch import Tensor

from .utils import HAS_TRITON, row_blocks, row_warps

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n_rows"])
    def _lookup_sum_kernel(TABLE, INDICES, BIAS, OUT, n_rows, n_codes, dim, HEADS: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """`OUT[n] = BIAS + sum_h TABLE[h * n_codes + INDICES[h, n]]` for `BLOCK_N` rows; `TABLE (HEADS * n_codes,
        dim)`, `INDICES (HEADS, n_rows)` int64, `OUT (n_rows, dim)`, all contiguous."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        cols = tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < dim)[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cols < dim, other=0.0)[None, :]
        for h in range(HEADS):
            code = tl.load(INDICES + h * n_rows + rows, mask=row_mask, other=0)
            table_rows = (h * n_codes + code).to(tl.int64)[:, None] * dim
            acc += tl.load(TABLE + table_rows + cols[None, :], mask=mask, other=0.0)
        tl.store(OUT + rows.to(tl.int64)[:, None] * dim + cols[None, :], acc, mask=mask)


def lookup_sum_triton(table: Tensor, indices: Tensor, bias: Tensor | None) -> Tensor:
    """`ops.projected.lookup_sum` (float32 `table (H K, D)`, `indices (H, N)`) by `_lookup_sum_kernel`; the sum runs
    over the heads in order, from the bias, in float32."""
    heads, n = indices.shape
    dim = table.shape[1]
    table, indices = table.contiguous(), indices.contiguous()
    out = torch.empty(n, dim, dtype=table.dtype, device=table.device)
    if n == 0:
        return out
    programs, rows, block_d = row_blocks(n, dim)
    _lookup_sum_kernel[(programs,)](table, indices, bias if bias is not None else table, out, n,
                                    table.shape[0] // heads, dim, HEADS=heads, HAS_BIAS=bias is not None,
                                    BLOCK_N=rows, BLOCK_D=block_d, num_warps=row_warps(block_d))
    return out
