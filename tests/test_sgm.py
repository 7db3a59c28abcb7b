"""The sgm / taming quantizers against the seed formulas (computed independently here), diffusers'
VectorQuantizer, and sgm state-dict keys."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import VectorQuantizer as DiffusersVectorQuantizer

import hf_vq


def _seed_vq(z, embed, beta, legacy=False):
    """CogVideo sgm VectorQuantizer.forward for (b, c, h, w) input, written out directly."""
    zc = z.permute(0, 2, 3, 1)
    flat = zc.reshape(-1, embed.shape[1])
    d = (flat**2).sum(1, keepdim=True) + (embed**2).sum(1) - 2 * flat @ embed.t()
    idx = d.argmin(1)
    zq = embed[idx].view(zc.shape)
    commit, book = ((zq.detach() - zc) ** 2).mean(), ((zq - zc.detach()) ** 2).mean()
    loss = commit + beta * book if legacy else beta * commit + book
    return (zc + (zq - zc).detach()).permute(0, 3, 1, 2), idx, loss


@pytest.mark.parametrize("legacy", [False, True])
def test_vector_quantizer_matches_the_seed_formula(legacy):
    cls = hf_vq.VectorQuantizer2 if legacy else hf_vq.VectorQuantizer
    q = cls(32, 4, 0.25).train()
    z = torch.randn(2, 4, 5, 5, requires_grad=True)
    ref_q, ref_idx, ref_loss = _seed_vq(z, q.embedding.weight, 0.25, legacy=legacy)
    out = q(z, return_dict=True)
    assert torch.equal(out.indices.reshape(-1), ref_idx)
    torch.testing.assert_close(out.quantized, ref_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-7, rtol=1e-6)
    # gradients: straight-through to z, codebook term to the embedding
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and q.embedding.weight.grad.abs().sum() > 0


def test_vector_quantizer_sgm_call_convention_and_perplexity():
    q = hf_vq.VectorQuantizer(16, 4, beta=0.25, log_perplexity=True)
    z = torch.randn(2, 4, 3, 3)
    z_q, log = q(z)
    idx = log["min_encoding_indices"]
    assert idx.shape == (18,)
    probs = torch.bincount(idx, minlength=16).float() / 18
    expected = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
    torch.testing.assert_close(log["perplexity"], expected)
    assert int(log["cluster_usage"]) == idx.unique().numel()
    assert set(log) == {"loss/vq", "perplexity", "cluster_usage", "min_encoding_indices"}
    assert list(q.get_trainable_parameters()) == list(q.parameters())


def test_vector_quantizer2_matches_diffusers_vector_quantizer():
    ours = hf_vq.VectorQuantizer2(16, 4, 0.25, sane_index_shape=True)
    theirs = DiffusersVectorQuantizer(16, 4, beta=0.25, sane_index_shape=True, legacy=True)
    theirs.load_state_dict(ours.state_dict())  # same key: embedding.weight
    z = torch.randn(2, 4, 6, 6)
    a_q, a_loss, (_, a_enc, a_idx) = ours(z)
    b_q, b_loss, (_, b_enc, b_idx) = theirs(z)
    assert torch.equal(a_idx, b_idx) and a_enc is None and b_enc is None
    torch.testing.assert_close(a_q, b_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(a_loss, b_loss)
    torch.testing.assert_close(ours.get_codebook_entry(a_idx.reshape(-1), (2, 6, 6, 4)),
                               theirs.get_codebook_entry(b_idx.reshape(-1), (2, 6, 6, 4)))


def test_remap_with_unknown_index_modes(tmp_path):
    used = np.array([3, 7, 1, 12])
    path = tmp_path / "used.npy"
    np.save(path, used)
    z = torch.randn(2, 4, 3, 3)
    for unknown in ("extra", 2, "random"):
        q = hf_vq.VectorQuantizer(16, 4, remap=str(path), unknown_index=unknown, sane_index_shape=True)
        full = hf_vq.VectorQuantizer(16, 4)
        full.load_state_dict({"embedding.weight": q.embedding.weight})
        _, log = q(z)
        full_idx = full(z)[1]["min_encoding_indices"].reshape(2, 3, 3)
        idx = log["min_encoding_indices"]
        for f, r in zip(full_idx.reshape(-1).tolist(), idx.reshape(-1).tolist()):
            if f in used.tolist():
                assert r == used.tolist().index(f)
            elif unknown == "extra":
                assert r == 4
            elif unknown == 2:
                assert r == 2
            else:
                assert 0 <= r < 4
        back = q.unmap_to_all(idx.reshape(2, -1))
        known = torch.isin(full_idx.reshape(2, -1), torch.as_tensor(used))
        assert torch.equal(back[known], full_idx.reshape(2, -1)[known])
    assert q.config.remap_size == 4


def test_remap_survives_save_and_load_without_the_npy(tmp_path):
    np.save(tmp_path / "used.npy", np.array([5, 2, 9]))
    q = hf_vq.VectorQuantizer(16, 4, remap=str(tmp_path / "used.npy"), unknown_index="extra")
    q.save_pretrained(tmp_path / "model")
    (tmp_path / "used.npy").unlink()
    loaded = hf_vq.VectorQuantizer.from_pretrained(tmp_path / "model")
    assert loaded.used.tolist() == [5, 2, 9] and loaded.re_embed == 4


def test_ema_vector_quantizer_update_matches_the_seed_formula():
    torch.manual_seed(0)
    q = hf_vq.EMAVectorQuantizer(8, 3, 0.25, decay=0.9, eps=1e-5).train()
    w0 = q.embedding.weight.clone()
    cs0, avg0 = q.embedding.cluster_size.clone(), q.embedding.embed_avg.clone()
    z = torch.randn(2, 3, 4, 4)
    z_q, log = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    idx = ((flat[:, None] - w0[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(log["encoding_indices"], idx)
    onehot = torch.zeros(flat.shape[0], 8).scatter_(1, idx[:, None], 1.0)  # dense reference, test only
    cs = cs0 * 0.9 + onehot.sum(0) * 0.1
    avg = avg0 * 0.9 + (onehot.t() @ flat) * 0.1
    n = cs.sum()
    weight = avg / ((cs + 1e-5) / (n + 8 * 1e-5) * n).unsqueeze(1)
    torch.testing.assert_close(q.embedding.cluster_size, cs)
    torch.testing.assert_close(q.embedding.embed_avg, avg, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q.embedding.weight, weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log["loss/vq"], 0.25 * F.mse_loss(w0[idx].view(2, 4, 4, 3), z.permute(0, 2, 3, 1)))
    assert sorted(q.state_dict()) == ["embedding.cluster_size", "embedding.embed_avg", "embedding.weight"]


def test_gumbel_quantizer_matches_the_seed_formula():
    q = hf_vq.GumbelQuantizer(8, 4, 16, straight_through=True, kl_weight=5e-4, temp_init=1.0).train()
    z = torch.randn(2, 8, 3, 3)
    torch.manual_seed(5)
    z_q, log = q(z, return_logits=True)
    logits = q.proj(z)
    torch.manual_seed(5)
    soft = F.gumbel_softmax(logits, tau=1.0, dim=1, hard=True)
    expected = torch.einsum("bnhw,nd->bdhw", soft, q.embed.weight)
    qy = F.softmax(logits, dim=1)
    kl = 5e-4 * torch.sum(qy * torch.log(qy * 16 + 1e-10), dim=1).mean()
    torch.testing.assert_close(z_q, expected)
    torch.testing.assert_close(log["loss/vq"], kl)
    torch.testing.assert_close(log["logits"], logits)
    idx = q(z, return_dict=True).indices
    torch.testing.assert_close(q.get_codebook_entry(idx.reshape(-1), (2, 3, 3, 4)),
                               q.embed.weight[idx].permute(0, 3, 1, 2))


def test_gumbel_quantize_vq_interface():
    q = hf_vq.GumbelQuantize(8, 4, 16).eval()
    z = torch.randn(2, 8, 3, 3)
    torch.manual_seed(2)  # the seed samples Gumbel noise in eval too (hard one-hot)
    z_q, loss, (p, enc, idx) = q(z)
    assert p is None and enc is None and idx.shape == (2, 3, 3)
    plain = hf_vq.GumbelQuantize(8, 4, 16, use_vqinterface=False)
    plain.load_state_dict(q.state_dict())
    torch.manual_seed(2)
    _, _, idx2 = plain.eval()(z)
    assert torch.equal(idx, idx2)


def test_vector_quantizer_with_input_projection_4d_and_5d():
    q = hf_vq.VectorQuantizerWithInputProjection(8, 16, 4, output_dim=8)
    for shape in [(2, 8, 3, 3), (2, 8, 2, 3, 3)]:
        z = torch.randn(*shape)
        z_q, log = q(z)
        assert z_q.shape == shape
        tokens = z.flatten(2).transpose(1, 2)
        inner = hf_vq.VectorQuantizer(16, 4, beta=1.0)
        inner.load_state_dict({"embedding.weight": q.embedding.weight})
        ref_q, ref_log = inner(q.proj_in(tokens))
        assert torch.equal(log["min_encoding_indices"], ref_log["min_encoding_indices"])
        torch.testing.assert_close(z_q, q.proj_out(ref_q).transpose(1, 2).reshape(shape))
    no_out = hf_vq.VectorQuantizerWithInputProjection(8, 16, 4)
    assert no_out(torch.randn(2, 8, 3, 3))[0].shape == (2, 9, 4)  # sgm keeps tokens without output_dim


def test_sgm_state_dict_keys_load_unchanged():
    sgm_state = {"embedding.weight": torch.randn(16, 4)}
    q = hf_vq.VectorQuantizer(n_e=16, e_dim=4)
    q.load_state_dict(sgm_state)
    assert torch.equal(q.embedding.weight, sgm_state["embedding.weight"])
    g = hf_vq.GumbelQuantizer(8, 4, 16)
    g.load_state_dict({"proj.weight": torch.randn(16, 8, 1, 1), "proj.bias": torch.randn(16),
                       "embed.weight": torch.randn(16, 4)})
    wn = hf_vq.VectorQuantizer(16, 4, embedding_weight_norm=True)
    assert sorted(wn.state_dict()) == ["embedding.weight_g", "embedding.weight_v"]


def test_positional_arguments_follow_sgm_order():
    q = hf_vq.VectorQuantizer(16, 4, 0.5, None, "extra", True)
    assert (q.config.n_e, q.config.e_dim, q.config.beta, q.config.unknown_index, q.config.sane_index_shape) == (
        16, 4, 0.5, "extra", True)
    e = hf_vq.EMAVectorQuantizer(16, 4, 0.3, 0.95)
    assert (e.config.beta, e.config.decay) == (0.3, 0.95)


def test_errors():
    with pytest.raises(ValueError, match="unknown_index must be 'random', 'extra' or an int"):
        hf_vq.VectorQuantizer(16, 4, unknown_index="bogus")
    with pytest.raises(ValueError, match="remap file 'missing.npy' does not exist"):
        hf_vq.VectorQuantizer(16, 4, remap="missing.npy")
    q = hf_vq.VectorQuantizer(16, 4)
    with pytest.raises(ValueError, match="expected 4 channels, got 3"):
        q(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        q(torch.full((2, 4, 2, 2), float("inf")))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 16\)"):
        q.get_codebook_entry(torch.tensor([16]))
    with pytest.raises(ValueError, match="expected \\(b, 8, h, w\\) input"):
        hf_vq.GumbelQuantizer(8, 4, 16)(torch.randn(2, 8, 3))
