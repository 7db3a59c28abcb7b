"""The sgm / taming quantizers against the seed formulas (computed independently here), diffusers'
VectorQuantizer, and sgm state-dict keys."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
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
    assert q(torch.full((2, 4, 2, 2), float("inf")), return_dict=True).quantized.shape == (2, 4, 2, 2)  # (no value check)
    ema = hf_vq.EMAVectorQuantizer(n_embed=16, embedding_dim=4).train()
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or Inf values .* not updated"):  # refused before the EMA update
        ema(torch.full((2, 4, 2, 2), float("inf")), return_dict=True)
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    with pytest.raises(ValueError, match=r"indices must be in \[0, 16\)"):
        q.get_codebook_entry(torch.tensor([16]))
    # float indices (1.7) are rejected, never truncated to 1 nor left to a raw torch error
    with pytest.raises(ValueError, match="indices must be an integer tensor, got dtype torch.float32"):
        q.get_codebook_entry(torch.tensor([1.7, 2.0]))
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        hf_vq.VectorQuantizer(16, 4, remap=None).get_codebook_entry(torch.tensor([1.7]), (1, 1, 1, 4))
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        hf_vq.GumbelQuantizer(8, 4, 16).get_codebook_entry(torch.full((4,), 1.7), (1, 2, 2, 4))
    with pytest.raises(ValueError, match="expected \\(b, 8, h, w\\) input"):
        hf_vq.GumbelQuantizer(8, 4, 16)(torch.randn(2, 8, 3))


# -- hand-checked small cases, remap formula, dtype, interfaces, validation, state ------------------------------


def _line_codebook(cls=hf_vq.VectorQuantizer, **kwargs):
    q = cls(4, 1, 0.25, **kwargs)
    q.load_state_dict({"embedding.weight": torch.tensor([[0.0], [1.0], [2.0], [3.0]])})
    return q


@pytest.mark.parametrize("legacy", [False, True])
def test_loss_terms_and_perplexity_by_hand(legacy):
    q = _line_codebook(hf_vq.VectorQuantizer, log_perplexity=True, legacy=legacy)
    z = torch.tensor([0.1, -0.2, 1.3, 2.0]).view(1, 4, 1).requires_grad_()  # (b, n, e_dim=1)
    z_q, log = q(z)
    assert log["min_encoding_indices"].tolist() == [0, 0, 1, 2]
    # both terms equal 0.035 in value: loss = (1 + beta) * 0.035 either way; legacy moves beta between gradients
    torch.testing.assert_close(log["loss/vq"], torch.tensor(1.25 * 0.035))
    # usage (2, 1, 1, 0) / 4 -> perplexity exp(H) = 2 ** 1.5
    torch.testing.assert_close(log["perplexity"], torch.tensor(2**1.5))
    assert int(log["cluster_usage"]) == 3
    log["loss/vq"].backward()
    diff = torch.tensor([0.1, -0.2, 0.3, 0.0])  # z - z_q
    z_weight, code_weight = (1.0, 0.25) if legacy else (0.25, 1.0)
    torch.testing.assert_close(z.grad.view(-1), z_weight * 2 * diff / 4)
    code_grad = -code_weight * 2 * torch.tensor([0.1 - 0.2, 0.3, 0.0, 0.0]) / 4
    torch.testing.assert_close(q.embedding.weight.grad.view(-1), code_grad)
    torch.testing.assert_close(z_q, torch.tensor([0.0, 0.0, 1.0, 2.0]).view(1, 4, 1))


def _sgm_remap_to_used(inds, used, unknown_index):
    """sgm's AbstractQuantizer.remap_to_used (match tensor + argmax), written out for int unknown_index."""
    match = (inds[:, :, None] == used[None, None, :]).long()
    new = match.argmax(-1)
    new[match.sum(2) < 1] = unknown_index
    return new


