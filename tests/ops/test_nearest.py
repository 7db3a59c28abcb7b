"""nearest_code: the chunked PyTorch reference against full-matrix argmin and vqp 1.32's formula, and the
Triton kernel against it (under TRITON_INTERPRET=1 in a subprocess on CPU; on the GPU when there is one)."""

import textwrap

import pytest
import torch
from kernel_checks import SHARD_PREAMBLE, gpu_check, gpu_env, interpreter_env, run_check, run_sharded

from hf_vq.ops.nearest import code_scores, iter_score_chunks, nearest_code, sq_norm

vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")


def vqp_argmax(x, c):
    """vector-quantize-pytorch 1.32 EuclideanCodebook: `dist = -cdist(flatten, embed)`, then argmax."""
    dist = -vqp.cdist(x, c)
    return dist.argmax(-1), dist.amax(-1)


def as_vqp(best):
    """nearest_code's euclidean score is the winner's squared distance; vqp's is `-sqrt` of it."""
    return -best.sqrt()


@pytest.mark.parametrize("chunk_bytes", [4 * 29 * 3 * 5, 4 * 29 * 3, 256 * 2**20])
def test_chunked_equals_vqp_full_matrix(chunk_bytes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 101, 13, generator=g)
    c = torch.randn(3, 29, 13, generator=g)
    idx, best = nearest_code(x, c, chunk_bytes=chunk_bytes)
    ref_idx, ref_best = vqp_argmax(x, c)
    assert idx.dtype == torch.int64 and best.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    # bit-equal with vqp at vqp's own (one-chunk) shape; BLAS may round a 1-row chunk's matmul differently
    torch.testing.assert_close(as_vqp(best), ref_best, rtol=1e-6, atol=1e-6)
    if chunk_bytes >= 4 * 29 * 3 * 101:
        assert torch.equal(as_vqp(best), ref_best)


