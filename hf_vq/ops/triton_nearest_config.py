"""Launch configuration of the nearest-code kernel (`triton_nearest`): a rule instead of autotuning, and the GEMM
route's row blocks, bf16 row copy and dots.

Autotuning compiles and times every candidate configuration on the first call of each codebook shape (tens of
seconds for a new model). `launch_config` instead picks one configuration from the feature dim, codebook size,
precision and mode, so a new shape costs a single compilation. The rule was read off a sweep of candidates on an
H200 (`benchmarks/bench_nearest.py --sweep`; the table is in `benchmarks/RESULTS.md`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .utils import interpreting, padded_dim, shared_memory_bytes

RESIDENT_DIM = 256  # up to this (padded) feature dim a program's rows stay on chip for the codebook loop
GEMM_BLOCK_BYTES = 256 * 2**20  # fp32 dots of one GEMM-route block (the route's scratch memory)
GEMM_MIN_ROWS = 4096  # rows per GEMM block below which a selection launch has too few programs for the route
PACK_MAX_BITS = 9  # packed keys keep >= 14 of fp32's 23 mantissa bits


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and scheduling of one `_nearest_kernel` launch."""

    block_n: int  # rows per program
    block_k: int  # codes per codebook tile (the lanes of the selection)
    block_d: int  # features per dot slice (>= the padded dim when the rows stay resident)
    pack: bool  # packed keys instead of lane arrays
    num_warps: int
    num_stages: int
    gemm: bool = False  # dots from a cuBLAS GEMM over row blocks (the kernel then only selects and re-scores)


