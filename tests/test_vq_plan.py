"""The forward-path decision of VectorQuantize (`hf_vq.models.vq_plan`): every config field is classified, and for
each field set to a value other than its default, the model either keeps a fast path and that path computes what
the general path computes, or it takes the general path."""

import copy
from unittest import mock

import pytest
import torch

import hf_vq
from hf_vq.models.vq_plan import FAST_PATH_RULES, GENERAL, VQPlan, plan_for
from hf_vq.ops import ema as ema_ops
from hf_vq.models import vector_quantize, vq_direct_eval
from hf_vq.ops import projected
from hf_vq.ops.nearest import nearest_code

BASE = dict(dim=8, codebook_size=16)

# one non-default value per field (with the companion options it needs to be a valid config)
NON_DEFAULT = {
    "dim": dict(dim=12),
    "codebook_size": dict(codebook_size=24),
    "codebook_dim": dict(codebook_dim=4),
    "heads": dict(heads=2),
    "separate_codebook_per_head": dict(separate_codebook_per_head=True),
    "decay": dict(decay=0.5),
    "eps": dict(eps=1e-3),
    "freeze_codebook": dict(freeze_codebook=True),
    "kmeans_init": dict(kmeans_init=True),
    "kmeans_iters": dict(kmeans_iters=3),
    "use_cosine_sim": dict(use_cosine_sim=True),
    "layernorm_after_project_in": dict(layernorm_after_project_in=True),
    "threshold_ema_dead_code": dict(threshold_ema_dead_code=1e-9),
    "reset_cluster_size": dict(reset_cluster_size=2.0),
    "channel_last": dict(channel_last=False),
    "accept_image_fmap": dict(accept_image_fmap=True),
    "accept_3d_fmap": dict(accept_3d_fmap=True),
    "commitment_weight": dict(commitment_weight=0.25),
    "commitment_use_cross_entropy_loss": dict(commitment_use_cross_entropy_loss=True),
    "orthogonal_reg_weight": dict(orthogonal_reg_weight=0.1),
    "orthogonal_reg_active_codes_only": dict(orthogonal_reg_active_codes_only=True),
    "orthogonal_reg_max_codes": dict(orthogonal_reg_max_codes=4),
    "codebook_diversity_loss_weight": dict(codebook_diversity_loss_weight=0.1),
    "codebook_diversity_temperature": dict(codebook_diversity_temperature=10.0),
    "stochastic_sample_codes": dict(stochastic_sample_codes=True),
    "sample_codebook_temp": dict(sample_codebook_temp=0.5),
    "straight_through": dict(straight_through=True),
    "reinmax": dict(reinmax=True, straight_through=True),
    "rotation_trick": dict(rotation_trick=False),
    "sync_codebook": dict(sync_codebook=True),
    "ema_update": dict(ema_update=False),
    "manual_ema_update": dict(manual_ema_update=True),
    "learnable_codebook": dict(learnable_codebook=True, ema_update=False),
    "affine_param": dict(affine_param=True),
    "affine_param_batch_decay": dict(affine_param_batch_decay=0.5),
    "affine_param_codebook_decay": dict(affine_param_codebook_decay=0.5),
    "return_zeros_for_masked_padding": dict(return_zeros_for_masked_padding=False),
    "route_gradients_to_input": dict(route_gradients_to_input=False),
    "sync_kmeans": dict(sync_kmeans=False),
    "sync_affine_param": dict(sync_affine_param=True),
    "directional_reparam": dict(directional_reparam=True, threshold_ema_dead_code=1e-9),
    "directional_reparam_variance": dict(directional_reparam_variance=1e-2),
    "sync_update_v": dict(sync_update_v=0.5, learnable_codebook=True, ema_update=False),
    "manual_in_place_optimizer_update": dict(manual_in_place_optimizer_update=True),
    "check_inputs": dict(check_inputs=False),
    "has_vq_bridge": dict(vq_bridge=torch.nn.Linear(8, 8)),  # the module sets the field (a bridge is not JSON)
}
FIELDS = hf_vq.VectorQuantizeConfig.field_names()


def test_every_config_field_is_classified():
    """A new VectorQuantizeConfig field must say which values each fast path honours (FAST_PATH_RULES) and get a
    row in this test; until then building any VectorQuantize fails, naming the field."""
    assert set(FAST_PATH_RULES) == set(FIELDS)
    assert set(NON_DEFAULT) == set(FIELDS)
    config = hf_vq.VectorQuantizeConfig(**BASE)
    rules = dict(FAST_PATH_RULES)
    try:
        del FAST_PATH_RULES["decay"]
        with pytest.raises(KeyError, match="'decay' is not classified"):
            plan_for(config)
    finally:
        FAST_PATH_RULES.clear()
        FAST_PATH_RULES.update(rules)


