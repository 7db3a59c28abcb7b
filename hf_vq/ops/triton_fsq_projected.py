"""FSQ between its two projections, `project_out(fsq(project_in(x)))`, as one pass over the features on CUDA.

With projections, an FSQ call is bound by memory: a few code features per token between two wide `nn.Linear`
maps. As separate ops the features are read and written by each projection, and the backward reads the output's
gradient once per product (input gradient, weight gradient, bias gradient), copying it first where it is not
dense (a broadcast or transposed gradient). Here:

- forward (`_fwd_kernel`): each program reads a block of rows once, keeps the projected code features in
  registers, bounds and rounds them (`triton_fsq._bound_round`, the FSQ kernel's arithmetic), writes the int32
  indices, and writes the output projection of the codes;
- backward, two kernels over (row blocks x feature chunks): `_bwd_out_kernel` reads the output's gradient once, in
  any strides, for the codes' gradient and the output projection's weight and bias gradients; `_bwd_in_kernel`
  reads the input once for the input projection's weight gradient and writes the input's gradient.

Weight and bias gradients are summed per program and the programs' partial sums added by one `sum` (no atomics:
the same gradients in every run). Features may be channel-last `(..., d)` or channel-first `(b, d, n)`: a kernel
reads rows `(b, t)` through strides, so neither layout is copied. `FSQ` routes calls whose features are strided
(channel-first images and video) here; contiguous rows go to cuBLAS's GEMMs, which are as fast as these kernels
there (benchmarks/RESULTS.md).

The products run on the tensor cores as `tf32x3` (`PRECISION`): each float32 operand split into two TF32 parts,
three products, float32 accumulation, float32-level accuracy (plain TF32 would round the operands to 10 bits, and
float32 FMA products ran slower). They sum in another order than cuBLAS, so a code feature within float32 rounding
of a level boundary may round the other way.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from .triton_fsq import MAX_LEVELS
from .utils import HAS_TRITON, interpreting, kernel_ok

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_fsq import _bound_round

    @triton.jit
    def _row_offsets(rows, T, stride_b, stride_t):
        # element offset of row `rows` of a (B, T, D) view: row r is (r // T, r % T)
        r = rows.to(tl.int64)
        b = r // T
        return b * stride_b + (r - b * T) * stride_t

    @triton.jit(do_not_specialize=["n_rows", "T"])
    def _fwd_kernel(x_ptr, w_in_ptr, b_in_ptr, w_out_ptr, b_out_ptr, table_ptr, basis_ptr, out_ptr, codes_ptr,
                    slope_ptr, indices_ptr, n_rows, T, sxb, sxt, sxd, sob, sot, sod,
                    D, C: tl.constexpr, N_LEVELS: tl.constexpr, N_CODEBOOKS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HARD_CLAMP: tl.constexpr, EMULATE_TANH: tl.constexpr,
                    SAVE: tl.constexpr, TABLE_WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
        """`BLOCK_M` rows: `z = x W_in^T + b_in` (`C` code features), FSQ codes and indices, `out = codes W_out^T +
        b_out`. `x`, `out`: (B, T, D) views through their strides; `w_in (C, D)`, `w_out (D, C)` contiguous;
        `indices (n_rows, N_CODEBOOKS)` int32; when `SAVE`, `codes` and `slope` `(n_rows, C)` for the backward."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        cols = tl.arange(0, BLOCK_C)
        col_mask = cols < C
        x_rows = _row_offsets(rows, T, sxb, sxt)
        z = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + x_rows[:, None] + d[None, :] * sxd, mask=row_mask[:, None] & (d < D)[None, :],
                        other=0.0)
            w = tl.load(w_in_ptr + cols[None, :] * D + d[:, None], mask=(d < D)[:, None] & col_mask[None, :],
                        other=0.0)
            z = tl.dot(x, w, z, input_precision=PRECISION)
        if HAS_BIAS:
            z += tl.load(b_in_ptr + cols, mask=col_mask, other=0.0)[None, :]
        level = cols % N_LEVELS
        r, half_width, slope = _bound_round(z, tl.broadcast_to(level[None, :], (BLOCK_M, BLOCK_C)), table_ptr,
                                            HARD_CLAMP, EMULATE_TANH, TABLE_WIDTH)
        codes = tl.where(col_mask[None, :], tl.math.div_rn(r, half_width), 0.0)
        digit = (r + half_width).to(tl.int32) * tl.load(basis_ptr + level, mask=col_mask, other=0)[None, :]
        for cb in tl.static_range(N_CODEBOOKS):
            in_codebook = (cols >= cb * N_LEVELS) & (cols < (cb + 1) * N_LEVELS)
            tl.store(indices_ptr + rows * N_CODEBOOKS + cb, tl.sum(tl.where(in_codebook[None, :], digit, 0), axis=1),
                     mask=row_mask)
        if SAVE:
            small = rows.to(tl.int64)[:, None] * C + cols[None, :]
            small_mask = row_mask[:, None] & col_mask[None, :]
            tl.store(codes_ptr + small, codes, mask=small_mask)
            tl.store(slope_ptr + small, slope, mask=small_mask)
        out_rows = _row_offsets(rows, T, sob, sot)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            w = tl.load(w_out_ptr + d[None, :] * C + cols[:, None], mask=col_mask[:, None] & (d < D)[None, :],
                        other=0.0)
            out = tl.dot(codes, w, input_precision=PRECISION)
            if HAS_BIAS:
                out += tl.load(b_out_ptr + d, mask=d < D, other=0.0)[None, :]
            tl.store(out_ptr + out_rows[:, None] + d[None, :] * sod, out,
                     mask=row_mask[:, None] & (d < D)[None, :])

    @triton.jit(do_not_specialize=["n_rows", "T", "blocks_per_program"])
    def _bwd_out_kernel(g_ptr, codes_ptr, w_out_ptr, grad_codes_ptr, part_ptr, n_rows, T, sgb, sgt, sgd,
                        blocks_per_program, D, C: tl.constexpr, PARAMS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                        PRECISION: tl.constexpr):
        """Program (p, k), over feature chunk k and the row blocks p, p + P, ...: the output gradient `g` (B, T, D,
        any strides) read once for the chunk's share of the codes' gradient, `grad_codes[k] (n_rows, C)`, and, when
        `PARAMS`, the chunk's rows of the output projection's weight and bias gradients, summed into
        `part[p] (D, C + 1)` (bias in column C)."""
        p, n_programs, k = tl.program_id(0), tl.num_programs(0), tl.program_id(1)
        d = k * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = d < D
        cols = tl.arange(0, BLOCK_C)
        col_mask = cols < C
        w = tl.load(w_out_ptr + d[:, None] * C + cols[None, :], mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        w_acc = tl.zeros((BLOCK_D, BLOCK_C), dtype=tl.float32)
        b_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(blocks_per_program):
            rows = (p + i * n_programs) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < n_rows
            g = tl.load(g_ptr + _row_offsets(rows, T, sgb, sgt)[:, None] + d[None, :] * sgd,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            small = rows.to(tl.int64)[:, None] * C + cols[None, :]
            small_mask = row_mask[:, None] & col_mask[None, :]
            tl.store(grad_codes_ptr + k.to(tl.int64) * n_rows * C + small, tl.dot(g, w, input_precision=PRECISION),
                     mask=small_mask)
            if PARAMS:
                codes = tl.load(codes_ptr + small, mask=small_mask, other=0.0)
                w_acc = tl.dot(tl.trans(g), codes, w_acc, input_precision=PRECISION)
                b_acc += tl.sum(g, axis=0)
        if PARAMS:
            part = part_ptr + p * D * (C + 1) + d * (C + 1)
            tl.store(part[:, None] + cols[None, :], w_acc, mask=d_mask[:, None] & col_mask[None, :])
            tl.store(part + C, b_acc, mask=d_mask)

    @triton.jit(do_not_specialize=["n_rows", "T", "blocks_per_program"])
    def _bwd_in_kernel(grad_z_ptr, x_ptr, w_in_ptr, grad_x_ptr, part_ptr, n_rows, T, sxb, sxt, sxd, sgb, sgt, sgd,
                       blocks_per_program, D, C: tl.constexpr, INPUT: tl.constexpr,
                       PARAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                       PRECISION: tl.constexpr):
        """Program (p, k), over feature chunk k and the row blocks p, p + P, ...: from the code features' gradient
        `grad_z (n_rows, C)`, when `INPUT` the chunk of the input's gradient `grad_x` (B, T, D view), and when
        `PARAMS` the chunk's columns of the input projection's weight gradient (and, in chunk 0, the bias
        gradient), summed into `part[p] (C, D + 1)` (bias in column D); the input `x` is read only for those."""
        p, n_programs, k = tl.program_id(0), tl.num_programs(0), tl.program_id(1)
        d = k * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = d < D
        cols = tl.arange(0, BLOCK_C)
        col_mask = cols < C
        w = tl.load(w_in_ptr + cols[:, None] * D + d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        w_acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
        b_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for i in range(blocks_per_program):
            rows = (p + i * n_programs) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & d_mask[None, :]
            grad_z = tl.load(grad_z_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :],
                             mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            if INPUT:
                tl.store(grad_x_ptr + _row_offsets(rows, T, sgb, sgt)[:, None] + d[None, :] * sgd,
                         tl.dot(grad_z, w, input_precision=PRECISION), mask=mask)
            if PARAMS:
                x = tl.load(x_ptr + _row_offsets(rows, T, sxb, sxt)[:, None] + d[None, :] * sxd, mask=mask,
                            other=0.0)
                w_acc = tl.dot(tl.trans(grad_z), x, w_acc, input_precision=PRECISION)
                b_acc += tl.sum(grad_z, axis=0)
        if PARAMS:
            part = part_ptr + p * C * (D + 1) + cols * (D + 1)
            tl.store(part[:, None] + d[None, :], w_acc, mask=col_mask[:, None] & d_mask[None, :])
            if k == 0:
                tl.store(part + D, b_acc, mask=col_mask)


class Tiles(NamedTuple):
    rows: int  # rows per block
    features: int  # at most this many features per chunk
    warps: int


class _Spec(NamedTuple):
    levels: int  # len(levels)
    codebooks: int
    hard_clamp: bool
    channel_first: bool  # the rows view is a transposed (B, D, T) tensor


# per kernel: the fastest of a sweep on an H200 (32-128 rows x 32-64 features x 4-8 warps, benchmarks/RESULTS.md)
TILES = {"fwd": Tiles(64, 64, 4), "bwd_out": Tiles(64, 64, 4), "bwd_in": Tiles(64, 64, 4)}
PROGRAMS_PER_SM = 4  # of a backward kernel, over all its chunks
PRECISION = "tf32x3"  # of the products (tl.dot's input_precision)
MAX_CODE_FEATURES = MAX_LEVELS  # code features per token (num_codebooks x len(levels)) one tile row holds


def _blocks(dim: int, code_features: int, tiles: Tiles) -> tuple[int, int]:
    """`(BLOCK_D, BLOCK_C)`: the feature chunk and the padded code-feature width (`tl.dot` needs at least 16)."""
    return min(tiles.features, max(16, triton.next_power_of_2(dim))), max(16, triton.next_power_of_2(code_features))


def _row_programs(n_rows: int, chunks: int, tiles: Tiles, device: torch.device) -> int:
    """Row programs of a backward kernel: `PROGRAMS_PER_SM` over all chunks (each sums its weight gradient over
    many row blocks, so there are few partial sums to add), at most one per row block."""
    sms = 4 if interpreting() else _multiprocessors(device)
    return max(1, min(triton.cdiv(n_rows, tiles.rows), triton.cdiv(PROGRAMS_PER_SM * sms, chunks)))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def available(x: Tensor) -> bool:
    """Whether the kernels can serve float32 features `x` (see `utils.kernel_ok`)."""
    return x.dtype == torch.float32 and kernel_ok(x)


def projected_fsq(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None, table: Tensor,
                  basis: Tensor, *, codebooks: int, hard_clamp: bool, channel_first: bool) -> tuple[Tensor, Tensor]:
    """`(out, indices)` of `project_out(fsq(project_in(x)))` for float32 features `x`, channel-last `(..., D)` or,
    with `channel_first`, `(B, D, N)`; `out` in `x`'s layout, int32 `indices (..., codebooks)` (channel-first:
    `(B, N, codebooks)`). `w_in (C, D)`, `w_out (D, C)` and the biases (both or neither) are the projections'
    (float32), `C = codebooks * len(levels)`; `table, basis` from `triton_fsq.fsq_table`. Differentiable in `x`
    and the projections (FSQ's straight-through gradient, as `fsq_quantize_fused`)."""
    if (b_in is None) != (b_out is None):
        raise ValueError("projected_fsq takes both projection biases or neither")
    n_levels, code_features = basis.numel(), w_in.shape[0]
    if code_features != codebooks * n_levels or code_features > MAX_CODE_FEATURES:
        raise ValueError(f"projected_fsq: {code_features} code features for {codebooks} codebooks of {n_levels} "
                         f"levels (at most {MAX_CODE_FEATURES})")
    # a (B, T, D) view of the features (3-D channel-last inputs as they are, whatever their strides)
    rows = x.transpose(1, 2) if channel_first else x if x.ndim == 3 else x.reshape(1, -1, x.shape[-1])
    spec = _Spec(n_levels, codebooks, hard_clamp, channel_first)
    args = (rows, w_in.contiguous(), b_in, w_out.contiguous(), b_out, table, basis, spec)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_in, b_in, w_out, b_out)):
        out, indices = _ProjectedFSQ.apply(*args)
    else:
        out, indices, _, _ = _forward(*args, save=False)
    if channel_first:
        return out.transpose(1, 2), indices.view(x.shape[0], -1, codebooks)
    return out.view(x.shape), indices.view(*x.shape[:-1], codebooks)


class _ProjectedFSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, table, basis, spec):
        out, indices, codes, slope = _forward(x, w_in, b_in, w_out, b_out, table, basis, spec, save=True)
        ctx.mark_non_differentiable(indices)
        ctx.spec = spec
        ctx.save_for_backward(x, w_in, w_out, codes, slope)
        return out, indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_indices):
        x, w_in, w_out, codes, slope = ctx.saved_tensors
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out = _backward(
            grad_out, x, w_in, w_out, codes, slope, ctx.spec.channel_first, need_x, need_w_in or need_b_in,
            need_w_out or need_b_out)
        return (grad_x, grad_w_in if need_w_in else None, grad_b_in if need_b_in else None,
                grad_w_out if need_w_out else None, grad_b_out if need_b_out else None, None, None, None)


