"""Residual quantization steps in one pass each (Triton), over one or several groups of rows.

Every function here takes a leading group axis `G`: `G` independent residual quantizers of one shape (the groups of
a `GroupedResidualVQ`, or `G = 1` for a `ResidualVQ`), each with its own rows `(N, d)` and codebooks `(K, d)`, run
by one launch per level (the group is the launch's second grid axis).

`residual_step_` (CUDA, PyTorch elsewhere): after a level's search, `codes = codebook[idx]`, `residual - codes`
and `out + codes` would be three passes over `(G, N, d)`. The kernel reads each row's index, code, residual and
running sum once and updates the last two in place: the same float32 values.
Float32 only: Triton 3.9's CPU interpreter rounds float32 -> bfloat16 differently from PyTorch, so a
low-precision variant could not be checked in CI; other dtypes take the PyTorch ops.

`residual_train_levels` (kernels only: CUDA or the interpreter): ResidualVQ's training step over all levels of the
common configuration (euclidean, EMA, the rotation trick with vqp's MSE commitment loss) as one autograd node.
Per level a search and one pass that looks up the code, adds the row to the code's EMA statistics (atomics, as
`index_add_` on CUDA), takes the commitment loss's partial sum, and updates the residual and the running sum by
the rotated code. The backward pass is one kernel for all levels: it recomputes each level's residual from the
input and the codes (nothing per level is stored but the indices and a snapshot of the codebooks), and adds up
every level's rotation and commitment gradient.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .nearest import gather_codes, nearest_code, sq_norm
from .triton_rotation import MAX_DIM
from .utils import HAS_TRITON, kernel_ok, row_blocks, row_warps

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _residual_step(RESIDUAL, OUT, CODEBOOK, INDEX, n_rows, dim, n_codes, BLOCK_ROWS: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        """In place for BLOCK_ROWS rows of group `program_id(1)`: `RESIDUAL -= CODEBOOK[INDEX]`, `OUT +=
        CODEBOOK[INDEX]`. RESIDUAL, OUT: contiguous float32 `(G, n_rows, dim)`; CODEBOOK contiguous `(G, n_codes,
        dim)`; INDEX int64 `(G, n_rows)`; BLOCK_D: `dim` padded to a power of two."""
        group = tl.program_id(1).to(tl.int64)
        RESIDUAL += group * n_rows * dim
        OUT += group * n_rows * dim
        CODEBOOK += group * n_codes * dim
        INDEX += group * n_rows
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
        idx = tl.load(INDEX + rows, mask=rows < n_rows, other=0)
        code = tl.load(CODEBOOK + idx[:, None] * dim + cols[None, :], mask=mask, other=0.0)
        offs = rows[:, None] * dim + cols[None, :]
        r = tl.load(RESIDUAL + offs, mask=mask, other=0.0)
        o = tl.load(OUT + offs, mask=mask, other=0.0)
        tl.store(RESIDUAL + offs, r - code, mask=mask)
        tl.store(OUT + offs, o + code, mask=mask)

    from .triton_rotation import frame_of, rotated, rotated_grad

    @triton.jit
    def _train_step(RESIDUAL, OUT, CODEBOOK, INDEX, COUNTS, SUMS, LOSS_PARTS, n_rows, dim, n_codes, n_parts,
                    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, STATS: tl.constexpr):
        """One level for BLOCK_ROWS rows of group `program_id(1)`: `RESIDUAL -= rot`, and with STATS `OUT += rot`,
        the rows added to their codes' EMA statistics (COUNTS `(G, n_codes)`, SUMS `(G, n_codes, dim)`, atomics)
        and the commitment loss's partial sum `sum((c - r)^2)` into LOSS_PARTS `(G, n_parts)`; `rot` is the
        rotation trick of the residual towards its code. Without STATS only RESIDUAL moves (replaying the levels'
        inputs; OUT, COUNTS, SUMS, LOSS_PARTS are None). RESIDUAL, OUT: contiguous float32 `(G, n_rows, dim)`;
        CODEBOOK `(G, n_codes, dim)`; INDEX int64 `(G, n_rows)`."""
        group = tl.program_id(1).to(tl.int64)
        RESIDUAL += group * n_rows * dim
        CODEBOOK += group * n_codes * dim
        INDEX += group * n_rows
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < dim)[None, :]
        idx = tl.load(INDEX + rows, mask=row_mask, other=0)
        offs = rows[:, None] * dim + cols[None, :]
        code_offs = idx[:, None] * dim + cols[None, :]
        r = tl.load(RESIDUAL + offs, mask=mask, other=0.0)
        c = tl.load(CODEBOOK + code_offs, mask=mask, other=0.0)
        u, q, w, s = frame_of(r, c, 1e-6)
        rot = rotated(r, u, q, w, s)
        tl.store(RESIDUAL + offs, r - rot, mask=mask)
        if STATS:
            tl.atomic_add(SUMS + group * n_codes * dim + code_offs, r, mask=mask, sem="relaxed")
            tl.atomic_add(COUNTS + group * n_codes + idx, tl.full([BLOCK_ROWS], 1.0, tl.float32), mask=row_mask,
                          sem="relaxed")
            diff = c - r
            tl.store(LOSS_PARTS + group * n_parts + tl.program_id(0),
                     tl.sum(tl.sum(diff * diff, axis=1), axis=0))
            OUT += group * n_rows * dim
            o = tl.load(OUT + offs, mask=mask, other=0.0)
            tl.store(OUT + offs, o + rot, mask=mask)

    @triton.jit
    def _train_bwd(X, GRAD_OUT, CODEBOOKS, INDICES, GRAD_LOSSES, GRAD_X, loss_scale, n_rows, dim, n_codes, n_levels,
                   n_groups, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """`GRAD_X` = the sum over levels of the rotation's gradient of GRAD_OUT plus `GRAD_LOSSES[l] *
        loss_scale * (r_l - c_l)`, the residual `r_l` recomputed level by level as in the forward (same
        arithmetic, so the same values), for group `program_id(1)` of `n_groups` (G). X, GRAD_OUT, GRAD_X:
        contiguous float32 `(G, n_rows, dim)`; CODEBOOKS `(n_levels, G, n_codes, dim)`; INDICES int64 `(n_levels, G,
        n_rows)`; GRAD_LOSSES float32 `(n_levels, G)`."""
        group = tl.program_id(1).to(tl.int64)
        X += group * n_rows * dim
        GRAD_OUT += group * n_rows * dim
        GRAD_X += group * n_rows * dim
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < dim)[None, :]
        offs = rows[:, None] * dim + cols[None, :]
        r = tl.load(X + offs, mask=mask, other=0.0)
        g = tl.load(GRAD_OUT + offs, mask=mask, other=0.0)
        gx = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        for level in range(n_levels):
            book = level * n_groups + group  # this group's codebook of the level
            idx = tl.load(INDICES + book * n_rows + rows, mask=row_mask, other=0)
            c = tl.load(CODEBOOKS + book * n_codes * dim + idx[:, None] * dim + cols[None, :], mask=mask, other=0.0)
            u, q, w, s = frame_of(r, c, 1e-6)
            gx += rotated_grad(g, u, q, w, s) + (r - c) * (tl.load(GRAD_LOSSES + book) * loss_scale)
            r = r - rotated(r, u, q, w, s)
        tl.store(GRAD_X + offs, gx, mask=mask)


def residual_step_(residual: Tensor, out: Tensor, codebook: Tensor, idx: Tensor) -> None:
    """In place: `residual -= codebook[idx]`, `out += codebook[idx]` per group (codes cast to `residual`'s dtype).
    `residual`, `out`: `(G, N, d)` of one dtype; `codebook (G, K, d)`; `idx (G, N)` int64 in range (nearest_code's
    output; the kernel does not check it). Where autograd must see the step (grad enabled and any input needing
    it), the PyTorch in-place ops run, so gradients reach the codebook and the residual's inputs."""
    tracked = torch.is_grad_enabled() and (residual.requires_grad or out.requires_grad or codebook.requires_grad)
    fused = (not tracked and residual.dtype == out.dtype == codebook.dtype == torch.float32
             and kernel_ok(residual, MAX_DIM) and residual.is_contiguous() and out.is_contiguous())
    if not fused:
        code = gather_codes(codebook, idx).to(residual.dtype)
        residual.sub_(code)
        out.add_(code)
        return
    groups, n, d = residual.shape
    programs, block, block_d = row_blocks(n, d)
    _residual_step[(programs, groups)](residual, out, codebook.contiguous(), idx, n, d, codebook.shape[1],
                                       BLOCK_ROWS=block, BLOCK_D=block_d, num_warps=row_warps(block_d))


def train_levels_ok(x: Tensor) -> bool:
    """Whether `residual_train_levels` can serve rows `x (..., d)` (metadata only): float32, at least one row, at
    most MAX_DIM features, kernels available."""
    return x.dtype == torch.float32 and x.numel() > 0 and kernel_ok(x, MAX_DIM)


def _launch_step(r: Tensor, out: Tensor | None, book: Tensor, idx: Tensor, counts: Tensor | None,
                 sums: Tensor | None, part: Tensor | None, stats: bool) -> None:
    groups, n, d = r.shape
    programs, block, block_d = row_blocks(n, d)
    _train_step[(programs, groups)](r, out, book, idx, counts, sums, part, n, d, book.shape[1], programs,
                                    BLOCK_ROWS=block, BLOCK_D=block_d, STATS=stats, num_warps=row_warps(block_d))


class _ResidualTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, books: Tensor, sq_norms: Tensor):
        levels, groups, num_codes, d = books.shape
        n = x.shape[1]
        r = x.detach().clone(memory_format=torch.contiguous_format)
        out = torch.zeros_like(r)
        counts = torch.zeros(levels, groups, num_codes, dtype=torch.float32, device=x.device)
        sums = torch.zeros(levels, groups, num_codes, d, dtype=torch.float32, device=x.device)
        part = torch.empty(levels, groups, row_blocks(n, d)[0], dtype=torch.float32, device=x.device)
        indices = []
        for level in range(levels):
            idx, _ = nearest_code(r, books[level], codebook_sq_norm=sq_norms[level])
            _launch_step(r, out, books[level], idx, counts[level], sums[level], part[level], stats=True)
            indices.append(idx)
        indices = torch.stack(indices)
        ctx.save_for_backward(x, books, indices)
        ctx.mark_non_differentiable(indices, counts, sums)
        return out, part.sum(-1) / (n * d), indices, counts, sums

    @staticmethod
    def backward(ctx, g_out: Tensor | None, g_loss: Tensor | None, *_):
        x, books, indices = ctx.saved_tensors
        x = x.contiguous()  # (the kernel reads rows at stride d)
        levels, groups, num_codes, d = books.shape
        n = x.shape[1]
        g_out = torch.zeros_like(x) if g_out is None else g_out.contiguous()
        g_loss = x.new_zeros(levels, groups) if g_loss is None else g_loss.float().contiguous()
        gx = torch.empty_like(x)
        programs, block, block_d = row_blocks(n, d)
        _train_bwd[(programs, groups)](x, g_out, books, indices, g_loss, gx, 2.0 / (n * d), n, d, num_codes, levels,
                                       groups, BLOCK_ROWS=block, BLOCK_D=block_d, num_warps=row_warps(block_d))
        return gx, None, None


def residual_train_levels(x: Tensor, books: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ResidualVQ's training levels for G groups at once: rows `x (G, N, d)` float32, codebooks `books (L, G, K, d)`
    (a snapshot: the backward pass reads it after the caller's EMA update). In each group, level l quantizes `r_l`
    (`r_0 = x`) to its nearest code `c_l` (`nearest_code`, default mode) and `r_{l+1} = r_l - rot(r_l, c_l)`, where
    `rot` is the rotation trick (`estimators.rotate_to`, value ~ `c_l`).

    Returns `(sum of rot(r_l, c_l) (G, N, d), commitment losses mean((c_l - r_l)^2) (L, G), indices (L, G, N),
    EMA counts (L, G, K), EMA sums of r_l (L, G, K, d))`; the first two are differentiable in `x` (the rotation's
    gradient and the losses', as vqp's per-level modules give them), the others are not."""
    books = books.detach().contiguous()
    return _ResidualTrain.apply(x, books, sq_norm(books))


@torch.no_grad()
def level_inputs(x: Tensor, books: Tensor, indices: Tensor) -> Iterator[Tensor]:
    """Each level's input `r_l (G, N, d)` of `residual_train_levels(x, books)` with its `indices`, recomputed by
    the same arithmetic (for dead-code expiry, which samples them; only run when a code expired)."""
    r = x.detach().clone(memory_format=torch.contiguous_format)
    for book, idx in zip(books, indices):
        yield r.clone()
        _launch_step(r, None, book, idx, None, None, None, stats=False)
