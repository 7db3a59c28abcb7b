"""LatentQuantize: parity with vector-quantize-pytorch 1.32 `LatentQuantize`, learnable values, in-place
optimizer, index <-> code round trips, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModel
from vector_quantize_pytorch import LatentQuantize as RefLatentQuantize

import hf_vq
from hf_vq.models import latent_quantize


def _pair(**kwargs):
    ref = RefLatentQuantize(**kwargs)
    ours = hf_vq.LatentQuantize(**kwargs)
    ours.load_state_dict(ref.state_dict())  # strict: same keys (values_per_latent.{i}, project_in/out)
    return ours, ref


# levels whose vqp float index arithmetic is exact (see test_indices_exact_where_vqp_truncates for level 7)
CASES = {
    "equal_levels": (dict(levels=[5, 5, 5], dim=3), (2, 3, 4, 4)),
    "unequal_levels": (dict(levels=[8, 5, 3, 4], dim=4), (2, 4, 3, 5)),
    "int_levels_projection": (dict(levels=5, codebook_dim=3, dim=8), (2, 8, 3, 3)),
    "num_codebooks": (dict(levels=[4, 5, 3], dim=12, num_codebooks=2), (2, 12, 3, 3)),
    "keep_codebook_dim": (dict(levels=[4, 5], dim=2, keep_num_codebooks_dim=True), (2, 2, 3, 3)),
    "video": (dict(levels=[4, 4], dim=6), (2, 6, 2, 3, 3)),
    "loss_weights": (dict(levels=[5, 4], dim=2, commitment_loss_weight=0.7, quantization_loss_weight=0.2),
                     (2, 2, 4, 4)),
    "fixed_values": (dict(levels=[5, 4], dim=6, optimize_values=False), (2, 6, 4, 4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_vqp_train_and_eval(case):
    kwargs, shape = CASES[case]
    ours, ref = _pair(**kwargs)
    x = torch.randn(*shape)
    for train in (True, False):
        ours.train(train), ref.train(train)
        q_ref, i_ref, loss_ref = ref(x)
        out = ours(x)
        assert torch.equal(out.indices, i_ref)
        torch.testing.assert_close(out.quantized, q_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.loss, loss_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.indices_to_codes(out.indices), ref.indices_to_codes(out.indices),
                                   rtol=0, atol=1e-6)


def test_rank3_channel_first_matches_vqp_and_default_is_tokens_last():
    # vqp 1.32 reads every input as (b, d, ...); CogVideo sgm and hf_vq read rank 3 as (b, n, d) by default
    ours, ref = _pair(levels=[5, 4], dim=6)
    ours_cf = hf_vq.LatentQuantize(levels=[5, 4], dim=6, channel_first=True)
    ours_cf.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 7)
    q_ref, i_ref, _ = ref(x)
    out = ours_cf(x)
    assert torch.equal(out.indices, i_ref) and torch.allclose(out.quantized, q_ref, atol=1e-6)
    tokens_last = ours(x.transpose(1, 2))
    assert torch.equal(tokens_last.indices, i_ref) and torch.allclose(tokens_last.quantized.transpose(1, 2), q_ref, atol=1e-6)


def test_input_gradient_matches_vqp_without_commitment_term():
    # the quantization term's gradient (straight-through into the input) is vqp's; the commitment term's
    # gradient goes to the values here (vqp's reaches no value, see the module docstring)
    ours, ref = _pair(levels=[5, 4], dim=6, commitment_loss_weight=0.0)
    xa, xb = torch.randn(2, 6, 3, 3, requires_grad=True), None
    xb = xa.detach().clone().requires_grad_()
    q_ref, _, l_ref = ref(xa)
    out = ours(xb)
    (q_ref.square().sum() + l_ref).backward()
    (out.quantized.square().sum() + out.loss).backward()
    torch.testing.assert_close(xb.grad, xa.grad)


def test_learnable_values_get_the_commitment_gradient():
    lq = hf_vq.LatentQuantize(levels=[5, 4], dim=2, commitment_loss_weight=1.0, quantization_loss_weight=0.0)
    assert lq.train_path == "one_node"  # (the training step's one autograd node, ops/latent.py)
    x = torch.randn(4, 2, 8, 8)
    out = lq(x)
    out.loss.backward()
    # d/dv mean((x - v[k(x)])^2) = -2 / N * sum over samples snapped to v of (x - v)
    tokens = x.movedim(1, -1).reshape(-1, 2)
    levels = lq.nearest_levels(tokens.unsqueeze(1)).squeeze(1)
    for i, param in enumerate(lq.values_per_latent):
        expected = torch.zeros_like(param)
        expected.index_add_(0, levels[:, i], -2.0 * (tokens[:, i] - param.detach()[levels[:, i]]) / tokens.numel())
        torch.testing.assert_close(param.grad, expected)


def test_values_train_towards_data_and_round_trip_through_automodel(tmp_path):
    lq = hf_vq.LatentQuantize(levels=[5, 4], dim=2, quantization_loss_weight=0.0, commitment_loss_weight=1.0)
    opt = torch.optim.Adam(lq.parameters(), lr=0.02)
    x = torch.randn(8, 8, 2) * 0.2
    first = lq(x).loss.item()
    for _ in range(40):
        opt.zero_grad()
        lq(x).loss.backward()
        opt.step()
    assert lq(x).loss.item() < 0.7 * first
    lq.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).train()
    for a, b in zip(lq.values_per_latent, loaded.values_per_latent):
        assert torch.equal(a, b)
    lq.eval(), loaded.eval()
    assert torch.equal(lq(x).quantized, loaded(x).quantized) and torch.equal(lq(x).indices, loaded(x).indices)
    # decoding uses the learned values
    out = lq(x)
    torch.testing.assert_close(lq.indices_to_codes(out.indices, project_out=False), out.quantized)


def test_vqp_state_dict_with_trained_values_loads():
    ours, ref = _pair(levels=[5, 4, 3], dim=8)
    with torch.no_grad():
        for p in ref.values_per_latent:
            p.add_(torch.randn_like(p) * 0.05)
    ours.load_state_dict(ref.state_dict())
    for a, b in zip(ours.latent_values(), ref.values_per_latent):
        assert torch.equal(a, b)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(ours.eval()(x).quantized, ref.eval()(x)[0], rtol=0, atol=1e-6)


def test_fixed_values_are_not_parameters_and_state_keys_match_vqp():
    ours, ref = _pair(levels=[5, 4], dim=6, optimize_values=False)
    assert set(ours.state_dict()) == set(ref.state_dict()) == {"project_in.weight", "project_in.bias",
                                                               "project_out.weight", "project_out.bias"}
    assert not any("values" in n for n, _ in ours.named_parameters())


def test_in_place_codebook_optimizer_updates_values_then_quantizes():
    # vqp 1.32's in-place optimizer raises AttributeError (self.optimize_values is never set): we check the
    # intended semantics instead: one optimizer step of mse(nearest value, detached latent), then quantize.
    kwargs = dict(levels=[5, 4], dim=2, in_place_codebook_optimizer="SGD",
                  in_place_codebook_optimizer_kwargs={"lr": 0.5})
    lq = hf_vq.LatentQuantize(**kwargs)
    manual = hf_vq.LatentQuantize(levels=[5, 4], dim=2)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    out = lq(x)
    opt = torch.optim.SGD(manual.values_per_latent.parameters(), lr=0.5)
    tokens = x.detach().movedim(1, -1).reshape(3, 16, 1, 2)
    F.mse_loss(manual.level_indices_to_codes(manual.nearest_levels(tokens)), tokens).backward()
    opt.step()
    for a, b in zip(lq.values_per_latent, manual.values_per_latent):
        torch.testing.assert_close(a, b)
        assert a.grad is None or not a.grad.any()
    manual.eval()
    torch.testing.assert_close(out.quantized, manual(x).quantized)
    # the main loss gives the values no gradient in this mode (only the input gets one)
    out.loss.backward()
    assert x.grad is not None and all(p.grad is None or not p.grad.any() for p in lq.values_per_latent)
    # eval does not step
    before = [p.detach().clone() for p in lq.values_per_latent]
    lq.eval()(x)
    assert all(torch.equal(a, b) for a, b in zip(before, lq.values_per_latent))
    # the optimizer is config, so it survives save/load
    assert hf_vq.LatentQuantizeConfig(**lq.config.to_kwargs()).in_place_codebook_optimizer == "SGD"


def test_indices_exact_where_vqp_truncates():
    # vqp computes int32(float code * basis), which truncates 4.9999995 to 4 for levels of 7; we take the
    # mixed radix of the argmin level indices (the intent of vqp 1.32's formula) and check it exactly
    lq = hf_vq.LatentQuantize(levels=[7, 7, 6], dim=3).eval()
    level_indices = torch.stack(torch.meshgrid(*[torch.arange(n) for n in (7, 7, 6)], indexing="ij"), -1).reshape(-1, 3)
    codes = lq.level_indices_to_codes(level_indices)
    expected = (level_indices * torch.tensor([1, 7, 49])).sum(-1)
    assert torch.equal(lq.codes_to_indices(codes).long(), expected)
    assert torch.equal(lq(codes.unsqueeze(0)).indices[0].long(), expected)


@settings(max_examples=25, deadline=None)
@given(levels=st.lists(st.integers(2, 9), min_size=1, max_size=4), num_codebooks=st.integers(1, 2))
def test_indices_codes_indices_round_trip(levels, num_codebooks):
    lq = hf_vq.LatentQuantize(levels=levels, num_codebooks=num_codebooks).eval()
    size = lq.codebook_size
    indices = torch.randint(0, size, (2, 5, num_codebooks)).squeeze(-1) if num_codebooks == 1 else \
        torch.randint(0, size, (2, 5, num_codebooks))
    codes = lq.indices_to_codes(indices)
    assert torch.equal(lq(codes).indices.long(), indices)
    torch.testing.assert_close(lq.implicit_codebook[indices.reshape(-1, num_codebooks)[:, 0]],
                               lq.indices_to_codes(indices, project_out=False).reshape(-1, num_codebooks, len(levels))[:, 0])


def test_implicit_codebook_matches_vqp():
    ours, ref = _pair(levels=[4, 5, 3], dim=3)
    torch.testing.assert_close(ours.implicit_codebook, ref.implicit_codebook)


def test_bf16_input_keeps_dtype_and_indices():
    lq = hf_vq.LatentQuantize(levels=[5, 4], dim=2).eval()
    x = torch.randn(2, 2, 4, 4)
    out32 = lq(x)
    out16 = lq(x.bfloat16())
    assert out16.quantized.dtype == torch.bfloat16
    assert (out16.indices != out32.indices).float().mean() < 0.1  # bf16 rounding may move a boundary case


@pytest.mark.parametrize("kwargs,message", [
    (dict(levels=[5, 1]), r"levels must all be >= 2"),
    (dict(levels=[5, 2.5]), "levels must contain only ints"),
    (dict(levels=5), "codebook_dim must be a positive int when levels is an int"),
    (dict(levels=[5, 5], codebook_dim=3), r"codebook_dim must be -1 or len\(levels\) = 2"),
    (dict(levels=[5, 5], num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim=False"),
    (dict(levels=[5, 5], commitment_loss_weight=-1.0), "commitment_loss_weight must be a finite number"),
    (dict(levels=[5, 5], in_place_codebook_optimizer="Sgd"), "in_place_codebook_optimizer must name"),
    (dict(levels=[5, 5], in_place_codebook_optimizer="SGD", optimize_values=False), "needs optimize_values=True"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_vq.LatentQuantizeConfig(**kwargs)


def test_input_and_index_errors():
    lq = hf_vq.LatentQuantize(levels=[5, 4], dim=6)
    with pytest.raises(ValueError, match="expected feature dim 6, got 5"):
        lq(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="must have rank"):
        lq(torch.randn(6))
    assert lq.eval()(torch.full((2, 3, 6), float("nan"))).quantized.shape == (2, 3, 6)  # (no value check)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 20\)"):
        lq.indices_to_codes(torch.tensor([[20]]))


# ---- nearest value per latent ----------------------------------------------------------------------------


def test_nearest_levels_running_minimum_is_argmin_with_ties_and_unsorted_values():
    lq = hf_vq.LatentQuantize(levels=[5, 3, 4], dim=3)
    with torch.no_grad():  # learned values: unsorted, one duplicated (a tie the first index wins)
        lq.values_per_latent[0].copy_(torch.tensor([0.4, -0.3, 0.1, -0.3, 0.9]))
        lq.values_per_latent[1].copy_(torch.tensor([0.5, -0.5, 0.0]))
    table = lq._value_table()
    z = torch.cat([torch.randn(400, 3), torch.tensor([[-0.3, 0.25, -0.125], [0.25, -0.25, 0.5]])])
    expected = (z.unsqueeze(-1) - table).abs().argmin(dim=-1)  # +inf padding is never nearest
    assert torch.equal(lq.nearest_levels(z), expected)
    # a transposed (channel-first) view gives the same levels
    zt = z.t().contiguous().t()
    assert torch.equal(lq.nearest_levels(zt), expected)
    codes = lq.level_indices_to_codes(expected)
    assert torch.equal(codes, table.gather(1, expected.t()).t())


@pytest.mark.parametrize("rows", [8, 4000], ids=["all-at-once", "running-minimum"])
def test_nearest_levels_both_cpu_paths_agree_with_argmin(rows):
    # up to `_SMALL_DISTANCES` distances the CPU takes them all at once, above that by the running minimum
    from hf_vq.models.latent_quantize import _SMALL_DISTANCES

    lq = hf_vq.LatentQuantize(levels=[5, 3, 4], dim=3)
    with torch.no_grad():  # unsorted values with a duplicate: the first index wins the tie
        lq.values_per_latent[0].copy_(torch.tensor([0.4, -0.3, 0.1, -0.3, 0.9]))
    table = lq._value_table()
    z = torch.cat([torch.randn(rows, 3), torch.tensor([[-0.3, 0.25, -0.125], [0.25, -0.25, 0.5]])])
    assert (z.numel() * table.shape[1] > _SMALL_DISTANCES) == (rows == 4000)
    expected = (z.unsqueeze(-1) - table).abs().argmin(dim=-1)  # float32 distances, as the forward
    assert torch.equal(lq.nearest_levels(z), expected)
    assert torch.equal(lq.nearest_levels(z.t().contiguous().t()), expected)  # a transposed view


# -- the training step as one autograd node (ops.latent) --------------------------------------------------------

# every config field at a non-default value (with the levels it needs); in_place_codebook_optimizer sends the
# model to the module path, every other field keeps the one-node step
FIELD_VALUES = {
    "levels": dict(levels=[8, 5, 3, 4]),
    "dim": dict(levels=[5, 4], dim=6),
    "commitment_loss_weight": dict(levels=[5, 4], dim=6, commitment_loss_weight=0.0),
    "quantization_loss_weight": dict(levels=[5, 4], dim=6, quantization_loss_weight=0.0),
    "num_codebooks": dict(levels=[4, 5, 3], dim=12, num_codebooks=2),
    "codebook_dim": dict(levels=5, codebook_dim=3, dim=8),
    "keep_num_codebooks_dim": dict(levels=[4, 5], dim=2, keep_num_codebooks_dim=True),
    "optimize_values": dict(levels=[5, 4], dim=6, optimize_values=False),
    "in_place_codebook_optimizer": dict(levels=[5, 4], dim=6, in_place_codebook_optimizer="SGD"),
    "in_place_codebook_optimizer_kwargs": dict(levels=[5, 4], dim=6, in_place_codebook_optimizer="Adam",
                                               in_place_codebook_optimizer_kwargs={"lr": 0.01}),
    "channel_first": dict(levels=[5, 4], dim=6, channel_first=True),
    "check_inputs": dict(levels=[5, 4], dim=6, check_inputs=False),
}
MODULE_PATH_FIELDS = {"in_place_codebook_optimizer", "in_place_codebook_optimizer_kwargs"}


def test_field_table_covers_every_config_field():
    assert set(FIELD_VALUES) == set(hf_vq.LatentQuantizeConfig.field_names())


def _train_step(model, x, weights):
    x = x.clone().requires_grad_()
    out = model(x)
    total = (out.quantized * weights).sum()
    if out.loss.requires_grad:
        total = total + 3.0 * out.loss
    total.backward()
    return out, x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("field", sorted(FIELD_VALUES))
@pytest.mark.parametrize("layout", ["tokens", "image", "rank3_channel_first"])
def test_one_node_training_step_equals_module_path(field, layout, monkeypatch):
    kwargs = dict(FIELD_VALUES[field])
    if layout == "rank3_channel_first":
        kwargs["channel_first"] = True
    torch.manual_seed(0)
    one_node = hf_vq.LatentQuantize(**kwargs).train()
    modules = hf_vq.LatentQuantize(**kwargs).train()
    modules.load_state_dict(one_node.state_dict())
    modules.train_path = "modules"
    assert one_node.train_path == ("modules" if field in MODULE_PATH_FIELDS else "one_node")
    d = one_node.dim
    shape = {"tokens": (2, 7, d), "image": (2, d, 3, 5), "rank3_channel_first": (2, d, 7)}[layout]
    if layout == "tokens" and one_node.channel_first:
        shape = (2, d, 7)
    x = torch.randn(shape) * 0.7
    calls = []
    from hf_vq.ops import latent
    apply = latent.LatentTrainStep.apply
    monkeypatch.setattr(latent.LatentTrainStep, "apply", lambda *a: calls.append(1) or apply(*a))
    for step in range(2):  # the second step after an optimizer step: learned values, moved projections
        weights = torch.randn(x.shape) if step == 0 else weights  # (the output has the input's shape)
        (a, ga, pa), (b, gb, pb) = _train_step(one_node, x, weights), _train_step(modules, x, weights)
        assert torch.equal(a.indices, b.indices)
        rel = lambda p, q: float((p - q).abs().max() / (q.abs().max() + 1e-12))
        assert rel(a.quantized.detach(), b.quantized.detach()) < 1e-6
        assert rel(a.loss.detach(), b.loss.detach()) < 1e-6 and a.loss.requires_grad == b.loss.requires_grad
        assert rel(ga, gb) < 1e-5
        assert pa.keys() == pb.keys()
        for name in pa:
            assert (pa[name] is None) == (pb[name] is None), name
            if pb[name] is not None:
                assert rel(pa[name], pb[name]) < 1e-5, name
        for model in (one_node, modules):
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
                    p.grad = None
    assert len(calls) == (0 if field in MODULE_PATH_FIELDS else 2)


def _assert_one_node_step_matches_modules(x, device="cpu", **kwargs):
    """One training step through the one-node path and through the module path, from one state."""
    one_node = hf_vq.LatentQuantize(**kwargs).to(device).train()
    modules = hf_vq.LatentQuantize(**kwargs).to(device).train()
    modules.load_state_dict(one_node.state_dict())
    modules.train_path = "modules"
    weights = torch.randn(x.shape, device=device)
    (a, ga, pa), (b, gb, pb) = _train_step(one_node, x, weights), _train_step(modules, x, weights)
    rel = lambda p, q: float((p - q).abs().max() / (q.abs().max() + 1e-12))
    assert torch.equal(a.indices, b.indices)
    assert rel(a.quantized.detach(), b.quantized.detach()) < 1e-6 and rel(a.loss.detach(), b.loss.detach()) < 1e-6
    assert rel(ga, gb) < 1e-5
    for name in pb:
        assert rel(pa[name], pb[name]) < 1e-4, name


@pytest.mark.parametrize("shape", [(2, 64, 1100), (2, 1100, 64)], ids=["channel_first", "tokens"])
def test_one_node_step_on_cpu_rows_past_the_argmin_size(shape):
    # enough distances that the CPU search takes the running minimum, whose levels keep the input's layout
    x = torch.randn(shape)
    assert x.numel() // 64 * 4 * 5 > latent_quantize._SMALL_DISTANCES  # (rows x latents x values)
    _assert_one_node_step_matches_modules(x, levels=[5, 5, 5, 5], dim=64, channel_first=shape[1] == 64)


def test_one_node_step_is_not_taken_where_it_does_not_apply():
    lq = hf_vq.LatentQuantize(levels=[5, 4], dim=6).train()
    x = torch.randn(2, 5, 6)
    assert lq._takes_train_step(x)
    assert not lq._takes_train_step(x.double()) and not lq._takes_train_step(x.bfloat16())
    with torch.no_grad():
        assert not lq._takes_train_step(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lq._takes_train_step(x)
    assert not lq.eval()._takes_train_step(x)
    # bf16 input in training (no projections): the module path, its dtype kept
    out = hf_vq.LatentQuantize(levels=[5, 4]).train()(torch.randn(2, 5, 2).bfloat16().requires_grad_())
    assert out.quantized.dtype == torch.bfloat16 and out.loss.requires_grad


@pytest.mark.parametrize("copies", [1, 4, 64])
def test_sum_into_slots_equals_index_add(copies):
    from hf_vq.ops.latent import sum_into_slots
    index = torch.randint(0, 20, (64 * 20,))
    src = torch.randn(64 * 20, dtype=torch.float64)
    expected = torch.zeros(20, dtype=torch.float64).index_add_(0, index, src)
    torch.testing.assert_close(sum_into_slots(index, src, 20, copies), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_node_step_on_gpu_equals_module_path():
    # enough rows that the values' gradient is summed into private slot copies (sum_into_slots)
    torch.manual_seed(0)
    x = torch.randn(4, 64, 4096, device="cuda")
    _assert_one_node_step_matches_modules(x, "cuda", levels=[5, 5, 5, 5], dim=64, channel_first=True)


@pytest.mark.parametrize("output_used", [True, False], ids=["output_and_loss", "loss_only"])
def test_one_node_step_with_an_input_that_needs_no_gradient(output_used):
    # a frozen encoder's features, and a backward that reaches only the loss: the parameters' gradients still
    # equal the module path's
    one_node = hf_vq.LatentQuantize(levels=[5, 4], dim=6).train()
    modules = copy.deepcopy(one_node)
    modules.train_path = "modules"
    x, weights = torch.randn(2, 7, 6), torch.randn(2, 7, 6)
    for model in (one_node, modules):
        out = model(x)
        ((out.quantized * weights).sum() + out.loss if output_used else out.loss).backward()
    for (name, p), q in zip(one_node.named_parameters(), modules.parameters()):
        # (with the loss only, no gradient reaches project_in: the commitment term's goes to the values)
        assert (p.grad is None) == (q.grad is None) == (name.startswith("project_in") and not output_used), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