def _forward(x, w_in, b_in, w_out, b_out, table, basis, spec: _Spec, save: bool):
    """`(out, indices, codes, slope)` of the rows view `x (B, T, D)`; `codes`, `slope` (for the backward) only when
    `save`."""
    B, T, D = x.shape
    C = w_in.shape[0]
    n_rows = B * T
    out = _empty_features(x, spec.channel_first)
    indices = torch.empty(n_rows, spec.codebooks, dtype=torch.int32, device=x.device)
    codes = slope = None
    if save:
        codes = torch.empty(n_rows, C, dtype=torch.float32, device=x.device)
        slope = torch.empty_like(codes)
    if n_rows:
        tiles = TILES["fwd"]
        block_d, block_c = _blocks(D, C, tiles)
        _fwd_kernel[(triton.cdiv(n_rows, tiles.rows),)](
            x, w_in, b_in if b_in is not None else w_in, w_out, b_out if b_out is not None else w_out, table, basis,
            out, codes if save else out, slope if save else out, indices, n_rows, T, *x.stride(), *out.stride(),
            D=D, C=C, N_LEVELS=spec.levels, N_CODEBOOKS=spec.codebooks, HAS_BIAS=b_in is not None,
            HARD_CLAMP=spec.hard_clamp, EMULATE_TANH=interpreting(), SAVE=save, TABLE_WIDTH=table.shape[1],
            BLOCK_M=tiles.rows, BLOCK_D=block_d, BLOCK_C=block_c, PRECISION=PRECISION, num_warps=tiles.warps)
    return out, indices, codes, slope


