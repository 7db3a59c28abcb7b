"""Fused rotation trick on CUDA (Triton): forward value and backward in one pass over the rows each.

`estimators.rotate_to` computes `e - 2 (e.w) w + 2 (e.u) q`, scaled by `|c| / |x|`, with vqp's per-row
`(1, d) @ (d, 1) @ (1, d)` matrix products, which on the GPU become batched tiny GEMMs. Row-wise the same map is
a few dot products per row: this kernel keeps a block of rows on chip, and the backward recomputes `u, q, w` from
`x` and the codes instead of storing them (`grad_x = s (g - 2 (g.w) w + 2 (g.q) u)`, `s = |c| / |x|`; `w, u, q, s`
are constants of the estimator, as in vqp). Same formula as the PyTorch path; float32 sums in another order, so
the value differs from it by float32 rounding (the CPU path keeps vqp's bit-exact form).

With `rotate_to_with_commitment` the same passes also give vqp's default commitment loss `mse(c, x)` (per-program
partial sums, summed after the launch: deterministic) and its gradient `2 (x - c) / numel`, so no separate MSE
forward, backward and gradient accumulation run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .utils import HAS_TRITON, kernel_ok, row_blocks, row_warps

MAX_DIM = 2048  # a block of whole rows stays on chip (row_blocks: 2 rows of 2048)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def frame_of(x, c, EPS: tl.constexpr):
        # u = x/|x|, q = c/|c|, w = (u + q)/|u + q| (norms clamped at EPS, as the PyTorch path), s = |c| / |x|;
        # x, c: (rows, BD) float32 blocks
        xn = tl.sqrt(tl.sum(x * x, axis=1))[:, None]
        cn = tl.sqrt(tl.sum(c * c, axis=1))[:, None]
        u = x / tl.maximum(xn, EPS)
        q = c / tl.maximum(cn, EPS)
        v = u + q
        w = v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=1))[:, None], EPS)
        return u, q, w, cn / tl.maximum(xn, EPS)

    @triton.jit
    def rotated(x, u, q, w, s):
        # the rotation trick's value: (x - 2 (x.w) w + 2 (x.u) q) * s
        ew = tl.sum(x * w, axis=1)[:, None]
        eu = tl.sum(x * u, axis=1)[:, None]
        return (x - 2.0 * ew * w + 2.0 * eu * q) * s

    @triton.jit
    def rotated_grad(g, u, q, w, s):
        # its gradient to x for the output's gradient g (u, q, w, s held constant, as vqp)
        g = g * s
        gw = tl.sum(g * w, axis=1)[:, None]
        gq = tl.sum(g * q, axis=1)[:, None]
        return g - 2.0 * gw * w + 2.0 * gq * u

    @triton.jit
    def _row_block(n_rows, dim, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        # this program's rows of a contiguous (n_rows, dim) tensor: element offsets and their mask
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
        return rows[:, None] * dim + cols[None, :], mask

    @triton.jit
    def _rotate_fwd(X, CODES, OUT, LOSS_PARTS, n_rows, dim, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                    COMMIT: tl.constexpr):
        """Rotation trick value of BLOCK_ROWS rows. X, CODES, OUT: contiguous `(n_rows, dim)` (OUT in X's
        dtype); LOSS_PARTS: float32 per-program sums of `(c - x)^2` (COMMIT only, else None). BLOCK_D: `dim`
        padded to a power of two."""
        offs, mask = _row_block(n_rows, dim, BLOCK_ROWS, BLOCK_D)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(CODES + offs, mask=mask, other=0.0).to(tl.float32)
        u, q, w, s = frame_of(x, c, 1e-6)
        tl.store(OUT + offs, rotated(x, u, q, w, s).to(OUT.dtype.element_ty), mask=mask)
        if COMMIT:
            diff = c - x
            tl.store(LOSS_PARTS + tl.program_id(0), tl.sum(tl.sum(diff * diff, axis=1), axis=0))

    @triton.jit
    def _rotate_bwd(X, CODES, GRAD_OUT, GRAD_X, GRAD_LOSS, loss_scale, n_rows, dim, BLOCK_ROWS: tl.constexpr,
                    BLOCK_D: tl.constexpr, COMMIT: tl.constexpr):
        """Gradient to X of the rotation (and with COMMIT of the commitment loss: `GRAD_LOSS[0] * loss_scale *
        (x - c)`, `loss_scale = 2 / numel`; GRAD_LOSS None without COMMIT). Tensors as in `_rotate_fwd`;
        GRAD_OUT and GRAD_X contiguous `(n_rows, dim)`."""
        offs, mask = _row_block(n_rows, dim, BLOCK_ROWS, BLOCK_D)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(CODES + offs, mask=mask, other=0.0).to(tl.float32)
        u, q, w, s = frame_of(x, c, 1e-6)
        gx = rotated_grad(tl.load(GRAD_OUT + offs, mask=mask, other=0.0).to(tl.float32), u, q, w, s)
        if COMMIT:
            gx += (x - c) * (tl.load(GRAD_LOSS) * loss_scale)
        tl.store(GRAD_X + offs, gx.to(GRAD_X.dtype.element_ty), mask=mask)


def available(x: Tensor) -> bool:
    """Whether the fused kernel can serve `x` (rows of up to MAX_DIM stay on chip)."""
    return kernel_ok(x, MAX_DIM)


def _launch(kernel, m: int, d: int, *args, commit: bool) -> None:
    programs, block, block_d = row_blocks(m, d)
    kernel[(programs,)](*args, m, d, BLOCK_ROWS=block, BLOCK_D=block_d, COMMIT=commit,
                        num_warps=row_warps(block_d))


class _Rotate(torch.autograd.Function):
    """`(rotated, commitment loss | None)`; with `commit`, `mean((codes - x)^2)` comes from the same pass over the
    rows and its gradient joins the rotation's in the backward pass (no separate MSE kernels)."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, commit: bool):
        x, codes = x.contiguous(), codes.detach().contiguous()
        d = x.shape[-1]
        m = x.numel() // d if d else 0
        out = torch.empty_like(x)
        # per-program partial sums of the loss (summed here: deterministic, unlike atomics)
        part = torch.empty(row_blocks(m, d)[0], dtype=torch.float32, device=x.device) if commit and m else None
        if m:
            _launch(_rotate_fwd, m, d, x, codes, out, part, commit=commit)
        ctx.save_for_backward(x, codes)
        ctx.commit = commit
        if not commit:
            return out, None
        return out, (part.sum() if m else x.new_zeros((), dtype=torch.float32)) / max(1, x.numel())

    @staticmethod
    def backward(ctx, g: Tensor, g_loss: Tensor | None):
        x, codes = ctx.saved_tensors
        d = x.shape[-1]
        m = x.numel() // d if d else 0
        gx = torch.empty_like(x)
        commit = ctx.commit and g_loss is not None
        if m:
            gl = g_loss.float().reshape(1) if commit else None
            _launch(_rotate_bwd, m, d, x, codes, g.contiguous(), gx, gl, 2.0 / x.numel(), commit=commit)
        return gx, None, None


def rotate_to_fused(x: Tensor, codes: Tensor) -> Tensor:
    """`estimators.rotate_to` (value and gradient to `x`; none to `codes`) in one kernel each way."""
    return _Rotate.apply(x, codes.to(x.dtype), False)[0]


def rotate_to_with_commitment(x: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """`(rotate_to(x, codes), mse_loss(codes.detach(), x))` in one kernel each way (float32 loss; its sum runs in
    another order than `mse_loss`'s, so it differs from it by float32 rounding)."""
    return _Rotate.apply(x, codes.to(x.dtype), True)
