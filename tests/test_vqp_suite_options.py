"""vector-quantize-pytorch 1.32's own tests of the options hf_vq took over (tests/test_beam.py and the option cases of
tests/test_readme.py in lucidrains/vector-quantize-pytorch), re-expressed here and run against hf_vq through an
adapter: it builds the hf_vq class of the same name with the same arguments and calls it with `return_dict=False`,
so each case reads as it does upstream. Shapes are smaller than upstream's (CI has 2 cores)."""

import pytest
import torch
from torch import nn

import hf_vq


class Adapter:
    """A vqp-style handle on an hf_vq quantizer: calls return vqp's tuples, attributes pass through."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.model(*args, return_dict=False, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def vqp(name, **kwargs):
    """`vector_quantize_pytorch.<name>(**kwargs)`, as hf_vq."""
    return Adapter(getattr(hf_vq, name)(**kwargs))


def test_topk_and_manual_ema_update():
    """A top-1 call without EMA update, then `update_ema_indices` with its codes, equals one ordinary training step."""
    torch.manual_seed(0)
    vq1 = vqp("VectorQuantize", dim=32, codebook_size=64)
    vq2 = vqp("VectorQuantize", dim=32, codebook_size=64)
    vq2.load_state_dict(vq1.state_dict())
    x = torch.randn(1, 128, 32)
    mask = torch.randint(0, 2, (1, 128)).bool()

    vq1.train()
    quantize1, indices1, commit_loss1 = vq1(x, mask=mask)
    vq2.train()
    quantize2, indices2, commit_losses = vq2(x, mask=mask, topk=1, ema_update=False)

    assert quantize2.shape == (1, 128, 1, 32)
    assert indices2.shape == (1, 128, 1)
    assert commit_losses.shape == (1, 128, 1)
    top_quantize2, top_indices2 = quantize2[..., 0, :], indices2[..., 0]
    assert torch.allclose(commit_loss1, commit_losses.sum() / mask.sum())
    assert torch.equal(indices1, top_indices2)
    assert torch.allclose(quantize1, top_quantize2)
    assert not torch.allclose(vq1._codebook.embed_avg, vq2._codebook.embed_avg)

    vq2.update_ema_indices(x, top_indices2, mask=mask)
    assert torch.allclose(vq1._codebook.cluster_size, vq2._codebook.cluster_size)
    assert torch.allclose(vq1._codebook.embed_avg, vq2._codebook.embed_avg)
    assert torch.allclose(vq1.codebook, vq2.codebook)


@pytest.mark.parametrize("codebook_dim", (32, 16))
def test_beam_search(codebook_dim):
    residual_vq = vqp("ResidualVQ", dim=32, codebook_dim=codebook_dim, num_quantizers=4, codebook_size=64,
                      quantize_dropout=True, beam_size=2, eval_beam_size=3)
    x = torch.randn(1, 64, 32).requires_grad_()
    for _ in range(5):
        quantized, indices, commit_loss = residual_vq(x)
    assert quantized.shape == (1, 64, 32)
    assert indices.shape == (1, 64, 4)
    assert commit_loss.shape == (4,)


@pytest.mark.parametrize("quant_grad_frac", (0.0, 0.1))
@pytest.mark.parametrize("shared_codebook", (True, False))
@pytest.mark.parametrize("train", (True, False))
@pytest.mark.parametrize("implicit_neural_codebook, use_cosine_sim", ((True, False), (False, True), (False, False)))
def test_residual_vq(implicit_neural_codebook, use_cosine_sim, train, shared_codebook, quant_grad_frac):
    residual_vq = vqp("ResidualVQ", dim=16, num_quantizers=4, codebook_size=32,
                      implicit_neural_codebook=implicit_neural_codebook, use_cosine_sim=use_cosine_sim,
                      shared_codebook=shared_codebook, quant_grad_frac=quant_grad_frac)
    x = torch.randn(1, 64, 16)
    residual_vq.train(train)
    quantized, indices, commit_loss = residual_vq(x, freeze_codebook=train and not implicit_neural_codebook)
    quantized_out = residual_vq.get_output_from_indices(indices)
    assert torch.allclose(quantized, quantized_out, atol=1e-5)


def test_tiger():
    residual_vq = vqp("ResidualVQ", dim=2, codebook_size=(5, 16, 32))
    x = torch.randn(2, 2, 2)
    residual_vq.train()
    quantized, indices, commit_loss = residual_vq(x, freeze_codebook=True)
    quantized_out = residual_vq.get_output_from_indices(indices)
    assert torch.allclose(quantized, quantized_out, atol=1e-5)


def test_diveq():
    residual_vq = vqp("ResidualVQ", dim=32, num_quantizers=4, codebook_size=32, diveq=True)
    x = torch.randn(1, 64, 32)
    residual_vq.train()
    quantized, indices, commit_loss = residual_vq(x)
    assert quantized.shape == x.shape
    residual_vq.eval()
    quantized_eval, indices_eval, commit_loss_eval = residual_vq(x)
    assert quantized_eval.shape == x.shape


class CodebookTransformer(nn.Module):
    """Upstream uses an x-transformers encoder with memory tokens over the codes; one torch encoder layer plays
    that part here (the codes of a head are the sequence)."""

    def __init__(self, dim):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)

    def forward(self, codebook):
        return self.layer(codebook)


def test_fvq():
    vq = vqp("VectorQuantize", dim=32, codebook_size=64, vq_bridge=CodebookTransformer(32),
             learnable_codebook=True, ema_update=False,
             in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=1e-3))
    x = torch.randn(1, 128, 32)
    quantized, indices, commit_loss = vq(x)
    assert quantized.shape == x.shape
    assert indices.shape == (1, 128)
