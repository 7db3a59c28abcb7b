"""`hf_vq.ops.nearest`: the chunked PyTorch reference against full-matrix argmin and vector-quantize-pytorch
1.32's own codebook, and the Triton kernel against the reference under `TRITON_INTERPRET=1` (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hf_vq.ops import triton_nearest
from hf_vq.ops.nearest import code_scores, iter_score_chunks, nearest_code, sq_norm


def _vqp_d2(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """vqp 1.32's `cdist` before the sqrt, on the full matrix: `(x2 + y2) + (x.y * -2)`, clamped."""
    x, c = x.float(), c.float()
    x2 = (x**2).sum(-1)
    y2 = (c**2).sum(-1)
    xy = torch.einsum("...id,...jd->...ij", x, c) * -2
    return (x2[..., :, None] + y2[..., None, :] + xy).clamp(min=1e-8)


def _full_argmin(x, c):
    d2 = _vqp_d2(x, c)
    idx = (-d2.sqrt()).argmax(-1)  # vqp: argmax(-cdist)
    return idx, d2.gather(-1, idx[..., None])[..., 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [4 * 57 * 3, 4 * 57 * 40, 256 * 2**20])
def test_chunked_equals_full_matrix(dtype, chunk_bytes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, 13, generator=g).to(dtype)
    c = torch.randn(57, 13, generator=g).to(dtype)
    idx, score = nearest_code(x, c, chunk_bytes=chunk_bytes)
    ref_i, ref_s = _full_argmin(x, c)
    assert idx.dtype == torch.int64 and score.dtype == torch.float32
    assert idx.shape == score.shape == (101,)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(score, ref_s, rtol=1e-6, atol=1e-5)
    # the score is the squared distance of the winner
    true_d2 = ((x.double()[:, None] - c.double()[None]) ** 2).sum(-1)
    torch.testing.assert_close(score.double(), true_d2.gather(1, idx[:, None])[:, 0], rtol=1e-4, atol=1e-4)


def test_heads_leading_dims_and_shared_codebook():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 45, 11, generator=g)
    c = torch.randn(2, 3, 29, 11, generator=g)
    idx, score = nearest_code(x, c, chunk_bytes=4 * 29 * 6 * 4)  # 4 rows per chunk across 6 heads
    ref_i, ref_s = _full_argmin(x, c)
    assert idx.shape == (2, 3, 45)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(score, ref_s, rtol=1e-6, atol=1e-5)
    shared = c[0, 0]
    idx_s, _ = nearest_code(x, shared, chunk_bytes=4 * 29 * 7)
    assert torch.equal(idx_s, _full_argmin(x, shared.expand(2, 3, 29, 11))[0])
    assert torch.equal(nearest_code(x[1, 2], shared)[0], idx_s[1, 2])  # (N, D) input
    with pytest.raises(ValueError, match="heads"):
        nearest_code(torch.randn(3, 4, 5), torch.randn(2, 6, 5))


def test_ties_go_to_the_lowest_index():
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # exact duplicates, and equidistant from all four
    assert nearest_code(x, c)[0].tolist() == [0, 1, 0]
    assert nearest_code(x, c, metric="cosine")[0].tolist() == [0, 1, 0]
    # one chunk per row: the tie breaks the same way however rows are chunked
    assert nearest_code(x, c, chunk_bytes=1)[0].tolist() == [0, 1, 0]