def test_near_ties_match_vqp():
    """Codes a few ulps apart, duplicates and points on bisectors: the same winner as vqp, bit for bit."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 24, generator=g)
    c = torch.cat([base, base + 1e-6 * torch.randn(40, 24, generator=g), base.clone()])  # near and exact dups
    x = torch.cat([base + 1e-4 * torch.randn(40, 24, generator=g), (base[:20] + base[20:]) / 2])
    x = torch.cat([x, torch.randn(200, 24, generator=g)])
    idx, best = nearest_code(x, c)  # one chunk: vqp's GEMM shape
    ref_idx, ref_best = vqp_argmax(x.unsqueeze(0), c.unsqueeze(0))
    assert torch.equal(idx, ref_idx[0])
    torch.testing.assert_close(as_vqp(best), ref_best[0], rtol=1e-6, atol=1e-6)
    # in chunks of 7 rows the GEMM may round differently (some BLAS pick kernels by shape): a winner within
    # that rounding of vqp's, never a worse code
    idx_c, _ = nearest_code(x, c, chunk_bytes=4 * 120 * 7)
    d = torch.cdist(x.double(), c.double())
    assert (d.gather(-1, idx_c[:, None])[:, 0] - d.amin(-1)).max() < 1e-5
    # exact duplicates: the lowest index wins (rows from `base` never pick the copy at 80 + i)
    assert (idx[:40] < 80).all()


def test_ties_go_to_lowest_index():
    x = torch.zeros(1, 2, 2)
    c = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert nearest_code(x, c)[0].tolist() == [[0, 0]]
    assert nearest_code(torch.tensor([[1.0, 0.0]]), c[0], metric="cosine")[0].tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_score_in_float32(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(77, 9, generator=g).to(dtype)
    c = torch.randn(31, 9, generator=g).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, best = nearest_code(x, c, chunk_bytes=4 * 31 * 10)
    full = -torch.cdist(x.double(), c.double())
    assert best.dtype == torch.float32
    ref = vqp_argmax(x.float().unsqueeze(0), c.float().unsqueeze(0))[0][0]
    assert torch.equal(idx, ref)
    # and float64 agrees except on fp32 near-ties
    agree = (full.argmax(-1) == idx).float().mean().item()
    assert agree == 1.0


def test_heads_shared_codebook_and_2d():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 19, 5, generator=g)
    c = torch.randn(23, 5, generator=g)
    idx, best = nearest_code(x, c, chunk_bytes=4 * 23 * 6 * 2)
    assert idx.shape == (2, 3, 19)
    ref = vqp_argmax(x.reshape(6, 19, 5), c.expand(6, -1, -1))[0].reshape(2, 3, 19)
    assert torch.equal(idx, ref)
    i2, _ = nearest_code(x[0, 0], c)
    assert torch.equal(i2, ref[0, 0])
    # separate codebook per head
    ch = torch.randn(2, 3, 23, 5, generator=g)
    idx, _ = nearest_code(x, ch)
    assert torch.equal(idx, vqp_argmax(x.reshape(6, 19, 5), ch.reshape(6, 23, 5))[0].reshape(2, 3, 19))


def test_cached_sq_norm_and_cosine():
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(4, 57, 8, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(4, 33, 8, generator=g), dim=-1)
    a = nearest_code(x, c)
    b = nearest_code(x, c, codebook_sq_norm=sq_norm(c))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sim = torch.einsum("hnd,hkd->hnk", x, c)
    idx, best = nearest_code(x, c, metric="cosine")
    assert torch.equal(idx, sim.argmax(-1)) and torch.equal(best, sim.amax(-1))
    idx, best = nearest_code(x, c, metric="cosine", chunk_bytes=4 * 33 * 4 * 3)  # 3-row chunks: BLAS rounding
    torch.testing.assert_close(best, sim.amax(-1), rtol=0, atol=1e-6)
    assert (sim.amax(-1) - sim.gather(-1, idx[..., None])[..., 0]).max() < 1e-6


def test_score_chunks_and_full_scores():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 6, generator=g)
    c = torch.randn(21, 6, generator=g)
    full = code_scores(x, c)
    assert full.shape == (50, 21)
    assert torch.equal(full, -vqp.cdist(x[None], c[None])[0])
    parts = list(iter_score_chunks(x, c, "euclidean", 4 * 21 * 8))  # -squared distances, in row chunks
    assert len(parts) == 7 and all(s.shape[-1] == 21 and s.numel() * 4 <= 4 * 21 * 8 for _, s in parts)
    assert [sl.start for sl, _ in parts] == list(range(0, 50, 8))
    torch.testing.assert_close(torch.cat([s for _, s in parts]), -(full**2), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([s for _, s in parts]).argmax(-1), full.argmax(-1))


def test_errors_and_empty():
    with pytest.raises(ValueError, match="metric"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 4), metric="manhattan")
    with pytest.raises(ValueError, match="feature dims"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="heads"):
        nearest_code(torch.randn(2, 3, 4), torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        nearest_code(torch.randn(4), torch.randn(5, 4))
    idx, best = nearest_code(torch.randn(2, 0, 4), torch.randn(5, 4))
    assert idx.shape == (2, 0) and best.shape == (2, 0)


@pytest.mark.parametrize("dim", [4, 32, 200])
def test_equals_vqp_codebook_forward(dim):
    """The indices of vqp 1.32's own `Codebook` forward (euclidean and cosine) on its (one-chunk) shape."""
    torch.manual_seed(3)
    x = torch.randn(4, 257, dim)
    for cosine in (False, True):
        book = vqp.Codebook(dim=dim, codebook_size=1000, use_cosine_sim=cosine).eval()
        with torch.no_grad():
            embed = torch.randn(1, 1000, dim)
            book.embed.copy_(torch.nn.functional.normalize(embed, dim=-1) if cosine else embed)
        _, vqp_idx, _ = book(x)
        xin = torch.nn.functional.normalize(x, dim=-1, eps=1e-6) if cosine else x
        idx, _ = nearest_code(xin, book.embed[0], metric="cosine" if cosine else "euclidean")
        assert torch.equal(idx, vqp_idx), f"cosine={cosine}: {(idx != vqp_idx).sum()} rows differ"


