"""Nearest-code search on CUDA (Triton): distances and a running top-k, never a full `N x K` matrix.

One program scores `BLOCK_N` rows of one head against the whole codebook in tiles of `BLOCK_K` codes. Rows of up
to `RESIDENT_DIM` features stay on chip and the kernel computes their dots (`tl.dot`, bf16 operands or tf32,
fp32 accumulation). Wider bf16 rows take the GEMM route: there in-kernel dots run well above the bf16 GEMM
floor, so cuBLAS computes them (a bf16 copy of a block of rows times the bf16 codebook, fp32 accumulation and
output, at most `GEMM_BLOCK_BYTES` of dots per block) and the kernel reads the dot tiles (`DOTS_GIVEN`); the
selection, the exactness bound (it covers any fp32 summation order of the exact bf16 products) and the written
codes are the same. (tf32 and `gemm=False` read wide rows in `BLOCK_D` slices per codebook tile instead.)
Metrics: euclidean, cosine (argmax `x.c`) and dot (argmax `x.c - offset`, cosine's path plus a per-code offset read
where euclidean reads `|c|^2`; `rerank` and `fast` only). Rows shared by every head (head stride 0) are read, and
on the GEMM route copied and multiplied, once.

Selection is lane-wise: lane `j` of a row keeps the best score (and its code) and the second-best score among
codes `j, j + BLOCK_K, ...`, updated elementwise per tile (no per-tile reductions). After the loop the best
`CANDIDATES` lane minima are popped one by one; every code not popped scores at least the last pop or its lane's
second best, which is the bound the exactness test below needs. In `rerank` mode a lane also keeps its second
best's code and a pop moves it up: a row's two nearest codes can share a lane, and where the low-precision
rounding orders them wrongly the true winner must still reach the fp32 re-score.

Packed keys (`PACK`): the lane state can instead be two float arrays of keys, each a score's fp32 bits with its
low `TILE_BITS` bits replaced by the codebook tile number (lane `j` of tile `t` is code `t * BLOCK_K + j`, so
the key names its code). Keys compare as floats in the scores' order (ties within a `2^TILE_BITS`-ulp bucket go
by tile), so the update is `min`/`max` only, cheaper where the selection and not the dot bounds the kernel
(small feature dims). A key's score is within `2^(TILE_BITS - 23)` of itself of the score: rerank re-scores the
candidates in fp32 anyway, and exact mode adds that slack to its bound. Up to `PACK_MAX_BITS` tile bits are
allowed; larger codebooks keep the lane arrays.

Launch configuration: no autotuning; `launch_config` picks tiles, warps, stages, state layout and route by a
rule, so a new codebook shape costs one compilation (sizes are runtime arguments; `EVEN_K`/`EVEN_D` drop the masks
when they are multiples of the tiles). With `out_codes` the kernel also writes each row's winning code.

Modes: `fast` returns the low-precision winner; `rerank` re-scores the best `CANDIDATES - 1` candidates in fp32
as `|x - c|^2` summed from the differences and returns the best (no fallback, no host sync); `exact` is
described next.

Exactness (`mode="exact"`). The low-precision score `s~_k = |c_k|^2 - 2 x~.c~_k` differs from the exact
`s_k = |c_k|^2 - 2 x.c_k` by at most `E` for every code of the row, where (Cauchy-Schwarz on the rounding
residuals `x = x~ + x_lo`, `c = c~ + c_lo`, since `x.c - x~.c~ = x_lo.c + x~.c_lo`)

    E = 2 (|x_lo| max|c| + |x~| max|c_lo|) + gamma (|x|^2 + max|c|^2 + 2 |x| max|c|),  gamma = (D + 16) 2^-22,

the gamma term covering the fp32 accumulation of the kernel's dot and the rounding of the fp32 reference
itself (cosine: `s = -x.c`, no factor 2). `|x_lo|` is measured per row for bf16 (the kernel rounds itself);
for tf32 the hardware rounding is only bounded, `|x_lo| <= 2^-10 |x|`. A code outside the kept candidates
has `s~ >= s~_(last)`; if `s~_(last) - s~_(1) > 2E`, every code that can win in fp32 is among the first
`CANDIDATES - 1`, which the kernel re-scores in fp32 with the reference formula (`-sqrt(clamp(|x|^2 + |c|^2 -
2 x.c, 1e-8))`, ties to the lowest index). The kernel's fp32 dot sums in another order than the reference
GEMM, so the fp32 winner is kept only if it beats the other candidates by more than twice the worst-case
difference of two fp32 evaluations of one score (`4 gamma_D |x| max|c| + 2u (|x|^2 + max|c|^2 + 2 |x| max|c|)`,
`gamma_D = D u / (1 - D u)`, `u = 2^-24`) plus `2^-20` relative; every other row is flagged and re-done by the
PyTorch path. Kept winners are therefore the reference's winners (the indices equal the PyTorch path's); only
the returned score may differ from it by that rounding. Exact duplicate codes near the top make rows fall back
(correct, slower).

Returned score: the winner's squared distance (euclidean) or `x.c` (cosine); in `fast` mode it is the
low-precision value.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (GEMM_BLOCK_BYTES, PACK_MAX_BITS, RESIDENT_DIM and LaunchConfig are re-exported: the limits and launch type)
from .triton_nearest_config import (GEMM_BLOCK_BYTES, PACK_MAX_BITS, RESIDENT_DIM, LaunchConfig, gemm_dots,
                                    launch_config, low_copy, row_blocks, tile_bits)
from .utils import HAS_TRITON, interpreting, kernel_ok, padded_dim

if HAS_TRITON:
    import triton
    import triton.language as tl

CANDIDATES = 8  # candidates popped per row (4 or 8): the best 7 are re-scored in fp32, the 8th bounds the rest
MODES = ("exact", "rerank", "fast")


def available(x: Tensor) -> bool:
    """Whether `nearest_code` should use the kernel for `x` (any feature dim; under torch.compile through
    `triton_nearest_op.nearest_code_op`)."""
    return kernel_ok(x, as_custom_op=True)


if HAS_TRITON:
    _EMPTY = tl.constexpr(3.0e38)  # a packed key no score reaches; finite, so tile bits keep it a number

    @triton.jit
    def _pop_lanes(best, best_code, second, second_code, PROMOTE: tl.constexpr):
        """The smallest lane value per row and its code (lowest code on ties). That lane then holds its second
        best and its code (PROMOTE: rerank keeps a lane's second code) or +inf."""
        value = tl.min(best, axis=1)
        code = tl.min(tl.where(best == value[:, None], best_code, 2147483647), axis=1)
        taken = best_code == code[:, None]
        if PROMOTE:
            best = tl.where(taken, second, best)
            best_code = tl.where(taken, second_code, best_code)
            second = tl.where(taken, float("inf"), second)
        else:
            best = tl.where(taken, float("inf"), best)
        return value, code, best, best_code, second

    @triton.jit
    def _unpack(key, code, TILE_BITS: tl.constexpr):
        """A packed key's score (its tile bits cleared) and code; an empty lane gives (+inf, 0)."""
        empty = key >= _EMPTY
        value = (key.to(tl.int32, bitcast=True) & -(1 << TILE_BITS)).to(tl.float32, bitcast=True)
        return tl.where(empty, float("inf"), value), tl.where(empty, 0, code)

    @triton.jit
    def _pop_packed(best, second, lane, PROMOTE: tl.constexpr, TILE_BITS: tl.constexpr, BLOCK_K: tl.constexpr):
        """`_pop_lanes` for packed keys: the popped key's (truncated) score and code; PROMOTE moves the lane's
        second key up."""
        key = tl.min(best, axis=1)
        codes = (best.to(tl.int32, bitcast=True) & ((1 << TILE_BITS) - 1)) * BLOCK_K + lane
        code = tl.min(tl.where(best == key[:, None], codes, 2147483647), axis=1)
        taken = codes == code[:, None]
        if PROMOTE:
            best = tl.where(taken, second, best)
            second = tl.where(taken, _EMPTY, second)
        else:
            best = tl.where(taken, _EMPTY, best)
        value, code = _unpack(key, code, TILE_BITS)
        return value, code, best, second

    @triton.jit
    def _pop(best, best_code, second, second_code, lane, PACK: tl.constexpr, PROMOTE: tl.constexpr,
             TILE_BITS: tl.constexpr, BLOCK_K: tl.constexpr):
        """`(score, code, best, best_code, second)` after popping each row's best lane (either layout)."""
        if PACK:
            value, code, best, second = _pop_packed(best, second, lane[None, :], PROMOTE, TILE_BITS, BLOCK_K)
        else:
            value, code, best, best_code, second = _pop_lanes(best, best_code, second, second_code, PROMOTE)
        return value, code, best, best_code, second

    @triton.jit
    def _low_dot(a, b, acc, BF16: tl.constexpr, EMULATE: tl.constexpr):
        """`acc + a @ b.T` in the search's precision: bf16 operands (EMULATE: the same rounded operands through
        an fp32 dot, for the CPU interpreter, whose bf16 dot is wrong) or tf32."""
        if BF16:
            if EMULATE:
                return acc + tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
            else:
                return tl.dot(a, tl.trans(b), acc)
        else:
            return tl.dot(a, tl.trans(b), acc, input_precision="tf32")

    @triton.jit
    def _scores(acc, x_sq, CODE_SQ, sq_offset, mask, COSINE: tl.constexpr, RERANK: tl.constexpr,
                OFFSET: tl.constexpr):
        """`(r, q)` of candidates from their summed fp32 `acc` (`x.c`, or with RERANK `|x - c|^2`): `r` higher is
        better, `q` the value returned for it. Euclidean: the reference's `r = -sqrt(q)`, `q = |x|^2 + |c|^2 -
        2 x.c` (`|c|^2` read at `CODE_SQ + sq_offset`), or with RERANK `q = |x - c|^2` (no cancellation, so
        closer to the float64 ranking). Cosine: `r = q = x.c`; dot (OFFSET): `r = q = x.c - offset` (the offset
        read where euclidean reads `|c|^2`)."""
        if COSINE:
            r = acc
            if OFFSET:
                r = acc - tl.load(CODE_SQ + sq_offset, mask=mask, other=0.0)
            q = r
        elif RERANK:
            q = tl.maximum(acc, 1e-8)
            r = -acc
        else:
            c_sq = tl.load(CODE_SQ + sq_offset, mask=mask, other=0.0)
            q = tl.maximum((x_sq + c_sq) + acc * -2.0, 1e-8)
            r = -tl.sqrt_rn(q)  # what the reference compares (its sqrt makes ties)
        return r, q

    @triton.jit
    def _rescore_one(X, CODES, CODE_SQ, x_sq, head, rows, row_mask, code, code_dim,
                     stride_x_head, stride_x_row, stride_c_head, stride_c_code, stride_sq_head,
                     COSINE: tl.constexpr, RERANK: tl.constexpr, OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr):
        """fp32 score `(r, q)` (`_scores`) of code `code` (one per row), reading `BLOCK_R` features at a time."""
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, code_dim, BLOCK_R):
            cols = d0 + tl.arange(0, BLOCK_R)
            mask = row_mask[:, None] & (cols < code_dim)[None, :]
            xv = tl.load(X + head.to(tl.int64) * stride_x_head + rows.to(tl.int64)[:, None] * stride_x_row
                         + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            cv = tl.load(CODES + head * stride_c_head + code[:, None] * stride_c_code + cols[None, :], mask=mask,
                         other=0.0)
            if RERANK and not COSINE:
                diff = xv - cv
                acc += tl.sum(diff * diff, axis=1)
            else:
                acc += tl.sum(xv * cv, axis=1)
        return _scores(acc, x_sq, CODE_SQ, head * stride_sq_head + code, row_mask, COSINE, RERANK, OFFSET)

    @triton.jit
    def _fold_one(value, code, r, q, win_r, win_q, win_t, win, runner_up, COSINE: tl.constexpr, PROVE: tl.constexpr):
        """Fold a popped candidate (low-precision `value`, fp32 score `r` / value `q`) into the running winner
        (higher `r`, then lower code). PROVE also keeps `runner_up`, the best lower-is-better fp32 score among the
        candidates that lost (a duplicate of the winner's code excluded)."""
        t = -q if COSINE else q
        valid = value < float("inf")  # an empty lane pops +inf
        takes = valid & ((r > win_r) | ((r == win_r) & (code < win)))
        if PROVE:  # the displaced winner, or this candidate, joins the runners-up
            loser_t = tl.where(takes, win_t, t)
            loser_ok = tl.where(takes, win_r > float("-inf"), valid & (code != win))
            runner_up = tl.where(loser_ok, tl.minimum(runner_up, loser_t), runner_up)
        return (tl.where(takes, r, win_r), tl.where(takes, q, win_q), tl.where(takes, t, win_t),
                tl.where(takes, code, win), runner_up)

    @triton.jit
    def _rescore_all(X, CODES, CODE_SQ, x_sq, head, rows, row_mask, code, valid, code_dim,
                     stride_x_head, stride_x_row, stride_c_head, stride_c_code, stride_sq_head,
                     COSINE: tl.constexpr, RERANK: tl.constexpr, OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr):
        """fp32 scores `(r, q)` (`_scores`) of the candidates `code (BLOCK_N, C)` (where `valid`), all in one pass
        over the features (`BLOCK_R` at a time, the `C` codes of a row gathered together)."""
        acc = tl.zeros(code.shape, dtype=tl.float32)
        x_rows = X + head.to(tl.int64) * stride_x_head + rows.to(tl.int64)[:, None] * stride_x_row
        c_rows = CODES + head * stride_c_head + code[:, :, None] * stride_c_code
        mask3 = (row_mask[:, None] & valid)[:, :, None]
        for d0 in range(0, code_dim, BLOCK_R):
            cols = d0 + tl.arange(0, BLOCK_R)
            col_ok = cols < code_dim
            xv = tl.load(x_rows + cols[None, :], mask=row_mask[:, None] & col_ok[None, :], other=0.0)
            cv = tl.load(c_rows + cols[None, None, :], mask=mask3 & col_ok[None, None, :], other=0.0)
            xv = xv.to(tl.float32)[:, None, :]
            if RERANK and not COSINE:
                diff = xv - cv
                acc += tl.sum(diff * diff, axis=2)
            else:
                acc += tl.sum(xv * cv, axis=2)
        return _scores(acc, x_sq[:, None], CODE_SQ, head * stride_sq_head + code, row_mask[:, None] & valid, COSINE,
                       RERANK, OFFSET)

    @triton.jit
    def _fold_all(code, valid, r, q, first_code, COSINE: tl.constexpr, PROVE: tl.constexpr):
        """The winner among the re-scored candidates `(BLOCK_N, C)`: highest `r`, then lowest code (`first_code`,
        the low-precision winner, where no score compares, as with NaN features). Returns its code, `q`,
        lower-is-better score `t`, and (PROVE) `runner_up`, the best `t` among the other candidates."""
        r = tl.where(valid, r, float("-inf"))
        win_r = tl.max(r, axis=1)
        win = tl.min(tl.where(valid & (r == win_r[:, None]), code, 2147483647), axis=1)
        win = tl.where(win == 2147483647, first_code, win)
        is_win = valid & (code == win[:, None])
        t = -q if COSINE else q
        win_q = tl.sum(tl.where(is_win, q, 0.0), axis=1)
        win_t = tl.sum(tl.where(is_win, t, 0.0), axis=1)
        runner_up = tl.full(win_t.shape, float("inf"), tl.float32)
        if PROVE:
            runner_up = tl.min(tl.where(valid & (code != win[:, None]), t, float("inf")), axis=1)
        return win, win_q, win_t, runner_up

    # sizes that change with the batch are not specialized on (a new batch size reuses the compiled kernel)
    @triton.jit(do_not_specialize=["n_rows", "n_codes", "row0", "row_end", "stride_x_head", "stride_xl_head",
                                   "stride_dots_head", "stride_dots_row"])
    def _nearest_kernel(
        X, X_LOW, CODES_LOW, CODES, CODE_SQ, CODE_STATS, X_SQ, DOTS,
        OUT_INDEX, OUT_SCORE, OUT_FLAG, OUT_CODES,
        n_rows, n_codes, code_dim, row0, row_end,
        stride_x_head, stride_x_row, stride_xl_head, stride_xl_row,
        stride_cl_head, stride_cl_code, stride_c_head, stride_c_code, stride_sq_head, stride_stats_head,
        stride_dots_head, stride_dots_row,
        COSINE: tl.constexpr, OFFSET: tl.constexpr, RESCORE: tl.constexpr, RERANK: tl.constexpr,
        PROVE: tl.constexpr, BF16: tl.constexpr,
        EMULATE: tl.constexpr, CANDIDATES: tl.constexpr, PACK: tl.constexpr, TILE_BITS: tl.constexpr,
        TRUNC: tl.constexpr, WRITE_CODES: tl.constexpr, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr,
        X_RESIDENT: tl.constexpr, DOTS_GIVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_R3: tl.constexpr, POPS: tl.constexpr,
    ):
        """Nearest code of `BLOCK_N` rows (from `row0`, below `row_end`) of one head. Grid: (row blocks, heads).

        Tensors (head strides are 0 for a codebook shared by all heads):
            X: `(heads, n_rows, code_dim)` features, any float dtype, unit stride along features.
            X_LOW: the dot's copy of X (bf16 when the rows are not resident, else X itself).
            CODES_LOW: `(heads, n_codes, code_dim)` codes in the dot's dtype, negated for cosine (so that the dot
                is a lower-is-better score).
            CODES: the same codes in float32 (fp32 re-scoring, written codes).
            CODE_SQ: `(heads, n_codes)` float32 `|c|^2` (euclidean) or the code offsets (OFFSET), else None.
            CODE_STATS: `(heads, 4)` float32 `max|c|, max|c|^2, max|c_lo|, 0` (PROVE only, else None).
            X_SQ: `(heads, n_rows)` float32 reference `|x|^2` (PROVE euclidean only, else None).
            OUT_INDEX: `(heads, n_rows)` int64 winners. OUT_SCORE: `(heads, n_rows)` float32 their score.
            OUT_FLAG: `(heads, n_rows)` int8, 1 where PROVE could not prove the winner (else None).
            OUT_CODES: `(heads, n_rows, code_dim)` winners' codes (WRITE_CODES, else None).
            DOTS: `(heads, row_end - row0, n_codes)` float32 `x~.c~` of this launch's rows, from a GEMM
                (DOTS_GIVEN, else None: the kernel computes them).
        Sizes: n_rows (of the whole search), n_codes, code_dim; row0 / row_end: this launch's rows. Strides:
            stride_<tensor>_<dim> in elements.
        Flags: COSINE (argmax x.c, else argmin distance); OFFSET (with COSINE: argmax x.c - offset, the "dot"
            metric); RESCORE (pop CANDIDATES and re-score all but the last in
            fp32); RERANK (rescore without proof: rerank mode's lane promotion and |x - c|^2 scores); PROVE (exact mode's error bound, see the module docstring); BF16 (bf16 dot, else tf32);
            EMULATE (CPU interpreter); PACK, TILE_BITS, TRUNC (packed keys and their relative truncation);
            WRITE_CODES; EVEN_K / EVEN_D (sizes are multiples of the tiles: no masks); X_RESIDENT (one
            BLOCK_D tile holds the whole row and stays on chip); DOTS_GIVEN (read the dots from DOTS).
        Tiles: BLOCK_N rows, BLOCK_K codes, BLOCK_D features per dot slice, BLOCK_R features per written-codes
            slice, BLOCK_R3 features per slice of the candidates' fp32 re-score; POPS candidates popped per row
            (CANDIDATES when RESCORE, else 1).
        """
        pid = tl.program_id(0)
        head = tl.program_id(1)
        rows = row0 + pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)[:, None]  # row offsets in int64: heads x rows x features can pass 2^31
        x_rows = X + head.to(tl.int64) * stride_x_head + rows64 * stride_x_row
        xl_rows = X_LOW + head.to(tl.int64) * stride_xl_head + rows64 * stride_xl_row
        cols = tl.arange(0, BLOCK_D)

        # row norms: |x|^2 (fast mode's returned distances), and for exact mode's error bound the norms of x~ and
        # of x - x~ (rerank re-scores from the differences: it needs neither)
        x_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        hi_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        lo_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        if not RERANK:
            for d0 in range(0, code_dim, BLOCK_D):
                mask = row_mask[:, None] & (d0 + cols < code_dim)[None, :]
                xf = tl.load(x_rows + d0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                x_sq += tl.sum(xf * xf, axis=1)
                if PROVE and BF16:
                    if X_RESIDENT:
                        xr = xf.to(tl.bfloat16).to(tl.float32)
                    else:  # the copy the dots were computed from
                        xr = tl.load(xl_rows + d0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                    hi_sq += tl.sum(xr * xr, axis=1)
                    lo_sq += tl.sum((xf - xr) * (xf - xr), axis=1)
        if BF16:
            x_hi = tl.sqrt(hi_sq)
            x_lo = tl.sqrt(lo_sq)
        else:
            x_hi = tl.sqrt(x_sq)
            x_lo = x_hi * 0.0009765625  # tf32 keeps 10 mantissa bits
        if PROVE and not COSINE:
            x_sq = tl.load(X_SQ + head * n_rows + rows, mask=row_mask, other=0.0)  # the reference's own |x|^2
        if X_RESIDENT:
            if EVEN_D:
                xq = tl.load(xl_rows + cols[None, :], mask=row_mask[:, None], other=0.0)
            else:
                xq = tl.load(xl_rows + cols[None, :], mask=row_mask[:, None] & (cols < code_dim)[None, :],
                             other=0.0)
            if BF16:
                xq = xq.to(tl.bfloat16)
            else:
                xq = xq.to(tl.float32)

        lane = tl.arange(0, BLOCK_K)
        if PACK:
            best = tl.full([BLOCK_N, BLOCK_K], _EMPTY, tl.float32)
        else:
            best = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        second = best
        best_code = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)  # (lanes only)
        second_code = best_code  # (lanes, RERANK: each lane's second-best code)
        for k0 in range(0, n_codes, BLOCK_K):
            codes = k0 + lane
            code_mask = codes < n_codes
            code_rows = CODES_LOW + head * stride_cl_head + codes[:, None] * stride_cl_code
            dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            if DOTS_GIVEN:
                dot_tile = DOTS + head.to(tl.int64) * stride_dots_head + (rows64 - row0) * stride_dots_row \
                    + codes[None, :]
                if EVEN_K:
                    dot = tl.load(dot_tile, mask=row_mask[:, None], other=0.0)
                else:
                    dot = tl.load(dot_tile, mask=row_mask[:, None] & code_mask[None, :], other=0.0)
            elif X_RESIDENT:
                if EVEN_K and EVEN_D:
                    c = tl.load(code_rows + cols[None, :])
                else:
                    c = tl.load(code_rows + cols[None, :], mask=code_mask[:, None] & (cols < code_dim)[None, :],
                                other=0.0)
                dot = _low_dot(xq, c, dot, BF16, EMULATE)
            else:
                for d0 in range(0, code_dim, BLOCK_D):
                    if EVEN_K and EVEN_D:
                        xt = tl.load(xl_rows + d0 + cols[None, :], mask=row_mask[:, None], other=0.0)
                        c = tl.load(code_rows + d0 + cols[None, :])
                    else:
                        col_mask = (d0 + cols < code_dim)[None, :]
                        xt = tl.load(xl_rows + d0 + cols[None, :], mask=row_mask[:, None] & col_mask, other=0.0)
                        c = tl.load(code_rows + d0 + cols[None, :], mask=code_mask[:, None] & col_mask, other=0.0)
                    if not BF16:
                        xt = xt.to(tl.float32)
                    dot = _low_dot(xt, c, dot, BF16, EMULATE)
            if COSINE:
                s = dot  # x.(-c)
                if OFFSET:
                    s += tl.load(CODE_SQ + head * stride_sq_head + codes, mask=code_mask, other=0.0)[None, :]
            else:
                c_sq = tl.load(CODE_SQ + head * stride_sq_head + codes, mask=code_mask, other=0.0)
                s = c_sq[None, :] - 2.0 * dot
            if PACK:
                if not EVEN_K:
                    s = tl.where(code_mask[None, :], s, _EMPTY)
                key = ((s.to(tl.int32, bitcast=True) & -(1 << TILE_BITS)) | (k0 // BLOCK_K)).to(tl.float32,
                                                                                                  bitcast=True)
                if RESCORE:
                    second = tl.minimum(second, tl.maximum(best, key))
                best = tl.minimum(best, key)
            else:
                if not EVEN_K:
                    s = tl.where(code_mask[None, :], s, float("inf"))
                better = s < best  # strict: within a lane the earlier (lower) code keeps a tie
                if RERANK:
                    second_code = tl.where(better, best_code, tl.where(s < second, codes[None, :], second_code))
                if RESCORE:
                    second = tl.minimum(second, tl.maximum(best, s))
                best_code = tl.where(better, codes[None, :], best_code)
                best = tl.where(better, s, best)

        # every code not popped scores >= the last pop or its lane's second best (`rest`)
        if PACK:
            rest, _ = _unpack(tl.min(second, axis=1), rows, TILE_BITS)
        else:
            rest = tl.min(second, axis=1)
        # the first pop is the low-precision winner; with RESCORE the first POPS - 1 pops are re-scored in fp32
        # and the last pop bounds every code never popped. Pops run as runtime loops (one copy of their code).
        # Resident rows re-score candidate by candidate (the row is in L1; few registers next to the selection
        # state); the GEMM route pops all candidates first and re-scores them together, in one pass over a wide
        # row's features instead of one per candidate.
        value, code, best, best_code, second = _pop(best, best_code, second, second_code, lane, PACK, RERANK,
                                                    TILE_BITS, BLOCK_K)
        first = value
        win = code
        last = tl.minimum(value, rest)
        win_q = tl.zeros([BLOCK_N], dtype=tl.float32)
        win_t = tl.full([BLOCK_N], float("inf"), tl.float32)  # the winner's lower-is-better fp32 score
        runner_up = tl.full([BLOCK_N], float("inf"), tl.float32)  # best lower-is-better score of the others
        if RESCORE and DOTS_GIVEN:
            slot = tl.arange(0, POPS)[None, :]
            cand_value = tl.where(slot == 0, value[:, None], float("inf"))
            cand_code = tl.where(slot == 0, code[:, None], 0)
            for j in range(1, POPS):
                value, code, best, best_code, second = _pop(best, best_code, second, second_code, lane, PACK,
                                                            RERANK, TILE_BITS, BLOCK_K)
                cand_value = tl.where(slot == j, value[:, None], cand_value)
                cand_code = tl.where(slot == j, code[:, None], cand_code)
            last = tl.minimum(value, rest)
            valid = (cand_value < float("inf")) & (slot < POPS - 1)  # an empty lane pops +inf
            r, q = _rescore_all(X, CODES, CODE_SQ, x_sq, head, rows, row_mask, cand_code, valid, code_dim,
                                stride_x_head, stride_x_row, stride_c_head, stride_c_code, stride_sq_head,
                                COSINE, RERANK, OFFSET, BLOCK_N, BLOCK_R3)
            win, win_q, win_t, runner_up = _fold_all(cand_code, valid, r, q, win, COSINE, PROVE)
        elif RESCORE:
            win_r = tl.full([BLOCK_N], float("-inf"), tl.float32)  # the winner's fp32 score (higher is better)
            for j in range(POPS - 1):
                if j > 0:
                    value, code, best, best_code, second = _pop(best, best_code, second, second_code, lane, PACK,
                                                                RERANK, TILE_BITS, BLOCK_K)
                r, q = _rescore_one(X, CODES, CODE_SQ, x_sq, head, rows, row_mask, code, code_dim,
                                    stride_x_head, stride_x_row, stride_c_head, stride_c_code, stride_sq_head,
                                    COSINE, RERANK, OFFSET, BLOCK_N, BLOCK_R)
                win_r, win_q, win_t, win, runner_up = _fold_one(value, code, r, q, win_r, win_q, win_t, win,
                                                                runner_up, COSINE, PROVE)
            value, code, best, best_code, second = _pop(best, best_code, second, second_code, lane, PACK, RERANK,
                                                        TILE_BITS, BLOCK_K)
            last = tl.minimum(value, rest)

        if PROVE:
            # the error bound of the low-precision scores for this row (see the module docstring)
            c_max = tl.load(CODE_STATS + head * stride_stats_head + 0)
            c_sq_max = tl.load(CODE_STATS + head * stride_stats_head + 1)
            c_lo_max = tl.load(CODE_STATS + head * stride_stats_head + 2)
            x_norm = x_hi + x_lo
            gamma = (code_dim + 16) * 2.384185791015625e-07  # (D + 16) * 2^-22
            # fp32_err: how far the kernel's fp32 re-score of one code can be from the reference's (both sum the
            # same fp32 products in different orders: each within gamma_D |x| |c| of the exact dot,
            # gamma_D = D u / (1 - D u), u = 2^-24; plus one rounding of the final add in each)
            gamma_d = code_dim * 5.9604644775390625e-08 * 1.001
            if COSINE:
                fp32_err = 2.0 * gamma_d * x_norm * c_max + 1.1920928955078125e-07 * (x_norm * c_max + 1.0)
                err = (x_lo * c_max + x_norm * c_lo_max) + gamma * (x_norm * c_max + 1.0)
            else:
                mag = x_sq + c_sq_max + 2.0 * x_norm * c_max
                fp32_err = 4.0 * gamma_d * x_norm * c_max + 1.1920928955078125e-07 * mag
                err = 2.0 * (x_lo * c_max + x_norm * c_lo_max) + gamma * mag
            err = err * 1.0625 + 1e-30
            fp32_err = fp32_err * 1.0625 + 1e-30
            gap_needed = 2.0 * err
            if PACK:  # each packed score is within TRUNC of itself of the score
                gap_needed += TRUNC * (tl.abs(first) + tl.abs(last))
            unproven = (last - first) <= gap_needed
            # a margin of 2^-20 |t| on top keeps the reference's gap many ulps wide, so its sqrt cannot merge it
            unproven = unproven | ((runner_up - win_t) <= 2.0 * fp32_err + 9.5367431640625e-07 * tl.abs(win_t))
            tl.store(OUT_FLAG + head * n_rows + rows, unproven.to(tl.int8), mask=row_mask)
        if not RESCORE:
            if COSINE:
                win_q = -first
            else:
                win_q = tl.maximum(x_sq + first, 1e-8)  # low-precision squared distance
        tl.store(OUT_INDEX + head * n_rows + rows, win.to(tl.int64), mask=row_mask)
        tl.store(OUT_SCORE + head * n_rows + rows, win_q, mask=row_mask)
        if WRITE_CODES:  # the winners' rows (the lookup that follows a search, without its own pass and launch)
            out_rows = OUT_CODES + (head * n_rows + rows[:, None]).to(tl.int64) * code_dim
            for d0 in range(0, code_dim, BLOCK_R):
                dd = d0 + tl.arange(0, BLOCK_R)
                mask = row_mask[:, None] & (dd < code_dim)[None, :]
                cv = tl.load(CODES + head * stride_c_head + win[:, None] * stride_c_code + dd[None, :], mask=mask,
                             other=0.0)
                tl.store(out_rows + dd[None, :], cv.to(OUT_CODES.dtype.element_ty), mask=mask)


def _code_stats(cf: Tensor, c_low: Tensor, c_sq: Tensor, bf16: bool) -> Tensor:
    """`(heads, 4)` float32 `max|c|, max|c|^2, max|c - c~|, 0` for exact mode's error bound (`cf`: the codes as
    the kernel's dot sees them before rounding, `c_low` after)."""
    norms = cf.norm(dim=-1)
    lo = (cf - c_low.float()).norm(dim=-1) if bf16 else norms * 2.0**-10
    return torch.stack([norms.amax(-1), c_sq.amax(-1), lo.amax(-1), torch.zeros_like(norms[:, 0])], -1).contiguous()


def nearest_code_triton(
    x: Tensor,
    codebook: Tensor,
    codebook_sq_norm: Tensor,
    *,
    metric: str = "euclidean",
    exact: bool | None = None,
    mode: str = "exact",
    precision: str = "bf16",
    stats: dict | None = None,
    block: tuple[int, ...] | None = None,
    topk: int = CANDIDATES,
    pack: bool | None = None,
    gemm: bool | None = None,
    gemm_rows: int | None = None,
    out_codes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Kernel behind `nearest_code`: `x (H, N, D)`, `codebook (H or 1, K, D)`, `codebook_sq_norm (H or 1, K)`
    (float32, `(codebook.float()**2).sum(-1)`; not read for cosine). Returns `(indices int64 (H, N), score
    float32 (H, N))` with `nearest_code`'s conventions.

    `mode`: `"exact"` (the reference's fp32 indices: margin check, PyTorch fallback for unproven rows, one host
    sync), `"rerank"` (the best `topk - 1` low-precision candidates re-ranked by fp32 `|x - c|^2`; no
    fallback, no sync), `"fast"` (the low-precision argmin). `exact=True/False` is the same as `"exact"`/`"fast"`.
    `stats`, if given, receives the number of rows re-done by the PyTorch path. `out_codes`, if given (contiguous
    `(H, N, D)`), receives the winners' code rows (in its dtype). `block=(BLOCK_N, BLOCK_K[, BLOCK_D])` and `pack`
    override `launch_config`, `gemm` its route (dots from a cuBLAS GEMM or in the kernel), `gemm_rows` the rows per
    GEMM block (default: blocks of at most `GEMM_BLOCK_BYTES` of dots). `topk` (4 or 8): candidates popped per
    row; 8 sends far fewer near-tie rows to the fallback for a little more work after the codebook loop."""
    if exact is not None:
        mode = "exact" if exact else "fast"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if topk not in (4, 8):
        raise ValueError(f"topk must be 4 or 8, got {topk!r}")
    if precision not in ("bf16", "tf32"):
        raise ValueError(f"precision must be 'bf16' or 'tf32', got {precision!r}")
    if metric not in ("euclidean", "cosine", "dot"):
        raise ValueError(f"metric must be 'euclidean', 'cosine' or 'dot', got {metric!r}")
    if metric == "dot" and mode == "exact":
        raise ValueError("exact mode's error bound does not cover the dot metric's offsets (nearest_code runs the "
                         "PyTorch path for it)")
    H, N, D = x.shape
    K = codebook.shape[-2]
    if out_codes is not None and (out_codes.shape != (H, N, D) or not out_codes.is_contiguous()):
        raise ValueError(f"out_codes must be a contiguous {(H, N, D)} tensor, got {tuple(out_codes.shape)}")
    cosine = metric != "euclidean"  # cosine and dot: argmax of x.c (dot: minus the per-code offset)
    offset = metric == "dot"
    bf16 = precision == "bf16"
    prove = mode == "exact"
    idx = torch.empty(H, N, dtype=torch.long, device=x.device)
    score = torch.empty(H, N, dtype=torch.float32, device=x.device)
    if N == 0 or H == 0:
        return idx, score
    cfg = launch_config(D, K, bf16=bf16, mode=mode, device=x.device, block=block, pack=pack, gemm=gemm)
    resident = not cfg.gemm and cfg.block_d >= padded_dim(D)

    x = x if x.stride(-1) == 1 else x.contiguous()
    cf = codebook.float().contiguous()
    signed = -cf if cosine else cf  # the kernel scores with -c for cosine (its dot is then lower-is-better)
    c_low = signed.to(torch.bfloat16) if bf16 else signed
    c_sq = None if cosine and not offset else codebook_sq_norm.float().contiguous()
    x_low = low_copy(x) if bf16 and not resident else x
    x_sq = (x.float() ** 2).sum(-1).contiguous() if prove and not cosine else None
    flag = torch.empty(H, N, dtype=torch.int8, device=x.device) if prove else None
    code_stats = _code_stats(signed, c_low, codebook_sq_norm.float(), bf16) if prove else None
    shared = cf.shape[0] == 1 and H > 1

    n_tile_bits = tile_bits(K, cfg.block_k)
    for row0, row_end in row_blocks(N, H * K, cfg, gemm_rows):
        dots = gemm_dots(x_low[:, row0:row_end], c_low) if cfg.gemm else None
        grid = (triton.cdiv(row_end - row0, cfg.block_n), H)
        _nearest_kernel[grid](
            x, x_low, c_low, cf, c_sq, code_stats, x_sq, dots, idx, score, flag, out_codes,
            N, K, D, row0, row_end,
            x.stride(0), x.stride(1), x_low.stride(0), x_low.stride(1),
            0 if shared else c_low.stride(0), c_low.stride(1), 0 if shared else cf.stride(0), cf.stride(1),
            0 if shared or c_sq is None else c_sq.stride(0), 0 if shared or not prove else code_stats.stride(0),
            0 if dots is None else dots.stride(0), 0 if dots is None else dots.stride(1),
            COSINE=cosine, OFFSET=offset, RESCORE=mode != "fast", RERANK=mode == "rerank", PROVE=prove, BF16=bf16,
            EMULATE=interpreting(), CANDIDATES=topk, PACK=cfg.pack, TILE_BITS=n_tile_bits,
            TRUNC=2.0 ** (n_tile_bits - 23) * 1.001, WRITE_CODES=out_codes is not None,
            EVEN_K=K % cfg.block_k == 0, EVEN_D=D % cfg.block_d == 0, X_RESIDENT=resident, DOTS_GIVEN=cfg.gemm,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, BLOCK_R=min(cfg.block_d, 64),
            BLOCK_R3=min(cfg.block_d, max(16, 1024 // cfg.block_n)), POPS=topk if mode != "fast" else 1,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if stats is not None:
        stats["fallback_rows"], stats["rows"] = 0, H * N
    if prove:
        from .nearest import redo_rows  # the reference path (lazy: nearest imports this module)

        redo_rows(x, cf, codebook_sq_norm.float(), flag.bool(), metric, idx, score, out_codes, stats)
    return idx, score

