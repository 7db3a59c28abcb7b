"""Fused FSQ on CUDA (Triton): bound, round, renormalize and pack the index in one pass over the features.

The PyTorch path (`bound_and_round` in `fsq.py`) is several elementwise kernels plus the index's, each a small
amount of work behind its own launch. This kernel reads `z` once and writes the codes (in `z`'s dtype) and the
int32 index, and in training the slope of the bound (the straight-through gradient of the round times the bound's
derivative), which one C++ autograd op applies. It does the same float32 arithmetic as the PyTorch op, in the same
order where it decides a rounding (`tanh(z + shift) * half_l - offset`, round half to even, `/ (L // 2)`); the
per-dimension constants come from the PyTorch op's own formulas (`fsq_table`).

The launch goes through Triton's own launcher (`kernel[grid](...)`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .utils import HAS_TRITON, interpreting, kernel_ok

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _round_half_even(v):
        # exact for |v| < 2^22 (FSQ values are a few units): adding 1.5 * 2^23 leaves no fraction bits
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _tanh(v, EMULATE_TANH: tl.constexpr):
        if EMULATE_TANH:  # the CPU interpreter has no libdevice: 1 - 2 / (exp(2v) + 1), within ~1e-7 of tanh
            return 1.0 - 2.0 / (tl.exp(2.0 * v) + 1.0)
        else:
            return libdevice.tanh(v)  # CUDA's tanhf, as torch.tanh on the GPU

    @triton.jit
    def _bound_round(z, col, table_ptr, HARD_CLAMP: tl.constexpr, EMULATE_TANH: tl.constexpr,
                     TABLE_WIDTH: tl.constexpr):
        # Per-dimension constants by column `col` (rows of the table, see `fsq_table`). Returns the rounded level
        # offset r (in [-L // 2, L // 2]), L // 2, and the slope d(code)/dz of the bound: the straight-through
        # gradient of the rounded code.
        shift = tl.load(table_ptr + col)
        half_l = tl.load(table_ptr + TABLE_WIDTH + col)
        offset = tl.load(table_ptr + 2 * TABLE_WIDTH + col)
        half_width = tl.load(table_ptr + 3 * TABLE_WIDTH + col)
        code_scale = tl.load(table_ptr + 4 * TABLE_WIDTH + col)  # half_l / (L // 2)
        if HARD_CLAMP:
            v = z + shift
            bounded = tl.minimum(tl.maximum(v, -1.0), 1.0) * half_l - offset
            slope = tl.where((v >= -1.0) & (v <= 1.0), code_scale, 0.0)
        else:
            t = _tanh(z + shift, EMULATE_TANH)
            bounded = t * half_l - offset
            slope = code_scale * (1.0 - t * t)
        return _round_half_even(bounded), half_width, slope

    @triton.jit(do_not_specialize=["n_rows"])  # one compiled kernel for every row count
    def _fsq_fwd_kernel(z_ptr, table_ptr, basis_ptr, codes_ptr, slope_ptr, indices_ptr, n_rows,
                        N_LEVELS: tl.constexpr, HARD_CLAMP: tl.constexpr, EMULATE_TANH: tl.constexpr,
                        WRITE_SLOPE: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr, TABLE_WIDTH: tl.constexpr,
                        ELEMS_PER_BLOCK: tl.constexpr):
        """One block quantizes `ROWS_PER_BLOCK` rows of `N_LEVELS` features.

        Args:
            z_ptr: `(n_rows, N_LEVELS)` contiguous features (any float dtype; float32 math).
            table_ptr: `(5, TABLE_WIDTH)` float32 per-level constants from `fsq_table`.
            basis_ptr: `(N_LEVELS,)` int32 mixed-radix place values.
            codes_ptr: `(n_rows, N_LEVELS)` output codes, in the dtype of the buffer.
            slope_ptr: `(n_rows, N_LEVELS)` output slopes (written only when `WRITE_SLOPE`).
            indices_ptr: `(n_rows,)` int32 output indices.
            n_rows: number of rows (not specialized on).
            ELEMS_PER_BLOCK: next power of two >= `ROWS_PER_BLOCK * N_LEVELS`.
        """
        first_row = tl.program_id(0) * ROWS_PER_BLOCK
        base = first_row * N_LEVELS
        # codes: the block's rows as one contiguous run of elements (coalesced, vectorized)
        e = tl.arange(0, ELEMS_PER_BLOCK)
        emask = (e < ROWS_PER_BLOCK * N_LEVELS) & (base + e < n_rows * N_LEVELS)
        z = tl.load(z_ptr + base + e, mask=emask, other=0.0).to(tl.float32)
        r, half_width, slope = _bound_round(z, e % N_LEVELS, table_ptr, HARD_CLAMP, EMULATE_TANH, TABLE_WIDTH)
        tl.store(codes_ptr + base + e, tl.math.div_rn(r, half_width).to(codes_ptr.dtype.element_ty), mask=emask)
        if WRITE_SLOPE:
            tl.store(slope_ptr + base + e, slope.to(slope_ptr.dtype.element_ty), mask=emask)
        # index: the same rows as a (ROWS_PER_BLOCK, TABLE_WIDTH) tile (a second read, from cache), digits summed
        rows = first_row + tl.arange(0, ROWS_PER_BLOCK)
        cols = tl.arange(0, TABLE_WIDTH)
        tile_mask = (rows < n_rows)[:, None] & (cols < N_LEVELS)[None, :]
        z2 = tl.load(z_ptr + rows[:, None] * N_LEVELS + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        col2 = tl.broadcast_to(cols[None, :], (ROWS_PER_BLOCK, TABLE_WIDTH))
        r2, half_width2, _ = _bound_round(z2, col2, table_ptr, HARD_CLAMP, EMULATE_TANH, TABLE_WIDTH)
        basis = tl.load(basis_ptr + cols, mask=cols < N_LEVELS, other=0)[None, :]
        digit = (r2 + half_width2).to(tl.int32)
        tl.store(indices_ptr + rows, tl.sum(tl.where(tile_mask, digit * basis, 0), axis=1), mask=rows < n_rows)


    @triton.jit(do_not_specialize=["n_rows"])
    def _residual_fsq_fwd_kernel(x_ptr, scales_ptr, lm1_ptr, step_ptr, basis_ptr, out_ptr, slope_ptr, indices_ptr,
                                 n_rows, N_LEVELS: tl.constexpr, N_QUANTIZERS: tl.constexpr,
                                 HARD_CLAMP: tl.constexpr, EMULATE_TANH: tl.constexpr, WRITE_SLOPE: tl.constexpr,
                                 ROWS_PER_BLOCK: tl.constexpr, WIDTH: tl.constexpr):
        """One block runs `ROWS_PER_BLOCK` rows through every level of a ResidualFSQ, the residual in registers.

        Args:
            x_ptr: `(n_rows, N_LEVELS)` contiguous input (any float dtype; float32 math).
            scales_ptr: `(N_QUANTIZERS, N_LEVELS)` float32 scale of each level and dimension (`levels ** -i`).
            lm1_ptr, step_ptr: `(N_LEVELS,)` float32 `L - 1` and `2 / (L - 1)` (`fsq.bound_table`, symmetric).
            basis_ptr: `(N_LEVELS,)` int32 mixed-radix place values.
            out_ptr: `(n_rows, N_LEVELS)` output: the sum of the levels' contributions.
            slope_ptr: `(n_rows, N_LEVELS)` output: d(out)/dx, the sum of the levels' straight-through slopes
                (written only when `WRITE_SLOPE`).
            indices_ptr: `(n_rows, N_QUANTIZERS)` int32 output indices.
            WIDTH: next power of two >= `N_LEVELS`.
        """
        rows = tl.program_id(0) * ROWS_PER_BLOCK + tl.arange(0, ROWS_PER_BLOCK)
        cols = tl.arange(0, WIDTH)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < N_LEVELS)[None, :]
        offsets = rows[:, None] * N_LEVELS + cols[None, :]
        residual = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        lm1 = tl.load(lm1_ptr + cols, mask=cols < N_LEVELS, other=1.0)[None, :]
        step = tl.load(step_ptr + cols, mask=cols < N_LEVELS, other=0.0)[None, :]
        basis = tl.load(basis_ptr + cols, mask=cols < N_LEVELS, other=0)[None, :]
        out = tl.zeros((ROWS_PER_BLOCK, WIDTH), dtype=tl.float32)
        slope = tl.zeros((ROWS_PER_BLOCK, WIDTH), dtype=tl.float32)
        for level in tl.static_range(N_QUANTIZERS):
            scale = tl.load(scales_ptr + level * N_LEVELS + cols, mask=cols < N_LEVELS, other=1.0)[None, :]
            v = tl.math.div_rn(residual, scale)
            if HARD_CLAMP:
                squashed = tl.minimum(tl.maximum(v, -1.0), 1.0)
                d_squashed = tl.where((v >= -1.0) & (v <= 1.0), 1.0, 0.0)
            else:
                squashed = _tanh(v, EMULATE_TANH)
                d_squashed = 1.0 - squashed * squashed
            # (L - 1) * (s + 1) / 2 + 1/2, floored: the level; the code is 2 / (L - 1) * level - 1
            digit = tl.math.floor(lm1 * (squashed + 1.0) * 0.5 + 0.5)
            contribution = (step * digit - 1.0) * scale
            tl.store(indices_ptr + rows * N_QUANTIZERS + level,
                     tl.sum(tl.where(mask, digit.to(tl.int32) * basis, 0), axis=1), mask=row_ok)
            residual = residual - contribution
            out = out + contribution
            if WRITE_SLOPE:  # d(contribution)/d(residual): scale * step * (L - 1) / 2 * squash' / scale
                slope = slope + step * lm1 * 0.5 * d_squashed
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_SLOPE:
            tl.store(slope_ptr + offsets, slope.to(slope_ptr.dtype.element_ty), mask=mask)


ROWS_PER_BLOCK = 256
MAX_LEVELS = 64  # one row of levels per tile row: FSQ has a handful


def available(z: Tensor) -> bool:
    """Whether the kernel can serve `z` (see `utils.kernel_ok`; under torch.compile the PyTorch ops are compiled)."""
    return kernel_ok(z)


def fsq_table(levels: Tensor, basis: Tensor, hard_clamp: bool, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Per-dimension constants `(5, W)` float32 (shift, half_l, offset, L // 2, half_l / (L // 2); W the next
    power of two >= len(levels), at least 2) and the int32 basis, by the PyTorch op's formulas (so the kernel
    rounds the same values)."""
    half_l = (levels - 1) * (1 + eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(levels.device)
    shift = offset / half_l if hard_clamp else torch.atanh(offset / half_l)
    width = max(2, 1 << (levels.numel() - 1).bit_length())
    table = torch.ones(5, width, dtype=torch.float32, device=levels.device)
    for row, v in enumerate((shift, half_l, offset, levels // 2, half_l / (levels // 2))):
        table[row, : levels.numel()] = v.float()
    return table, basis.to(torch.int32).contiguous()


def fsq_quantize_fused(z: Tensor, table: Tensor, basis: Tensor, hard_clamp: bool = False, *,
                       straight_through: bool = False) -> tuple[Tensor, Tensor]:
    """`(codes in z's dtype, int32 indices (..., C))` of `fsq_quantize` + `codes_to_indices` for `z (..., C * d)`
    (C codebooks of `d = len(levels)` dims side by side), in one kernel (float32 inside). `table, basis` from
    `fsq_table`.

    With `straight_through=True` the codes carry FSQ's straight-through gradient to `z`: d(code)/dz of the bound
    times the incoming gradient. That is recorded as the product `z * slope` (one C++ autograd node, cheaper in
    host time than a Python autograd Function), and the kernel then writes the codes over the product and the
    slope into the tensor the product saved for its backward: neither needs a buffer or an op of its own.
    Otherwise the codes are not differentiable."""
    n_levels = basis.numel()
    if z.shape[-1] % n_levels:
        raise ValueError(f"last dim {z.shape[-1]} is not a multiple of the {n_levels} levels")
    if n_levels > MAX_LEVELS:
        raise ValueError(f"the FSQ kernel takes at most {MAX_LEVELS} levels, got {n_levels}")
    z = z.contiguous()
    n_rows = z.numel() // n_levels
    indices = torch.empty((*z.shape[:-1], z.shape[-1] // n_levels), dtype=torch.int32, device=z.device)
    if straight_through:
        slope = torch.empty_like(z)
        codes = z * slope  # contiguous like both operands; its value (from unset memory) is overwritten below
    else:
        slope, codes = None, torch.empty_like(z)
    if n_rows:
        grid = (triton.cdiv(n_rows, ROWS_PER_BLOCK),)
        _fsq_fwd_kernel[grid](
            z, table, basis, codes, codes if slope is None else slope, indices, n_rows,
            N_LEVELS=n_levels, HARD_CLAMP=hard_clamp, EMULATE_TANH=interpreting(), WRITE_SLOPE=straight_through,
            ROWS_PER_BLOCK=ROWS_PER_BLOCK, TABLE_WIDTH=table.shape[1],
            ELEMS_PER_BLOCK=triton.next_power_of_2(ROWS_PER_BLOCK * n_levels))
    return codes, indices


def residual_fsq_fused(x: Tensor, scales: Tensor, table: Tensor, basis: Tensor, hard_clamp: bool = False, *,
                       straight_through: bool = False) -> tuple[Tensor, Tensor]:
    """`fsq.residual_fsq` in one kernel: `(quantized in x's dtype, int32 indices (..., Q))` of `x (..., d)` through
    the Q symmetric FSQ levels of a ResidualFSQ. `scales (Q, d)`, `table` (`fsq.bound_table(..., symmetric=True)`)
    and `basis` as there. Each element is read once and written once; the residual stays in registers.

    With `straight_through=True` the output carries the straight-through gradient to `x`, recorded as the product
    `x * slope` (see `fsq_quantize_fused`): the kernel writes the output over the product and the summed slopes of
    the levels into the tensor the product saved. The kernel runs with floating-point contraction off, so that
    each step rounds as the PyTorch ops do."""
    n_levels = basis.numel()
    if x.shape[-1] != n_levels:
        raise ValueError(f"last dim {x.shape[-1]} is not the {n_levels} levels")
    if n_levels > MAX_LEVELS:
        raise ValueError(f"the FSQ kernel takes at most {MAX_LEVELS} levels, got {n_levels}")
    x = x.contiguous()
    n_rows, n_quantizers = x.numel() // n_levels, scales.shape[0]
    indices = torch.empty((*x.shape[:-1], n_quantizers), dtype=torch.int32, device=x.device)
    if straight_through:
        slope = torch.empty_like(x)
        out = x * slope  # overwritten by the kernel (see `fsq_quantize_fused`)
    else:
        slope, out = None, torch.empty_like(x)
    if n_rows:
        grid = (triton.cdiv(n_rows, ROWS_PER_BLOCK),)
        _residual_fsq_fwd_kernel[grid](
            x, scales.contiguous(), table[0].contiguous(), table[1].contiguous(), basis, out,
            out if slope is None else slope, indices, n_rows,
            N_LEVELS=n_levels, N_QUANTIZERS=n_quantizers, HARD_CLAMP=hard_clamp, EMULATE_TANH=interpreting(),
            WRITE_SLOPE=straight_through, ROWS_PER_BLOCK=ROWS_PER_BLOCK,
            WIDTH=max(2, triton.next_power_of_2(n_levels)), enable_fp_fusion=False)
    return out, indices
