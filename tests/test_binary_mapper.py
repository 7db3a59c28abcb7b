"""BinaryMapper against vector-quantize-pytorch 1.32 `BinaryMapper` on shared inputs and seeds.

Tolerances: indices and losses are equal (tolerance 0). The one-hot output is exactly one-hot here, while vqp's is
`one_hot + soft - soft.detach()` (within an ulp, 6e-8, of one-hot): compared at atol 1e-6. Gradients go through the
same code probabilities computed with one matmul instead of two einsums: rtol 1e-5, atol 1e-6.
"""

import math

import pytest
import torch
from transformers import AutoModel
from vector_quantize_pytorch.binary_mapper import BinaryMapper as VqpBinaryMapper

import hf_vq
from hf_vq import BinaryMapper, BinaryMapperConfig
from hf_vq.diffusers_support import DiffusersQuantizer

CALLS = [
    dict(),
    dict(return_indices=True, reduce_aux_kl_loss=False, temperature=0.7),
    dict(straight_through=True, calc_aux_loss=True, return_indices=True),
    dict(deterministic=True, return_indices=True),
]


def _pair(**kwargs):
    theirs = VqpBinaryMapper(**kwargs)
    return theirs, BinaryMapper.from_vector_quantize_pytorch(theirs)


@pytest.mark.parametrize("call", CALLS, ids=range(len(CALLS)))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_vqp(call, train):
    theirs, ours = _pair(bits=5, kl_loss_threshold=0.3)
    theirs.train(train), ours.train(train)
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)) * 2
    l1, l2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    torch.manual_seed(2)
    want = theirs(l1, **call)
    torch.manual_seed(2)
    got = ours(l2, return_dict=False, **call)
    assert len(got) == len(want) == (3 if call.get("return_indices") else 2)
    assert torch.allclose(got[0], want[0], rtol=0, atol=1e-6) and got[0].dtype == want[0].dtype
    assert ((got[0] == 0) | (got[0] == 1)).all() and torch.equal(got[0].sum(-1), torch.ones(3, 4))
    for a, b in zip(want[1:], got[1:]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if want[0].requires_grad:
        weights = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(1))
        ((want[0] * weights).sum() + want[-1].sum()).backward()
        ((got[0] * weights).sum() + got[-1].sum()).backward()
        assert torch.allclose(l1.grad, l2.grad, rtol=1e-5, atol=1e-6)


def test_training_steps_match_vqp():
    theirs, ours = _pair(bits=4)
    torch.manual_seed(0)
    enc_t = torch.nn.Linear(6, 4)
    enc_o = torch.nn.Linear(6, 4)
    enc_o.load_state_dict(enc_t.state_dict())
    target = torch.randn(16)
    opts = [torch.optim.SGD(enc_t.parameters(), lr=0.1), torch.optim.SGD(enc_o.parameters(), lr=0.1)]
    for step in range(5):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for (enc, mapper, opt) in ((enc_t, theirs, opts[0]), (enc_o, ours, opts[1])):
            torch.manual_seed(step)
            one_hot, aux = mapper(enc(x)) if mapper is theirs else mapper(enc(x), return_dict=False)
            ((one_hot @ target).square().mean() + aux).backward()
            opt.step()
            opt.zero_grad()
    for p1, p2 in zip(enc_t.parameters(), enc_o.parameters()):
        assert torch.allclose(p1, p2, rtol=1e-5, atol=1e-6)


def test_vqp_readme_example():
    mapper = BinaryMapper(8)  # vqp's positional `bits`
    logits = torch.randn(3, 4, 8)
    one_hot, indices, aux_loss = mapper(logits, return_indices=True, reduce_aux_kl_loss=False, return_dict=False)
    assert one_hot.shape == (3, 4, 256) and indices.shape == (3, 4) and aux_loss.shape == (3, 4)
    joint = mapper.log_prob(logits, indices=indices)
    assert joint.shape == (3, 4)
    assert torch.allclose(joint, mapper.log_prob(logits, one_hot=one_hot))
    assert torch.equal(one_hot.argmax(-1), indices)
    mapper.eval()
    assert torch.equal(mapper(logits, deterministic=True).quantized, mapper(logits, deterministic=True).quantized)


