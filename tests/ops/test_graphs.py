"""`ops.graphs.GraphedUpdate`: a no-grad update replayed as a CUDA graph, bit-identical to its eager run."""

import copy

import pytest
import torch

import hf_vq
from hf_vq.models import sgm_ema
from hf_vq.ops import ema, graphs

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _scaled_add(inputs, state, scale):
    """state[0] += scale * inputs[0]; returns [state[0].sum()]."""
    state[0].add_(inputs[0], alpha=scale)
    return [state[0].sum()]


def test_signature_follows_state_addresses_not_input_addresses():
    a, b = torch.zeros(4), torch.zeros(4)
    assert graphs.signature([a], [b], 1.0) == graphs.signature([torch.ones(4)], [b], 1.0)
    assert graphs.signature([a], [b], 1.0) != graphs.signature([a], [torch.zeros(4)], 1.0)
    assert graphs.signature([a], [b], 1.0) != graphs.signature([a], [b], 2.0)
    assert graphs.signature([a], [b], 1.0) != graphs.signature([torch.zeros(5)], [b], 1.0)


def test_cpu_and_disabled_updates_run_eagerly(monkeypatch):
    update = graphs.GraphedUpdate(_scaled_add)
    state = [torch.zeros(3)]
    for _ in range(3):
        (total,) = update([torch.ones(3)], state, 2.0)
    assert torch.equal(state[0], torch.full((3,), 6.0)) and total.item() == 18.0
    assert not update._graphs and not graphs.enabled_for(state)
    if torch.cuda.is_available():
        monkeypatch.setenv(graphs.ENV, "0")
        assert not graphs.enabled_for([torch.zeros(1, device="cuda")])


@needs_gpu
def test_graphed_update_replays_and_recaptures_when_state_moves():
    update = graphs.GraphedUpdate(_scaled_add, max_graphs=2)
    state = [torch.zeros(3, device="cuda")]
    for step in range(1, 5):
        (total,) = update([torch.full((3,), float(step), device="cuda")], state, 0.5)
        # eager on first sight, captured on the second call, then replayed
        assert len(update._graphs) == (0 if step == 1 else 1)
    expected = 0.5 * (1 + 2 + 3 + 4)
    assert torch.equal(state[0].cpu(), torch.full((3,), expected)) and total.item() == 3 * expected
    moved = [state[0].clone()]  # new address: a new signature, never the old graph
    for _ in range(2):
        update([torch.ones(3, device="cuda")], moved, 1.0)
    assert torch.equal(moved[0].cpu(), torch.full((3,), expected + 2)) and len(update._graphs) == 2
    assert torch.equal(state[0].cpu(), torch.full((3,), expected))  # the old tensor untouched
    third = [torch.zeros(3, device="cuda")]
    for _ in range(2):
        update([torch.ones(3, device="cuda")], third, 1.0)
    assert len(update._graphs) == 2  # least recently used dropped


def _models(kind: str):
    kw = dict(dim=16, codebook_size=64, decay=0.9)
    if kind == "residual":
        return hf_vq.ResidualVQ(num_quantizers=3, **kw)
    if kind == "grouped":
        return hf_vq.GroupedResidualVQ(groups=2, num_quantizers=2, **kw)
    if kind == "sgm_ema":
        return hf_vq.EMAVectorQuantizer(n_embed=64, embedding_dim=16, decay=0.9)
    if kind == "heads":
        return hf_vq.VectorQuantize(heads=2, separate_codebook_per_head=True, **kw)
    return hf_vq.VectorQuantize(use_cosine_sim=kind == "cosine", affine_param=kind == "affine", **kw)


@needs_gpu
@pytest.mark.parametrize("kind", ["vq", "cosine", "heads", "affine", "residual", "grouped", "sgm_ema"])
def test_graphed_training_steps_equal_eager_ones(kind, monkeypatch):
    """Training steps whose codebook update is replayed as a CUDA graph give bit-identical outputs, gradients and
    state to eager steps, also after the model moves (new buffer addresses)."""
    torch.manual_seed(0)
    graphed = _models(kind).cuda().train()
    eager = copy.deepcopy(graphed)
    for step in range(6):
        if step == 3:
            graphed, eager = graphed.cpu().cuda(), eager.cpu().cuda()
        x = torch.randn(2, 16, 5, 8, device="cuda") if kind == "sgm_ema" else torch.randn(2, 40, 16, device="cuda")
        outputs = []
        for model, flag in ((graphed, "1"), (eager, "0")):
            monkeypatch.setenv(graphs.ENV, flag)
            model.train(step != 4)  # an eval call too (the affine statistics update in eval)
            xi = x.clone().requires_grad_()
            out = model(xi)
            if model.training:
                (out.quantized.square().sum() + out.loss.sum()).backward()
            outputs.append((out.quantized, out.indices, out.loss, out.perplexity, xi.grad))
        for a, b in zip(*outputs):
            assert (a is None and b is None) or torch.equal(a, b), kind
        for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
            assert torch.equal(a, b), name
    steps = sgm_ema._EMA_STEPS if kind == "sgm_ema" else ema.PLAIN_EMA_STEPS
    assert steps._graphs, "no step was replayed as a graph"
