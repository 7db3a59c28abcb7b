"""VectorQuantize's `vq_bridge` (vqp 1.32): a module mapping the codebook before every search. Parity with
vector-quantize-pytorch 1.32 over SGD steps (outputs, indices, losses, gradients, state), migration and
save/load round trips, errors.

Tolerances: values to the float32 defaults of `assert_close`; gradients and the state after SGD steps to 1e-5
(the bridge's parameter gradients are accumulated in a different order through our gather)."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModel
from vector_quantize_pytorch import VectorQuantize as VqpVectorQuantize

import hf_vq


class Bridge(nn.Module):
    """A small learned map of the codebook (a residual MLP with a LayerNorm)."""

    def __init__(self, dim):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, codebook):
        return codebook + self.lin(self.norm(codebook))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


CASES = {
    "plain": (dict(dim=8, codebook_size=16), False),
    "projection_dead_codes": (dict(dim=8, codebook_size=16, codebook_dim=4, threshold_ema_dead_code=1), False),
    "in_place_optimizer": (dict(dim=8, codebook_size=16), True),
}


def _twin(case):
    kwargs, in_place = CASES[case]
    torch.manual_seed(0)
    optimizer = dict(in_place_codebook_optimizer=_sgd) if in_place else {}
    ref = VqpVectorQuantize(**kwargs, vq_bridge=Bridge(kwargs.get("codebook_dim", 8)), **optimizer)
    if not in_place:
        return ref, hf_vq.VectorQuantize.from_vector_quantize_pytorch(ref)
    with pytest.raises(ValueError, match="in-place codebook optimizer"):
        hf_vq.VectorQuantize.from_vector_quantize_pytorch(ref)
    bare = copy.deepcopy(ref)
    bare.in_place_codebook_optimizer = None
    config = hf_vq.VectorQuantize.from_vector_quantize_pytorch(bare).config
    ours = hf_vq.VectorQuantize(config, vq_bridge=copy.deepcopy(ref._codebook.vq_bridge), **optimizer)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_vq_bridge_matches_vqp_over_sgd_steps(case):
    ref, ours = _twin(case)
    assert ours.config.has_vq_bridge and ours.learnable_codebook and not ours._codebook.ema_update
    plan = ours.plan  # training takes the general path (the direct eval searches the bridged codes)
    assert not (plan.fused_estimator or plan.lean_eval or plan.fused_levels)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    ref.train(), ours.train()
    for step in range(3):
        x = torch.randn(2, 6, 8, requires_grad=True)
        x_ours = x.detach().clone().requires_grad_()
        torch.manual_seed(step)
        q_ref, i_ref, l_ref = ref(x)
        torch.manual_seed(step)
        q, i, l = ours(x_ours, return_dict=False)
        assert torch.equal(i, i_ref)
        torch.testing.assert_close(q, q_ref)
        torch.testing.assert_close(l, l_ref)
        (q_ref.square().sum() + l_ref).backward()
        (q.square().sum() + l).backward()
        torch.testing.assert_close(x_ours.grad, x.grad, rtol=1e-5, atol=1e-5)
        ref_opt.step(), our_opt.step(), ref_opt.zero_grad(), our_opt.zero_grad()
    ref_state = ref.state_dict()
    assert set(ours.state_dict()) == set(ref_state)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-5, atol=1e-5, msg=key)


def test_vq_bridge_round_trip_and_lookup(tmp_path):
    ref, ours = _twin("plain")
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, vq_bridge=Bridge(8)).eval()
    x = torch.randn(2, 5, 8)
    q_ref, i_ref, _ = ref.eval()(x)
    out = loaded(x)
    assert torch.equal(out.indices, i_ref)
    torch.testing.assert_close(out.quantized, q_ref)
    # lookup goes through the bridge, so it gives what forward returned
    torch.testing.assert_close(loaded.get_output_from_indices(out.indices), out.quantized)
    with pytest.raises(ValueError, match="needs a vq_bridge module"):
        AutoModel.from_pretrained(tmp_path)


def test_vq_bridge_errors():
    with pytest.raises(ValueError, match="needs a vq_bridge module"):
        hf_vq.VectorQuantize(dim=8, codebook_size=16, has_vq_bridge=True)
    with pytest.raises(ValueError, match="has_vq_bridge=True"):
        hf_vq.VectorQuantize(hf_vq.VectorQuantizeConfig(dim=8, codebook_size=16), vq_bridge=Bridge(8))
    with pytest.raises(ValueError, match="learnable_codebook=True and ema_update=False"):
        hf_vq.VectorQuantizeConfig(dim=8, codebook_size=16, has_vq_bridge=True, learnable_codebook=False)
    with pytest.raises(ValueError, match="unknown"):
        hf_vq.ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, has_vq_bridge=True)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="vq_bridge"):
        hf_vq.ResidualVQ.from_vector_quantize_pytorch(
            __import__("vector_quantize_pytorch").ResidualVQ(dim=8, num_quantizers=2, codebook_size=4,
                                                             vq_bridge=Bridge(8)))
