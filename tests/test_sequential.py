"""`hf_vq.Sequential` against vqp 1.32's `Sequential` on the same modules, its keyword arguments, outputs,
gradients and errors."""

import pytest
import torch
import vector_quantize_pytorch as vqp
from torch import nn

import hf_vq


def _linears(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(8, 4), nn.Linear(4, 8)


def test_matches_vqp_sequential_with_fsq():
    before, after = _linears()
    ours = hf_vq.Sequential(before, hf_vq.FSQ(levels=[8, 5, 5, 5]), after)
    theirs = vqp.Sequential(before, vqp.FSQ(levels=[8, 5, 5, 5]), after)
    x = torch.randn(2, 30, 8)
    quantized, indices = ours(x, return_dict=False)
    ref_quantized, ref_indices = theirs(x)
    torch.testing.assert_close(quantized, ref_quantized, rtol=1e-6, atol=1e-6)
    assert torch.equal(indices.long(), ref_indices.long())


def test_matches_vqp_sequential_with_vector_quantize_and_passes_keyword_arguments():
    torch.manual_seed(0)
    ref_vq = vqp.VectorQuantize(dim=4, codebook_size=32)
    with torch.no_grad():
        ref_vq._codebook.embed.copy_(torch.randn_like(ref_vq._codebook.embed))
    before, after = _linears(1)
    theirs = vqp.Sequential(before, ref_vq, after).eval()
    ours = hf_vq.Sequential(before, hf_vq.VectorQuantize.from_vector_quantize_pytorch(ref_vq), after).eval()
    x = torch.randn(2, 30, 8)
    mask = torch.rand(2, 30) > 0.3
    quantized, indices, loss = ours(x, mask=mask, return_dict=False)
    ref_quantized, ref_indices, ref_loss = theirs(x, mask=mask)
    torch.testing.assert_close(quantized, ref_quantized)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(loss, ref_loss)


def test_returns_the_quantizers_output_with_the_last_modules_features():
    before, after = _linears()
    fsq = hf_vq.FSQ(levels=[8, 5, 5, 5])
    seq = hf_vq.Sequential(before, fsq, after)
    x = torch.randn(2, 10, 8)
    out = seq(x)
    direct = fsq(before(x))
    assert isinstance(out, hf_vq.FSQOutput)
    torch.testing.assert_close(out.quantized, after(direct.quantized))
    assert torch.equal(out.indices, direct.indices)
    assert seq.quantizer is fsq
    # a quantizer last: its output as it is
    assert torch.equal(hf_vq.Sequential(before, fsq)(x).quantized, direct.quantized)


def test_gradients_reach_the_modules_on_both_sides():
    before, after = _linears()
    seq = hf_vq.Sequential(before, hf_vq.FSQ(levels=[8, 5, 5, 5]), after)
    seq(torch.randn(2, 10, 8)).quantized.square().sum().backward()
    assert before.weight.grad is not None and before.weight.grad.abs().sum() > 0
    assert after.weight.grad is not None and after.weight.grad.abs().sum() > 0


def test_errors():
    before, after = _linears()
    with pytest.raises(ValueError, match="exactly one hf_vq quantizer among its modules, got 0"):
        hf_vq.Sequential(before, after)
    with pytest.raises(ValueError, match="exactly one hf_vq quantizer among its modules, got 2"):
        hf_vq.Sequential(hf_vq.FSQ(levels=[8, 5, 5, 5]), hf_vq.FSQ(levels=[8, 5, 5, 5]))
    rpq = hf_vq.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4)
    seq = hf_vq.Sequential(rpq, nn.Identity())
    with pytest.raises(ValueError, match="RandomProjectionQuantizer returned no quantized features"):
        seq(torch.randn(2, 10, 8), return_dict=False)