def test_ema_quantizer_reports_a_non_finite_batch_at_the_next_update(monkeypatch):
    """The GPU's way (on the CPU, `report_finite` handing back a `PendingCheck`): a NaN batch leaves the EMA state
    as it was without raising; the next training call raises and does not update either; the one after trains."""
    from hf_vq.models import sgm_ema
    from hf_vq.ops.ema import PendingCheck
    monkeypatch.setattr(sgm_ema, "report_finite", lambda finite, what: PendingCheck(finite, what))
    ema = hf_vq.EMAVectorQuantizer(n_embed=16, embedding_dim=4).train()
    ema(torch.randn(2, 4, 3, 3), return_dict=True)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    bad = torch.randn(2, 4, 3, 3)
    bad[1, 2, 0, 1] = float("nan")
    ema(bad, return_dict=True)
    with pytest.raises(ValueError, match=r"an earlier call's batch had NaN or Inf values \(codebook EMA statistics\)"):
        ema(torch.randn(2, 4, 3, 3), return_dict=True)
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    ema(torch.randn(2, 4, 3, 3), return_dict=True)
    assert not torch.equal(ema.state_dict()["embedding.embed_avg"], before["embedding.embed_avg"])


def test_remap_op_matches_sgm_formula_including_duplicates():
    from hf_vq.ops.remap import remap_to_used, resolve_unknown_index, unmap_to_all

    used = torch.tensor([3, 7, 1, 7, 12])  # 7 twice: the first position wins, as sgm's argmax
    inds = torch.randint(0, 16, (3, 40), generator=torch.Generator().manual_seed(0))
    for unknown in ("extra", 0, 3):
        unk, re_embed = resolve_unknown_index(unknown, used.numel())
        ours = remap_to_used(inds, used, 16, unk, re_embed)
        assert torch.equal(ours, _sgm_remap_to_used(inds, used, unk))
        back = unmap_to_all(ours, used, re_embed)
        expected = used[ours.masked_fill(ours >= used.numel(), 0)]  # sgm: the extra index maps to used[0]
        assert torch.equal(back, expected)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    r1 = remap_to_used(inds, used, 16, "random", 5, generator=g1)
    r2 = remap_to_used(inds, used, 16, "random", 5, generator=g2)
    assert torch.equal(r1, r2) and int(r1.min()) >= 0 and int(r1.max()) < 5
    with pytest.raises(ValueError, match=r"remapped indices must be in \[0, 5\)"):
        unmap_to_all(torch.tensor([[5]]), used, 5)


