"""The projections folded into the codebook (`hf_vq.ops.projected`) against the projections themselves, in
float64: the folded search ranks the codes as the search of the projected rows does, and the sum of projected
codes is the output projection of the codes (values and gradients); its Triton kernel against the gather and sum
(CPU interpreter, and the GPU when there is one)."""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import gpu_check, gpu_env, interpreter_env, run_check

from hf_vq.ops import projected
from hf_vq.ops.nearest import nearest_code


def _setup(heads, shared, d_c=6, dim=5, k=9, n=40):
    g = torch.Generator().manual_seed(heads * 10 + shared)
    codebook = torch.randn(1 if shared else heads, k, d_c, generator=g, dtype=torch.float64)
    lin_in = torch.nn.Linear(dim, heads * d_c, dtype=torch.float64)
    lin_out = torch.nn.Linear(heads * d_c, dim, dtype=torch.float64)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return codebook, lin_in, lin_out, x


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("heads,shared", [(1, True), (3, True), (3, False)])
def test_folded_search_ranks_as_the_projected_search(metric, heads, shared):
    codebook, lin_in, _, x = _setup(heads, shared)
    with torch.no_grad():
        z = lin_in(x).view(len(x), heads, -1).transpose(0, 1)  # (heads, N, d_c)
        book = codebook.expand(heads, -1, -1)
        if metric == "euclidean":
            want = -torch.cdist(z, book)  # higher is better
        else:
            want = F.normalize(z, dim=-1) @ book.mT
        table, offset = projected.search_table(codebook, lin_in.weight, lin_in.bias, metric)
        got = x @ table.mT - offset[:, None, :]
        assert table.dtype == torch.float64 and offset.shape == (heads, codebook.shape[1])
        # the same order of the codes: the folded score is an increasing function of the projected one per row
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert torch.equal(got.argsort(-1), want.argsort(-1))
        ids, _ = nearest_code(x.float().expand(heads, -1, -1), table, metric="dot", code_offset=offset)
        assert torch.equal(ids, want.argmax(-1))


def test_folded_search_without_bias():
    codebook, lin_in, _, x = _setup(2, False)
    with torch.no_grad():
        z = F.linear(x, lin_in.weight).view(len(x), 2, -1).transpose(0, 1)
        table, offset = projected.search_table(codebook, lin_in.weight, None, "euclidean")
        assert torch.equal((x @ table.mT - offset[:, None]).argmax(-1), torch.cdist(z, codebook).argmin(-1))
    with pytest.raises(ValueError, match="metric must be"):
        projected.search_table(codebook, lin_in.weight, None, "dot")


@pytest.mark.parametrize("heads,shared", [(1, True), (3, True), (3, False)])
def test_lookup_sum_is_the_output_projection_of_the_codes(heads, shared):
    codebook, _, lin_out, x = _setup(heads, shared)
    codebook.requires_grad_()
    ids = torch.randint(0, codebook.shape[1], (heads, 40))
    codes = torch.stack([codebook.expand(heads, -1, -1)[h, ids[h]] for h in range(heads)], 1)  # (N, heads, d_c)
    want = lin_out(codes.flatten(1))
    got = projected.lookup_sum(projected.lookup_table(codebook, lin_out.weight), ids, lin_out.bias)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # differentiable in the weights and the codebook, as the projection is
    probe = torch.randn_like(want)
    grads = torch.autograd.grad((want * probe).sum(), [lin_out.weight, lin_out.bias, codebook])
    folded = torch.autograd.grad((got * probe).sum(), [lin_out.weight, lin_out.bias, codebook])
    for a, b in zip(folded, grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert torch.allclose(projected.lookup_sum(projected.lookup_table(codebook, lin_out.weight), ids, None),
                          want - lin_out.bias, atol=1e-12)


def test_dot_metric_arguments():
    x, c = torch.randn(7, 4), torch.randn(5, 4)
    off = torch.randn(5)
    ids, score = nearest_code(x, c, metric="dot", code_offset=off)
    want = x @ c.T - off
    assert torch.equal(ids, want.argmax(-1)) and torch.allclose(score, want.amax(-1))
    for mode in ("rerank", "exact"):  # no offset: zero
        assert torch.equal(nearest_code(x, c, metric="dot", mode=mode)[0], (x @ c.T).argmax(-1))
    assert torch.equal(nearest_code(x, c, metric="dot", code_offset=off, mode="exact")[0], ids)
    with pytest.raises(ValueError, match="code_offset is an argument of metric='dot'"):
        nearest_code(x, c, code_offset=off)
    with pytest.raises(ValueError, match="metric must be one of"):
        nearest_code(x, c, metric="manhattan")


def test_folding_pays_below_the_row_count():
    assert projected.folding_pays(rows=65536, codebook_size=1024)
    assert not projected.folding_pays(rows=1024, codebook_size=1024)


LOOKUP_CHECK = """
import json, sys, torch
from hf_vq.ops import projected, triton_projected
dev = sys.argv[1]
g = torch.Generator().manual_seed(0)
out = {}
for heads, k, d, n, bias in ((1, 7, 5, 33, True), (3, 9, 20, 50, False), (8, 64, 300, 257, True)):
    table = torch.randn(heads * k, d, generator=g).to(dev)
    ids = torch.randint(0, k, (heads, n), generator=g).to(dev)
    b = torch.randn(d, generator=g).to(dev) if bias else None
    got = triton_projected.lookup_sum_triton(table, ids, b)
    with torch.no_grad():
        dispatched = projected.lookup_sum(table, ids, b)  # the kernel, on CUDA or under the interpreter
    rows = table.view(heads, k, d)[torch.arange(heads, device=dev)[:, None], ids]  # (heads, n, d)
    want = rows.sum(0) + (b if bias else 0)
    out[f"{heads}-{d}"] = [float((got - want).abs().max()), bool(torch.equal(got, dispatched))]
print("RESULT" + json.dumps(out))
"""


def _assert_lookup(res):
    for name, (err, same) in res.items():
        assert err < 1e-5 and same, (name, err, same)


def test_lookup_sum_kernel_interpreted_on_cpu():
    pytest.importorskip("triton")
    _assert_lookup(run_check(LOOKUP_CHECK, "cpu", env=interpreter_env()))


@gpu_check(LOOKUP_CHECK)
def test_lookup_sum_kernel_on_gpu():
    pytest.importorskip("triton")
    _assert_lookup(run_check(LOOKUP_CHECK, "cuda", env=gpu_env()))
