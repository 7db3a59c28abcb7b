"""Residual quantization steps in one pass each (Triton).

`residual_step_` (CUDA, PyTorch elsewhere): after a level's search, `codes = codebook[idx]`, `residual - codes`
and `out + codes` are three passes over `(N, d)` (at ResidualVQ 8x1024 d128 N=2^17 on an H200: 81 + 49 + 48 us a
level). The kernel reads each row's index, code, residual and running sum once and updates the last two in place:
the same float32 values.
Float32 only: Triton 3.9's CPU interpreter rounds float32 -> bfloat16 differently from PyTorch, so a
low-precision variant could not be checked in CI; other dtypes take the PyTorch ops.

`residual_train_levels` (kernels only: CUDA or the interpreter): ResidualVQ's training step over all levels of the
common configuration (euclidean, EMA, the rotation trick with vqp's MSE commitment loss) as one autograd node.
Per level a search and one pass that looks up the code, adds the row to the code's EMA statistics (atomics, as
`index_add_` on CUDA), takes the commitment loss's partial sum, and updates the residual and the running sum by
the rotated code. The backward pass is one kernel for all levels: it recomputes each level's residual from the
input and the codes (nothing per level is stored but the indices and a snapshot of the codebooks), and adds up
every level's rotation and commitment gradient. A step at 8 levels costs ~60 host ops instead of ~440.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .nearest import nearest_code, sq_norm
from .triton_nearest import HAS_TRITON, kernel_ok
from .triton_rotation import MAX_DIM, row_blocks, row_warps

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _residual_step(R, O, C, IDX, N, D, BLOCK_N: tl.constexpr, BD: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BD)
        m = (rows < N)[:, None] & (d < D)[None, :]
        idx = tl.load(IDX + rows, mask=rows < N, other=0)
        code = tl.load(C + idx[:, None] * D + d[None, :], mask=m, other=0.0)
        off = rows[:, None] * D + d[None, :]
        r = tl.load(R + off, mask=m, other=0.0)
        o = tl.load(O + off, mask=m, other=0.0)
        tl.store(R + off, r - code, mask=m)
        tl.store(O + off, o + code, mask=m)

    from .triton_rotation import frame_of, rotated, rotated_grad

    @triton.jit
    def _train_step(R, O, C, IDX, CNT, SUM, PART, N, D, BLOCK: tl.constexpr, BD: tl.constexpr,
                    STATS: tl.constexpr):
        # one level: EMA statistics of the rows (STATS), commitment partial sum into PART[program],
        # R -= rotated code, O += rotated code; without STATS only R moves (replaying the levels' inputs)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, BD)
        rm = rows < N
        m = rm[:, None] & (d < D)[None, :]
        idx = tl.load(IDX + rows, mask=rm, other=0)
        off = rows[:, None] * D + d[None, :]
        coff = idx[:, None] * D + d[None, :]
        r = tl.load(R + off, mask=m, other=0.0)
        c = tl.load(C + coff, mask=m, other=0.0)
        u, q, w, s = frame_of(r, c, 1e-6)
        rot = rotated(r, u, q, w, s)
        tl.store(R + off, r - rot, mask=m)
        if STATS:
            tl.atomic_add(SUM + coff, r, mask=m, sem="relaxed")
            tl.atomic_add(CNT + idx, tl.full([BLOCK], 1.0, tl.float32), mask=rm, sem="relaxed")
            diff = c - r
            tl.store(PART + tl.program_id(0), tl.sum(tl.sum(diff * diff, axis=1), axis=0))
            o = tl.load(O + off, mask=m, other=0.0)
            tl.store(O + off, o + rot, mask=m)

    @triton.jit
    def _train_bwd(X, G, C, IDX, GL, GX, scale, N, D, K, LEVELS, BLOCK: tl.constexpr, BD: tl.constexpr):
        # grad_x = sum over levels of the rotation's gradient of G plus GL[l] * scale * (r_l - c_l), the residual
        # r_l recomputed level by level as in the forward (same arithmetic, so the same values)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, BD)
        rm = rows < N
        m = rm[:, None] & (d < D)[None, :]
        off = rows[:, None] * D + d[None, :]
        r = tl.load(X + off, mask=m, other=0.0)
        g = tl.load(G + off, mask=m, other=0.0)
        gx = tl.zeros([BLOCK, BD], dtype=tl.float32)
        for level in range(LEVELS):
            idx = tl.load(IDX + level * N + rows, mask=rm, other=0)
            c = tl.load(C + level * K * D + idx[:, None] * D + d[None, :], mask=m, other=0.0)
            u, q, w, s = frame_of(r, c, 1e-6)
            gx += rotated_grad(g, u, q, w, s) + (r - c) * (tl.load(GL + level) * scale)
            r = r - rotated(r, u, q, w, s)
        tl.store(GX + off, gx, mask=m)


def residual_step_(residual: Tensor, out: Tensor, codebook: Tensor, idx: Tensor) -> None:
    """In place: `residual -= codebook[idx]`, `out += codebook[idx]` (codes cast to `residual`'s dtype).
    `residual`, `out`: `(N, d)` of one dtype; `codebook (K, d)`; `idx (N,)` int64 in range (nearest_code's output;
    the kernel does not check it). Where autograd must see the step (grad enabled and any input needing it), the
    PyTorch in-place ops run, so gradients reach the codebook and the residual's inputs."""
    tracked = torch.is_grad_enabled() and (residual.requires_grad or out.requires_grad or codebook.requires_grad)
    fused = (not tracked and residual.dtype == out.dtype == codebook.dtype == torch.float32
             and kernel_ok(residual, 1024) and residual.is_contiguous() and out.is_contiguous())
    if not fused:
        code = codebook[idx].to(residual.dtype)
        residual.sub_(code)
        out.add_(code)
        return
    n, d = residual.shape
    bd = triton.next_power_of_2(d)
    block_n = max(1, 4096 // bd)  # 4096 elements a program
    _residual_step[(triton.cdiv(n, block_n),)](residual, out, codebook.contiguous(), idx, n, d,
                                               BLOCK_N=block_n, BD=bd)


def train_levels_ok(x: Tensor) -> bool:
    """Whether `residual_train_levels` can serve `x`: float32 rows of at most MAX_DIM, kernels available."""
    return x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] > 0 and kernel_ok(x, MAX_DIM)


def _launch_step(r: Tensor, out: Tensor, book: Tensor, idx: Tensor, counts: Tensor, sums: Tensor, part: Tensor,
                 stats: bool) -> None:
    n, d = r.shape
    programs, block, bd = row_blocks(n, d)
    _train_step[(programs,)](r, out, book, idx, counts, sums, part, n, d, BLOCK=block, BD=bd, STATS=stats,
                             num_warps=row_warps(bd))


class _ResidualTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, books: Tensor, sq_norms: Tensor):
        levels, num_codes, d = books.shape
        n = x.shape[0]
        r = x.detach().clone(memory_format=torch.contiguous_format)
        out = torch.zeros_like(r)
        counts = torch.zeros(levels, num_codes, dtype=torch.float32, device=x.device)
        sums = torch.zeros(levels, num_codes, d, dtype=torch.float32, device=x.device)
        part = torch.empty(levels, row_blocks(n, d)[0], dtype=torch.float32, device=x.device)
        indices = []
        for level in range(levels):
            idx, _ = nearest_code(r, books[level], codebook_sq_norm=sq_norms[level])
            _launch_step(r, out, books[level], idx, counts[level], sums[level], part[level], stats=True)
            indices.append(idx)
        indices = torch.stack(indices)
        ctx.save_for_backward(x, books, indices)
        ctx.mark_non_differentiable(indices, counts, sums)
        return out, part.sum(1) / x.numel(), indices, counts, sums

    @staticmethod
    def backward(ctx, g_out: Tensor | None, g_loss: Tensor | None, *_):
        x, books, indices = ctx.saved_tensors
        x = x.contiguous()  # (the kernel reads rows at stride d)
        levels, num_codes, d = books.shape
        n = x.shape[0]
        g_out = torch.zeros_like(x) if g_out is None else g_out.contiguous()
        g_loss = x.new_zeros(levels) if g_loss is None else g_loss.float().contiguous()
        gx = torch.empty_like(x)
        programs, block, bd = row_blocks(n, d)
        _train_bwd[(programs,)](x, g_out, books, indices, g_loss, gx, 2.0 / x.numel(), n, d, num_codes, levels,
                                BLOCK=block, BD=bd, num_warps=row_warps(bd))
        return gx, None, None