def test_cosine_score_chunks():
    g = torch.Generator().manual_seed(6)
    x, c = torch.randn(2, 53, 7, generator=g), torch.randn(19, 7, generator=g)
    parts = list(iter_score_chunks(x, c, metric="cosine", chunk_bytes=4 * 19 * 2 * 6))  # 6 rows per chunk
    assert [sl.start for sl, _ in parts] == list(range(0, 53, 6))
    torch.testing.assert_close(torch.cat([s for _, s in parts], dim=-2), torch.einsum("hnd,kd->hnk", x, c))


def test_kernel_off_on_cpu_and_by_env(monkeypatch):
    tn = pytest.importorskip("hf_vq.ops.triton_nearest")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not tn.available(torch.randn(3, 4))  # CPU tensors never use the kernel
    monkeypatch.setenv("HF_VQ_DISABLE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not tn.available(torch.randn(3, 4))


def test_return_codes_are_the_winners_rows():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, 8, generator=g)
    for codebook in (torch.randn(7, 8, generator=g), torch.randn(3, 7, 8, generator=g).bfloat16()):
        idx, score, codes = nearest_code(x, codebook, return_codes=True)
        assert torch.equal(idx, nearest_code(x, codebook)[0]) and codes.dtype == codebook.dtype
        heads = codebook.expand(3, -1, -1)
        assert torch.equal(codes, heads.gather(1, idx[..., None].expand(-1, -1, 8)))


def test_packed_keys_refuse_codebooks_with_too_many_tiles():
    tn = pytest.importorskip("hf_vq.ops.triton_nearest")
    if not tn.HAS_TRITON:
        pytest.skip("triton is not installed")
    c = torch.randn(1, 16 * 2**tn.PACK_MAX_BITS + 1, 4)  # one tile of 16 codes too many for the key's tile bits
    with pytest.raises(ValueError, match="pack=True needs at most"):
        tn.nearest_code_triton(torch.randn(1, 3, 4), c, sq_norm(c), mode="rerank", block=(16, 16), pack=True)


def test_launch_config_covers_every_dim_and_codebook_size():
    """`launch_config` (the rule that replaces autotuning) gives a valid configuration for feature dims 4..2048 and
    codebook sizes 256..2^17 in both precisions: rows resident exactly up to RESIDENT_DIM, else the GEMM route
    (bf16, where its blocks hold enough rows) or sliced in-kernel dots; packed keys only where the tile bits allow; the H200's shared memory
    (227 KiB) never exceeded by the stage buffers."""
    tn = pytest.importorskip("hf_vq.ops.triton_nearest")
    if not tn.HAS_TRITON:
        pytest.skip("triton is not installed")
    from hf_vq.ops.triton_nearest_config import gemm_fits
    from hf_vq.ops.utils import padded_dim

    smem = 227 * 1024
    for d in (4, 7, 16, 33, 64, 100, 128, 255, 256, 257, 300, 512, 768, 1000, 1024, 2048):
        for k in (256, 1000, 8192, 65536, 2**17):
            for bf16 in (True, False):
                cfg = tn.launch_config(d, k, bf16=bf16, mode="rerank")
                resident = padded_dim(d) <= tn.RESIDENT_DIM
                assert cfg.gemm == (bf16 and not resident and gemm_fits(k)), (d, k, bf16, cfg)
                assert cfg.gemm or (cfg.block_d >= padded_dim(d)) == resident, (d, k, bf16, cfg)
                assert not resident or cfg.block_d == padded_dim(d)
                assert not cfg.pack or tn.tile_bits(k, cfg.block_k) <= tn.PACK_MAX_BITS, (d, k, cfg)
                elt = 2 if bf16 else 4
                rows = cfg.block_n * cfg.block_d * elt
                stage = cfg.block_n * cfg.block_k * 4 if cfg.gemm else \
                    cfg.block_k * cfg.block_d * elt + (0 if resident else rows)
                assert (rows if resident else 0) + cfg.num_stages * stage <= smem, (d, k, bf16, cfg)
                assert cfg.num_stages >= 1 and cfg.num_warps in (4, 8)
    assert not tn.launch_config(256, 2**17, bf16=True, mode="rerank").pack  # 2^11 tiles: lane arrays
    with pytest.raises(ValueError, match="pack=True needs at most"):
        tn.launch_config(256, 2**17, bf16=True, mode="rerank", pack=True)
    # the GEMM route needs blocks of enough rows: up to 16384 codes (256 MiB / 4 B / 4096 rows), else in-kernel dots
    assert tn.launch_config(512, 16384, bf16=True, mode="rerank").gemm
    assert not tn.launch_config(512, 16385, bf16=True, mode="rerank").gemm
    with pytest.raises(ValueError, match="GEMM route computes bf16 dots"):
        tn.launch_config(512, 1024, bf16=False, mode="rerank", gemm=True)


