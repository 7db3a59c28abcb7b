"""ResidualVQ: parity with vector-quantize-pytorch 1.32 at every level, quantize-dropout invariants,
index <-> code round trips, state round trip, errors."""

import pytest
import torch
from transformers import AutoModel
import vector_quantize_pytorch as vqp
from vector_quantize_pytorch import ResidualVQ as VqpResidualVQ

import hf_vq

CASES = {
    "ema": dict(dim=16, num_quantizers=3, codebook_size=32, decay=0.9),
    "projection": dict(dim=16, num_quantizers=3, codebook_size=32, codebook_dim=8),
    "dead_codes": dict(dim=16, num_quantizers=3, codebook_size=32, threshold_ema_dead_code=0),
    "cosine": dict(dim=16, num_quantizers=2, codebook_size=32, use_cosine_sim=True),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_vqp_at_every_level(case, train):
    torch.manual_seed(0)
    ref = VqpResidualVQ(**CASES[case])
    ours = hf_vq.ResidualVQ.from_vector_quantize_pytorch(ref)
    ref.train(train), ours.train(train)
    for _ in range(4):
        x = torch.randn(2, 30, 16, requires_grad=True)
        x_ours = x.detach().clone().requires_grad_()
        q_ref, i_ref, l_ref = ref(x)
        out = ours(x_ours)
        assert torch.equal(out.indices, i_ref)
        torch.testing.assert_close(out.quantized, q_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.loss, l_ref, atol=1e-6, rtol=1e-6)
        if train:
            (q_ref.sum() + l_ref.sum()).backward()
            (out.quantized.sum() + out.loss.sum()).backward()
            torch.testing.assert_close(x_ours.grad, x.grad, atol=1e-5, rtol=1e-5)
    ref_state = ref.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value.float(), ref_state[key].float(), atol=1e-5, rtol=1e-5, msg=key)
    x = torch.randn(2, 5, 16)
    ours.eval(), ref.eval()
    _, idx, _ = ref(x)
    torch.testing.assert_close(ours.get_codes_from_indices(idx), ref.get_codes_from_indices(idx))
    torch.testing.assert_close(ours.get_output_from_indices(idx), ref.get_output_from_indices(idx), atol=1e-6, rtol=0)


def test_quantize_dropout_invariants():
    rvq = hf_vq.ResidualVQ(dim=8, num_quantizers=6, codebook_size=16, quantize_dropout=True,
                           quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2).train()
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        x = torch.randn(2, 10, 8)
        out = rvq(x, freeze_codebook=True)  # a fixed codebook, so the codes can be looked up afterwards
        kept = int((out.indices[0, 0] >= 0).sum())
        seen.add(kept)
        # levels beyond the cutoff: -1 indices and no loss; kept levels form a prefix of even length
        assert (out.indices[..., kept:] == -1).all() and (out.indices[..., :kept] >= 0).all()
        assert (out.loss[kept:] == 0).all() and kept % 2 == 0 and kept >= 2
        # the output is exactly the sum of the kept levels' codes (dropped ones contribute zero)
        torch.testing.assert_close(out.quantized, rvq.get_output_from_indices(out.indices), atol=1e-5, rtol=0)
    assert seen == {2, 4, 6}
    rvq.eval()
    assert (rvq(torch.randn(2, 10, 8)).indices >= 0).all()  # no dropout in eval


def test_return_all_codes_and_coarse_indices():
    rvq = hf_vq.ResidualVQ(dim=8, num_quantizers=3, codebook_size=16).eval()
    out = rvq(torch.randn(2, 7, 8), return_all_codes=True)
    assert out.all_codes.shape == (3, 2, 7, 8)
    torch.testing.assert_close(out.all_codes.sum(0), out.quantized, atol=1e-6, rtol=0)
    coarse = rvq.get_codes_from_indices(out.indices[..., :1])
    assert (coarse[1:] == 0).all() and torch.equal(coarse[0], out.all_codes[0])


