"""HierarchicalVQ against vector-quantize-pytorch 1.32 on shared weights, inputs and random streams.

Random paths (k-means init, dead-code replacement, nested dropout) draw from the same seeded stream in both.
Tolerances: indices and cutoffs exact; outputs, losses, gradients and state within 1e-5 (float32; on this CPU they
agree to the last bit)."""

import os

import pytest
import torch
import vector_quantize_pytorch as vqp
from transformers import AutoModel

import hf_vq
from hf_vq.diffusers_support import DiffusersQuantizer

TOL = dict(atol=1e-5, rtol=1e-5)

CASES = {
    "image_shared": (dict(dim=8, codebook_size=32, accept_image_fmap=True, scales=(1, 2, 4, 7)), (2, 8, 7, 7)),
    "seq_per_level_channel_last": (dict(dim=8, codebook_size=(16, 32, 32), shared_codebook=False, scales=(1, 3, 6),
                                        channel_first=False, share_quant_resi=0, rotation_trick=True), (2, 6, 8)),
    "nested_dropout": (dict(dim=8, codebook_size=16, scales=(1, 2, 4), nested_dropout=0.7, decay=0.9), (2, 8, 6)),
    "rect_scales_phi_levels": (dict(dim=8, codebook_size=16, accept_image_fmap=True, scales=(1, (2, 3), (4, 6)),
                                    share_quant_resi=2, quant_resi=-0.3, kmeans_init=False), (2, 8, 4, 6)),
    "video": (dict(dim=4, codebook_size=8, accept_3d_fmap=True, scales=(1, 2), threshold_ema_dead_code=0), (2, 4, 2, 2, 2)),
}


def _pair(kwargs):
    torch.manual_seed(0)
    ref = vqp.HierarchicalVQ(**kwargs)
    return ref, hf_vq.HierarchicalVQ.from_vector_quantize_pytorch(ref)


def _same_state(ours, ref):
    theirs = ref.state_dict()
    assert sorted(ours.state_dict()) == sorted(theirs)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value.float(), theirs[key].float(), **TOL, msg=key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_steps_match_vqp(case):
    kwargs, shape = CASES[case]
    ref, ours = _pair(kwargs)
    opt_ref, opt_ours = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ref, ours))
    cutoffs = set()
    for step in range(4):
        x = torch.randn(*shape)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(step)
        q_r, i_r, l_r, c_r = ref(xr, return_cutoff=True)
        torch.manual_seed(step)
        q_o, i_o, l_o, c_o = ours(xo, return_cutoff=True, return_dict=False)
        assert c_o == c_r and len(i_o) == len(i_r)
        assert all(torch.equal(a, b) for a, b in zip(i_o, i_r))
        torch.testing.assert_close(q_o, q_r, **TOL)
        torch.testing.assert_close(l_o, l_r, **TOL)
        cutoffs.add(c_o)
        (q_r.square().mean() + l_r).backward()
        (q_o.square().mean() + l_o).backward()
        torch.testing.assert_close(xo.grad, xr.grad, **TOL)
        opt_ref.step(), opt_ours.step()
        opt_ref.zero_grad(), opt_ours.zero_grad()
    _same_state(ours, ref)
    if kwargs.get("nested_dropout"):
        assert len(cutoffs) > 1  # the dropout path ran (some steps cut, some not, or different cutoffs)
    ours.eval(), ref.eval()
    x = torch.randn(*shape)
    q, indices, _ = ours(x, return_dict=False)
    full = tuple(x.shape[2:]) if ours.channel_first else tuple(x.shape[1:-1])
    recon = ours.get_output_from_indices(indices, full_shape=full)
    torch.testing.assert_close(recon, q, atol=1e-5, rtol=0)
    torch.testing.assert_close(recon, ref.get_output_from_indices(indices, full_shape=full), **TOL)


def test_mask_and_lens_match_vqp():
    kwargs = dict(dim=8, codebook_size=16, scales=(1, 2, 5), threshold_ema_dead_code=0, decay=0.9)
    ref, ours = _pair(kwargs)
    for step in range(3):
        x = torch.randn(3, 8, 10)
        lens = torch.tensor([10, 6, 3])
        mask = torch.arange(10) < lens[:, None]
        torch.manual_seed(step)
        want = ref(x, lens=lens)
        torch.manual_seed(step)
        got = ours(x, lens=lens, return_dict=False)
        torch.manual_seed(step)
        got_mask = ours.eval()(x, mask=mask, return_dict=False)
        ours.train()
        torch.testing.assert_close(got[0], want[0], **TOL)
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
        torch.testing.assert_close(got[2], want[2], **TOL)
        assert torch.all(got[0][2, :, 3:] == 0) and torch.all(got_mask[0][2, :, 3:] == 0)
        assert int((got[1][2] == -1).sum()) > 0  # pooled positions with no valid input are marked -1
    _same_state(ours, ref)


