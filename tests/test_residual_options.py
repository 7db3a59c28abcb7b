"""ResidualVQ options of vqp 1.32 (per-level codebook sizes, quant_grad_frac, beam search, ...): parity with
vector-quantize-pytorch 1.32 on shared weights and inputs, state after training steps, migration round trips,
config errors."""

import pytest
import torch
from transformers import AutoModel
from vector_quantize_pytorch import ResidualVQ as VqpResidualVQ

import hf_vq

# float32 on CPU, same op order: values agree to 1e-6 (the default assert_close float32 tolerances, 1.3e-6 rel)
CASES = {
    "per_level_sizes": dict(dim=8, codebook_size=(8, 16, 32)),
    "per_level_sizes_projection": dict(dim=8, codebook_dim=4, num_quantizers=2, codebook_size=(16, 4)),
    "quant_grad_frac": dict(dim=8, num_quantizers=3, codebook_size=16, quant_grad_frac=0.3),
    "quant_grad_frac_sizes": dict(dim=8, codebook_size=(16, 8), quant_grad_frac=1.0, decay=0.9),
    "manual_ema_update": dict(dim=8, num_quantizers=2, codebook_size=16, manual_ema_update=True),
}


def _twin(kwargs, seed=0):
    torch.manual_seed(seed)
    ref = VqpResidualVQ(**kwargs)
    return ref, hf_vq.ResidualVQ.from_vector_quantize_pytorch(ref)


def _train_steps(ref, ours, steps=3, shape=(2, 20, 8), **call):
    """Training steps on the same inputs: equal indices, outputs, losses and input gradients at each."""
    ref.train(), ours.train()
    for _ in range(steps):
        x = torch.randn(*shape, requires_grad=True)
        x_ours = x.detach().clone().requires_grad_()
        q_ref, i_ref, l_ref = ref(x, **call)
        out = ours(x_ours, **call)
        assert torch.equal(out.indices, i_ref)
        torch.testing.assert_close(out.quantized, q_ref)
        torch.testing.assert_close(out.loss, l_ref)
        (q_ref.square().sum() + l_ref.sum()).backward()
        (out.quantized.square().sum() + out.loss.sum()).backward()
        torch.testing.assert_close(x_ours.grad, x.grad)


def _same_state(ref, ours):
    ref_state = ref.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], msg=key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_options_match_vqp_over_training_steps(case):
    ref, ours = _twin(CASES[case])
    _train_steps(ref, ours, shape=(2, 20, CASES[case]["dim"]))
    _same_state(ref, ours)
    ref.eval(), ours.eval()
    x = torch.randn(2, 7, CASES[case]["dim"])
    q_ref, i_ref, _ = ref(x)
    out = ours(x)
    assert torch.equal(out.indices, i_ref)
    torch.testing.assert_close(out.quantized, q_ref)
    torch.testing.assert_close(ours.get_codes_from_indices(i_ref), ref.get_codes_from_indices(i_ref))
    torch.testing.assert_close(ours.get_output_from_indices(i_ref), ref.get_output_from_indices(i_ref))


def test_per_level_codebook_sizes_round_trip_and_lookup(tmp_path):
    ref, ours = _twin(CASES["per_level_sizes"])
    assert ours.config.codebook_size == [8, 16, 32] and ours.config.num_quantizers == 3
    assert [layer.codebook_size for layer in ours.layers] == [8, 16, 32]
    assert isinstance(ours.codebooks, tuple) and [b.shape[0] for b in ours.codebooks] == [8, 16, 32]
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 9, 8)
    out = loaded(x)
    torch.testing.assert_close(out.quantized, ref.eval()(x)[0])
    # the last level has 32 codes: index 31 is valid there, not in the first level (8 codes)
    ok = torch.tensor([[[7, 15, 31]]])
    assert loaded.get_codes_from_indices(ok).shape == (3, 1, 1, 8)
    with pytest.raises(ValueError, match=r"codebook_size\) of their level"):
        loaded.get_codes_from_indices(torch.tensor([[[8, 0, 0]]]))
    coarse = loaded.get_codes_from_indices(torch.tensor([[[3]]]))  # fewer levels: the rest count as dropped
    assert coarse[1:].abs().sum() == 0


def test_quant_grad_frac_round_trip(tmp_path):
    ref, ours = _twin(CASES["quant_grad_frac"])
    assert ours.config.quant_grad_frac == 0.3
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.quant_grad_frac == 0.3
    _train_steps(ref, loaded, steps=2)