@pytest.mark.parametrize("unknown", ["extra", 1])
def test_remap_matches_diffusers_vector_quantizer(tmp_path, unknown):
    np.save(tmp_path / "used.npy", np.array([2, 9, 4, 11, 0]))
    kwargs = dict(remap=str(tmp_path / "used.npy"), unknown_index=unknown, sane_index_shape=True)
    ours = hf_vq.VectorQuantizer2(16, 4, 0.25, **kwargs)
    theirs = DiffusersVectorQuantizer(16, 4, beta=0.25, legacy=True, **kwargs)
    theirs.load_state_dict(ours.state_dict())  # embedding.weight and used
    z = torch.randn(2, 4, 5, 5)
    a_q, a_loss, (_, _, a_idx) = ours(z)
    b_q, b_loss, (_, _, b_idx) = theirs(z)
    assert torch.equal(a_idx, b_idx)
    torch.testing.assert_close(a_q, b_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(a_loss, b_loss)
    torch.testing.assert_close(ours.get_codebook_entry(a_idx, (2, 5, 5, 4)),
                               theirs.get_codebook_entry(b_idx.clone(), (2, 5, 5, 4)))


def test_remap_with_codes_outside_the_codebook_is_rejected(tmp_path):
    np.save(tmp_path / "used.npy", np.array([2, 16]))
    with pytest.raises(ValueError, match=r"used indices must be in \[0, 16\)"):
        hf_vq.VectorQuantizer(16, 4, remap=str(tmp_path / "used.npy"))


def test_sane_index_shape_for_token_and_video_inputs():
    q = hf_vq.VectorQuantizer(16, 4, sane_index_shape=True)
    assert q(torch.randn(2, 7, 4))[1]["min_encoding_indices"].shape == (2, 7)
    z_q, log = q(torch.randn(2, 4, 3, 5, 5))  # (b, c, t, h, w): an hf_vq extension (sgm stops at 4D)
    assert z_q.shape == (2, 4, 3, 5, 5) and log["min_encoding_indices"].shape == (2, 3, 5, 5)
    plain = hf_vq.VectorQuantizer(16, 4)
    assert plain(torch.randn(2, 4, 3, 3))[1]["min_encoding_indices"].shape == (18,)  # sgm's flat indices


def test_codebook_entry_with_and_without_shape():
    q = hf_vq.VectorQuantizer(16, 4)
    idx = torch.tensor([[3, 0], [15, 7]])
    assert torch.equal(q.get_codebook_entry(idx.reshape(-1)), q.embedding.weight[idx.reshape(-1)])
    entry = q.get_codebook_entry(idx.reshape(-1), (1, 2, 2, 4))
    assert torch.equal(entry, q.embedding.weight[idx].unsqueeze(0).permute(0, 3, 1, 2))


def test_embedding_weight_norm_searches_the_current_codebook(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        q = hf_vq.VectorQuantizer(4, 1, embedding_weight_norm=True)
    v = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    q.load_state_dict({"embedding.weight_g": torch.tensor([[6.0]]), "embedding.weight_v": v})
    # weight = g * v / ||v|| = 6 v / sqrt(14): the search must use it on the very first call
    codes = 6 * v / 14**0.5
    z = codes.view(1, 4, 1) + 0.01
    z_q, log = q(z)
    assert log["min_encoding_indices"].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(z_q, codes.view(1, 4, 1))
    q.save_pretrained(tmp_path)
    loaded = hf_vq.VectorQuantizer.from_pretrained(tmp_path)
    assert torch.equal(loaded(z)[0], z_q)


@pytest.mark.parametrize("name", ["VectorQuantizer", "VectorQuantizer2", "EMAVectorQuantizer"])
def test_output_keeps_the_input_dtype(name):
    q = getattr(hf_vq, name)(16, 4).train()
    codebook = q.embedding.weight.detach().clone()  # before the EMA step
    out = q(torch.randn(2, 4, 3, 3).bfloat16(), return_dict=True)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.bfloat16
    expected = codebook[out.indices.reshape(-1)].view(2, 3, 3, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.quantized.float(), expected, atol=2e-2, rtol=0)  # straight-through in bf16


def test_vector_quantizer2_gumbel_compatible_signature():
    q = hf_vq.VectorQuantizer2(16, 4, 0.25)
    z = torch.randn(1, 4, 2, 2)
    assert torch.equal(q(z, temp=1.0)[0], q(z)[0])
    for kwargs in (dict(temp=0.5), dict(rescale_logits=True), dict(return_logits=True)):
        with pytest.raises(ValueError, match="only for interface compatibility"):
            q(z, **kwargs)


def test_gumbel_quantize_return_logits_follows_taming():
    z = torch.randn(1, 8, 2, 2)
    with_vq = hf_vq.GumbelQuantize(8, 4, 16).eval()
    assert len(with_vq(z, return_logits=True)) == 4 and with_vq(z, return_logits=True)[3].shape == (1, 16, 2, 2)
    plain = hf_vq.GumbelQuantize(8, 4, 16, use_vqinterface=False).eval()
    assert len(plain(z, return_logits=True)) == 3  # taming ignores return_logits without the VQ interface


def test_taming_positional_order():
    q = hf_vq.VectorQuantizer2(16, 4, 0.5, None, "random", True, False)
    assert (q.config.sane_index_shape, q.config.legacy) == (True, False)
    g = hf_vq.GumbelQuantize(8, 4, 16, False, 1e-3, 0.7, False)
    assert (g.config.straight_through, g.config.kl_weight, g.temperature, g.config.use_vqinterface) == (
        False, 1e-3, 0.7, False)
    with pytest.raises(ValueError, match="n_e given twice"):
        hf_vq.VectorQuantizer(16, 4, n_e=8)


def test_sgm_classes_return_the_tuple_by_default_and_after_reload(tmp_path):
    q = hf_vq.VectorQuantizer(16, 4)
    z = torch.randn(1, 4, 2, 2)
    assert isinstance(q(z), tuple)
    assert isinstance(q(z, return_dict=True), hf_vq.models.sgm.SgmQuantizerOutput)
    q.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is hf_vq.VectorQuantizer and isinstance(loaded(z), tuple)
    assert hf_vq.VectorQuantizer(16, 4, return_dict=True)(z).quantized.shape == z.shape


@pytest.mark.parametrize("cls, kwargs, match", [
    (hf_vq.VectorQuantizer, dict(n_e=0, e_dim=4), "n_e must be a positive int"),
    (hf_vq.VectorQuantizer, dict(n_e=8, e_dim=4, beta=-1.0), "beta must be a number >= 0"),
    (hf_vq.VectorQuantizer, dict(n_e=8, e_dim=4, legacy="yes"), "legacy must be a bool"),
    (hf_vq.EMAVectorQuantizer, dict(n_embed=8, embedding_dim=4, decay=1.5), r"decay must be a number in \[0, 1\]"),
    (hf_vq.EMAVectorQuantizer, dict(n_embed=8, embedding_dim=4, eps=0.0), "eps must be a number > 0"),
    (hf_vq.EMAVectorQuantizer, dict(n_embed=8, embedding_dim=2.5), "embedding_dim must be a positive int"),
    (hf_vq.GumbelQuantizer, dict(num_hiddens=8, embedding_dim=4, n_embed=16, temp_init=0), "temp_init must be"),
    (hf_vq.GumbelQuantizer, dict(num_hiddens=8, embedding_dim=4, n_embed=16, kl_weight=-1), "kl_weight must be"),
    (hf_vq.GumbelQuantize, dict(num_hiddens=8, embedding_dim=4, n_embed=16, use_vqinterface=1), "use_vqinterface"),
    (hf_vq.VectorQuantizerWithInputProjection, dict(input_dim=8, n_codes=0, codebook_dim=4), "n_codes must be"),
    (hf_vq.VectorQuantizerWithInputProjection, dict(input_dim=8, n_codes=8, codebook_dim=4, output_dim=0),
     "output_dim must be None or a positive int"),
    (hf_vq.VectorQuantizer, dict(n_e=8, e_dim=4, bogus=1), r"unknown field\(s\) \['bogus'\]"),
])
def test_config_validation_names_the_field(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_inputs_and_checkpoints():
    q = hf_vq.VectorQuantizer(16, 4)
    with pytest.raises(ValueError, match="is empty"):
        q(torch.randn(0, 4, 2, 2))
    with pytest.raises(ValueError, match="floating point"):
        q(torch.ones(2, 4, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="must have rank"):
        q(torch.randn(1, 4, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="expected \\(b, 4, h, w\\)"):
        hf_vq.EMAVectorQuantizer(16, 4)(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="needs `shape` when a remap is used"):
        _remapped_without_shape()
    with pytest.raises(RuntimeError, match="size mismatch for embedding.weight"):
        q.load_state_dict({"embedding.weight": torch.randn(8, 4)})
    with pytest.raises(ValueError, match="does not match 5 indices"):
        hf_vq.GumbelQuantizer(8, 4, 16).get_codebook_entry(torch.zeros(5, dtype=torch.long), (1, 2, 2, 4))


def _remapped_without_shape():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        np.save(f"{d}/used.npy", np.array([1, 2]))
        q = hf_vq.VectorQuantizer(16, 4, remap=f"{d}/used.npy")
    q.get_codebook_entry(torch.tensor([0, 1]))


def _ema_reference_step(state, flat, decay, eps, k):
    """sgm's EmbeddingEMA step with a dense one-hot (test-only reference)."""
    w, cs, avg = state
    idx = torch.cdist(flat, w).argmin(1)
    onehot = torch.zeros(flat.shape[0], k).scatter_(1, idx[:, None], 1.0)
    cs = cs * decay + onehot.sum(0) * (1 - decay)
    avg = avg * decay + (onehot.t() @ flat) * (1 - decay)
    n = cs.sum()
    return (avg / ((cs + eps) / (n + k * eps) * n).unsqueeze(1), cs, avg), idx


def test_ema_training_resumes_exactly_after_save_and_load(tmp_path):
    torch.manual_seed(1)
    q = hf_vq.EMAVectorQuantizer(8, 3, 0.25, 0.8, 1e-5).train()
    sgm_state = {"embedding.weight": torch.randn(8, 3), "embedding.cluster_size": torch.zeros(8)}
    sgm_state["embedding.embed_avg"] = sgm_state["embedding.weight"].clone()
    q.load_state_dict(sgm_state)  # sgm's EmbeddingEMA keys, unchanged
    ref = (sgm_state["embedding.weight"], sgm_state["embedding.cluster_size"], sgm_state["embedding.embed_avg"])
    batches = [torch.randn(2, 3, 4, 4) for _ in range(4)]
    for z in batches[:3]:
        _, log = q(z)
        ref, idx = _ema_reference_step(ref, z.permute(0, 2, 3, 1).reshape(-1, 3), 0.8, 1e-5, 8)
        assert torch.equal(log["encoding_indices"], idx)
    for name, expected in zip(("weight", "cluster_size", "embed_avg"), ref):
        torch.testing.assert_close(getattr(q.embedding, name), expected, atol=1e-5, rtol=1e-5)
    q.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).train()
    for m in (q, loaded):
        m(batches[3])
    for key, value in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    q.eval()(batches[0])
    assert torch.equal(q.embedding.weight, loaded.embedding.weight)  # eval: no update


@pytest.mark.parametrize("sync", [None, False])
def test_ema_statistics_are_summed_over_processes(monkeypatch, sync):
    """A stand-in for a 2-rank group where the other rank sees the same batch: its all-reduce doubles the
    counts and sums, so with sync the step equals one process on the batch twice (gloo itself is exercised
    by tests/test_distributed.py's all_reduce_sum_ tests)."""
    from hf_vq import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce_sum_", lambda *ts: [t.mul_(2) for t in ts])
    torch.manual_seed(0)
    synced = hf_vq.EMAVectorQuantizer(8, 3, 0.25, 0.9, sync_codebook=sync).train()
    torch.manual_seed(0)
    single = hf_vq.EMAVectorQuantizer(8, 3, 0.25, 0.9, sync_codebook=False).train()
    z = torch.randn(2, 3, 2, 2)
    synced(z)
    single(torch.cat([z, z]) if sync is None else z)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[key], value, atol=1e-6, rtol=1e-6)


def test_vector_quantizer2_takes_the_quantizer_of_a_diffusers_vq_model():
    """hf_vq.VQAutoencoder's contract: diffusers VQModel's `quantize.*` weights load into VectorQuantizer2
    (its defaults beta=0.25, legacy=True are VQModel's) and reproduce VQModel.quantize exactly."""
    from diffusers import VQModel

    torch.manual_seed(0)
    vq_model = VQModel(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, num_vq_embeddings=16,
                       vq_embed_dim=4, layers_per_block=1).eval()
    state = {k.removeprefix("quantize."): v for k, v in vq_model.state_dict().items() if k.startswith("quantize.")}
    ours = hf_vq.VectorQuantizer2(n_e=16, e_dim=4)
    ours.load_state_dict(state)
    h = vq_model.quant_conv(vq_model.encoder(torch.randn(2, 3, 8, 8)))
    a_q, a_loss, (_, _, a_idx) = ours(h)
    b_q, b_loss, (_, _, b_idx) = vq_model.quantize(h)
    assert torch.equal(a_idx, b_idx)
    torch.testing.assert_close(a_q, b_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(a_loss, b_loss)


def test_gumbel_quantizer_with_remap_matches_the_seed_formula(tmp_path):
    used = np.array([5, 1, 9, 12])
    np.save(tmp_path / "used.npy", used)
    q = hf_vq.GumbelQuantizer(8, 4, 16, remap=str(tmp_path / "used.npy"), unknown_index="extra").train()
    z = torch.randn(2, 8, 3, 3)
    torch.manual_seed(4)
    z_q, log = q(z)
    idx = q(z, return_dict=True).indices
    # the seed: Gumbel-softmax over the used logits only, scattered back to the full codebook
    full_logits = q.proj(z)
    logits = full_logits[:, torch.as_tensor(used)]
    torch.manual_seed(4)
    soft = torch.zeros_like(full_logits)
    soft[:, torch.as_tensor(used)] = F.gumbel_softmax(logits, tau=1.0, dim=1, hard=True)
    torch.testing.assert_close(z_q, torch.einsum("bnhw,nd->bdhw", soft, q.embed.weight))
    qy = F.softmax(logits, dim=1)
    torch.testing.assert_close(log["loss/vq"], 5e-4 * torch.sum(qy * torch.log(qy * 16 + 1e-10), dim=1).mean())
    assert int(idx.max()) < 4  # positions in `used` (every sampled code is a used one)
    entry = q.get_codebook_entry(idx.reshape(-1), (2, 3, 3, 4))
    torch.testing.assert_close(entry, q.embed.weight[torch.as_tensor(used)[idx]].permute(0, 3, 1, 2))