def residual_train_levels(x: Tensor, books: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ResidualVQ's training levels on rows `x (N, d)` float32 with codebooks `books (L, K, d)` (a snapshot: the
    backward pass reads it after the caller's EMA update). Level l quantizes `r_l` (`r_0 = x`) to its nearest code
    `c_l` (`nearest_code`, default mode) and `r_{l+1} = r_l - rot(r_l, c_l)`, where `rot` is the rotation trick
    (`estimators.rotate_to`, value ~ `c_l`).

    Returns `(sum of rot(r_l, c_l) (N, d), commitment losses mean((c_l - r_l)^2) (L,), indices (L, N),
    EMA counts (L, K), EMA sums of r_l (L, K, d))`; the first two are differentiable in `x` (the rotation's
    gradient and the losses', as vqp's per-level modules give them), the others are not."""
    books = books.detach().contiguous()
    return _ResidualTrain.apply(x, books, sq_norm(books))


@torch.no_grad()
def level_inputs(x: Tensor, books: Tensor, indices: Tensor) -> Iterator[Tensor]:
    """Each level's input `r_l (N, d)` of `residual_train_levels(x, books)` with its `indices`, recomputed by the
    same arithmetic (for dead-code expiry, which samples them; only run when a code expired)."""
    r = x.detach().clone(memory_format=torch.contiguous_format)
    for book, idx in zip(books, indices):
        yield r.clone()
        _launch_step(r, r, book, idx, r, r, r, stats=False)