def test_quant_grad_frac_passes_gradient_to_earlier_levels():
    """With frac 0 a level's output gradient never reaches the previous levels' input; with frac 1 it does."""
    grads = {}
    for frac in (0.0, 1.0):
        torch.manual_seed(0)
        rvq = hf_vq.ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, learnable_codebook=True,
                               ema_update=False, rotation_trick=False, quant_grad_frac=frac).train()
        x = torch.randn(1, 6, 4)
        rvq(x).quantized.sum().backward()
        grads[frac] = rvq.layers[0]._codebook.embed.grad.clone()
    assert not torch.equal(grads[0.0], grads[1.0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(codebook_size=[8, 16], num_quantizers=3), "one size per level"),
    (dict(codebook_size=[8, 0]), "positive ints"),
    (dict(codebook_size="8"), "codebook_size must be"),
    (dict(codebook_size=[8, 16], shared_codebook=True), "shared_codebook"),
    (dict(quant_grad_frac=1.5), "quant_grad_frac"),
    (dict(quant_grad_frac=-0.1), "quant_grad_frac"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_vq.ResidualVQConfig(dim=8, **kwargs)


# -- beam search ------------------------------------------------------------------------------------

BEAM_CASES = {
    "beam3": (dict(dim=8, num_quantizers=3, codebook_size=16, beam_size=3), {}),
    "weighted": (dict(dim=8, num_quantizers=3, codebook_size=16, beam_size=2, decay=0.9,
                      beam_score_quantizer_weights=[1.0, 0.5, 0.25]), {}),
    "sizes_frac": (dict(dim=8, num_quantizers=3, codebook_size=(8, 16, 4), beam_size=3, quant_grad_frac=0.5), {}),
    "call_beam": (dict(dim=8, num_quantizers=3, codebook_size=16), dict(beam_size=4)),
    "dropout": (dict(dim=8, num_quantizers=4, codebook_size=16, beam_size=2, quantize_dropout=True), {}),
    "projection_dead_codes": (dict(dim=8, num_quantizers=3, codebook_size=16, codebook_dim=4, beam_size=2,
                                   threshold_ema_dead_code=1), {}),
    "masked": (dict(dim=8, num_quantizers=2, codebook_size=16, beam_size=2),
               dict(mask=torch.tensor([[True] * 6, [True] * 2 + [False] * 4]))),
}


def _vqp_update_later_levels(ref, x, indices, mask, books):
    """vqp 1.32's beam search updates only the first level's codebook in training (it takes the winning beam's
    level inputs with `[..., 0, :]`, which picks level 0). hf_vq updates every kept level along the winning
    beam; this applies the same update to vqp's later levels, so the two can be compared over several steps.
    `books`: the codebooks the forward searched (before its update of level 0)."""
    residual = ref.project_in(x)
    for level, (layer, book) in enumerate(zip(ref.layers, books)):
        level_indices = indices[..., level]
        if not bool((level_indices >= 0).any()):
            break  # quantize dropout: this level and the next ones were not run
        if level > 0:
            layer.update_indices(residual, level_indices, mask=mask)
        residual = residual - book[level_indices]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(BEAM_CASES))
def test_beam_search_matches_vqp(case, train):
    kwargs, call = BEAM_CASES[case]
    ref, ours = _twin(kwargs)
    ref.train(train), ours.train(train)
    for step in range(3):
        x = torch.randn(2, 6, 8, requires_grad=True)
        x_ours = x.detach().clone().requires_grad_()
        books = [layer.codebook.detach().clone() for layer in ref.layers]
        torch.manual_seed(step)  # the quantize-dropout draw
        q_ref, i_ref, l_ref = ref(x, **call)
        if train:  # (before our step: dead-code replacement draws in the same order, level by level)
            with torch.no_grad():
                _vqp_update_later_levels(ref, x.detach(), i_ref, call.get("mask"), books)
        torch.manual_seed(step)
        out = ours(x_ours, **call)
        assert torch.equal(out.indices, i_ref)
        torch.testing.assert_close(out.quantized, q_ref)
        torch.testing.assert_close(out.loss, l_ref)
        if train:
            (q_ref.square().sum() + l_ref.sum()).backward()
            (out.quantized.square().sum() + out.loss.sum()).backward()
            torch.testing.assert_close(x_ours.grad, x.grad)
    _same_state(ref, ours)


def _path_score(rvq, x, indices):
    """Per token: the sum over levels of the mean squared error between a level's input and its code (the
    score the beam search minimizes, all level weights 1)."""
    residual, total = x, torch.zeros(x.shape[:-1])
    for level, book in enumerate(rvq.codebooks):
        code = book[indices[..., level]]
        total = total + (residual - code).square().mean(-1)
        residual = residual - code
    return total


def test_beam_search_exhaustive_beam_minimizes_the_path_score():
    torch.manual_seed(0)
    rvq = hf_vq.ResidualVQ(dim=4, num_quantizers=3, codebook_size=4).eval()
    x = torch.randn(2, 30, 4)
    greedy = rvq(x)
    beam = rvq(x, beam_size=16)  # 4 x 4 prefixes: every path is scored, the best one is kept
    assert beam.indices.shape == greedy.indices.shape and beam.quantized.shape == x.shape
    best = torch.full(x.shape[:-1], float("inf"))
    for path in torch.cartesian_prod(*[torch.arange(4)] * 3):
        best = torch.minimum(best, _path_score(rvq, x, path.expand(*x.shape[:-1], 3)))
    torch.testing.assert_close(_path_score(rvq, x, beam.indices), best)
    assert (_path_score(rvq, x, greedy.indices) > best + 1e-6).any()  # greedy is not optimal here
    torch.testing.assert_close(rvq.get_output_from_indices(beam.indices), beam.quantized)
    assert torch.equal(rvq(x, beam_size=1).indices, greedy.indices)


def test_beam_options_round_trip_and_errors(tmp_path):
    ref, ours = _twin(BEAM_CASES["weighted"][0])
    assert ours.config.beam_size == 2 and ours.config.beam_score_quantizer_weights == [1.0, 0.5, 0.25]
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 5, 8)
    assert torch.equal(loaded(x).indices, ref.eval()(x)[1])
    assert hf_vq.ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, beam_size=2, eval_beam_size=3).eval_beam_size == 3
    for kwargs, message in [(dict(beam_size=0), "beam_size must be"), (dict(eval_beam_size=2), "eval_beam_size needs"),
                            (dict(beam_size=2, beam_score_quantizer_weights=[1.0]), "one weight per level")]:
        with pytest.raises(ValueError, match=message):
            hf_vq.ResidualVQConfig(dim=8, num_quantizers=2, codebook_size=4, **kwargs)
    with pytest.raises(ValueError, match="beam_size must be a positive int"):
        loaded(x, beam_size=0)


