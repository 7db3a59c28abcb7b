"""Fused nearest-code search on CUDA (Triton): distances and a running top-k, never an `N x K` matrix.

One program scores `BLOCK_N` rows of one head against the whole codebook in `BLOCK_K` tiles with a
low-precision `tl.dot` (bf16 operands, or tf32) and fp32 accumulation. Selection is lane-wise: lane `j` of a
row keeps the best score (and its code) and the second-best score among codes `j, j + BLOCK_K, ...`, updated
elementwise per tile (no per-tile reductions: the earlier per-tile top-k extraction took 13.3 ms in exact top-8 mode
at d256 K8192 N=2^18 on an H100, lanes 8.7 ms); after the
loop the best `TOPK` lane minima are popped, and every code not popped scores at least the next pop or its lane's
second best, which is the bound the exactness test below needs. In `rerank` mode a lane also keeps its second
best's code and a pop moves it up: a row's two nearest codes can share a lane, and where bf16 rounding orders
them wrongly the true winner would otherwise never be re-ranked (the 2-8 rows of 65,536 that rerank missed vs
float64 on randn d256 K8192 before, about 1/BLOCK_K of the ~0.5% of rows whose top two bf16 swaps).

Packed keys (`PACK`): the lane state can instead be two float arrays of keys, each a score's fp32 bits with its
low `TB` bits replaced by the tile number (lane `j` of tile `t` is code `t * BLOCK_K + j`, so the key names its
code). Keys compare as floats in the scores' order (ties within a `2^TB`-ulp bucket go by tile), so the update is
`min`/`max` only: at cdim 32, where this selection and not the dot bounds the kernel, the cosine search took
1.10-1.21 instead of 1.59 ms (K8192, N=2^18, H200). A key's score is within 2^(TB - 23) of itself of the score:
rerank re-scores the candidates in fp32 anyway, and exact mode adds that slack to its bound. `TB` covers the
smallest tile of the launch; up to `PACK_MAX_BITS` bits are allowed (K <= 16,384 at BLOCK_K 32), larger codebooks
keep the lane arrays.

Tile sizes and the state layout (lanes or packed keys: neither wins everywhere, e.g. exact mode at d128 K1024
prefers lanes) are autotuned once per (precision, K, D, mode) and then launched directly: the autotuner's
per-call dispatch is host time that a ResidualVQ step pays once per level (dropping it, with two smaller host
trims, took that training step from 10.8 to 7.5 ms on an H200). K and D are compile-time, so a codebook whose K
is a multiple of the tile and whose D is a power of two runs an unmasked loop. With `out_codes` the kernel also
writes each row's winning code (the lookup that follows every search, without its own pass over memory).

Modes: `fast` returns the low-precision winner; `rerank` re-scores the best `TOPK - 1` candidates in fp32 as
`|x - c|^2` summed from the differences and returns the best (no fallback, no host sync); `exact` is described
next.

Exactness (`mode="exact"`, or `exact=True`). The low-precision score `s~_k = |c_k|^2 - 2 x~.c~_k` differs from the exact
`s_k = |c_k|^2 - 2 x.c_k` by at most `E` for every code of the row, where (Cauchy-Schwarz on the rounding
residuals `x = x~ + x_lo`, `c = c~ + c_lo`, since `x.c - x~.c~ = x_lo.c + x~.c_lo`)

    E = 2 (|x_lo| max|c| + |x~| max|c_lo|) + gamma (|x|^2 + max|c|^2 + 2 |x| max|c|),  gamma = (D + 16) 2^-22,

the gamma term covering the fp32 accumulation of the kernel's dot and the rounding of the fp32 reference
itself (cosine: `s = -x.c`, no factor 2). `|x_lo|` is measured per row for bf16 (the kernel rounds itself);
for tf32 the hardware rounding is only bounded, `|x_lo| <= 2^-10 |x|`. A code outside the kept top-`TOPK`
has `s~ >= s~_(TOPK)`; if `s~_(TOPK) - s~_(1) > 2E`, every code that can win in fp32 is among the first
`TOPK - 1`, which the kernel re-scores in fp32 with the reference formula (`-sqrt(clamp(|x|^2 + |c|^2 -
2 x.c, 1e-8))`, ties to the lowest index). The kernel's fp32 dot sums in another order than the reference
GEMM, so the fp32 winner is kept only if it beats the other candidates by more than twice the worst-case
difference of two fp32 evaluations of one score (`4 gamma_D |x| max|c| + 2u (|x|^2 + max|c|^2 + 2 |x| max|c|)`,
`gamma_D = D u / (1 - D u)`, `u = 2^-24`) plus `2^-20` relative; every other row is flagged and re-done by the
PyTorch path. Kept winners are therefore the reference's
winners (the indices equal the PyTorch path's); only the returned score may differ from it by that rounding.
Exact duplicate codes near the top make rows fall back (correct, slower).

Returned score: the winner's squared distance (euclidean) or `x.c` (cosine); with `exact=False` it is the
low-precision value.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:  # triton is optional: CPU installs and HF_VQ_DISABLE_TRITON=1 use the PyTorch path
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAS_TRITON = False

MAX_DIM = 256  # the x tile (BLOCK_N x next_pow2(D)) stays on chip up to here
PACK_MAX_BITS = 9  # packed keys keep >= 14 of fp32's 23 mantissa bits (K <= 16384 at BLOCK_K 32)
TOPK = 8  # candidates per row (4 or 8); with lane-wise selection 8 costs only 4 more pops after the loop


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_ok(x: Tensor, max_dim: int, *, as_custom_op: bool = False) -> bool:
    """Whether one of hf_vq's Triton kernels may serve `x`: triton installed, `HF_VQ_DISABLE_TRITON` unset, a float
    dtype, last dim <= `max_dim`, and CUDA (or the CPU interpreter, `TRITON_INTERPRET=1`). Under torch.compile only
    a kernel wrapped as a custom op (`as_custom_op`: dynamo sees one opaque op) serves; the others' PyTorch paths
    are what gets compiled."""
    if not HAS_TRITON or os.environ.get("HF_VQ_DISABLE_TRITON", "0") == "1":
        return False
    if torch.compiler.is_compiling() and not as_custom_op:
        return False
    if x.shape[-1] > max_dim or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return x.is_cuda or _interpret()


def available(x: Tensor) -> bool:
    """Whether `nearest_code` should use the kernel for `x` (under torch.compile: through `nearest_code_op`)."""
    return kernel_ok(x, MAX_DIM, as_custom_op=True)


if HAS_TRITON:
    _EMPTY = tl.constexpr(3.0e38)  # a packed key no score reaches; finite, so tile bits keep it a number

    @triton.jit
    def _pop(m1, li, m2, li2, HEAP: tl.constexpr):
        # the smallest lane value per row and its code (lowest on ties); that lane then holds its second best
        # (HEAP: a row's two nearest codes can share a lane, and bf16 rounding can order them wrongly) or inf
        m = tl.min(m1, axis=1)
        i = tl.min(tl.where(m1 == m[:, None], li, 2147483647), axis=1)
        sel = li == i[:, None]
        if HEAP:
            m1 = tl.where(sel, m2, m1)
            li = tl.where(sel, li2, li)
            m2 = tl.where(sel, float("inf"), m2)
        else:
            m1 = tl.where(sel, float("inf"), m1)
        return m, i, m1, li, m2

    @triton.jit
    def _pop_packed(m1, m2, lane, HEAP: tl.constexpr, TB: tl.constexpr, BLOCK_K: tl.constexpr):
        # `_pop` for packed keys (see the codebook loop): returns the popped key's score (truncated; inf for an
        # empty lane) and code
        m = tl.min(m1, axis=1)
        code = (m1.to(tl.int32, bitcast=True) & ((1 << TB) - 1)) * BLOCK_K + lane
        i = tl.min(tl.where(m1 == m[:, None], code, 2147483647), axis=1)
        sel = code == i[:, None]
        if HEAP:
            m1 = tl.where(sel, m2, m1)
            m2 = tl.where(sel, _EMPTY, m2)
        else:
            m1 = tl.where(sel, _EMPTY, m1)
        b, i = _unpack(m, i, TB)
        return b, i, m1, m2

    @triton.jit
    def _unpack(key, i, TB: tl.constexpr):
        # a key's score (its low TB bits cleared) and code; an empty lane's key is _EMPTY with tile bits
        empty = key >= _EMPTY
        b = (key.to(tl.int32, bitcast=True) & -(1 << TB)).to(tl.float32, bitcast=True)
        return tl.where(empty, float("inf"), b), tl.where(empty, 0, i)

    @triton.jit
    def _fold(r, q, i, rb, qb, ib):
        u = (r > rb) | ((r == rb) & (i < ib))
        return tl.where(u, r, rb), tl.where(u, q, qb), tl.where(u, i, ib)

    @triton.jit
    def _other(q, i, b, ib, COSINE: tl.constexpr):
        # lower-is-better fp32 score of a candidate other than the winner (inf for the winner, empty slots)
        if COSINE:
            t = -q
        else:
            t = q
        return tl.where((i != ib) & (b < float("inf")), t, float("inf"))

    @triton.jit
    def _rescore(X, CF, C2, x2, h, rows, rmask, idx, D, sxh, sxn, scf_h, scf_k, sc2_h,
                 COSINE: tl.constexpr, RERANK: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr,
                 RD: tl.constexpr):
        # fp32 score (higher is better) of code `idx` for each row: the reference's `-sqrt(d2)`, or with RERANK
        # `-|x - c|^2` summed from the differences (no cancellation, no sqrt to merge neighbours: far closer to
        # the float64 ranking than the reference formula)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in tl.static_range(0, BD, RD):
            d = d0 + tl.arange(0, RD)
            m2 = rmask[:, None] & (d < D)[None, :]
            xv = tl.load(X + h * sxh + rows[:, None] * sxn + d[None, :], mask=m2, other=0.0).to(tl.float32)
            cv = tl.load(CF + h * scf_h + idx[:, None] * scf_k + d[None, :], mask=m2, other=0.0)
            if RERANK and not COSINE:
                diff = xv - cv
                acc += tl.sum(diff * diff, axis=1)  # |x - c|^2 directly: no cancellation of |x|^2 against 2 x.c
            else:
                acc += tl.sum(xv * cv, axis=1)
        if COSINE:
            r = acc
            q = acc
        elif RERANK:
            q = tl.maximum(acc, 1e-8)  # the squared distance (returned)
            r = -acc
        else:
            c2 = tl.load(C2 + h * sc2_h + idx, mask=rmask, other=0.0)
            q = tl.maximum((x2 + c2) + acc * -2.0, 1e-8)  # the squared distance (returned)
            r = -tl.sqrt_rn(q)  # what vqp compares (its sqrt makes ties)
        return r, q

    @triton.jit
    def _nearest_kernel(
        X, X2, CL, CF, C2, STATS, OUT_I, OUT_S, OUT_F, OUT_C,
        N, K: tl.constexpr, D: tl.constexpr, sxh, sxn, scl_h, scl_k, scf_h, scf_k, sc2_h, sst_h,
        COSINE: tl.constexpr, EXACT: tl.constexpr, BF16: tl.constexpr, RERANK: tl.constexpr, EMULATE: tl.constexpr,
        TOPK: tl.constexpr, PACK: tl.constexpr, TB: tl.constexpr, TRUNC: tl.constexpr, WRITE_CODES: tl.constexpr,
        BD: tl.constexpr, RD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # K and D are compile-time (one build per codebook shape): when K is a multiple of BLOCK_K and D == BD
        # the codebook loop needs no masks. CL holds the low-precision codes, negated for cosine, so that the
        # dot is already the lower-is-better score.
        pid = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        d = tl.arange(0, BD)
        dmask = d < D
        xf = tl.load(X + h * sxh + rows[:, None] * sxn + d[None, :], mask=rmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        if BF16:
            xq = xf.to(tl.bfloat16)
        else:
            xq = xf
        if COSINE or RERANK or not EXACT:
            x2 = tl.sum(xf * xf, axis=1)  # only the returned distance uses it (exact mode: torch's own |x|^2)
        else:
            x2 = tl.load(X2 + h * N + rows, mask=rmask, other=0.0)
        # row norms for the error bound, computed before the loop so the fp32 tile need not stay live
        nhi = tl.sqrt(tl.sum(xq.to(tl.float32) * xq.to(tl.float32), axis=1))
        if BF16:
            xlo = xf - xq.to(tl.float32)
            nlo = tl.sqrt(tl.sum(xlo * xlo, axis=1))
        else:
            nlo = nhi * 0.0009765625

        inf = float("inf")
        kk = tl.arange(0, BLOCK_K)
        if PACK:
            # packed keys: a score's fp32 bits with the low TB bits replaced by the tile number, compared as
            # floats. Lane j of tile t is code t * BLOCK_K + j, so the key carries its code, and two arrays
            # (best, second best) with min/max updates replace four with compares and selects. Truncation moves a
            # score by < 2^TB ulps; keys keep the scores' order across buckets and are unique within a lane.
            m1 = tl.full([BLOCK_N, BLOCK_K], _EMPTY, tl.float32)
            m2 = m1
            li = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)  # unused (keeps the names bound for the compiler)
            li2 = li
        else:
            # per-lane state (lane j sees codes k0 + j): best score m1 and its code li, second-best score m2 -
            # elementwise updates only; the top-k is extracted from the lanes once, after the loop
            m1 = tl.full([BLOCK_N, BLOCK_K], inf, tl.float32)
            m2 = m1
            li = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
            li2 = li  # rerank: the code of the lane's second best
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + kk
            kmask = ks < K
            cptr = CL + h * scl_h + ks[:, None] * scl_k + d[None, :]
            if K % BLOCK_K == 0 and D == BD:
                c = tl.load(cptr)
            else:
                c = tl.load(cptr, mask=kmask[:, None] & dmask[None, :], other=0.0)
            if BF16:
                if EMULATE:  # the Triton 3.9 CPU interpreter gets bf16 dots wrong: same operands, fp32 dot
                    dot = tl.dot(xq.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
                else:
                    dot = tl.dot(xq, tl.trans(c))
            else:
                dot = tl.dot(xq, tl.trans(c), input_precision="tf32")
            if COSINE:
                s = dot  # x.(-c)
            else:
                c2 = tl.load(C2 + h * sc2_h + ks, mask=kmask, other=0.0)
                s = c2[None, :] - 2.0 * dot
            if PACK:
                if K % BLOCK_K != 0:
                    s = tl.where(kmask[None, :], s, _EMPTY)
                key = ((s.to(tl.int32, bitcast=True) & -(1 << TB)) | (k0 // BLOCK_K)).to(tl.float32, bitcast=True)
                if EXACT:
                    m2 = tl.minimum(m2, tl.maximum(m1, key))
                m1 = tl.minimum(m1, key)
            else:
                if K % BLOCK_K != 0:
                    s = tl.where(kmask[None, :], s, inf)
                lt = s < m1  # strict: within a lane the earlier (lower) code keeps a tie
                if RERANK:
                    li2 = tl.where(lt, li, tl.where(s < m2, ks[None, :], li2))
                if EXACT:
                    m2 = tl.minimum(m2, tl.maximum(m1, s))
                li = tl.where(lt, ks[None, :], li)
                m1 = tl.where(lt, s, m1)

        # lane minima in ascending order (ties: lowest code); every code not popped scores >= the next pop or
        # its lane's second best
        if PACK:
            rest, _ = _unpack(tl.min(m2, axis=1), rows, TB)
            b0, i0, m1, m2 = _pop_packed(m1, m2, kk[None, :], RERANK, TB, BLOCK_K)
            if EXACT:
                b1, i1, m1, m2 = _pop_packed(m1, m2, kk[None, :], RERANK, TB, BLOCK_K)
                b2, i2, m1, m2 = _pop_packed(m1, m2, kk[None, :], RERANK, TB, BLOCK_K)
                b3, i3, m1, m2 = _pop_packed(m1, m2, kk[None, :], RERANK, TB, BLOCK_K)
                if TOPK == 8:
                    b4, i4, m1, m2 = _pop_packed(m1, m2, kk[None, :], RERANK, TB, BLOCK_K)
                    b5, i5, m1, m2 = _pop_packed(m1, m2, kk[None, :], RERANK, TB, BLOCK_K)
                    b6, i6, m1, m2 = _pop_packed(m1, m2, kk[None, :], RERANK, TB, BLOCK_K)
                    b7, i7, m1, m2 = _pop_packed(m1, m2, kk[None, :], RERANK, TB, BLOCK_K)
                    b7 = tl.minimum(b7, rest)
                else:
                    b3 = tl.minimum(b3, rest)
        else:
            rest = tl.min(m2, axis=1)  # exact mode's bound (before RERANK's pops move second bests up)
            b0, i0, m1, li, m2 = _pop(m1, li, m2, li2, RERANK)
            if EXACT:
                b1, i1, m1, li, m2 = _pop(m1, li, m2, li2, RERANK)
                b2, i2, m1, li, m2 = _pop(m1, li, m2, li2, RERANK)
                b3, i3, m1, li, m2 = _pop(m1, li, m2, li2, RERANK)
                if TOPK == 8:
                    b4, i4, m1, li, m2 = _pop(m1, li, m2, li2, RERANK)
                    b5, i5, m1, li, m2 = _pop(m1, li, m2, li2, RERANK)
                    b6, i6, m1, li, m2 = _pop(m1, li, m2, li2, RERANK)
                    b7, i7, m1, li, m2 = _pop(m1, li, m2, li2, RERANK)
                    b7 = tl.minimum(b7, rest)
                else:
                    b3 = tl.minimum(b3, rest)

        if EXACT:
            if not RERANK:
                # the error bound of the low-precision scores for this row (see the module docstring)
                cmax = tl.load(STATS + h * sst_h + 0)
                c2max = tl.load(STATS + h * sst_h + 1)
                clomax = tl.load(STATS + h * sst_h + 2)
                nx = nhi + nlo
                gamma = (D + 16) * 2.384185791015625e-07  # (D + 16) * 2^-22
                # ferr: how far the kernel's fp32 re-score of one code can be from the reference's (both sum the
                # same fp32 products, in different orders: each within gamma_D |x| |c| of the exact dot,
                # gamma_D = D u / (1 - D u), u = 2^-24; plus one rounding of the final add in each)
                gd = D * 5.9604644775390625e-08 * 1.001
                if COSINE:
                    ferr = 2.0 * gd * nx * cmax + 1.1920928955078125e-07 * (nx * cmax + 1.0)
                    err = (nlo * cmax + nx * clomax) + gamma * (nx * cmax + 1.0)
                else:
                    ferr = 4.0 * gd * nx * cmax + 1.1920928955078125e-07 * (x2 + c2max + 2.0 * nx * cmax)
                    err = 2.0 * (nlo * cmax + nx * clomax) + gamma * (x2 + c2max + 2.0 * nx * cmax)
                err = err * 1.0625 + 1e-30
                ferr = ferr * 1.0625 + 1e-30
                if TOPK == 8:
                    bl = b7
                else:
                    bl = b3
                if PACK:  # each packed score (and the bound) is within 2^(TB - 23) of itself of the score
                    err2 = 2.0 * err + TRUNC * (tl.abs(b0) + tl.abs(bl))
                else:
                    err2 = 2.0 * err
                flag = (bl - b0) <= err2
            r0, q0 = _rescore(X, CF, C2, x2, h, rows, rmask, i0, D, sxh, sxn, scf_h, scf_k, sc2_h,
                              COSINE, RERANK, BLOCK_N, BD, RD)
            r1, q1 = _rescore(X, CF, C2, x2, h, rows, rmask, i1, D, sxh, sxn, scf_h, scf_k, sc2_h,
                              COSINE, RERANK, BLOCK_N, BD, RD)
            r2, q2 = _rescore(X, CF, C2, x2, h, rows, rmask, i2, D, sxh, sxn, scf_h, scf_k, sc2_h,
                              COSINE, RERANK, BLOCK_N, BD, RD)
            rb = r0
            qb = q0
            ib = i0
            rb, qb, ib = _fold(r1, q1, i1, rb, qb, ib)
            rb, qb, ib = _fold(r2, q2, i2, rb, qb, ib)
            if TOPK == 8:
                r3, q3 = _rescore(X, CF, C2, x2, h, rows, rmask, i3, D, sxh, sxn, scf_h, scf_k, sc2_h,
                                  COSINE, RERANK, BLOCK_N, BD, RD)
                r4, q4 = _rescore(X, CF, C2, x2, h, rows, rmask, i4, D, sxh, sxn, scf_h, scf_k, sc2_h,
                                  COSINE, RERANK, BLOCK_N, BD, RD)
                r5, q5 = _rescore(X, CF, C2, x2, h, rows, rmask, i5, D, sxh, sxn, scf_h, scf_k, sc2_h,
                                  COSINE, RERANK, BLOCK_N, BD, RD)
                r6, q6 = _rescore(X, CF, C2, x2, h, rows, rmask, i6, D, sxh, sxn, scf_h, scf_k, sc2_h,
                                  COSINE, RERANK, BLOCK_N, BD, RD)
                rb, qb, ib = _fold(r3, q3, i3, rb, qb, ib)
                rb, qb, ib = _fold(r4, q4, i4, rb, qb, ib)
                rb, qb, ib = _fold(r5, q5, i5, rb, qb, ib)
                rb, qb, ib = _fold(r6, q6, i6, rb, qb, ib)
            if not RERANK:
                # the kernel's fp32 dot sums in another order than the reference GEMM: a winner closer than that
                # rounding slack to another candidate is not proven either (the reference decides those rows)
                if COSINE:
                    tb = -qb
                else:
                    tb = qb
                second = tl.minimum(tl.minimum(_other(q0, i0, b0, ib, COSINE), _other(q1, i1, b1, ib, COSINE)),
                                    _other(q2, i2, b2, ib, COSINE))
                if TOPK == 8:
                    second = tl.minimum(second, tl.minimum(
                        tl.minimum(_other(q3, i3, b3, ib, COSINE), _other(q4, i4, b4, ib, COSINE)),
                        tl.minimum(_other(q5, i5, b5, ib, COSINE), _other(q6, i6, b6, ib, COSINE))))
                # a margin of 2^-20 |tb| on top keeps the reference's gap many ulps wide, so vqp's sqrt cannot merge it
                flag = flag | ((second - tb) <= 2.0 * ferr + 9.5367431640625e-07 * tl.abs(tb))
                tl.store(OUT_F + h * N + rows, flag.to(tl.int8), mask=rmask)
        else:
            ib = i0
            if COSINE:
                qb = -b0
            else:
                qb = tl.maximum(x2 + b0, 1e-8)  # low-precision squared distance
        tl.store(OUT_I + h * N + rows, ib.to(tl.int64), mask=rmask)
        tl.store(OUT_S + h * N + rows, qb, mask=rmask)
        if WRITE_CODES:  # the winners' rows (the lookup that follows a search, without its own pass and launch)
            for d0 in tl.static_range(0, BD, RD):
                dd = d0 + tl.arange(0, RD)
                m2 = rmask[:, None] & (dd < D)[None, :]
                cv = tl.load(CF + h * scf_h + ib[:, None] * scf_k + dd[None, :], mask=m2, other=0.0)
                dst = OUT_C + (h * N + rows[:, None]).to(tl.int64) * D + dd[None, :]
                tl.store(dst, cv.to(OUT_C.dtype.element_ty), mask=m2)

    # (BLOCK_N, BLOCK_K, warps, stages); 64 x 128 was dropped when the layouts doubled the search: on an H200 it
    # was never the fastest (cosine d32, euclidean d128; at d256 it exceeds shared memory)
    _BLOCKS = ((128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 4))

    def _configs(bf16: bool, packs: tuple[bool, ...]):
        cfgs = []
        for pack in packs:  # the selection state's layout is tuned like the tile sizes (neither wins everywhere)
            for bn, bk, w, s in _BLOCKS:
                if not bf16 and bn == 128:
                    continue  # a 128 x 256 fp32 x tile plus codebook stages does not fit in shared memory
                cfgs.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PACK": pack}, num_warps=w, num_stages=s))
        return cfgs

    def _prune(configs, named_args, **kwargs):
        bd = named_args.get("BD", kwargs.get("BD", 256))
        bf16 = named_args.get("BF16", kwargs.get("BF16", True))
        tb = named_args.get("TB", kwargs.get("TB", PACK_MAX_BITS + 1))
        elt = 2 if bf16 else 4
        keep = [c for c in configs
                if (c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_K"] * c.num_stages) * bd * elt <= 200 * 1024
                and (tb <= PACK_MAX_BITS or not c.kwargs["PACK"])]
        return keep or configs[-1:]

    _KEY = ["K", "D", "COSINE", "EXACT", "RERANK", "BF16", "TOPK"]

    @functools.cache
    def _tuner(bf16: bool, packs: tuple[bool, ...]):
        return triton.autotune(_configs(bf16, packs), key=_KEY, prune_configs_by={"early_config_prune": _prune})(
            _nearest_kernel)


MODES = ("exact", "rerank", "fast")
_best_configs: dict = {}  # (bf16, K, D, constexprs) -> the autotuner's choice


def _launch_tuned(args: tuple, consts: dict, n: int, heads: int, packs: tuple[bool, ...], key: tuple) -> None:
    """Autotune once per `key` (precision, allowed key layouts, codebook shape, constexprs), then launch with the
    chosen config directly: the autotuner's own per-call dispatch costs host time that a ResidualVQ step (one
    search per level) notices."""
    best = _best_configs.get(key)
    if best is None:
        tuner = _tuner(key[0], packs)
        tuner[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), heads)](*args, **consts)
        _best_configs[key] = tuner.best_config
        return
    _nearest_kernel[(triton.cdiv(n, best.kwargs["BLOCK_N"]), heads)](*args, **consts, **best.all_kwargs())


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
    block: tuple[int, int] | None = None,
    topk: int = TOPK,
    pack: bool | None = None,
    out_codes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Kernel behind `nearest_code`: `x (H, N, D)`, `codebook (H or 1, K, D)`, `codebook_sq_norm (H or 1, K)`
    (float32, `(codebook.float()**2).sum(-1)`). Returns `(indices int64 (H, N), score float32 (H, N))` with
    `nearest_code`'s conventions.

    `mode`: `"exact"` (the reference's fp32 indices: margin check, PyTorch fallback for unproven rows, one host
    sync), `"rerank"` (the best `topk - 1` low-precision candidates re-ranked by fp32 `|c|^2 - 2 x.c`; no
    fallback, no sync), `"fast"` (the low-precision argmin). `exact=True/False` is the older spelling of
    `"exact"`/`"fast"`. `stats`, if given, receives the number of rows re-done by the PyTorch path.
    `out_codes`, if given (contiguous `(H, N, D)`), receives the winners' code rows (in its dtype). `pack`:
    the selection layout, packed keys (True) or lane arrays (False); default: whichever the autotuner times faster.
    `block=(BLOCK_N, BLOCK_K)` skips autotuning (the interpreter uses (16, 16)). `topk` (4 or 8): candidates
    kept per row; 8 sends far fewer near-tie rows to the fallback (randn d256 K8192: 17,866 -> 1,511 of
    262,144 rows, H100) for a little more work after the codebook loop."""
    if exact is not None:
        mode = "exact" if exact else "fast"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if topk not in (4, 8):
        raise ValueError(f"topk must be 4 or 8, got {topk!r}")
    if precision not in ("bf16", "tf32"):
        raise ValueError(f"precision must be 'bf16' or 'tf32', got {precision!r}")
    H, N, D = x.shape
    K = codebook.shape[-2]
    cosine = metric == "cosine"
    bf16 = precision == "bf16"
    dev = x.device
    idx = torch.empty(H, N, dtype=torch.long, device=dev)
    score = torch.empty(H, N, dtype=torch.float32, device=dev)
    if N == 0 or H == 0:
        return idx, score
    x = x.contiguous()
    cf = codebook.float().contiguous()
    signed = -cf if cosine else cf  # the kernel scores with -c for cosine (its dot is then lower-is-better)
    cl = signed.to(torch.bfloat16) if bf16 else signed
    c2 = codebook_sq_norm.float().contiguous()
    shared = cf.shape[0] == 1 and H > 1
    exact = mode == "exact"
    # the reference's |x|^2 (exact euclidean mode; the other modes sum it in the kernel)
    x2 = (x.float() ** 2).sum(-1).contiguous() if exact and not cosine else score
    flag = torch.zeros(H, N, dtype=torch.int8, device=dev) if exact else idx
    if exact:
        cn = cf.norm(dim=-1)
        clo = (signed - cl.float()).norm(dim=-1) if bf16 else cn * 2.0**-10
        st = torch.stack([cn.amax(-1), c2.amax(-1), clo.amax(-1), torch.zeros_like(cn[:, 0])], -1).contiguous()
    else:
        st = c2  # not read outside exact mode (any float32 tensor with a head stride will do)
    bd = max(16, triton.next_power_of_2(D))
    if out_codes is not None and (out_codes.shape != (H, N, D) or not out_codes.is_contiguous()):
        raise ValueError(f"out_codes must be a contiguous {(H, N, D)} tensor, got {tuple(out_codes.shape)}")
    args = (
        x, x2, cl, cf, c2, st, idx, score, flag, score if out_codes is None else out_codes, N, K, D,
        x.stride(0), x.stride(1),
        0 if shared else cl.stride(0), cl.stride(1),
        0 if shared else cf.stride(0), cf.stride(1),
        0 if shared else c2.stride(0), 0 if shared else st.stride(0),
    )
    if block is None and _interpret():
        block = (16, 16)
    # tile-number bits of a packed key: enough for the smallest BLOCK_K this launch may use
    min_block_k = block[1] if block is not None else min(bk for _, bk, _, _ in _BLOCKS)
    tb = max(1, (triton.cdiv(K, min_block_k) - 1).bit_length())
    if pack and tb > PACK_MAX_BITS:
        raise ValueError(f"pack=True needs at most 2^{PACK_MAX_BITS} codebook tiles of {min_block_k} codes, got K={K}")
    consts = dict(COSINE=cosine, EXACT=mode != "fast", RERANK=mode == "rerank", BF16=bf16, EMULATE=_interpret(),
                  TOPK=topk if mode != "fast" else 4, TB=tb, TRUNC=2.0 ** (tb - 23) * 1.001,
                  WRITE_CODES=out_codes is not None, BD=bd, RD=min(bd, 64))
    if block is not None:
        grid = (triton.cdiv(N, block[0]), H)
        _nearest_kernel[grid](*args, **consts, BLOCK_N=block[0], BLOCK_K=block[1],
                              PACK=tb <= PACK_MAX_BITS if pack is None else pack)
    else:
        packs = (False, True) if pack is None else (pack,)
        _launch_tuned(args, consts, N, H, packs, key=(bf16, packs, K, D, *consts.items()))

    if stats is not None:
        stats["fallback_rows"], stats["rows"] = 0, H * N
    if exact:
        redo = flag.bool()
        n_redo = int(redo.sum())
        if stats is not None:
            stats["fallback_rows"] = n_redo
            stats["rows"] = H * N
        if n_redo:
            from .nearest import _nearest_torch  # the reference path; lazy to avoid an import cycle

            heads = redo.any(1).nonzero().flatten().tolist()
            for hh in heads:
                rows = redo[hh].nonzero().flatten()
                ch = 0 if cf.shape[0] == 1 else hh
                i_r, s_r = _nearest_torch(x[hh : hh + 1, rows], cf[ch : ch + 1], c2[ch : ch + 1], metric)
                idx[hh, rows] = i_r[0]
                score[hh, rows] = s_r[0]
                if out_codes is not None:
                    out_codes[hh, rows] = cf[ch, i_r[0]].to(out_codes.dtype)
    return idx, score


@torch.library.custom_op("hf_vq::nearest_code", mutates_args=())
def nearest_code_op(x: Tensor, codebook: Tensor, codebook_sq_norm: Tensor, metric: str, mode: str,
                    return_codes: bool) -> tuple[Tensor, Tensor, Tensor]:
    """`nearest_code_triton` as one opaque op for torch.compile (dynamo does not trace into the launch, its
    autotuning or exact mode's host-side fallback): `(indices, score, codes)`, codes empty unless `return_codes`.
    Eager calls use `nearest_code_triton` directly (no op dispatch)."""
    codes = x.new_empty(x.shape, dtype=codebook.dtype) if return_codes else x.new_empty(0, dtype=codebook.dtype)
    idx, score = nearest_code_triton(x, codebook, codebook_sq_norm, metric=metric, mode=mode,
                                     out_codes=codes if return_codes else None)
    return idx, score, codes


@nearest_code_op.register_fake
def _nearest_code_op_shapes(x, codebook, codebook_sq_norm, metric, mode, return_codes):
    H, N, _ = x.shape
    codes = x.new_empty(x.shape if return_codes else (0,), dtype=codebook.dtype)
    return x.new_empty((H, N), dtype=torch.long), x.new_empty((H, N), dtype=torch.float32), codes