def test_level_options_pass_through_and_round_trip(tmp_path):
    rvq = hf_vq.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, decay=0.9, kmeans_init=True,
                           threshold_ema_dead_code=1)
    assert rvq.config.vq_kwargs == {"decay": 0.9, "kmeans_init": True, "threshold_ema_dead_code": 1}
    assert all(layer.config.decay == 0.9 for layer in rvq.layers)
    rvq.train()
    for _ in range(3):
        rvq(torch.randn(2, 20, 8))
    rvq.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is hf_vq.ResidualVQ
    for key, value in rvq.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key  # EMA state of every level


def test_errors():
    with pytest.raises(ValueError, match="unknown field"):
        hf_vq.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, decya=0.9)
    with pytest.raises(ValueError, match="heads > 1"):
        hf_vq.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, heads=2)
    rvq = hf_vq.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)
    with pytest.raises(ValueError, match="expected feature dim 8, got 4"):
        rvq(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="indices have 3 levels, the model has 2"):
        rvq.get_codes_from_indices(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"-1 \(dropped\) or in \[0, 16\)"):
        rvq.get_codes_from_indices(torch.full((1, 2, 2), 16))


def _parity(ref, ours, shape, train, has_loss=True, steps=3):
    ref.train(train), ours.train(train)
    for _ in range(steps):
        x = torch.randn(*shape)
        r = ref(x)
        o = ours(x, return_dict=True)
        assert torch.equal(o.indices, r[1])
        torch.testing.assert_close(o.quantized, r[0], atol=1e-6, rtol=1e-6)
        if has_loss:
            torch.testing.assert_close(o.loss, r[2], atol=1e-6, rtol=1e-5)
        else:
            assert o.loss is None


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kwargs", [dict(levels=[5, 5, 3], num_quantizers=3, dim=8),
                                    dict(levels=[7, 5], num_quantizers=2),
                                    dict(levels=[5, 5, 3], num_quantizers=2, dim=8, bound_hard_clamp=False,
                                         soft_clamp_input_value=1.5)], ids=["proj", "noproj", "softclamp"])
def test_residual_fsq_parity_with_vqp(kwargs, train):
    from vector_quantize_pytorch import ResidualFSQ as VqpResidualFSQ

    torch.manual_seed(0)
    ref = VqpResidualFSQ(**kwargs)
    ours = hf_vq.ResidualFSQ(**kwargs)
    ours.load_state_dict(ref.state_dict())
    _parity(ref, ours, (2, 20, kwargs.get("dim", len(kwargs["levels"]))), train, has_loss=False)
    idx = ours.eval()(torch.randn(2, 5, kwargs.get("dim", len(kwargs["levels"])))).indices
    torch.testing.assert_close(ours.get_codes_from_indices(idx), ref.get_codes_from_indices(idx))


