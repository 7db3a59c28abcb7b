"""torch.compile: every quantizer's forward traces into one graph (`fullgraph=True`) and gives the eager module's
outputs, gradients and codebook updates. The `eager` backend checks the tracing (dynamo) without generating code,
so no compiler is needed. With the Triton kernels available (CUDA, or the CPU interpreter in a subprocess here), the
nearest-code search is one custom op in the graph and the other kernels' PyTorch paths are compiled instead.

Exceptions, by design: k-means initialization runs in an eager call before compiling (it is data-dependent; the
compiled forward says so if it meets an uninitialized codebook), and dead-code expiry runs eagerly inside the
compiled step (one graph break per training step, `fullgraph=False`)."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_vq
from quantizer_examples import EXAMPLES, example


def _tensors(out):
    return [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _step(model, x, train):
    torch.manual_seed(0)
    x = x.clone().requires_grad_(train)
    out = _tensors(model(x))
    if train:
        sum(t.float().sum() for t in out if t.is_floating_point() and t.requires_grad).backward()
    grads = [x.grad] + [p.grad for p in model.parameters()] if train else []
    return out, grads, [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_compiled_forward_is_one_graph_and_matches_eager(name, train):
    cls_name, kwargs, x = example(name)
    model = getattr(hf_vq, cls_name)(**kwargs).train(train)
    if kwargs.get("kmeans_init"):
        model(x)  # k-means initializes the codebook eagerly
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    torch._dynamo.reset()
    fullgraph = not (train and kwargs.get("threshold_ema_dead_code"))
    run = torch.compile(compiled, fullgraph=fullgraph, backend="eager")
    for got, want in zip(_step(run, x, train), _step(eager, x, train), strict=True):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b), name


def test_uninitialized_kmeans_codebook_under_compile_names_the_fix():
    model = hf_vq.VectorQuantize(dim=8, codebook_size=16, kmeans_init=True)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="run one forward outside torch.compile first"):
        torch.compile(model, fullgraph=True, backend="eager")(torch.randn(2, 10, 8))


KERNELS_UNDER_COMPILE = textwrap.dedent(
    """
    import copy, json, sys, torch, hf_vq
    sys.path.insert(0, "tests")
    from quantizer_examples import example
    out = {}
    for name in ["FSQ", "VectorQuantize_cosine", "ResidualVQ"]:
        cls, kw, x = example(name)
        for train in (False, True):
            m = getattr(hf_vq, cls)(**kw).train(train)
            eager, compiled = copy.deepcopy(m), copy.deepcopy(m)
            torch._dynamo.reset()
            torch.manual_seed(0)
            want = eager(x.clone().requires_grad_(train))
            torch.manual_seed(0)
            got = torch.compile(compiled, fullgraph=True, backend="eager")(x.clone().requires_grad_(train))
            flat = lambda r: [t.float() for t in torch.utils._pytree.tree_flatten(r)[0] if isinstance(t, torch.Tensor)]
            out[f"{name}-{train}"] = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(flat(got), flat(want)))
    print("RESULT" + json.dumps(out))
    """
)


def test_kernels_under_compile_interpreted():
    """With the kernels available (here: Triton's CPU interpreter), the nearest-code search enters the graph as one
    custom op (`hf_vq::nearest_code`) and the other kernels' PyTorch paths are compiled: one graph, eager values."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("HF_VQ_DISABLE_TRITON", None)
    proc = subprocess.run([sys.executable, "-c", KERNELS_UNDER_COMPILE], capture_output=True, text=True, env=env,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(res) == 6 and all(res.values()), res


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["FSQ", "FSQ_codebooks", "LFQ", "VectorQuantize_cosine", "ResidualVQ",
                                  "ResidualVQ_projection"])
def test_compiled_forward_on_cuda_traces_the_kernels(name, train):
    """On CUDA: the nearest-code kernel as its custom op, the other kernels' PyTorch paths compiled; one graph, the
    eager (kernel) results up to float32 rounding."""
    cls_name, kwargs, x = example(name)
    model = getattr(hf_vq, cls_name)(**kwargs).cuda().train(train)
    x = x.cuda()
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    torch._dynamo.reset()
    run = torch.compile(compiled, fullgraph=True, backend="eager")
    for got, want in zip(_step(run, x, train), _step(eager, x, train), strict=True):
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