def _empty_features(x: Tensor, channel_first: bool) -> Tensor:
    """An uninitialized `(B, T, D)` tensor like the rows view `x`: stored as `(B, D, T)` when `channel_first`."""
    B, T, D = x.shape
    if channel_first:
        return torch.empty(B, D, T, dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(B, T, D, dtype=x.dtype, device=x.device)


def _backward(grad_out, x, w_in, w_out, codes, slope, channel_first, need_x, need_in_params, need_out_params):
    """`(grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out)` from the output gradient (any strides); those not
    needed are None."""
    B, T, D = x.shape
    C = w_in.shape[0]
    n_rows = B * T
    tiles = TILES["bwd_out"]
    block_d, block_c = _blocks(D, C, tiles)
    chunks = triton.cdiv(D, block_d)
    programs = _row_programs(n_rows, chunks, tiles, x.device)
    grad_codes = torch.empty(chunks, n_rows, C, dtype=torch.float32, device=x.device)
    out_part = torch.empty(programs, D, C + 1, dtype=torch.float32, device=x.device) if need_out_params else None
    _bwd_out_kernel[(programs, chunks)](
        grad_out, codes, w_out, grad_codes, out_part if need_out_params else grad_codes, n_rows, T,
        *grad_out.stride(), triton.cdiv(triton.cdiv(n_rows, tiles.rows), programs), D=D, C=C,
        PARAMS=need_out_params, BLOCK_M=tiles.rows, BLOCK_D=block_d, BLOCK_C=block_c, PRECISION=PRECISION,
        num_warps=tiles.warps)
    grad_z = grad_codes.sum(0).mul_(slope) if chunks > 1 else grad_codes[0].mul_(slope)
    grad_x = in_part = None
    if need_x:
        grad_x = _empty_features(x, channel_first)
    if need_x or need_in_params:
        tiles = TILES["bwd_in"]
        block_d, _ = _blocks(D, C, tiles)
        chunks = triton.cdiv(D, block_d)
        programs = _row_programs(n_rows, chunks, tiles, x.device)
        if need_in_params:
            in_part = torch.empty(programs, C, D + 1, dtype=torch.float32, device=x.device)
        gx = grad_x if need_x else x
        _bwd_in_kernel[(programs, chunks)](
            grad_z, x, w_in, gx, in_part if need_in_params else grad_z, n_rows, T, *x.stride(), *gx.stride(),
            triton.cdiv(triton.cdiv(n_rows, tiles.rows), programs), D=D, C=C, INPUT=need_x, PARAMS=need_in_params,
            BLOCK_M=tiles.rows, BLOCK_D=block_d, BLOCK_C=block_c, PRECISION=PRECISION, num_warps=tiles.warps)
    grad_w_in = grad_b_in = grad_w_out = grad_b_out = None
    if need_in_params:
        sums = in_part.sum(0)
        grad_w_in, grad_b_in = sums[:, :D], sums[:, D]
    if need_out_params:
        sums = out_part.sum(0)
        grad_w_out, grad_b_out = sums[:, :C], sums[:, C]
    return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out