def test_vqp_readme_call():
    hq = hf_vq.HierarchicalVQ(dim=16, codebook_size=32, accept_image_fmap=True, scales=(1, 2, 4, 7), quant_resi=0.5,
                              share_quant_resi=1)
    x = torch.randn(1, 16, 7, 7)
    quantized, indices, commit_loss = hq(x, return_dict=False)
    reconstructed = hq.get_output_from_indices(indices)
    assert quantized.shape == x.shape and reconstructed.shape == x.shape
    assert len(indices) == 4 and [tuple(i.shape) for i in indices] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 7, 7)]
    assert torch.isfinite(commit_loss).all()


def test_migration_round_trip_through_save_pretrained(tmp_path):
    ref, ours = _pair(dict(dim=8, codebook_size=(8, 16), shared_codebook=False, scales=(2, 4), share_quant_resi=0))
    torch.manual_seed(0)
    ref(torch.randn(2, 8, 4))  # k-means and EMA state to carry over
    ours = hf_vq.HierarchicalVQ.from_vector_quantize_pytorch(ref)
    assert ours.config.codebook_size == [8, 16] and ours.config.scales == [2, 4]
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is hf_vq.HierarchicalVQ
    for (k, v), (k2, v2) in zip(sorted(loaded.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    loaded.eval(), ref.eval()
    x = torch.randn(2, 8, 4)
    got, want = loaded(x, return_dict=False), ref(x)
    torch.testing.assert_close(got[0], want[0], **TOL)
    DiffusersQuantizer.from_quantizer(loaded).save_pretrained(tmp_path / "diffusers")
    again = DiffusersQuantizer.from_pretrained(tmp_path / "diffusers").quantizer.eval()
    assert torch.equal(again(x, return_dict=False)[0], got[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(accept_image_fmap=True, accept_3d_fmap=True), "choose at most one of accept_image_fmap"),
    (dict(scales=[2, 1]), "scales must be non-decreasing"),
    (dict(scales=[]), "scales must be a non-empty list"),
    (dict(scales=[1, [2, 2]]), r"scale \[2, 2\] must have 1 entries"),
    (dict(codebook_size=[8, 16], scales=[1, 2]), "shared_codebook=True requires one codebook size"),
    (dict(codebook_size=[8, 16], scales=[1, 2, 4], shared_codebook=False), "codebook_size has 2 entries"),
    (dict(nested_dropout=1.5), r"nested_dropout must be in \[0, 1\]"),
    (dict(nested_dropout_min_levels=0), "nested_dropout_min_levels must be an int >= 1"),
    (dict(decay=2.0), "decay must be in"),
])
def test_bad_config_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_vq.HierarchicalVQConfig(**{"dim": 8, **kwargs})


def test_bad_input_is_a_value_error():
    hq = hf_vq.HierarchicalVQ(dim=8, codebook_size=16, scales=[1, 2], accept_image_fmap=True, kmeans_init=False)
    with pytest.raises(ValueError, match=r"x must be \(b, dim, \*spatial\) with dim=8 and 2 spatial axes"):
        hq(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="x must be"):
        hq(torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match="lens is only supported for 1d sequences"):
        hq(torch.randn(2, 8, 4, 4), lens=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 4, 4\)"):
        hq(torch.randn(2, 8, 4, 4), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="does not reconstruct from indices"):
        hq(torch.randn(2, 8, 4, 4), indices=torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="indices must be a tuple of 2 tensors"):
        hq.get_output_from_indices([torch.zeros(2, 1, 1, dtype=torch.long)])
    with pytest.raises(TypeError, match="keyword arguments only"):
        hf_vq.HierarchicalVQ(8, 16)


# -- two processes (gloo): codebook state and random level choices agree across ranks -----------------------------


def _sync_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from hf_vq import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights
        hq = hf_vq.HierarchicalVQ(dim=4, codebook_size=8, scales=[1, 2, 4], kmeans_iters=2, decay=0.8,
                                  threshold_ema_dead_code=1, nested_dropout=0.8).train()
        rsv = hf_vq.ResidualSimVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True).train()
        torch.manual_seed(100 + rank)  # different data and random streams per rank
        cutoffs, dropped = [], []
        for _ in range(4):
            cutoffs.append(hq(torch.randn(2 + rank, 4, 4), return_cutoff=True, return_dict=False)[3])
            dropped.append(int((rsv(torch.randn(2, 3, 4)).indices[0, 0] == -1).sum()))
        distributed.assert_same_across_ranks(hq)
        state = {k: v.clone() for k, v in hq.state_dict().items()}
        torch.save({"state": state, "cutoffs": cutoffs, "dropped": dropped}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_the_same_codebooks_and_drop_the_same_levels():
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_sync_worker, args=(2, os.path.join(out_dir, "init"), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    assert results[0]["cutoffs"] == results[1]["cutoffs"]
    assert results[0]["dropped"] == results[1]["dropped"]
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), key
    assert bool(results[0]["state"]["vq._codebook.initted"])


def test_bfloat16_input_keeps_its_dtype():
    hq = hf_vq.HierarchicalVQ(dim=8, codebook_size=16, scales=[1, 3], kmeans_init=False)
    x = torch.randn(2, 8, 6)
    out = hq(x.bfloat16())
    assert out.quantized.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert out.quantized.shape == x.shape