# -- DiVeQ ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(dim=8, num_quantizers=3, codebook_size=16, diveq=True),
                                    dict(dim=8, codebook_dim=4, num_quantizers=2, codebook_size=16, diveq=True,
                                         threshold_ema_dead_code=1)], ids=["plain", "projection_dead_codes"])
def test_diveq_matches_vqp_over_sgd_steps(kwargs):
    ref, ours = _twin(kwargs)
    assert ours.config.diveq and ours.quant_grad_frac == 1.0
    assert all(layer.learnable_codebook and layer.commitment_weight == 0 for layer in ours.layers)
    ref_opt, our_opt = torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(ours.parameters(), lr=0.1)
    ref.train(), ours.train()
    for step in range(3):
        x = torch.randn(2, 6, 8, requires_grad=True)
        x_ours = x.detach().clone().requires_grad_()
        torch.manual_seed(step)  # DiVeQ's direction noise and dead-code draws
        q_ref, i_ref, l_ref = ref(x)
        torch.manual_seed(step)
        out = ours(x_ours)
        assert torch.equal(out.indices, i_ref)
        torch.testing.assert_close(out.quantized, q_ref)
        torch.testing.assert_close(out.loss, l_ref)
        (q_ref.square().sum() + l_ref.sum()).backward()
        (out.quantized.square().sum() + out.loss.sum()).backward()
        torch.testing.assert_close(x_ours.grad, x.grad)
        ref_opt.step(), our_opt.step(), ref_opt.zero_grad(), our_opt.zero_grad()
    _same_state(ref, ours)
    ref.eval(), ours.eval()
    x = torch.randn(2, 5, 8)
    out = ours(x)
    assert torch.equal(out.indices, ref(x)[1])
    # outside training hf_vq outputs the codes (vqp 1.32 adds DiVeQ's random move there too)
    torch.testing.assert_close(out.quantized, ours.get_output_from_indices(out.indices))


def test_diveq_round_trip(tmp_path):
    _, ours = _twin(dict(dim=8, num_quantizers=2, codebook_size=16, diveq=True))
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.diveq and loaded.quant_grad_frac == 1.0 and loaded.layers[1].learnable_codebook
    x = torch.randn(2, 5, 8)
    assert torch.equal(loaded.eval()(x).indices, ours.eval()(x).indices)


# -- implicit neural codebook (QINCo) -----------------------------------------------------------------

INC_CASES = {
    "mlp_kwargs": dict(dim=8, num_quantizers=3, codebook_size=16, implicit_neural_codebook=True,
                       mlp_kwargs=dict(dim_hidden=12, depth=2)),
    "projection_sizes_dead_codes": dict(dim=8, codebook_dim=4, num_quantizers=3, codebook_size=(16, 8, 4),
                                        implicit_neural_codebook=True, threshold_ema_dead_code=1),
    "dropout": dict(dim=8, num_quantizers=3, codebook_size=8, implicit_neural_codebook=True, quantize_dropout=True),
}


