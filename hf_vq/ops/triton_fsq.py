"""Fused FSQ on CUDA (Triton): bound, round, renormalize and pack the index in one pass over the features.

`fsq_quantize` (in `fsq.py`) is several elementwise kernels plus the index's, each a small amount of work behind
its own launch, so the op is launch- and pass-bound. This kernel reads `z` once and
writes the codes (in `z`'s dtype) and the int32 index, and in training the slope of the bound (the
straight-through gradient of the round times the bound's derivative), which one C++ autograd op applies. The same
float32 arithmetic as the PyTorch op, in the same order where it decides a rounding (`tanh(z + shift) * half_l -
offset`, round half to even, `/ (L // 2)`); the per-dimension constants come from the PyTorch op's own formulas.
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
    def _tanh(v, EMULATE: tl.constexpr):
        if EMULATE:  # the CPU interpreter has no libdevice: 1 - 2 / (exp(2v) + 1), within ~1e-7 of tanh
            return 1.0 - 2.0 / (tl.exp(2.0 * v) + 1.0)
        else:
            return libdevice.tanh(v)  # CUDA's tanhf, as torch.tanh on the GPU

    @triton.jit
    def _bound_round(z, col, TABLE, HARD: tl.constexpr, EMULATE: tl.constexpr, TABLE_WIDTH: tl.constexpr):
        # per-dimension constants by column (a tiny, cached table); returns (rounded level offset r, L // 2, slope):
        # the slope is d(code)/dz of the bound, the straight-through gradient of the rounded code
        shift = tl.load(TABLE + col)
        half_l = tl.load(TABLE + TABLE_WIDTH + col)
        offset = tl.load(TABLE + 2 * TABLE_WIDTH + col)
        hw = tl.load(TABLE + 3 * TABLE_WIDTH + col)
        scale = tl.load(TABLE + 4 * TABLE_WIDTH + col)  # half_l / (L // 2)
        if HARD:
            v = z + shift
            bounded = tl.minimum(tl.maximum(v, -1.0), 1.0) * half_l - offset
            slope = tl.where((v >= -1.0) & (v <= 1.0), scale, 0.0)
        else:
            t = _tanh(z + shift, EMULATE)
            bounded = t * half_l - offset
            slope = scale * (1.0 - t * t)
        return _round_half_even(bounded), hw, slope

    @triton.jit(do_not_specialize=["n_rows"])  # one compiled kernel for every row count
    def _fsq_fwd(Z, TABLE, BASIS, CODES, SLOPE, INDEX, n_rows, n_levels: tl.constexpr, HARD: tl.constexpr,
                 EMULATE: tl.constexpr, WANT_SLOPE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                 TABLE_WIDTH: tl.constexpr, BLOCK_E: tl.constexpr):
        """FSQ of BLOCK_ROWS rows of `n_levels` values each.

        Z: contiguous `(n_rows, n_levels)` input, any float dtype. TABLE: `(5, TABLE_WIDTH)` float32 per-level
        constants (`fsq_table`). BASIS: `(n_levels,)` int32 index basis. CODES: `(n_rows, n_levels)` output in
        Z's dtype; SLOPE: the bound's slope (WANT_SLOPE, else None); INDEX: `(n_rows,)` int32 packed index.
        HARD: clamp instead of tanh. EMULATE: the CPU interpreter (no libdevice). BLOCK_E: BLOCK_ROWS * n_levels
        padded to a power of two."""
        # codes: the block's rows as one contiguous run of BLOCK_ROWS * n_levels elements (coalesced, vectorized)
        first = tl.program_id(0) * BLOCK_ROWS
        e = tl.arange(0, BLOCK_E)
        emask = (e < BLOCK_ROWS * n_levels) & (first * n_levels + e < n_rows * n_levels)
        z = tl.load(Z + first * n_levels + e, mask=emask, other=0.0).to(tl.float32)
        r, hw, slope = _bound_round(z, e % n_levels, TABLE, HARD, EMULATE, TABLE_WIDTH)
        tl.store(CODES + first * n_levels + e, tl.math.div_rn(r, hw).to(CODES.dtype.element_ty), mask=emask)
        if WANT_SLOPE:
            tl.store(SLOPE + first * n_levels + e, slope.to(SLOPE.dtype.element_ty), mask=emask)
        # index: the same rows as a (BLOCK_ROWS, TABLE_WIDTH) tile (a second read, from cache), levels summed
        rows = first + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, TABLE_WIDTH)
        mask = (rows < n_rows)[:, None] & (cols < n_levels)[None, :]
        z2 = tl.load(Z + rows[:, None] * n_levels + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r2, hw2, _ = _bound_round(z2, tl.broadcast_to(cols[None, :], (BLOCK_ROWS, TABLE_WIDTH)), TABLE, HARD,
                                  EMULATE, TABLE_WIDTH)
        basis = tl.load(BASIS + cols, mask=cols < n_levels, other=0)[None, :]
        level = (r2 + hw2).to(tl.int32)
        tl.store(INDEX + rows, tl.sum(tl.where(mask, level * basis, 0), axis=1), mask=rows < n_rows)


BLOCK = 256  # rows per program


def available(z: Tensor) -> bool:
    """Whether the fused kernel can serve `z` (CUDA or the interpreter, float dtypes, `HF_VQ_DISABLE_TRITON`)."""
    return kernel_ok(z, 64)  # one row of levels per thread block row: a handful of dims


def fsq_table(levels: Tensor, basis: Tensor, hard_clamp: bool, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Per-dimension constants `(5, BD)` float32 (shift, half_l, offset, L // 2, half_l / (L // 2)) and the int32
    basis, computed by the PyTorch op's formulas (so the kernel rounds the same values)."""
    half_l = (levels - 1) * (1 + eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(levels.device)
    shift = offset / half_l if hard_clamp else torch.atanh(offset / half_l)
    bd = max(2, triton.next_power_of_2(levels.numel()))
    tab = torch.ones(5, bd, dtype=torch.float32, device=levels.device)
    for row, v in enumerate((shift, half_l, offset, levels // 2, half_l / (levels // 2))):
        tab[row, : levels.numel()] = v.float()
    return tab, basis.to(torch.int32).contiguous()


def fsq_quantize_fused(z: Tensor, tab: Tensor, basis: Tensor, hard_clamp: bool = False, *,
                       straight_through: bool = False) -> tuple[Tensor, Tensor]:
    """`(codes in z's dtype, int32 indices (..., C))` of `fsq_quantize` + `codes_to_indices` for `z (..., C * d)`
    (C codebooks of `d = len(levels)` dims side by side), in one kernel (float32 inside). `tab, basis` from
    `fsq_table`.

    With `straight_through=True` the codes carry FSQ's straight-through gradient to `z`: d(code)/dz of the bound
    times the incoming gradient. That is recorded as the product `z * slope` (one C++ autograd node; a Python
    autograd Function's backward costs more host time than the whole GPU step), and the kernel then writes the
    codes over the product and the slope into the tensor the product saved for its backward: neither needs a
    buffer or an op of its own. Otherwise the codes are not differentiable."""
    d = basis.numel()
    if z.shape[-1] % d:
        raise ValueError(f"last dim {z.shape[-1]} is not a multiple of the {d} levels")
    z = z.contiguous()
    m = z.numel() // d
    idx = torch.empty((*z.shape[:-1], z.shape[-1] // d), dtype=torch.int32, device=z.device)
    if straight_through:
        slope = torch.empty_like(z)
        q = z * slope  # contiguous like both operands; its value (from unset memory) is overwritten below
    else:
        slope, q = None, torch.empty_like(z)
    if m:
        _launch(z, tab, basis, q, slope, idx, m, d, hard_clamp, straight_through)
    return q, idx


def _launch(z: Tensor, tab: Tensor, basis: Tensor, q: Tensor, slope: Tensor | None, idx: Tensor, m: int, d: int,
            hard_clamp: bool, want_slope: bool) -> None:
    """Run `_fsq_fwd` over `m` rows through Triton's launcher (row count unspecialized: one compilation per
    level count, dtype and flags)."""
    _fsq_fwd[(triton.cdiv(m, BLOCK),)](
        z, tab, basis, q, slope, idx, m, n_levels=d, HARD=hard_clamp, EMULATE=interpreting(), WANT_SLOPE=want_slope,
        BLOCK_ROWS=BLOCK, TABLE_WIDTH=tab.shape[1], BLOCK_E=triton.next_power_of_2(BLOCK * d))
