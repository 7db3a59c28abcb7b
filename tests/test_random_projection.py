"""RandomProjectionQuantizer against vector-quantize-pytorch 1.32 on shared projections, codebooks and inputs.

Tolerances: indices exact; cross-entropy losses and gradients within 1e-6 / 1e-5 (float32)."""

import pytest
import torch
import vector_quantize_pytorch as vqp
from torch import nn
from transformers import AutoModel

import hf_vq
from hf_vq.diffusers_support import DiffusersQuantizer


def _pair(**kwargs):
    torch.manual_seed(0)
    ref = vqp.RandomProjectionQuantizer(**kwargs)
    if kwargs.get("kmeans_init"):  # k-means draws its own samples: initialize in vqp, then migrate the codebooks
        ref(torch.randn(2, 24, kwargs["dim"]))
    return ref, hf_vq.RandomProjectionQuantizer.from_vector_quantize_pytorch(ref)


@pytest.mark.parametrize("kwargs", [
    dict(dim=16, codebook_size=32, codebook_dim=4),
    dict(dim=16, codebook_size=32, codebook_dim=4, num_codebooks=3, norm=False),
    dict(dim=16, codebook_size=32, codebook_dim=6, num_codebooks=2, decay=0.9, kmeans_init=True),
])
def test_indices_and_cross_entropy_match_vqp(kwargs):
    ref, ours = _pair(**kwargs)
    ref.train(), ours.train()
    for _ in range(3):
        x = torch.randn(2, 24, 16)
        want = ref(x)
        got = ours(x, return_dict=False)
        assert torch.equal(got, want)
        out = ours(x)
        assert torch.equal(out.indices, want) and out.quantized.shape == (2, 24, ref.vq.dim)
        # targets with an ignored position
        target = want.clone()
        target[0, 0] = -1
        torch.testing.assert_close(ours(x, indices=target, return_dict=False), ref(x, indices=target),
                                   atol=1e-6, rtol=0)
    assert not ours.vq.training  # the inner quantizer stays a fixed target in training mode
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_training_an_upstream_model_on_the_targets_matches_vqp():
    ref, ours = _pair(dim=16, codebook_size=32, codebook_dim=4, num_codebooks=2)
    torch.manual_seed(1)
    encoder_ref = nn.Linear(8, 16)
    encoder_ours = nn.Linear(8, 16)
    encoder_ours.load_state_dict(encoder_ref.state_dict())
    opt_ref = torch.optim.Adam(encoder_ref.parameters(), lr=1e-2)
    opt_ours = torch.optim.Adam(encoder_ours.parameters(), lr=1e-2)
    for _ in range(4):
        feats, targets_from = torch.randn(2, 12, 8), torch.randn(2, 12, 16)
        targets = ref(targets_from)
        assert torch.equal(targets, ours(targets_from, return_dict=False))
        loss_ref = ref(encoder_ref(feats), indices=targets)
        loss_ours = ours(encoder_ours(feats), indices=targets).loss
        torch.testing.assert_close(loss_ours, loss_ref, atol=1e-6, rtol=0)
        loss_ref.backward(), loss_ours.backward()
        for p, q in zip(encoder_ours.parameters(), encoder_ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=0)
        opt_ref.step(), opt_ours.step()
        opt_ref.zero_grad(), opt_ours.zero_grad()
    for p, q in zip(encoder_ours.parameters(), encoder_ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)


def test_vqp_readme_call_and_flat_vq_kwargs():
    quantizer = hf_vq.RandomProjectionQuantizer(dim=32, num_codebooks=4, codebook_dim=8, codebook_size=64, decay=0.9)
    assert quantizer.config.vq_kwargs == {"decay": 0.9}
    assert quantizer.vq.config.decay == 0.9 and quantizer.vq.config.use_cosine_sim
    indices = quantizer(torch.randn(1, 50, 32), return_dict=False)
    assert indices.shape == (1, 50, 4) and indices.dtype == torch.long
    assert int(indices.min()) >= 0 and int(indices.max()) < 64


def test_migration_round_trip_through_save_pretrained(tmp_path):
    ref, ours = _pair(dim=16, codebook_size=32, codebook_dim=4, num_codebooks=2, decay=0.95)
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is hf_vq.RandomProjectionQuantizer and loaded.config.vq_kwargs["decay"] == 0.95
    for (k, v), (k2, v2) in zip(loaded.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    x = torch.randn(2, 9, 16)
    assert torch.equal(loaded(x, return_dict=False), ref(x))
    DiffusersQuantizer.from_quantizer(loaded).save_pretrained(tmp_path / "diffusers")
    again = DiffusersQuantizer.from_pretrained(tmp_path / "diffusers").quantizer
    assert torch.equal(again(x, return_dict=False), ref(x))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="codebook_dim must be a positive int"):
        hf_vq.RandomProjectionQuantizerConfig(codebook_dim=0)
    with pytest.raises(ValueError, match=r"vq_kwargs may not set \['heads'\]"):
        hf_vq.RandomProjectionQuantizer(dim=8, codebook_dim=4, vq_kwargs={"heads": 2})
    with pytest.raises(ValueError, match=r"unknown VectorQuantize field\(s\) \['decai'\]"):
        hf_vq.RandomProjectionQuantizerConfig(vq_kwargs={"decai": 0.9})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['decai'\]"):
        hf_vq.RandomProjectionQuantizerConfig(decai=0.9)
    with pytest.raises(ValueError, match="decay must be in"):
        hf_vq.RandomProjectionQuantizerConfig(decay=2.0)
    with pytest.raises(TypeError, match="keyword arguments only"):
        hf_vq.RandomProjectionQuantizer(8, 16)
    model = hf_vq.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, dim=8\)"):
        model(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="expected feature dim 8|x must have shape"):
        model(torch.randn(2, 5, 6))