def test_near_ties_match_vqp_sqrt_rounding():
    """Codes one fp32 ulp apart: vqp's sqrt can merge their distances into a tie, won by the lowest index.
    The op must reproduce that, not the plain argmin of the squared distance."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 24, generator=g) * 3
    c = torch.cat([torch.nextafter(base, base + 1), base, base * (1 + 2e-7)])  # near-identical triplets
    x = base[torch.randint(0, 64, (300,), generator=g)] + 1e-3 * torch.randn(300, 24, generator=g)
    idx, _ = nearest_code(x, c)  # one chunk: a chunk's GEMM may round differently on some BLAS
    assert torch.equal(idx, _full_argmin(x, c)[0])


@pytest.mark.parametrize("dim", [4, 32, 200])
def test_equals_vqp_codebook_forward(dim):
    from vector_quantize_pytorch.vector_quantize_pytorch import Codebook

    torch.manual_seed(3)
    x = torch.randn(4, 257, dim)
    for cosine in (False, True):
        book = Codebook(dim=dim, codebook_size=1000, use_cosine_sim=cosine).eval()
        with torch.no_grad():
            embed = torch.randn(1, 1000, dim)
            book.embed.copy_(F.normalize(embed, dim=-1) if cosine else embed)
        _, vqp_idx, _ = book(x)
        xin = F.normalize(x, dim=-1, eps=1e-6) if cosine else x
        idx, _ = nearest_code(xin, book.embed[0], metric="cosine" if cosine else "euclidean",
                              chunk_bytes=4 * 1000 * 33)
        assert torch.equal(idx, vqp_idx), f"cosine={cosine}: {(idx != vqp_idx).sum()} rows differ"


def test_cosine_scores_and_bf16():
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(3, 77, 9, generator=g), dim=-1)
    c = F.normalize(torch.randn(3, 31, 9, generator=g), dim=-1)
    sim = torch.einsum("hnd,hkd->hnk", x, c)
    idx, score = nearest_code(x, c, metric="cosine", chunk_bytes=4 * 31 * 3 * 5)
    assert torch.equal(idx, sim.argmax(-1))
    torch.testing.assert_close(score, sim.amax(-1))
    idx16, _ = nearest_code(x.bfloat16(), c.bfloat16(), metric="cosine")
    assert torch.equal(idx16, torch.einsum("hnd,hkd->hnk", x.bfloat16().float(), c.bfloat16().float()).argmax(-1))


def test_autocast_is_disabled_and_sq_norm_cache():
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(90, 16, generator=g), torch.randn(40, 16, generator=g)
    ref = nearest_code(x, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_code(x, c)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    cached = nearest_code(x, c, codebook_sq_norm=sq_norm(c))
    assert torch.equal(cached[0], ref[0]) and torch.equal(cached[1], ref[1])


def test_iter_score_chunks_bounded_and_complete():
    g = torch.Generator().manual_seed(6)
    x, c = torch.randn(2, 53, 7, generator=g), torch.randn(2, 19, 7, generator=g)
    budget = 4 * 19 * 2 * 6  # 6 rows per chunk
    parts = list(iter_score_chunks(x, c, metric="euclidean", chunk_bytes=budget))
    assert len(parts) == 9 and all(s.numel() * 4 <= budget and s.dtype == torch.float32 for _, s in parts)
    assert [sl.start for sl, _ in parts] == list(range(0, 53, 6))
    full = torch.cat([s for _, s in parts], dim=-2)
    torch.testing.assert_close(full, -_vqp_d2(x, c), rtol=0, atol=0)
    cos = torch.cat([s for _, s in iter_score_chunks(x, c[0], metric="cosine", chunk_bytes=budget)], dim=-2)
    torch.testing.assert_close(cos, torch.einsum("hnd,kd->hnk", x, c[0]))
    # code_scores / scores keep vqp's logits (-cdist) for samplers
    torch.testing.assert_close(code_scores(x, c), -_vqp_d2(x, c).sqrt())


def test_errors_and_empty():
    with pytest.raises(ValueError, match="metric"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 4), metric="manhattan")
    with pytest.raises(ValueError, match="feature dims"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2 dims"):
        nearest_code(torch.randn(4), torch.randn(5, 4))
    idx, score = nearest_code(torch.randn(2, 0, 4), torch.randn(5, 4))
    assert idx.shape == score.shape == (2, 0)


def test_disable_env_and_cpu_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_nearest.available(torch.randn(3, 4))  # CPU tensors never use the kernel
    monkeypatch.setenv("HF_VQ_DISABLE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_nearest.available(torch.randn(3, 4))


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import json, torch, torch.nn.functional as F
    from hf_vq.ops import triton_nearest as tn
    from hf_vq.ops.nearest import _nearest_torch, nearest_code, sq_norm
    g = torch.Generator().manual_seed(0)
    out = []
    def case(name, x, c, metric):
        shared = c.shape[0] == 1 and x.shape[0] > 1
        ri, rs = _nearest_torch(x, c, None, metric)
        for prec, topk in (("bf16", 4), ("tf32", 4), ("bf16", 8)):
            st = {}
            i, s = tn.nearest_code_triton(x, c, sq_norm(c), metric=metric, exact=True, precision=prec, stats=st,
                                          topk=topk)
            fi, fs = tn.nearest_code_triton(x, c, sq_norm(c), metric=metric, exact=False, precision=prec)
            out.append(dict(name=name, prec=prec, topk=topk, rows=x.shape[0] * x.shape[1],
                            exact_equal=bool(torch.equal(i, ri)),
                            score_err=float((s - rs).abs().max()), fast_agree=float((fi == ri).float().mean()),
                            fast_score_err=float((fs - rs).abs().max()), fallback=st["fallback_rows"]))
    x = torch.randn(2, 37, 24, generator=g); c = torch.randn(2, 45, 24, generator=g)
    case("euclidean heads", x, c, "euclidean")
    case("shared codebook", torch.randn(3, 21, 20, generator=g), torch.randn(1, 50, 20, generator=g), "euclidean")
    case("cosine", F.normalize(x, dim=-1), F.normalize(c, dim=-1), "cosine")
    base = torch.randn(1, 12, 24, generator=g)
    dup = torch.cat([base, base, base + 1e-4 * torch.randn(1, 12, 24, generator=g)], 1)  # duplicates / near-ties
    case("duplicates", base[:, torch.randint(0, 12, (40,), generator=g)], dup, "euclidean")
    case("tiny K", torch.randn(1, 9, 5, generator=g), torch.randn(1, 2, 5, generator=g), "euclidean")
    case("K=300 over 16-wide tiles", torch.randn(1, 64, 8, generator=g), torch.randn(1, 300, 8, generator=g), "euclidean")
    # the public op dispatches to the kernel under the interpreter
    xb = torch.randn(30, 16, generator=g).bfloat16(); cb = torch.randn(33, 16, generator=g)
    i = nearest_code(xb, cb)[0]
    out.append(dict(name="nearest_code dispatch bf16 input", exact_equal=bool(torch.equal(i, _nearest_torch(xb[None], cb[None], None, "euclidean")[0][0]))))
    print("RESULT" + json.dumps(out))
    """
)


def test_triton_kernel_matches_reference_under_interpreter():
    if not triton_nearest.HAS_TRITON:
        pytest.skip("triton is not installed: the kernel cannot be checked on CPU")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("HF_VQ_DISABLE_TRITON", None)
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        if "interpret" in proc.stderr.lower() and "not supported" in proc.stderr.lower():
            pytest.skip(f"the Triton CPU interpreter cannot run this kernel here: {proc.stderr[-500:]}")
        raise AssertionError(f"interpreter run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads(lines[-1][len("RESULT"):])
    print(json.dumps(results, indent=1))
    for r in results:
        assert r["exact_equal"], r
        if "score_err" in r:
            assert r["score_err"] <= 1e-4, r
            if r["name"] != "duplicates":  # near-ties: the low-precision argmin is expected to miss there
                assert r["fast_agree"] >= 0.7, r
    assert any(r.get("fallback", 0) > 0 for r in results), "the duplicate-code case should use the fallback"