# ---------------------------------------------------------------- Triton kernel vs the PyTorch reference
KERNEL_CHECK = SHARD_PREAMBLE + textwrap.dedent(
    """
    import json, sys, torch
    from hf_vq.ops import triton_nearest as tn
    from hf_vq.ops.nearest import _nearest_torch, sq_norm
    dev = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    out = {}
    BOTH, BF16 = ("bf16", "tf32"), ("bf16",)
    # (H, N, K, D, codebook heads, metric, dtype, precisions, block): block None is launch_config's choice; a
    # 3-tuple (BLOCK_N, BLOCK_K, BLOCK_D) with BLOCK_D below the padded dim reads the rows in feature slices
    small = [
        (1, 37, 45, 20, 1, "euclidean", torch.float32, BOTH, None),
        (2, 21, 19, 16, 2, "euclidean", torch.bfloat16, BOTH, None),
        (3, 18, 40, 33, 1, "cosine", torch.float32, BOTH, None),
        (1, 25, 3, 8, 1, "euclidean", torch.float16, BOTH, None),
        (2, 19, 70, 7, 1, "euclidean", torch.float16, BOTH, None),
        (1, 33, 17, 48, 1, "cosine", torch.bfloat16, BOTH, None),
        (1, 29, 32, 16, 1, "cosine", torch.float32, BOTH, (16, 16)),  # K, D multiples of the tiles: no masks
        (2, 23, 48, 32, 1, "euclidean", torch.bfloat16, BOTH, None),
        (1, 21, 37, 300, 1, "euclidean", torch.float32, BOTH, None),  # D > 256: feature slices, K not a tile multiple
        (2, 17, 40, 70, 1, "cosine", torch.float32, BOTH, (16, 16, 32)),  # sliced rows, D not a slice multiple
        (1, 19, 32, 64, 1, "euclidean", torch.bfloat16, BF16, (16, 16, 32)),  # sliced rows, no masks
        # the GEMM route (dots from a GEMM over row blocks): several blocks, a shared codebook over heads,
        # separate codebooks, K not a tile multiple, cosine
        (3, 37, 45, 20, 1, "euclidean", torch.float32, BF16, dict(gemm=True, gemm_rows=16, block=(16, 16))),
        (2, 29, 64, 40, 2, "cosine", torch.float32, BF16, dict(gemm=True, gemm_rows=32, block=(16, 32))),
    ]
    # on the GPU only larger shapes with the launch configurations users get (the interpreter covers the small
    # ones; every distinct specialization is a compilation, which is what bounds this test's time)
    large = [
            (1, 1001, 999, 129, 1, "euclidean", torch.float32, BOTH, None),
            (2, 513, 257, 7, 2, "euclidean", torch.bfloat16, BF16, None),
            (1, 4097, 8192, 256, 1, "euclidean", torch.float32, BF16, None),
            (1, 2049, 4096, 64, 1, "cosine", torch.float32, BF16, None),
            (1, 3000, 65536, 256, 1, "euclidean", torch.bfloat16, BF16, None),
            (1, 2001, 3001, 700, 1, "euclidean", torch.float32, BOTH, None),
            (2, 1025, 2048, 2048, 1, "cosine", torch.float32, BF16, dict(gemm_rows=384)),  # GEMM route blocks
            (1, 1500, 1000, 300, 1, "euclidean", torch.float32, BF16, dict(gemm=False)),  # in-kernel sliced dots
    ]
    cases = large if dev == "cuda" else small
    for case_no, (H, N, K, D, HC, metric, dtype, precisions, blk) in enumerate(cases):
        if case_no % shards != shard:
            continue
        g.manual_seed(case_no)  # each case's data independent of the others (the cases may run in shards)
        x = torch.randn(H, N, D, generator=g)
        c = torch.randn(HC, K, D, generator=g)
        gemm_route = isinstance(blk, dict) and blk.get("gemm") and metric == "euclidean" and K >= 45
        if case_no == 0 or gemm_route:  # near-ties: duplicates and near-duplicates of codes, points next to codes
            c[0, 40:45] = c[0, :5]
            c[0, 30:35] = c[0, :5] + 1e-3
            x[0, :10] = c[0, :10] + 1e-3 * torch.randn(10, D, generator=g)
        if metric == "cosine":
            x, c = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(c, dim=-1)
        x, c = x.to(dtype).to(dev), c.to(dev)
        sqn = sq_norm(c)
        ref_i, ref_s = _nearest_torch(x, c, sqn, metric)
        pack = bool(case_no % 2) and K <= 8192  # both selection layouts (lanes, packed keys) over the cases
        for prec in precisions:
            st = {}
            kw = dict(metric=metric, precision=prec, pack=pack, **(blk if isinstance(blk, dict) else dict(block=blk)))
            codes_e, codes_r = torch.empty_like(x, dtype=c.dtype), torch.empty_like(x, dtype=c.dtype)
            i, s = tn.nearest_code_triton(x, c, sqn, exact=True, stats=st, out_codes=codes_e, **kw)
            ia, sa = tn.nearest_code_triton(x, c, sqn, exact=False, **kw)
            ir, sr = tn.nearest_code_triton(x, c, sqn, mode="rerank", out_codes=codes_r, **kw)
            lookup = lambda ids: c.expand(H, -1, -1).gather(1, ids[..., None].expand(-1, -1, D))

            xf = x.float()
            cf = c.expand(H, -1, -1)
            d64 = torch.cdist(xf.double(), cf.double()) if metric == "euclidean" else -xf.double() @ cf.double().mT
            ia_d = d64.gather(-1, ia[..., None])[..., 0]
            ir_d = d64.gather(-1, ir[..., None])[..., 0]
            # some CPU BLAS (seen: AMD EPYC, torch 2.13) round a GEMM differently by its row count, so the
            # reference's fp32 near-ties (exact duplicate codes) can resolve differently for the few rows the
            # exact mode re-does: on CPU, exactness is asserted where float64's top two are apart
            top2 = d64.topk(2, dim=-1, largest=False).values if K > 1 else torch.cat([d64, d64 + 1], -1)
            stable = (top2[..., 1] - top2[..., 0]) > 1e-5 * (1 + d64.abs().amax()) if dev == "cpu" else \
                torch.ones_like(ref_i, dtype=torch.bool)
            if case_no == 0:  # top-4 candidates (more rows fall back) still give the reference's indices
                i4, _ = tn.nearest_code_triton(x, c, sqn, exact=True, topk=4, **kw)
                out[f"top4-{prec}"] = bool(torch.equal(i4[stable], ref_i[stable]))
            out[f"{case_no}-{prec}"] = dict(
                # rerank: the float64 winner up to fp32 rounding of the scores (exact ties and near-duplicates)
                rerank_gap=float((ir_d - d64.amin(-1)).max() / (1 + d64.abs().amax())),
                rerank_agree=float((ir_d == d64.amin(-1)).float().mean()),
                rerank_score_maxdiff=float(((sr - ir_d**2) if metric == "euclidean" else (sr + ir_d)).abs().max()
                                           / (1 + 2 * d64.abs().amax() ** 2)),
                exact_equal=bool(torch.equal(i[stable], ref_i[stable])),
                exact_gap=float((d64.gather(-1, i[..., None])[..., 0] - d64.amin(-1)).max() / (1 + d64.abs().amax())),
                # squared scores: vqp's |x|^2 + |c|^2 - 2 x.c cancels for points next to a code
                # vqp's |x|^2 + |c|^2 - 2 x.c cancels for points next to a code: relative to the magnitudes
                score_maxdiff=float((s.double() - ref_s.double()).abs().max() / (1 + 2 * d64.abs().amax() ** 2)),
                fallback=st["fallback_rows"], rows=st["rows"],
                codes_written=bool(torch.equal(codes_e, lookup(i)) and torch.equal(codes_r, lookup(ir))),
                approx_agree=float((ia == ref_i).float().mean()),
                approx_gap=float((ia_d - d64.amin(-1)).max()),
                approx_score_maxdiff=float(((sa - ia_d**2) if metric == "euclidean" else (sa + ia_d)).abs().max()
                                           / (1 + 2 * d64.abs().amax() ** 2)),
            )
    if shard != 0:
        print("RESULT" + json.dumps(out))
        sys.exit(0)
    # the dot metric (argmax x.c - offset) on rows shared by every head (head stride 0), as the folded search of
    # `ops.projected` runs it: resident rows and the GEMM route (one GEMM of the shared rows against every head)
    dot_cases = ([(3, 41, 37, 20, None), (3, 41, 37, 40, dict(gemm=True, gemm_rows=16, block=(16, 16)))]
                 if dev == "cpu" else [(4, 3001, 1024, 512, None), (2, 2049, 999, 96, None)])
    for j, (H, N, K, D, kw) in enumerate(dot_cases):
        x = torch.randn(N, D, generator=g).to(dev).expand(H, -1, -1)
        c = torch.randn(H, K, D, generator=g).to(dev)
        off = (torch.randn(H, K, generator=g) * D**0.5).to(dev)
        ref_i, _ = _nearest_torch(x, c, off, "dot")
        s64 = x.double() @ c.double().mT - off.double()[:, None, :]
        scale = 1 + float(s64.abs().amax())
        for mode in ("fast", "rerank"):
            i, s = tn.nearest_code_triton(x, c, off, metric="dot", mode=mode, **(kw or {}))
            got = s64.gather(-1, i[..., None])[..., 0]
            out[f"dot{j}-{mode}"] = dict(gap=float((s64.amax(-1) - got).max()) / scale,
                                         agree=float((i == ref_i).float().mean()),
                                         score=float((s.double() - got).abs().max()) / scale)
    # a row's two nearest codes in one lane (codes 0 and 128 share lane 0 for every BLOCK_K <= 128), ordered
    # wrongly by the low-precision scores: code 128 is nearer in fp32 but rounds to code 0's bf16/tf32 value
    # and has the larger |c|^2, so a lane that keeps only its best code would never re-rank it
    c = torch.randn(1, 200, 16, generator=g) - 6.0
    c[0, 0] = 1.0
    c[0, 128] = 1.0 + 2.0**-12
    x = torch.full((1, 5, 16), 1.5)
    x, c = x.to(dev), c.to(dev)
    blk = None
    for prec in ("bf16", "tf32") if dev == "cuda" else ("bf16",):  # the interpreter's tf32 dot is full fp32
        for pack in (False, True) if prec == "bf16" else (False,):
            out[f"lane-{prec}-{pack}"] = {
                m: tn.nearest_code_triton(x, c, sq_norm(c), mode=m, precision=prec, block=blk, pack=pack)[0]
                .flatten().tolist() for m in ("fast", "rerank", "exact")}
    if dev == "cpu":  # the public op dispatches to the kernel under the interpreter (bf16 input)
        from hf_vq.ops.nearest import nearest_code
        xb, cb = torch.randn(30, 16, generator=g).bfloat16(), torch.randn(33, 16, generator=g)
        out["dispatch"] = bool(torch.equal(nearest_code(xb, cb, mode="exact")[0],
                                           _nearest_torch(xb[None], cb[None], None, "euclidean")[0][0]))
        # the dot metric through the public op: with offsets (exact mode: the PyTorch path), without (cosine's)
        off = torch.randn(33, generator=g)
        want_dot = (xb.float() @ cb.T - off).argmax(-1)
        out["dispatch_dot"] = all(bool(torch.equal(nearest_code(xb, cb, metric="dot", code_offset=off, mode=m)[0],
                                                   want_dot)) for m in ("rerank", "exact"))
        out["dispatch_dot"] &= bool(torch.equal(nearest_code(xb, cb, metric="dot")[0], (xb.float() @ cb.T).argmax(-1)))
        # a feature dim above the resident rows' limit takes the kernel too (its GEMM route)
        xw, cw = torch.randn(2, 9, 260, generator=g), torch.randn(21, 260, generator=g)
        assert tn.available(xw)
        out["dispatch_wide"] = bool(torch.equal(nearest_code(xw, cw, mode="exact")[0],
                                                _nearest_torch(xw, cw[None], None, "euclidean")[0]))
    print("RESULT" + json.dumps(out))
    """
)