def test_default_config_takes_every_fast_path():
    assert hf_vq.VectorQuantize(**BASE).plan == VQPlan(fused_estimator=True, lean_eval=True, fused_levels=True,
                                                       direct_eval=True, graphed_call=True)
    assert hf_vq.VectorQuantize(**BASE).plan.direct_eval
    # with projections: not the lean eval of ResidualVQ's levels, which reads raw rows
    assert hf_vq.VectorQuantize(**BASE, heads=2).plan == VQPlan(fused_estimator=True, direct_eval=True)
    # heads without projections (their codebook dims add up to the input dim) are replayed as CUDA graphs
    assert hf_vq.VectorQuantize(**BASE, heads=2, codebook_dim=4).plan.graphed_call
    optimizer = hf_vq.VectorQuantize(**BASE, learnable_codebook=True, ema_update=False, rotation_trick=True,
                                     in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert not optimizer.plan.fused_levels


def _input(model, requires_grad=False, many=False):
    """A small input in the model's layout (`many`: more tokens than the codebook has codes)."""
    c, d = model.config, model.config.dim
    n = 3 if many else 1
    shape = ((2, d, 3 * n, 3) if c.accept_image_fmap else (2, d, 2, 2 * n, 2) if c.accept_3d_fmap
             else (2, d, 5 * n) if not c.channel_last else (2, 5 * n, d))
    return torch.randn(shape).requires_grad_(requires_grad)


def _general(model):
    general = copy.deepcopy(model)
    general.config_plan = GENERAL
    general._plan_cache = None
    return general


def _train_step(model, x):
    torch.manual_seed(1)
    x = x.detach().clone().requires_grad_()
    out = model.train()(x)
    (out.quantized.square().sum() + out.loss).backward()
    return out, x.grad


def _assert_same_state(a, b):
    for (name, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("field", FIELDS)
def test_each_field_keeps_an_equal_fast_path_or_the_general_one(field):
    torch.manual_seed(0)
    model = hf_vq.VectorQuantize(**{**BASE, **copy.deepcopy(NON_DEFAULT[field])})
    if model.config.kmeans_init:
        assert not model.plan.lean_eval and not model.plan.fused_levels  # an uninitialized codebook
        with torch.no_grad():
            model.train()(_input(model))
    plan = model.plan
    x = _input(model)

    # fused_estimator: the same training step (values, loss, input gradient, state) as the general path
    if plan.fused_estimator:
        general = _general(model)
        got, got_grad = _train_step(model, x)
        want, want_grad = _train_step(general, x)
        assert torch.equal(got.indices, want.indices)
        assert torch.allclose(got.quantized, want.quantized, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got.loss, want.loss, rtol=1e-5, atol=1e-7)
        assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)
        _assert_same_state(model, general)
    else:
        assert not plan.fused_levels  # the fused levels compute the fused estimator's step

    # lean_eval: the eval forward is the nearest euclidean code of the raw rows, looked up by index
    if plan.lean_eval:
        codes = model._codebook.codes()[0].detach()
        rows = x.reshape(-1, x.shape[-1])
        ids = nearest_code(rows, codes)[0]
        out = model.eval()(x)
        assert torch.equal(out.indices.reshape(-1), ids)
        assert torch.equal(out.quantized.detach().reshape(-1, x.shape[-1]), codes[ids])

    # direct_eval: the eval forward as a search and a lookup gives the general path's values
    if plan.direct_eval:
        _assert_direct_eval_is_general(model)
    else:
        assert field == "affine_param", field

    # fused_levels: a training step is exactly one level of ops.triton_residual.residual_train_levels: nearest
    # code, the MSE commitment loss times its weight, one EMA step with the config's decay and eps
    if plan.fused_levels:
        cb = model._codebook
        embed, sizes, avgs = cb.embed[0].clone(), cb.cluster_size.clone(), cb.embed_avg.clone()
        rows = x.reshape(-1, x.shape[-1])
        ids = nearest_code(rows, embed)[0]
        out, _ = _train_step(model, x)
        c = model.config
        assert torch.equal(out.indices.reshape(-1), ids)
        assert torch.allclose(out.loss, c.commitment_weight * (embed[ids] - rows).square().mean(), rtol=1e-5)
        counts, sums = ema_ops.cluster_stats(rows, ids, c.codebook_size)
        sizes = sizes * c.decay + counts * (1 - c.decay)
        avgs = avgs * c.decay + sums * (1 - c.decay)
        smoothed = ema_ops.laplace_smoothing(sizes, c.codebook_size, c.eps) * sizes.sum(-1, keepdim=True)
        assert torch.allclose(cb.cluster_size, sizes, rtol=1e-5, atol=1e-6)
        assert torch.allclose(cb.embed, avgs / smoothed.unsqueeze(-1), rtol=1e-4, atol=1e-6)


def _assert_direct_eval_is_general(model, folds: bool | None = None):
    """The direct eval runs (a spy on it; `folds`: whether it folds the projections) and gives the general path's
    indices and perplexity, and its output up to float32 rounding, on a call with more tokens than codes."""
    many = _input(model, many=True)
    model.eval()
    with mock.patch.object(vector_quantize, "direct_eval", wraps=vq_direct_eval.direct_eval) as direct, \
            mock.patch.object(projected, "lookup_sum", wraps=projected.lookup_sum) as folded:
        got = model(many)
    assert direct.call_count == 1
    if folds is not None:
        assert folded.call_count == int(folds)
    want = _general(model).eval()(many)
    assert torch.equal(got.indices, want.indices)
    assert torch.allclose(got.quantized, want.quantized, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.perplexity, want.perplexity) and got.loss == want.loss == 0


@pytest.mark.parametrize("field", FIELDS)
def test_each_field_with_projections_keeps_the_direct_eval_or_takes_the_general_path(field):
    """The walk again on a model with projections (two heads): every field either keeps the direct eval, with the
    projections folded into the codebook unless the field excludes that, or sends the call to the general path."""
    torch.manual_seed(0)
    model = hf_vq.VectorQuantize(**{**BASE, "heads": 2, **copy.deepcopy(NON_DEFAULT[field])})
    if model.config.kmeans_init:
        assert not model.plan.direct_eval  # an uninitialized codebook
        with torch.no_grad():
            model.train()(_input(model))
    # codebook_dim 4 with two heads has no projection; a LayerNorm after the input projection is not folded
    folds = field not in ("layernorm_after_project_in", "codebook_dim")
    if model.plan.direct_eval:
        assert model.can_fold == folds, field
        _assert_direct_eval_is_general(model, folds)
    else:
        assert field == "affine_param", field


def test_direct_eval_folds_per_call(monkeypatch):
    """A direct eval call folds the projections only with float32 input and weights, no autocast, a search mode
    other than exact, and fewer codes than tokens; otherwise it projects, with the general path's values. Training
    and masked calls take the general path."""
    torch.manual_seed(0)
    model = hf_vq.VectorQuantize(dim=8, codebook_size=16, heads=2).eval()
    tokens = torch.randn(2, 15, 8)
    assert vq_direct_eval.folds(model, tokens)
    assert not vq_direct_eval.folds(model, tokens[:, :8])  # 16 tokens, 16 codes
    assert not vq_direct_eval.folds(model, tokens.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not vq_direct_eval.folds(model, tokens)
        out, want = model(tokens), _general(model)(tokens)  # projections under autocast, as the general path
        assert torch.equal(out.indices, want.indices) and torch.equal(out.quantized, want.quantized)
    monkeypatch.setenv("HF_VQ_NEAREST_MODE", "exact")
    assert not vq_direct_eval.folds(model, tokens)
    out, want = model(tokens), _general(model)(tokens)
    assert torch.equal(out.indices, want.indices) and torch.equal(out.quantized, want.quantized)
    monkeypatch.delenv("HF_VQ_NEAREST_MODE")
    assert not vq_direct_eval.folds(copy.deepcopy(model).double(), tokens.double())
    # training and masked calls: the general path (-1 where masked)
    mask = torch.rand(2, 15) > 0.3
    with mock.patch.object(vector_quantize, "direct_eval") as direct:
        out = model(tokens, mask=mask)
        model.train()(tokens)
    assert direct.call_count == 0
    assert torch.equal(out.indices[~mask], torch.full_like(out.indices[~mask], -1))


def test_folded_eval_agrees_with_float64():
    """The folded search picks the float64 nearest code of the projected rows, cosine and euclidean, shared and
    separate codebooks, and folds the input projection or not (codebook dim vs input dim)."""
    for kw in (dict(heads=4), dict(heads=4, separate_codebook_per_head=True, use_cosine_sim=True),
               dict(codebook_dim=4), dict(codebook_dim=4, use_cosine_sim=True)):
        torch.manual_seed(0)
        model = hf_vq.VectorQuantize(dim=8, codebook_size=32, **kw).eval()
        x = torch.randn(3, 200, 8)
        out = model(x)
        with torch.no_grad():
            z = model.project_in.double()(x.double()).view(600, model.heads, -1).transpose(0, 1)
            model.project_in.float()
            book = model._codebook.embed.double().expand(model.heads, -1, -1)
            if model.use_cosine_sim:
                score = torch.nn.functional.normalize(z, dim=-1) @ book.mT
            else:
                score = -torch.cdist(z, book)
        ids = out.indices.reshape(600, model.heads).T
        got = score.gather(-1, ids[..., None])[..., 0]
        assert ((score.amax(-1) - got) <= 1e-6 * (1 + score.abs().amax())).all(), kw
        assert model.fold_search == (model.codebook_dim >= model.dim)
        # the output is the output projection of the chosen codes (as the lookup from indices computes it)
        with torch.no_grad():
            assert torch.allclose(model.get_output_from_indices(out.indices), out.quantized, atol=1e-6), kw