@pytest.mark.parametrize("case", sorted(INC_CASES))
def test_implicit_neural_codebook_matches_vqp_over_sgd_steps(case):
    """Values to float32 defaults; input gradients and state after SGD steps to 1e-5 (the one-hot matmul of vqp
    and our gather accumulate the codebook/MLP gradients in different orders)."""
    ref, ours = _twin(INC_CASES[case])
    assert set(ours.state_dict()) == set(ref.state_dict())  # vqp's keys (mlps.{i}.proj_in, .layers.{j}.0/.2)
    ref_opt, our_opt = torch.optim.SGD(ref.parameters(), lr=0.01), torch.optim.SGD(ours.parameters(), lr=0.01)
    ref.train(), ours.train()
    for step in range(3):
        x = torch.randn(2, 6, 8, requires_grad=True)
        x_ours = x.detach().clone().requires_grad_()
        torch.manual_seed(step)
        q_ref, i_ref, l_ref = ref(x)
        torch.manual_seed(step)
        out = ours(x_ours)
        assert torch.equal(out.indices, i_ref)
        torch.testing.assert_close(out.quantized, q_ref)
        torch.testing.assert_close(out.loss, l_ref)
        (q_ref.square().sum() + l_ref.sum()).backward()
        (out.quantized.square().sum() + out.loss.sum()).backward()
        torch.testing.assert_close(x_ours.grad, x.grad, rtol=1e-5, atol=1e-5)
        ref_opt.step(), our_opt.step(), ref_opt.zero_grad(), our_opt.zero_grad()
    ref_state = ref.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-5, atol=1e-5, msg=key)
    ref.eval(), ours.eval()
    x = torch.randn(2, 5, 8)
    q_ref, i_ref, _ = ref(x)
    out = ours(x)
    assert torch.equal(out.indices, i_ref)
    torch.testing.assert_close(out.quantized, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.get_codes_from_indices(i_ref), ref.get_codes_from_indices(i_ref),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.get_output_from_indices(i_ref), out.quantized)


def test_implicit_neural_codebook_round_trip_and_errors(tmp_path):
    ref, ours = _twin(INC_CASES["mlp_kwargs"])
    assert ours.config.mlp_kwargs == dict(dim_hidden=12, depth=2)
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 5, 8)
    q_ref, i_ref, _ = ref.eval()(x)
    out = loaded(x)
    assert torch.equal(out.indices, i_ref)
    torch.testing.assert_close(out.quantized, q_ref)
    # the MLP conditions later levels on earlier codes: the codes of level 1 depend on level 0's index
    other = i_ref.clone()
    other[..., 0] = (other[..., 0] + 1) % 16
    assert not torch.allclose(loaded.get_codes_from_indices(other)[1], loaded.get_codes_from_indices(i_ref)[1])
    with pytest.raises(ValueError, match="beam search"):
        loaded(x, beam_size=2)
    for kwargs, message in [(dict(mlp_kwargs=dict(width=3)), "unknown field"),
                            (dict(mlp_kwargs=dict(depth=0)), "positive int"),
                            (dict(straight_through=True, rotation_trick=False), "straight_through")]:
        with pytest.raises(ValueError, match=message):
            hf_vq.ResidualVQConfig(dim=8, num_quantizers=2, codebook_size=4, implicit_neural_codebook=True,
                                   **kwargs)


# -- fast paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, lean_eval", [
    (dict(quant_grad_frac=0.5), False),
    (dict(codebook_size=[16, 8, 4]), True),  # the lean eval loop takes one codebook per level, any size
    (dict(beam_size=2), False),
    (dict(diveq=True), False),  # (quant_grad_frac 1; learnable codebooks: never the fused training levels)
    (dict(implicit_neural_codebook=True), False),
])
def test_options_leave_the_fast_paths_they_change(kwargs, lean_eval):
    """The fused training levels never run with these options (they would drop what the option adds); the lean
    eval loop runs only where it computes the same as the level-by-level loop."""
    torch.manual_seed(0)
    rvq = hf_vq.ResidualVQ(**{**dict(dim=8, num_quantizers=3, codebook_size=16), **kwargs})
    residual = torch.randn(2, 5, 8, requires_grad=True)
    assert rvq.train()._fused_levels(residual, None, 2, {}) is None
    rvq.eval()
    assert (rvq._lean_eval_codebooks(None, {}) is not None) == lean_eval
    x = torch.randn(2, 5, 8)
    out = rvq(x)
    looped = rvq(x, freeze_codebook=False)  # a per-call option: the level-by-level loop
    assert torch.equal(out.indices, looped.indices)
    torch.testing.assert_close(out.quantized, looped.quantized)