def _check_kernel_results(res):
    assert res.pop("dispatch", True)
    assert res.pop("dispatch_dot", True)
    assert res.pop("dispatch_wide", True)
    for prec in ("bf16", "tf32"):
        assert res.pop(f"top4-{prec}"), prec
    for prec in ("bf16", "tf32") if "lane-tf32-False" in res else ("bf16",):
        for pack in (False, True) if prec == "bf16" else (False,):
            lane = res.pop(f"lane-{prec}-{pack}")
            assert lane == {"fast": [0] * 5, "rerank": [128] * 5, "exact": [128] * 5}, (prec, pack, lane)
    for name in [k for k in res if k.startswith("dot")]:
        r = res.pop(name)
        if name.endswith("rerank"):  # the float64 winner up to fp32 rounding of the scores
            assert r["gap"] < 1e-5 and r["agree"] >= 0.99 and r["score"] < 1e-5, (name, r)
        else:  # the bf16 winner is a near-winner, its score the bf16 one
            assert r["gap"] < 1e-2 and r["score"] < 1e-2, (name, r)
    for name, r in res.items():
        assert r["exact_equal"] and r["codes_written"], (name, r)
        assert r["exact_gap"] < 1e-5, (name, r)  # shape-dependent rows: a winner within fp32 rounding
        assert r["score_maxdiff"] < 1e-5, (name, r)
        assert r["approx_gap"] < 0.1, (name, r)  # the low-precision winner is a near-winner
        assert r["approx_score_maxdiff"] < 1e-2, (name, r)
        assert r["rerank_gap"] < 1e-5, (name, r)  # only fp32-level near-ties may differ from float64
        assert r["rerank_agree"] >= 0.9, (name, r)
        assert r["rerank_score_maxdiff"] < 1e-5, (name, r)


def test_triton_kernel_interpreted_on_cpu():
    pytest.importorskip("triton")
    res = run_check(KERNEL_CHECK, "cpu", env=interpreter_env())
    _check_kernel_results(res)


@gpu_check(KERNEL_CHECK, 3)
def test_triton_kernel_on_gpu():
    pytest.importorskip("triton")
    _check_kernel_results(run_sharded(KERNEL_CHECK, "cuda", 3, env=gpu_env()))
