"""torch.compile: every quantizer's forward traces into one graph (`fullgraph=True`) and gives the eager module's
outputs, gradients and codebook updates. The `eager` backend checks the tracing (dynamo) without generating code,
so no compiler is needed; the CUDA kernels' launches are not covered here (no GPU in CI).

Exceptions, by design: k-means initialization runs in an eager call before compiling (it is data-dependent; the
compiled forward says so if it meets an uninitialized codebook), and dead-code expiry runs eagerly inside the
compiled step (one graph break per training step, `fullgraph=False`)."""

import copy

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