def tile_bits(n_codes: int, block_k: int) -> int:
    """Bits of a packed key that number the codebook tiles."""
    return max(1, (-(-n_codes // block_k) - 1).bit_length())


def _fit_stages(stages: int, block_n: int, block_k: int, block_d: int, resident: bool, elt: int,
                smem: int) -> int:
    """The most pipeline stages (at most `stages`, at least 1) whose shared-memory buffers fit `smem`: the
    resident rows once, plus one codebook slice (and one row slice when not resident) per stage."""
    while stages > 1:
        per_stage = block_k * block_d * elt + (0 if resident else block_n * block_d * elt)
        if (block_n * block_d * elt if resident else 0) + stages * per_stage <= smem:
            break
        stages -= 1
    return stages


def launch_config(code_dim: int, n_codes: int, *, bf16: bool, mode: str, device: torch.device | None = None,
                  block: tuple[int, ...] | None = None, pack: bool | None = None,
                  gemm: bool | None = None) -> LaunchConfig:
    """The launch configuration for a search (no autotuning: one compilation per specialization); memoized (a
    call's host time matters to short searches), see `_launch_config`."""
    return _launch_config(code_dim, n_codes, bf16, mode, device, None if block is None else tuple(block), pack, gemm,
                          interpreting())


def gemm_fits(n_codes: int) -> bool:
    """Whether GEMM blocks of `GEMM_BLOCK_BYTES` hold `GEMM_MIN_ROWS` rows of one head's `n_codes` fp32 dots. A
    selection launch then has `GEMM_BLOCK_BYTES / (4 n_codes BLOCK_N)` programs whatever the head count (a block
    of H heads has 1/H of the rows, each in H programs); with fewer, the launches are too small to fill the GPU
    and the in-kernel dots win (the block-size measurements are in `benchmarks/RESULTS.md`)."""
    return GEMM_BLOCK_BYTES // (4 * n_codes) >= GEMM_MIN_ROWS


@functools.lru_cache(maxsize=1024)
def _launch_config(code_dim: int, n_codes: int, bf16: bool, mode: str, device: torch.device | None,
                   block: tuple[int, ...] | None, pack: bool | None, gemm: bool | None,
                   interpreter: bool) -> LaunchConfig:
    """`launch_config`'s rule.

    Two routes. Rows that fit `RESIDENT_DIM` (and tf32 searches, and codebooks too large for `gemm_fits`) compute
    their dots in the kernel, next to the selection. Wider bf16 rows take the GEMM route (`gemm`): cuBLAS computes
    the dots of a block of rows against the whole codebook, and the kernel streams them (`BLOCK_N x BLOCK_K` fp32
    tiles) through the same selection and fp32 re-score. In-kernel dots at wide rows run several times above the
    bf16 GEMM floor (the selection state and the GEMM's tiles compete for registers; `benchmarks/RESULTS.md`),
    while the extra pass over the dots costs `8 K` bytes per row against `2 K D` GEMM flops, a small share once
    `D > RESIDENT_DIM`.

    The rule comes from `benchmarks/bench_nearest.py --sweep` on an H200 (table in `benchmarks/RESULTS.md`), which
    times a fixed set of candidates per (D, K): packed keys beat lane arrays wherever the tile bits allow them
    (the selection is a large share of the kernel's work at every D), so they are used whenever they fit.
    - Rows that fit `RESIDENT_DIM` stay on chip. bf16: 128 rows x 64 codes with 8 warps at padded D 256, 64 x 64
      with 4 warps below; without packed keys (K above 2^9 tiles) 64 x 32 with 4 warps and 4 stages. tf32: 128 x
      32 with 8 warps (the fp32 rows leave room for narrower codebook tiles only).
    - Wider rows with in-kernel dots are read in 64-feature slices: 128 x 128 with 8 warps and 3 stages with
      packed keys (up to K = 2^16), else 64 x 64 with 4 warps and 4 stages. tf32 (not swept): 64 x 64 in
      32-feature slices, the bf16 lane shape at the same bytes per stage.
    - The GEMM route streams 32 x 128 dot tiles with 4 warps and 3 stages: its rows per launch are a GEMM block,
      so short row tiles keep enough programs per launch (64-row tiles lost at large K).
    Stages are then cut to what fits the device's shared memory. `block=(BLOCK_N, BLOCK_K[, BLOCK_D])`, `pack`
    and `gemm` override the rule (tests, sweeps); a `block` without `gemm=True` selects the in-kernel dots."""
    elt = 2 if bf16 else 4
    padded = padded_dim(code_dim)
    resident = padded <= RESIDENT_DIM
    if gemm is None:
        gemm = bf16 and not resident and block is None and gemm_fits(n_codes)
    if gemm and not bf16:
        raise ValueError("the GEMM route computes bf16 dots (precision='bf16')")
    if gemm:  # a streaming pass over fp32 dot tiles, 64-feature slices for the row norms
        block_n, block_k = block[:2] if block is not None else (32, 128)
        block_d, warps, stages = 64, 4, 3
        can_pack = tile_bits(n_codes, block_k) <= PACK_MAX_BITS
    elif block is not None:
        block_n, block_k = block[0], block[1]
        block_d = block[2] if len(block) > 2 else (padded if resident else 64)
        resident = block_d >= padded
        block_d = padded if resident else block_d
        warps, stages = (4 if block_n * block_k <= 4096 else 8), 3
        can_pack = tile_bits(n_codes, block_k) <= PACK_MAX_BITS
    elif resident:
        block_d = padded
        can_pack = bf16 and tile_bits(n_codes, 64) <= PACK_MAX_BITS
        if not bf16:
            block_n, block_k, warps, stages = 128, 32, 8, 3
        elif not can_pack:
            block_n, block_k, warps, stages = 64, 32, 4, 4
        elif padded >= 256:
            block_n, block_k, warps, stages = 128, 64, 8, 3
        else:
            block_n, block_k, warps, stages = 64, 64, 4, 3
    else:
        can_pack = bf16 and tile_bits(n_codes, 128) <= PACK_MAX_BITS
        if not bf16:
            block_n, block_k, block_d, warps, stages = 64, 64, 32, 4, 3
        elif can_pack:
            block_n, block_k, block_d, warps, stages = 128, 128, 64, 8, 3
        else:
            block_n, block_k, block_d, warps, stages = 64, 64, 64, 4, 4
    if interpreter:
        stages = 1
    elif not gemm:
        stages = _fit_stages(stages, block_n, block_k, block_d, resident, elt, shared_memory_bytes(device) - 1024)
    if pack is None:
        pack = can_pack
    elif pack and tile_bits(n_codes, block_k) > PACK_MAX_BITS:
        raise ValueError(f"pack=True needs at most 2^{PACK_MAX_BITS} codebook tiles of {block_k} codes, "
                         f"got K={n_codes}")
    return LaunchConfig(block_n, block_k, block_d, pack, warps, stages, gemm)


def row_blocks(n_rows: int, dots_per_row: int, cfg: LaunchConfig, rows: int | None) -> list[tuple[int, int]]:
    """`(row0, row_end)` of each launch: one for in-kernel dots; for the GEMM route, blocks whose fp32 dots take at
    most `GEMM_BLOCK_BYTES` (or `rows` rows each), so the scratch memory stays bounded."""
    if not cfg.gemm:
        return [(0, n_rows)]
    if rows is None:
        rows = max(1, GEMM_BLOCK_BYTES // (4 * dots_per_row)) // cfg.block_n * cfg.block_n or cfg.block_n
    return [(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)]


def low_copy(x: Tensor) -> Tensor:
    """The bf16 copy of `x (H, N, D)` the GEMM route's dots read; rows shared by every head (a head stride of 0, as
    `x.expand(H, ...)` gives) are copied once."""
    if x.shape[0] > 1 and x.stride(0) == 0:
        return x[:1].to(torch.bfloat16).expand(x.shape)
    return x.to(torch.bfloat16)


def gemm_dots(x_low: Tensor, c_low: Tensor) -> Tensor:
    """`(H, n, K)` float32 `x~.c~` of bf16 `x_low (H, n, D)` and `c_low (H or 1, K, D)`: the bf16 products summed
    in fp32 (cuBLAS with a float32 output on CUDA; the same products in a float32 GEMM elsewhere), which is the
    error model of the in-kernel dots. A shared codebook is one GEMM over all heads' rows; rows shared by all heads
    (head stride 0) are one GEMM against all heads' codes, returned as an `(H, n, K)` view of its `(n, H, K)`
    output."""
    H, n, D = x_low.shape
    if H > 1 and x_low.stride(0) == 0 and c_low.shape[0] == H:
        codes = c_low.reshape(1, -1, D)
        a = x_low[:1]
        dots = torch.bmm(a, codes.mT, out_dtype=torch.float32) if a.is_cuda else torch.bmm(a.float(), codes.float().mT)
        return dots.view(n, H, -1).transpose(0, 1)
    a = x_low.reshape(1, H * n, D) if c_low.shape[0] == 1 else x_low
    if a.is_cuda:
        dots = torch.bmm(a, c_low.mT, out_dtype=torch.float32)
    else:
        dots = torch.bmm(a.float(), c_low.float().mT)
    return dots.view(H, n, -1)