def test_output_and_probability_semantics():
    mapper = BinaryMapper(bits=3, deterministic_on_eval=True).eval()
    logits = torch.tensor([[4.0, -4.0, 4.0], [-4.0, -4.0, 4.0]])
    out = mapper(logits)
    # bit i is worth 2**i: [1, 0, 1] -> 5, [0, 0, 1] -> 4
    assert out.indices.tolist() == [5, 4] and torch.equal(out.one_hot, out.quantized)
    assert float(out.loss) == 0.0  # no aux loss in eval by default
    assert torch.equal(mapper.indices_to_bits(out.indices), logits > 0)
    # the joint probabilities of all codes sum to one
    all_codes = torch.arange(8).expand(2, 8)
    probs = mapper.log_prob(logits[:, None, :].expand(2, 8, 3), indices=all_codes).exp()
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    # KL hinge: uniform bits have zero KL, so the loss is 0; confident bits approach bits * log 2 - threshold
    assert float(mapper.calc_aux_loss(torch.zeros(5, 3))) == 0.0
    assert math.isclose(float(mapper.calc_aux_loss(torch.full((1, 3), 30.0))), 2 * math.log(2), rel_tol=1e-5)


def test_migration_round_trip_through_automodel(tmp_path):
    theirs = VqpBinaryMapper(bits=6, kl_loss_threshold=0.5, deterministic_on_eval=True)
    ours = BinaryMapper.from_vector_quantize_pytorch(theirs)
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is BinaryMapper and loaded.config.to_kwargs() == ours.config.to_kwargs()
    assert torch.equal(loaded.codes, theirs.codes) and torch.equal(loaded.power_two, theirs.power_two)
    logits = torch.randn(2, 5, 6)
    for train in (False, True):
        theirs.train(train), loaded.train(train)
        torch.manual_seed(0)
        want = theirs(logits, return_indices=True)
        torch.manual_seed(0)
        got = loaded(logits, return_indices=True, return_dict=False)
        assert torch.equal(want[1], got[1]) and torch.equal(want[2], got[2])


def test_diffusers_face_round_trip(tmp_path):
    mapper = BinaryMapper(bits=4, deterministic_on_eval=True).eval()
    DiffusersQuantizer.from_quantizer(mapper).save_pretrained(tmp_path)
    loaded = DiffusersQuantizer.from_pretrained(tmp_path).quantizer.eval()
    logits = torch.randn(2, 3, 4)
    assert type(loaded) is BinaryMapper and torch.equal(loaded(logits).indices, mapper(logits).indices)
    assert isinstance(hf_vq.build_quantizer("BinaryMapper", {"bits": 2}), BinaryMapper)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=0), r"bits must be an int in \[1, 62\]"),
    (dict(bits=2.0), r"bits must be an int"),
    (dict(kl_loss_threshold=float("inf")), "kl_loss_threshold must be a finite number"),
    (dict(deterministic_on_eval="yes"), "deterministic_on_eval must be a bool"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BinaryMapperConfig(**kwargs)


def test_bad_input():
    mapper = BinaryMapper(bits=4)
    with pytest.raises(ValueError, match=r"last dimension of 4 \(bits\), got shape \(2, 3\)"):
        mapper(torch.randn(2, 3))
    with pytest.raises(ValueError, match="floating point"):
        mapper(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of indices or one_hot"):
        mapper.log_prob(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 16\)"):
        mapper.log_prob(torch.randn(2, 4), indices=torch.tensor([3, 16]))
    with pytest.raises(TypeError, match="multiple values for argument 'bits'"):
        BinaryMapper(4, bits=4)