@pytest.mark.parametrize("clamp", [None, 2.0], ids=["one-pass-eval", "soft-clamp"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_residual_lfq_parity_with_vqp(train, clamp):
    from vector_quantize_pytorch import ResidualLFQ as VqpResidualLFQ

    kwargs = dict(dim=8, num_quantizers=3, codebook_size=2**5, commitment_loss_weight=0.25,
                  soft_clamp_input_value=clamp)
    torch.manual_seed(0)
    ref = VqpResidualLFQ(**kwargs)
    ours = hf_vq.ResidualLFQ(**kwargs)
    assert ours.eval_path == ("one_pass" if clamp is None else "per_level")
    ours.load_state_dict(ref.state_dict(), strict=False)  # vqp also saves each level's derived bit mask
    _parity(ref, ours, (2, 20, 8), train)
    idx = ours.eval()(torch.randn(2, 5, 8)).indices
    torch.testing.assert_close(ours.get_codes_from_indices(idx), ref.get_codes_from_indices(idx))


def test_grouped_vq_eval_in_one_pass_equals_groups_in_turn(monkeypatch):
    """GroupedResidualVQ outside training runs its groups in one pass (the lean eval loop over stacked groups): the
    same values as each group's ResidualVQ called in turn, for every input layout, and the same gradients for a
    learnable codebook."""
    from hf_vq.models.grouped import GroupedResidualBase

    at_once = GroupedResidualBase._forward_groups_at_once
    calls = []
    monkeypatch.setattr(GroupedResidualBase, "_forward_groups_at_once",
                        lambda self, *a, **k: calls.append(1) or at_once(self, *a, **k))
    torch.manual_seed(0)
    cases = [(dict(), (2, 30, 16)), (dict(accept_image_fmap=True), (2, 16, 3, 5)), (dict(codebook_dim=6), (2, 30, 16)),
             (dict(learnable_codebook=True, ema_update=False), (2, 30, 16))]
    for kwargs, shape in cases:
        model = hf_vq.GroupedResidualVQ(dim=16, groups=2, num_quantizers=3, codebook_size=8, **kwargs).eval()
        x = torch.randn(shape)
        results = []
        for together in (True, False):
            if not together:
                monkeypatch.setattr(GroupedResidualBase, "_forward_groups_at_once", lambda self, *a, **k: None)
            model.zero_grad()
            calls.clear()
            out = model(x, return_all_codes=True)
            out.quantized.square().sum().backward() if out.quantized.requires_grad else None
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            results.append((out, grads, len(calls)))
        (a, grads_a, n_calls), (b, grads_b, _) = results
        assert n_calls == 1 and a.indices.shape == (2, *b.indices.shape[1:])
        for key in ("quantized", "indices", "loss", "all_codes"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (kwargs, key)
        assert len(grads_a) == len(grads_b) and all(torch.equal(u, v) for u, v in zip(grads_a, grads_b))
        book_grads = [rvq.layers[0]._codebook.embed.grad for rvq in model.rvqs]
        assert all(g is not None for g in book_grads) == bool(kwargs.get("learnable_codebook"))
        monkeypatch.setattr(GroupedResidualBase, "_forward_groups_at_once",
                            lambda self, *a, **k: calls.append(1) or at_once(self, *a, **k))


@pytest.mark.parametrize("name, kwargs", [
    # (no projections: vqp's ResidualLFQ projects the last dim of any input)
    ("ResidualLFQ", dict(dim=4, codebook_size=16, num_quantizers=2, commitment_loss_weight=0.0)),
    ("GroupedResidualLFQ", dict(dim=8, groups=2, codebook_size=16, num_quantizers=2, accept_image_fmap=True,
                                commitment_loss_weight=0.0)),
    ("GroupedResidualFSQ", dict(dim=12, groups=2, levels=[5, 4], num_quantizers=2, accept_image_fmap=True,
                                is_channel_first=True)),
])
def test_image_input_of_residual_and_grouped_scalar_forms_matches_vqp(name, kwargs):
    """Channel-first image input: vqp 1.32's ResidualLFQ levels read rank-4 input as channel-first, its grouped forms
    split it along dim 1 (GroupedResidualFSQ with `is_channel_first=True` for its groups, which ours accepts and
    also sets from `accept_image_fmap`). Outputs, indices, losses and input gradients in training and eval; the
    output from the indices in the forward's layout."""
    torch.manual_seed(0)
    ref, ours = getattr(vqp, name)(**kwargs), getattr(hf_vq, name)(**kwargs)
    ours.load_state_dict(ref.state_dict(), strict=False)
    for train in (True, False):
        ref.train(train), ours.train(train)
        x = torch.randn(2, kwargs["dim"], 3, 5, requires_grad=True)
        x_ours = x.detach().clone().requires_grad_()
        torch.manual_seed(1)
        q, indices, *loss = ref(x)
        torch.manual_seed(1)
        out = ours(x_ours)
        torch.testing.assert_close(out.quantized, q)
        assert torch.equal(out.indices, indices if "FSQ" not in name else indices.movedim(-3, -1))
        if loss:
            torch.testing.assert_close(out.loss, loss[0])
        if train:
            (q.square().sum() + sum(t.sum() for t in loss)).backward()
            (out.quantized.square().sum() + (out.loss.sum() if loss else 0)).backward()
            torch.testing.assert_close(x_ours.grad, x.grad)
    torch.testing.assert_close(ours.get_output_from_indices(out.indices), out.quantized)


def test_grouped_layout_option_must_agree_with_accept_image_fmap():
    with pytest.raises(ValueError, match="is_channel_first=True contradicts accept_image_fmap=False"):
        hf_vq.GroupedResidualFSQ(dim=12, groups=2, levels=[5, 4], is_channel_first=True)


# every LFQConfig field with a value other than its default: True where ResidualLFQ's one-pass eval still serves it
# (the option acts only in training), False where it changes eval values (the per-level loop runs)
_LFQ_OPTION_EVAL_PATHS = {
    "entropy_loss_weight": (0.5, True), "commitment_loss_weight": (0.5, True), "diversity_gamma": (2.0, True),
    "straight_through_activation": ("tanh", True), "frac_per_sample_entropy": (0.5, True),
    "inv_temperature": (50.0, True), "entropy_loss_method": ("factorized", True),
    "sync_codebook_entropy": (True, True), "experimental_softplus_entropy_loss": (True, True),
    "entropy_loss_offset": (1.0, True),
    "spherical": (True, False), "soft_clamp_input_value": (2.0, False), "orthogonal_rotation": (True, False),
    "num_codebooks": (2, False), "keep_num_codebooks_dim": (True, False), "force_quantization_f32": (False, False),
    "has_projections": (True, False), "projection_has_bias": (False, False), "cosine_sim_project_in": (True, False),
    "cosine_sim_project_in_scale": (2.0, False), "channel_first": (True, False),
}


def test_residual_lfq_eval_path_walks_every_level_option():
    """ResidualLFQ decides its eval path from the level config: every LFQ option is classified, the training-only
    ones keep the one-pass loop, the others send the model to the level forwards; both give the same values."""
    fixed = {"dim", "codebook_size", "codebook_scale", "check_inputs"}  # set per level by ResidualLFQ
    assert set(_LFQ_OPTION_EVAL_PATHS) | fixed == set(hf_vq.LFQConfig.field_names())
    torch.manual_seed(0)
    x = torch.randn(2, 17, 12)
    for name, (value, one_pass) in _LFQ_OPTION_EVAL_PATHS.items():
        model = hf_vq.ResidualLFQ(dim=12, num_quantizers=3, codebook_size=2**4, **{name: value}).eval()
        assert model.eval_path == ("one_pass" if one_pass else "per_level"), name
        if one_pass:
            with torch.no_grad():
                lean = model(x)
                model.eval_path = "per_level"
                ref = model(x)
            for key in ("quantized", "indices", "loss"):
                assert torch.equal(getattr(lean, key), getattr(ref, key)), (name, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_lfq_one_pass_eval_equals_level_forwards(dtype):
    """The one-pass eval loop (`residual_lfq`) gives each level's forward values: indices, codes in the input
    dtype, zero losses; with and without projections, and in a grouped model."""
    torch.manual_seed(0)
    for model, dim in ((hf_vq.ResidualLFQ(dim=5, num_quantizers=4, codebook_size=2**5), 5),
                       (hf_vq.ResidualLFQ(dim=24, num_quantizers=3, codebook_size=2**6), 24),
                       (hf_vq.GroupedResidualLFQ(dim=10, groups=2, num_quantizers=3, codebook_size=2**5), 10)):
        if dim == 24 and dtype != torch.float32:
            continue  # (projections are float32 Linear layers: a bfloat16 input needs autocast, as vqp)
        model.eval()
        rvqs = model.rvqs if hasattr(model, "rvqs") else [model]
        assert all(r.eval_path == "one_pass" for r in rvqs)
        x = torch.randn(3, 40, dim).to(dtype)
        with torch.no_grad():
            lean = model(x)
            for r in rvqs:
                r.eval_path = "per_level"
            ref = model(x)
        assert lean.quantized.dtype == dtype and lean.indices.dtype == torch.int64
        for key in ("quantized", "indices", "loss"):
            assert torch.equal(getattr(lean, key), getattr(ref, key)), key
        assert lean.indices.min() >= 0 and lean.indices.max() < 2 ** rvqs[0].layers[0].codebook_dim


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_grouped_forms_parity_with_vqp(train):
    torch.manual_seed(0)
    ref = vqp.GroupedResidualVQ(dim=16, groups=2, num_quantizers=2, codebook_size=16, decay=0.9)
    ours = hf_vq.GroupedResidualVQ(dim=16, groups=2, num_quantizers=2, codebook_size=16, decay=0.9)
    ours.load_state_dict(ref.state_dict())
    _parity(ref, ours, (2, 20, 16), train)
    torch.manual_seed(0)
    ref = vqp.GroupedResidualFSQ(dim=12, groups=2, levels=[5, 3], num_quantizers=2)
    ours = hf_vq.GroupedResidualFSQ(dim=12, groups=2, levels=[5, 3], num_quantizers=2)
    ours.load_state_dict(ref.state_dict())
    _parity(ref, ours, (2, 20, 12), train, has_loss=False)
    torch.manual_seed(0)
    ref = vqp.GroupedResidualLFQ(dim=12, groups=2, codebook_size=2**4, num_quantizers=2, commitment_loss_weight=0.25)
    ours = hf_vq.GroupedResidualLFQ(dim=12, groups=2, codebook_size=2**4, num_quantizers=2, commitment_loss_weight=0.25)
    ours.load_state_dict(ref.state_dict(), strict=False)
    _parity(ref, ours, (2, 20, 12), train)


def test_grouped_dropout_cutoff_is_shared_by_all_groups():
    g = hf_vq.GroupedResidualFSQ(dim=8, groups=2, levels=[5, 3], num_quantizers=4, quantize_dropout=True).train()
    for seed in range(10):
        torch.manual_seed(seed)
        idx = g(torch.randn(2, 6, 8, requires_grad=True)).indices  # (groups, b, n, q)
        kept = (idx[..., 0, 0, :] >= 0).sum(-1)
        assert kept[0] == kept[1]
        assert (idx[0, ..., int(kept[0]):] == -1).all()


def test_residual_fsq_channel_first_and_config_nesting(tmp_path):
    rfsq = hf_vq.ResidualFSQ(levels=[5, 5], num_quantizers=2, dim=6, is_channel_first=True, projection_has_bias=False)
    assert rfsq.config.fsq_kwargs == {"projection_has_bias": False}
    x = torch.randn(2, 6, 3, 4)
    out = rfsq.eval()(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (2, 3, 4, 2)
    torch.testing.assert_close(rfsq.get_output_from_indices(out.indices), out.quantized, atol=1e-6, rtol=1e-6)
    rfsq.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(again(x).quantized, out.quantized)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("extra", [dict(decay=0.9), dict(codebook_dim=8)], ids=["ema", "projection"])
def test_shared_codebook_parity_with_vqp(extra, train):
    kwargs = dict(dim=16, num_quantizers=3, codebook_size=32, shared_codebook=True, **extra)
    torch.manual_seed(0)
    ref = VqpResidualVQ(**kwargs)
    ours = hf_vq.ResidualVQ.from_vector_quantize_pytorch(ref)
    ref.train(train), ours.train(train)
    for _ in range(4):
        x = torch.randn(2, 30, 16)
        q_ref, i_ref, l_ref = ref(x)
        out = ours(x)
        assert torch.equal(out.indices, i_ref)
        torch.testing.assert_close(out.quantized, q_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.loss, l_ref, atol=1e-6, rtol=1e-6)
    ref_state = ref.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value.float(), ref_state[key].float(), atol=1e-5, rtol=1e-5, msg=key)
    # vqp's state dict repeats the shared codebook under every level: it loads strictly, through level 0
    fresh = hf_vq.ResidualVQ(**kwargs).train(train)
    fresh.load_state_dict(ref_state)
    assert torch.equal(fresh.layers[2]._codebook.embed, ref.layers[0]._codebook.embed)


def test_shared_codebook_is_saved_once_and_shared_after_loading(tmp_path):
    rvq = hf_vq.ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True,
                           threshold_ema_dead_code=1.5, decay=0.5).train()
    assert not any(k.startswith(("layers.1.", "layers.2.")) for k in rvq.state_dict())
    level_inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, args, kw: level_inputs.append(args[0].reshape(-1, 8)),
                                             with_kwargs=True) for layer in rvq.layers]
    rvq(torch.randn(2, 10, 8))
    for hook in hooks:
        hook.remove()
    # dead codes were replaced by inputs of some level (the levels' residuals), with a reset EMA count
    cb = rvq.layers[0]._codebook
    replaced = cb.cluster_size[0] == 1.5
    assert replaced.any() and len(level_inputs) == 3
    candidates = torch.cat(level_inputs).detach()
    for code in cb.embed[0][replaced]:
        assert torch.isclose(candidates, code, atol=1e-5).all(-1).any()
    rvq.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert all(layer._codebook is loaded.layers[0]._codebook for layer in loaded.layers)
    for key, value in rvq.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_loop_equals_every_level_forward(dtype, device):
    """Outside training ResidualVQ runs levels whose plan has `lean_eval` by nearest_code + a row lookup
    (`_forward_lean_eval`): the same values as each level's own forward, in the input dtype, for every input layout."""
    torch.manual_seed(0)
    model = hf_vq.ResidualVQ(dim=16, num_quantizers=4, codebook_size=32).eval().to(device)
    assert model._lean_eval_codebooks(None, {}) is not None  # the lean loop serves these calls
    for shape in [(3, 7, 16), (5, 16), (4, 1000, 16)]:
        x = torch.randn(shape).to(dtype).to(device)
        out = model(x)
        residual, total, ids = x, torch.zeros_like(x), []
        for layer in model.layers:
            level = layer(residual)
            residual, total = residual - level.quantized, total + level.quantized
            ids.append(level.indices)
        assert out.quantized.dtype == dtype and torch.equal(out.quantized, total)
        assert torch.equal(out.indices, torch.stack(ids, dim=-1))
        assert torch.equal(out.loss, torch.zeros(4, device=device))
    # a mask goes through the levels' forwards: unmasked rows get the same codes
    x = torch.randn(3, 7, 16).to(dtype).to(device)
    mask = torch.ones(3, 7, dtype=torch.bool, device=device)
    mask[0, 3:] = False
    assert torch.equal(model(x, mask=mask).indices[mask], model(x).indices[mask])
    # a learnable codebook keeps its gradient through the lean loop, as through the levels' forwards
    learn = hf_vq.ResidualVQ(dim=16, num_quantizers=2, codebook_size=8, learnable_codebook=True,
                             ema_update=False).eval().to(device)
    assert learn._lean_eval_codebooks(None, {}) is not None
    x = torch.randn(2, 9, 16, device=device)
    learn(x).quantized.square().sum().backward()
    lean_grads = [layer._codebook.embed.grad.clone() for layer in learn.layers]
    learn.zero_grad()
    residual, total = x, 0
    for layer in learn.layers:
        q = layer(residual).quantized
        residual, total = residual - q.detach(), total + q
    total.square().sum().backward()
    for layer, g in zip(learn.layers, lean_grads):
        assert g.abs().sum() > 0 and torch.equal(layer._codebook.embed.grad, g)
    # levels that are not plain (cosine) or not yet k-means-initialized take the levels' forwards
    assert hf_vq.ResidualVQ(dim=16, num_quantizers=2, codebook_size=8, use_cosine_sim=True).eval() \
        ._lean_eval_codebooks(None, {}) is None
    lazy = hf_vq.ResidualVQ(dim=16, num_quantizers=2, codebook_size=8, kmeans_init=True).eval()
    assert lazy._lean_eval_codebooks(None, {}) is None and not lazy.layers[0].plan.lean_eval
    lazy(torch.randn(4, 10, 16))
    assert lazy._lean_eval_codebooks(None, {}) is not None and lazy.layers[0].plan.lean_eval
    # the plan follows the codebook's state: an uninitialized checkpoint sends the levels back to their forwards
    lazy.load_state_dict(hf_vq.ResidualVQ(lazy.config).state_dict())
    assert lazy._lean_eval_codebooks(None, {}) is None


@pytest.mark.parametrize("kwargs", [
    dict(decay=0.9, threshold_ema_dead_code=1.0, kmeans_init=True),
    dict(use_cosine_sim=True, commitment_weight=0.25),
    dict(learnable_codebook=True, ema_update=False),
    dict(straight_through=True, stochastic_sample_codes=True, rotation_trick=False),
], ids=["ema_dead_kmeans", "cosine", "learnable", "gumbel"])
def test_training_levels_are_called_as_modules(kwargs):
    """Outside the fused training levels, ResidualVQ calls each level as a module (its hooks fire): the same values,
    gradients and codebook updates with and without a (no-op) forward hook on every level."""
    torch.manual_seed(0)
    direct = hf_vq.ResidualVQ(dim=16, num_quantizers=3, codebook_size=16, **kwargs).train()
    called = hf_vq.ResidualVQ(direct.config).train()
    called.load_state_dict(direct.state_dict())
    fired = []
    for layer in called.layers:
        layer.register_forward_hook(lambda m, args, out: fired.append(1))
    for step in range(3):
        x = torch.randn(2, 24, 16)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(step)
        a = direct(xa)
        torch.manual_seed(step)
        b = called(xb)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
        assert torch.equal(a.loss, b.loss)
        (a.quantized.square().sum() + a.loss.sum()).backward()
        (b.quantized.square().sum() + b.loss.sum()).backward()
        assert torch.equal(xa.grad, xb.grad), (xa.grad - xb.grad).abs().max()
    assert len(fired) == 9
    for (name, p), q in zip(direct.named_parameters(), called.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, t), u in zip(direct.state_dict().items(), called.state_dict().values()):
        assert torch.equal(t, u), name


@pytest.mark.parametrize("kwargs", [
    dict(use_cosine_sim=True), dict(affine_param=True), dict(ema_update=False),
    dict(learnable_codebook=True, ema_update=False),
    dict(stochastic_sample_codes=True), dict(codebook_diversity_loss_weight=0.1), dict(orthogonal_reg_weight=0.1),
    dict(commitment_use_cross_entropy_loss=True), dict(rotation_trick=False), dict(commitment_weight=0.0),
    dict(heads=2), dict(codebook_dim=8), dict(kmeans_init=True), dict(freeze_codebook=True),
], ids=lambda kw: next(iter(kw)))
def test_only_the_common_level_configuration_is_fused(kwargs):
    """ResidualVQ fuses its training levels (`residual_train_levels`) only for levels whose plan has `fused_levels`:
    their step is exactly what the fused pass computes (euclidean, EMA, rotation trick + MSE commitment); any
    other option keeps the level's own forward."""
    assert hf_vq.VectorQuantize(dim=16, codebook_size=32).plan.fused_levels
    assert not hf_vq.VectorQuantize(dim=16, codebook_size=32, **kwargs).plan.fused_levels


@pytest.mark.parametrize("kwargs", [dict(), dict(shared_codebook=True, threshold_ema_dead_code=1.0),
                                    dict(codebook_dim=4, kmeans_init=True)], ids=["plain", "shared", "kmeans"])
def test_non_finite_input_leaves_every_level_untouched(kwargs):
    """A NaN/Inf batch in training raises before any level's codebook, EMA or k-means state is written (whatever
    `check_inputs` says); outside training the levels return a result without reading values."""
    torch.manual_seed(0)
    model = hf_vq.ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, check_inputs=False, **kwargs).train()
    if not kwargs.get("kmeans_init"):
        model(torch.randn(2, 6, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 8)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf values .* not updated"):
        model(x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    if not kwargs.get("kmeans_init"):
        assert model.eval()(x).indices.shape == (2, 5, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("name, kwargs", [("ResidualFSQ", dict(levels=[5, 4], num_quantizers=2, dim=6)),
                                          ("ResidualLFQ", dict(dim=6, codebook_size=16, num_quantizers=2))])
def test_output_from_indices_of_a_cast_model_matches_vqp(name, kwargs, dtype):
    """`model.to(dtype)`: codes and outputs from indices come in that dtype, through the cast projection."""
    torch.manual_seed(0)
    ref = getattr(vqp, name)(**kwargs)
    ours = getattr(hf_vq, name)(**kwargs)
    ours.load_state_dict(ref.state_dict(), strict=False)
    ref.to(dtype).eval(), ours.to(dtype).eval()
    indices = torch.randint(0, 4, (2, 5, 2))
    out, expected = ours.get_output_from_indices(indices), ref.get_output_from_indices(indices)
    assert out.dtype == expected.dtype == dtype and ours.get_codes_from_indices(indices).dtype == dtype
    torch.testing.assert_close(out, expected)


def test_float_indices_are_refused_not_truncated():
    rvq = hf_vq.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16).eval()
    with pytest.raises(ValueError, match="indices must be an integer tensor, got dtype torch.float32"):
        rvq.get_output_from_indices(torch.full((1, 3, 2), 1.7))


@pytest.mark.parametrize("multiple_of", [1, 2, 4])  # 4: rounded past the last of 6 levels for some seeds
@pytest.mark.parametrize("name, kwargs", [("ResidualVQ", dict(codebook_size=32)),
                                          ("ResidualFSQ", dict(levels=[8, 5, 5, 5])),
                                          ("ResidualLFQ", dict(codebook_size=2**4))])
def test_quantize_dropout_fixed_seed_drops_the_levels_vqp_drops(name, kwargs, multiple_of):
    """`rand_quantize_dropout_fixed_seed` draws the quantize-dropout cutoff as vqp 1.32 does from that seed: the
    same levels are dropped (indices -1) for every seed; outside training nothing is dropped."""
    common = dict(dim=16, num_quantizers=6, quantize_dropout=True, quantize_dropout_cutoff_index=1,
                  quantize_dropout_multiple_of=multiple_of, **kwargs)
    ours, ref = getattr(hf_vq, name)(**common), getattr(vqp, name)(**common)
    x = torch.randn(2, 10, 16)
    kept = set()
    for seed in range(8):
        dropped = ours(x, rand_quantize_dropout_fixed_seed=seed).indices == -1
        ref_dropped = ref(x, rand_quantize_dropout_fixed_seed=seed)[1] == -1
        assert torch.equal(dropped, ref_dropped), seed
        kept.add(int((~dropped[0, 0]).sum()))
    assert len(kept) > 1  # the seeds gave different cutoffs
    assert not (ours.eval()(x, rand_quantize_dropout_fixed_seed=0).indices == -1).any()
