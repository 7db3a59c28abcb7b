"""FSP against vector-quantize-pytorch 1.32 `FSP` on shared weights and inputs (bit-exact: tolerance 0 for outputs,
indices, losses, statistics and gradients), vqp's own FSP tests run on hf_vq, migration and errors."""

import pytest
import torch
from transformers import AutoModel
from vector_quantize_pytorch import FSP as VqpFSP
from vector_quantize_pytorch.finite_scalar_perturbation import build_cdf_act as vqp_build_cdf_act

import hf_vq
from hf_vq import FSP, FSPConfig, build_cdf_act
from hf_vq.diffusers_support import DiffusersQuantizer

CONFIGS = [
    dict(levels=[8, 5, 5, 5]),
    dict(levels=[8, 5, 5, 5], dim=16, quantize_rate=0.3, act_name="normal"),
    dict(levels=[4, 3], dim=6, channel_first=True, need_inv_act=True, vector_norm="kurt", act_name="laplace",
         quantize_rate=0.5),
    dict(levels=[2, 7], dim=5, projection_has_bias=False, act_name="sigmoid", vector_norm="var_sigmoid"),
    dict(levels=[6, 6, 6], act_name="cauchy", need_inv_act=True, vector_norm="none", quantize_rate=0.0),
]


def _input(kwargs, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = kwargs.get("dim") or len(kwargs["levels"])
    shape = (2, dim, 3, 4) if kwargs.get("channel_first") else (2, 7, dim)
    return torch.randn(*shape, generator=g)


def _pair(kwargs):
    torch.manual_seed(0)
    theirs = VqpFSP(**kwargs)
    return theirs, FSP.from_vector_quantize_pytorch(theirs)


def _assert_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_equal(a[key], b[key])
    else:
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_vqp_outputs_and_gradients(kwargs, train):
    theirs, ours = _pair(kwargs)
    theirs.train(train), ours.train(train)
    x = _input(kwargs)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    want = theirs(x1)
    torch.manual_seed(1)
    got = ours(x2, return_dict=False)
    assert len(got) == len(want) == 4
    for a, b in zip(want, got):
        _assert_equal(a, b)
    assert ("p_accept_prob" in got[3]) == (train and kwargs.get("quantize_rate", 0.0) < 1.0)
    (want[0].square().sum() + want[2]).backward()
    (got[0].square().sum() + got[2]).backward()
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("kwargs", CONFIGS[1:3], ids=["normal", "inv_act"])
def test_training_steps_match_vqp(kwargs):
    theirs, ours = _pair(kwargs)
    opt_t = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    opt_o = torch.optim.Adam(ours.parameters(), lr=1e-2)
    for step in range(4):
        x = _input(kwargs, seed=step)
        for model, opt in ((theirs, opt_t), (ours, opt_o)):
            torch.manual_seed(step)
            quantized, _, norm_loss, _ = model(x) if model is theirs else model(x, return_dict=False)
            ((quantized - x).square().mean() + norm_loss).backward()
            opt.step()
            opt.zero_grad()
    for (n1, p1), (n2, p2) in zip(theirs.state_dict().items(), ours.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_output_fields_and_indices_round_trip():
    fsp = FSP(levels=[8, 5, 3], dim=6, quantize_rate=0.25).eval()
    x = torch.randn(2, 5, 6)
    out = fsp(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (2, 5) and out.indices.dtype == torch.int32
    assert out.level_indices.shape == (2, 5, 3) and out.p_accept_prob is None
    assert sorted(out.norm_info) == ["kurtosis", "mean", "skewness", "variance"]
    assert torch.equal(fsp.indices_to_level_indices(out.indices).float(), out.level_indices)
    assert torch.allclose(fsp.indices_to_codes(out.indices), out.quantized, atol=1e-6)
    # every code of the implicit codebook decodes to its own bins
    all_codes = torch.arange(fsp.codebook_size)
    assert torch.equal(fsp.level_indices_to_indices(fsp.indices_to_level_indices(all_codes)), all_codes.int())
    fsp.train()
    assert 0.0 < float(fsp(x).p_accept_prob) <= 1.0


@pytest.mark.parametrize("act_name", ["tanh", "sigmoid", "normal", "laplace", "cauchy"])
def test_build_cdf_act_matches_vqp_and_inverts(act_name):
    act, inv = build_cdf_act(act_name)
    their_act, their_inv = vqp_build_cdf_act(act_name)
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    y = act(x)
    assert torch.equal(y, their_act(x)) and torch.equal(inv(y), their_inv(y))
    assert ((y > 0) & (y < 1)).all() and torch.allclose(inv(y), x, atol=1e-3)  # float32 CDF tails


def test_build_cdf_act_unknown_name():
    with pytest.raises(ValueError, match="CDF activation 'gumbel' not available"):
        build_cdf_act("gumbel")


@pytest.mark.parametrize("dim", [None, 5])
def test_a_feature_constant_over_the_batch_keeps_finite_gradients(dim):
    """The default `"var_tanh"` norm weighs skewness and kurtosis 0: they are left out, so a feature constant over
    the batch (zero variance, where their square roots have infinite slope) gives finite input gradients; vqp
    1.32 gives NaN ones (README: deliberate differences) with the same loss value."""
    ref = VqpFSP(levels=[5, 3], dim=dim)
    ours = FSP.from_vector_quantize_pytorch(ref)
    row = torch.randn(dim or 2)
    x = torch.stack([row, row])[None].requires_grad_()
    quantized, _, loss, _ = ours(x, return_dict=False)
    torch.testing.assert_close(loss, ref(x.detach())[2])
    (quantized.sum() + loss).backward()
    assert torch.isfinite(x.grad).all()


# vqp 1.32 tests/test_fsp.py, called the vqp way (positional args, plain tuples)


def test_vqp_basic_none_norm_gives_zero_loss():
    fsp = FSP(levels=[8, 5, 5, 5], act_name="normal", vector_norm="none", return_dict=False)
    x = torch.randn(1, 1024, 4)
    quantized, indices, norm_loss, other_info = fsp(x)
    assert quantized.shape == x.shape and indices.shape == (1, 1024)
    assert norm_loss.item() == 0.0 and isinstance(other_info, dict)


def test_vqp_index_encoding_positional():
    fsp = FSP([8, 5, 5, 5])
    level_indices = torch.tensor([[[7, 4, 4, 4]]])
    flat = fsp.level_indices_to_indices(level_indices)
    assert flat.item() == 999
    assert torch.equal(fsp.indices_to_level_indices(flat).long(), level_indices)


def test_vqp_image_input_and_projection():
    fsp = FSP([8, 5, 5, 5], 4, True).eval()  # levels, dim, channel_first
    x = torch.randn(2, 4, 8, 8)
    quantized, indices, *_ = fsp(x, return_dict=False)
    assert quantized.shape == x.shape and indices.shape == (2, 8, 8)
    assert torch.allclose(fsp.indices_to_codes(indices), quantized, atol=1e-5)
    fsp = FSP(levels=[8, 5, 5, 5], dim=256).eval()
    assert fsp.has_projections
    x = torch.randn(1, 64, 256)
    quantized, indices, _, _ = fsp(x, return_dict=False)
    assert torch.allclose(fsp.indices_to_codes(indices), quantized, atol=1e-4)


def test_vqp_quantize_rate_one_is_deterministic_in_training():
    fsp = FSP(levels=[8, 5, 5, 5], quantize_rate=1.0).train()
    x = torch.randn(1, 64, 4)
    assert torch.equal(fsp(x).quantized, fsp(x).quantized)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_training_dtypes_and_gradients(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), FSP(levels=[8, 5, 5, 5], dim=16, return_dict=False),
                                ).to(dtype).train()
    x = torch.randn(2, 8, 16, dtype=dtype, requires_grad=True)
    quantized, indices, norm_loss, _ = model(x)
    assert quantized.dtype == dtype and indices.dtype == torch.int32
    assert ((indices >= 0) & (indices < 1000)).all()
    (quantized.float().sum() + norm_loss.float()).backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# migration and Hugging Face round trips


def test_migration_round_trip_through_automodel(tmp_path):
    torch.manual_seed(0)
    theirs = VqpFSP(levels=[5, 4, 3], dim=8, act_name="sigmoid", quantize_rate=0.2, need_inv_act=True,
                    vector_norm="var_laplace")
    with torch.no_grad():  # a "trained" module: state differs from a fresh init
        theirs.project_in.weight.mul_(1.5)
    theirs.vector_norm.l2_weight = 0.5  # a non-preset regularizer survives as a dict
    ours = FSP.from_vector_quantize_pytorch(theirs)
    assert ours.config.vector_norm["l2_weight"] == 0.5 and ours.config.vector_norm["l2_target"] == 2.0
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is FSP and (tmp_path / "README.md").exists()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(2, 6, 8)
    for train in (False, True):
        theirs.train(train), loaded.train(train)
        torch.manual_seed(3)
        want = theirs(x)
        torch.manual_seed(3)
        got = loaded(x, return_dict=False)
        for a, b in zip(want, got):
            _assert_equal(a, b)
    assert FSP.from_vector_quantize_pytorch(VqpFSP(levels=[4, 4], vector_norm="kurt")).config.vector_norm == "kurt"


def test_diffusers_face_round_trip(tmp_path):
    fsp = FSP(levels=[5, 3], dim=4, act_name="normal").eval()
    DiffusersQuantizer.from_quantizer(fsp).save_pretrained(tmp_path)
    loaded = DiffusersQuantizer.from_pretrained(tmp_path).quantizer.eval()
    x = torch.randn(2, 5, 4)
    assert type(loaded) is FSP and torch.equal(loaded(x).quantized, fsp(x).quantized)
    assert isinstance(hf_vq.build_quantizer("FSP", {"levels": [3, 3]}), FSP)


# errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(levels=[8, 1]), "levels must all be >= 2"),
    (dict(levels=[]), "levels must be a non-empty list"),
    (dict(dim=0), "dim must be a positive int"),
    (dict(act_name="gumbel"), "act_name must be one of"),
    (dict(quantize_rate=1.5), r"quantize_rate must be in \[0.0, 1.0\]"),
    (dict(vector_norm="varr"), "vector_norm preset 'varr' unknown"),
    (dict(vector_norm={"l5_weight": 1.0}), r"vector_norm got unknown field\(s\) \['l5_weight'\]"),
    (dict(vector_norm={"l1_weight": "a"}), "vector_norm values must be numbers"),
    (dict(need_inv_act=1), "need_inv_act must be a bool"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSPConfig(**{"levels": [8, 5], **kwargs})


def test_bad_input_and_arguments():
    fsp = FSP(levels=[8, 5], dim=6)
    with pytest.raises(ValueError, match="expected feature dim 6 on the last dim, got 5"):
        fsp(torch.randn(2, 3, 5))
    fsp.eval()(torch.full((2, 3, 6), float("nan")))  # no value check on the input (no device sync)
    with pytest.raises(ValueError, match="expected feature dim 6 on dim 1"):
        FSP(levels=[8, 5], dim=6, channel_first=True)(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 40\)"):
        fsp.indices_to_codes(torch.tensor([[40]]))
    with pytest.raises(TypeError, match="multiple values for argument 'levels'"):
        FSP([8, 5], levels=[8, 5])
    with pytest.raises(TypeError, match="at most 8 positional"):
        FSP([8, 5], None, False, True, "tanh", 0.0, False, "none", 1)
