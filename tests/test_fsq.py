"""FSQ: parity with vector-quantize-pytorch 1.32 `FSQ` for every option, CogVideo sgm's formulas, index <->
code round trips, shapes, gradients, noise dropout, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vector_quantize_pytorch import FSQ as RefFSQ

import hf_vq


def _pair(**kwargs):
    ref = RefFSQ(**kwargs)
    ours = hf_vq.FSQ(**kwargs)
    ours.load_state_dict(ref.state_dict())  # projections and the orthogonal rotation buffer, strict
    return ours, ref


CASES = {
    "levels": (dict(levels=[8, 5, 5, 5]), (2, 7, 4)),
    "projections_image": (dict(levels=[8, 5, 5, 5], dim=16), (2, 16, 4, 4)),
    "video": (dict(levels=[7, 5, 4], dim=6), (2, 6, 2, 3, 3)),
    "num_codebooks": (dict(levels=[5, 5, 3], num_codebooks=2), (2, 7, 6)),
    "num_codebooks_projection": (dict(levels=[5, 3], dim=10, num_codebooks=3), (2, 10, 3, 3)),
    "keep_num_codebooks_dim": (dict(levels=[8, 6], keep_num_codebooks_dim=True), (2, 7, 2)),
    "channel_first_rank3": (dict(levels=[8, 5, 5], dim=12, channel_first=True), (2, 12, 9)),
    "no_bias": (dict(levels=[8, 5, 5], dim=12, projection_has_bias=False), (2, 9, 12)),
    "preserve_symmetry": (dict(levels=[2, 4, 5], preserve_symmetry=True), (2, 9, 3)),
    "bound_hard_clamp": (dict(levels=[8, 5, 5], bound_hard_clamp=True), (2, 9, 3)),
    "symmetric_hard_clamp": (dict(levels=[6, 5], preserve_symmetry=True, bound_hard_clamp=True), (2, 9, 2)),
    "orthogonal_rotation": (dict(levels=[5, 5, 5, 5], dim=8, orthogonal_rotation=True), (2, 8, 3, 3)),
    "no_indices": (dict(levels=[8, 5, 5], return_indices=False), (2, 9, 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_vqp(case):
    kwargs, shape = CASES[case]
    ours, ref = _pair(**kwargs)
    x = (torch.randn(*shape) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    for train in (False, True):
        ours.train(train), ref.train(train)
        q_ref, i_ref = ref(x_ref)
        out = ours(x)
        torch.testing.assert_close(out.quantized, q_ref, rtol=0, atol=1e-6)
        if kwargs.get("return_indices", True):
            assert torch.equal(out.indices, i_ref)
            torch.testing.assert_close(ours.indices_to_codes(out.indices), ref.indices_to_codes(i_ref), rtol=0, atol=1e-6)
        else:
            assert out.indices is None and i_ref is None
    # straight-through gradients are the same
    ref(x_ref)[0].square().sum().backward()
    ours(x).quantized.square().sum().backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_force_quantization_f32_with_bf16_under_autocast():
    ours, ref = _pair(levels=[8, 5, 5, 5])
    x = (torch.randn(2, 9, 4) * 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    q_ref, i_ref = ref(x)  # vqp: float32 quantization (bf16 is not an allowed dtype), cast back
    assert out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.quantized, q_ref) and torch.equal(out.indices, i_ref)
    # without forcing f32 the computation runs in bf16 (and may differ), but the dtype is kept
    loose = hf_vq.FSQ(levels=[8, 5, 5, 5], force_quantization_f32=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loose(x).quantized.dtype == torch.bfloat16


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_symmetric_levels_quantized_in_bf16_match_vqp(grad):
    """`force_quantization_f32=False`: the quantization runs in bf16, the same rounding steps with or without
    autograd, and the mixed-radix index is summed exactly (336 codes: bf16 cannot hold every index)."""
    ours, ref = _pair(levels=[8, 6, 7], preserve_symmetry=True, force_quantization_f32=False)
    x = (torch.randn(1, 2000, 3) * 1.5).bfloat16().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        q_ref, i_ref = ref(x)
        out = ours(x)
    assert torch.equal(out.quantized, q_ref) and torch.equal(out.indices, i_ref)
    assert int(out.indices.max()) < ours.codebook_size


# ---- CogVideo sgm's formulas ---------------------------------------------------------------------


def test_allowed_dtypes_match_vqp():
    # levels 7 and 3 give codes like 1/3 that float32 cannot hold exactly: float64 input quantized in float32 (not an
    # allowed dtype) and cast back differs from float64 quantization
    x = torch.randn(2, 64, 4, dtype=torch.float64) * 2
    ours, ref = _pair(levels=[7, 7, 3, 6], allowed_dtypes=(torch.float32,))
    out, (q_ref, i_ref) = ours(x), ref(x)
    assert out.quantized.dtype == torch.float64
    assert torch.equal(out.quantized, q_ref) and torch.equal(out.indices, i_ref)
    default = hf_vq.FSQ(levels=[7, 7, 3, 6])(x)  # float64 is allowed by default: quantized in float64
    assert torch.equal(default.quantized, RefFSQ(levels=[7, 7, 3, 6])(x)[0])
    assert not torch.equal(default.quantized, out.quantized)
    assert torch.equal(out.quantized, default.quantized.float().double())


def test_allowed_dtypes_config_field():
    fsq = hf_vq.FSQ([8, 5, 5, 5], None, 1, None, None, [torch.bfloat16, "float32"])  # vqp's positional slot
    assert fsq.config.allowed_dtypes == ["bfloat16", "float32"]
    assert hf_vq.FSQConfig.from_dict(fsq.config.to_dict()).allowed_dtypes == ["bfloat16", "float32"]
    for bad in (["int32"], ["nonsense"], torch.float32, "float32"):
        with pytest.raises(ValueError, match="allowed_dtypes"):
            hf_vq.FSQ(levels=[8, 5, 5, 5], allowed_dtypes=bad)


# ---- the CogVideo seed (000) formulas ----------------------------------------------------------


def _sgm_indices_to_codes(indices, levels, num_codebooks_axis):
    """CogVideo sgm `indices_to_codes(..., project_out=False)`: mixed-radix digits, centred, image -> channel first."""
    levels_t = torch.tensor(levels)
    basis = torch.cumprod(torch.tensor([1] + levels[:-1]), 0)
    is_img = indices.ndim >= 3 + int(num_codebooks_axis)
    digits = (indices.unsqueeze(-1) // basis) % levels_t
    half = levels_t // 2
    codes = (digits - half) / half
    if num_codebooks_axis:
        codes = codes.flatten(-2)
    return codes.movedim(-1, 1) if is_img else codes


@pytest.mark.parametrize("levels,num_codebooks,shape", [([8, 5, 5, 5], 1, (2, 4, 4)), ([7, 5, 3], 2, (2, 6, 2))])
def test_indices_to_codes_without_projection_matches_sgm(levels, num_codebooks, shape):
    fsq = hf_vq.FSQ(levels=levels, num_codebooks=num_codebooks, dim=16)
    indices = torch.randint(0, math.prod(levels), shape)
    expected = _sgm_indices_to_codes(indices, levels, num_codebooks > 1)
    torch.testing.assert_close(fsq.indices_to_codes(indices, project_out=False), expected)


def test_codes_to_indices_rounds_where_sgm_truncates():
    # CogVideo sgm casts float sums with int32() (truncation); vqp and hf_vq round. Over the whole implicit
    # codebook the indices are exact.
    fsq = hf_vq.FSQ(levels=[7, 7, 7, 6])
    assert torch.equal(fsq.codes_to_indices(fsq.implicit_codebook).long(), torch.arange(fsq.codebook_size))


# ---- index <-> code -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(levels=st.lists(st.integers(2, 10), min_size=1, max_size=5), symmetric=st.booleans())
def test_indices_codes_indices_identity(levels, symmetric):
    if 2 in levels and not symmetric:
        levels = [level + 1 if level == 2 else level for level in levels]
    fsq = hf_vq.FSQ(levels=levels, preserve_symmetry=symmetric)
    indices = torch.randint(0, fsq.codebook_size, (64,))
    codes = fsq.indices_to_codes(indices)
    assert codes.abs().max() <= 1.0 + 1e-6
    assert torch.equal(fsq.codes_to_indices(codes).long(), indices)


def test_implicit_codebook_is_indices_to_codes_of_arange():
    for kwargs in (dict(levels=[8, 5, 5, 5]), dict(levels=[2, 4, 3], preserve_symmetry=True)):
        ours, ref = _pair(**kwargs)
        codebook = ours.indices_to_codes(torch.arange(ours.codebook_size), project_out=False)
        assert torch.equal(ours.implicit_codebook, codebook)
        torch.testing.assert_close(ours.implicit_codebook, ref.implicit_codebook)


# ---- shapes, gradients, noise dropout -----------------------------------------------------------


@pytest.mark.parametrize("shape,channel_first,index_shape", [
    ((2, 16, 4, 4), False, (2, 4, 4)),
    ((2, 16, 2, 3, 3), False, (2, 2, 3, 3)),
    ((2, 9, 16), False, (2, 9)),
    ((2, 16, 9), True, (2, 9)),
    ((3, 16), False, (3,)),
])
def test_shapes(shape, channel_first, index_shape):
    fsq = hf_vq.FSQ(levels=[8, 5, 5, 5], dim=16, channel_first=channel_first)
    out = fsq(torch.randn(*shape))
    assert out.quantized.shape == shape and out.indices.shape == index_shape
    assert fsq.indices_to_codes(out.indices).shape == shape


def test_gradient_flows_straight_through():
    fsq = hf_vq.FSQ(levels=[8, 5, 5, 5], dim=16)
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    fsq(x).quantized.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert fsq.project_in.weight.grad.abs().sum() > 0


def test_noise_dropout_invariants():
    fsq = hf_vq.FSQ(levels=[8, 6, 5], preserve_symmetry=True, noise_dropout=0.5)
    clean = hf_vq.FSQ(levels=[8, 6, 5], preserve_symmetry=True).eval()
    x = torch.randn(4, 64, 3) * 2
    fsq.train()
    out = fsq(x)
    ref = clean(x)
    assert torch.equal(out.indices, ref.indices)  # indices are taken before the noise
    assert out.quantized.abs().max() <= 1.0
    changed = (out.quantized != ref.quantized).float().mean()
    assert 0.2 < changed < 0.8  # about half the entries get an offset
    assert ((out.quantized - ref.quantized).abs() <= 0.5 + 1e-6).all()
    fsq.eval()
    assert torch.equal(fsq(x).quantized, ref.quantized)


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(levels=[8, 5.5]), "levels must contain only ints"),
    (dict(levels=[8, 1]), "levels must all be >= 2"),
    (dict(levels=[8, 2]), "contains 2, which needs preserve_symmetry=True"),
    (dict(levels=[]), "levels must be a non-empty list"),
    (dict(levels=[8, 5], noise_dropout=0.1), "noise_dropout > 0 requires preserve_symmetry=True"),
    (dict(levels=[8, 5], num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim=False"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_vq.FSQConfig(**kwargs)


def test_input_and_index_errors():
    fsq = hf_vq.FSQ(levels=[8, 5, 5, 5], dim=16)
    with pytest.raises(ValueError, match="expected feature dim 16, got 15"):
        fsq(torch.randn(2, 9, 15))
    with pytest.raises(ValueError, match="must have rank"):
        fsq(torch.randn(16))
    # no value check on the input (no device sync); FSQ keeps no state a NaN could reach
    assert fsq(torch.full((2, 9, 16), float("nan"))).quantized.shape == (2, 9, 16)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 1000\), got range \[0, 1000\]"):
        fsq.indices_to_codes(torch.tensor([[0, 1000]]))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 1000\)"):
        fsq.indices_to_codes(torch.tensor([[-1]]))


# ---- the forward's ops: one bound/round pass, exact indices, channel-first layouts ----------------------


@pytest.mark.parametrize("levels,symmetric,hard_clamp", [
    ([8, 8, 8, 5, 5, 5], False, False), ([7, 5, 4], False, True), ([2, 4, 5], True, False), ([6, 5], True, True)])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_bound_and_round_equals_the_reference_ops(levels, symmetric, hard_clamp, requires_grad):
    from hf_vq.ops import fsq as fsq_ops

    g = torch.Generator().manual_seed(len(levels))
    z = torch.randn(3000, 2 * len(levels), generator=g) * 3
    z[:7] = 0.0  # exact zeros and values on rounding boundaries of the bound
    lv, basis = fsq_ops.fsq_tables(levels)
    reference = fsq_ops.fsq_quantize_symmetric if symmetric else fsq_ops.fsq_quantize
    z_ref = z.clone().requires_grad_(requires_grad)
    ref_codes = reference(z_ref, lv.repeat(2), hard_clamp=hard_clamp)
    ref_indices = fsq_ops.codes_to_indices(ref_codes.unflatten(-1, (2, len(levels))), lv, basis, symmetric)
    table = fsq_ops.bound_table(levels, hard_clamp=hard_clamp, symmetric=symmetric, repeat=2)
    z_ours = z.clone().requires_grad_(requires_grad)
    codes, level = fsq_ops.bound_and_round(z_ours, table, hard_clamp=hard_clamp, symmetric=symmetric)
    indices = fsq_ops.level_digits_to_indices(level.unflatten(-1, (2, len(levels))), basis, math.prod(levels))
    assert torch.equal(codes, ref_codes) and torch.equal(indices, ref_indices)
    assert codes.requires_grad == requires_grad
    if requires_grad:
        w = torch.randn(codes.shape, generator=g)
        (codes * w).sum().backward()
        (ref_codes * w).sum().backward()
        assert torch.equal(z_ours.grad, z_ref.grad)


def test_level_digits_to_indices_exact_beyond_float32_integers():
    from hf_vq.ops import fsq as fsq_ops

    levels = [1000, 1000, 999]  # codebook of ~1e9 codes: float32 sums would round
    lv, basis = fsq_ops.fsq_tables(levels)
    digits = torch.stack([torch.randint(0, level, (500,)) for level in levels], dim=-1)
    expected = (digits * basis).sum(-1).to(torch.int32)
    got = fsq_ops.level_digits_to_indices(digits.float().unsqueeze(-2), basis, math.prod(levels))
    assert torch.equal(got.squeeze(-1), expected)
    # within 2**24 the float32 product is exact, also under a bf16 autocast region
    small = [8, 8, 8, 5, 5, 5]
    lv, basis = fsq_ops.fsq_tables(small)
    digits = torch.stack([torch.randint(0, level, (500,)) for level in small], dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fsq_ops.level_digits_to_indices(digits.float(), basis, math.prod(small))
    assert torch.equal(got, (digits * basis).sum(-1).to(torch.int32))


@pytest.mark.parametrize("dim,bias", [(24, True), (24, False), (None, True)])
def test_channel_first_input_equals_the_token_layout(dim, bias):
    """A (b, d, h, w) input (projected as batched products over its (b, d, n) view) gives the values and
    gradients of the same tokens given as (b, n, d)."""
    fsq = hf_vq.FSQ(levels=[8, 5, 5, 5], dim=dim, projection_has_bias=bias)
    d = dim or 4
    x = (torch.randn(2, d, 3, 5) * 2).requires_grad_()
    tokens = x.detach().flatten(2).transpose(1, 2).contiguous().requires_grad_()
    out, ref = fsq(x), fsq(tokens)
    torch.testing.assert_close(out.quantized.flatten(2).transpose(1, 2), ref.quantized, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.indices.flatten(1), ref.indices)
    w = torch.randn(ref.quantized.shape)
    (out.quantized.flatten(2).transpose(1, 2) * w).sum().backward()
    (ref.quantized * w).sum().backward()
    torch.testing.assert_close(x.grad.flatten(2).transpose(1, 2), tokens.grad, rtol=1e-5, atol=1e-6)


def test_config_is_read_once():
    """The forward reads the plain attributes copied from the config when the model was built."""
    fsq = hf_vq.FSQ(levels=[8, 5, 5, 5])
    assert (fsq.levels, fsq.dim, fsq.keep_num_codebooks_dim, fsq.check_inputs) == ([8, 5, 5, 5], 4, False, True)
    assert not hasattr(hf_vq.models.fsq, "fast_view")


@pytest.mark.parametrize("levels,hard_clamp,num_quantizers", [([8, 5, 5, 5], True, 4), ([7, 4, 3], False, 3)])
def test_residual_fsq_op_equals_the_per_level_loop(levels, hard_clamp, num_quantizers):
    """`fsq.residual_fsq` (the reference of the one-pass ResidualFSQ kernel) gives ResidualFSQ's values, indices
    and straight-through gradients, computed there by calling each level's FSQ forward."""
    from hf_vq.ops import fsq as fsq_ops

    model = hf_vq.ResidualFSQ(levels=levels, num_quantizers=num_quantizers, dim=len(levels),
                              bound_hard_clamp=hard_clamp)
    model.levels_path = "per_level"  # the reference: each level's FSQ forward in turn
    scales = torch.stack([torch.tensor(levels, dtype=torch.float32) ** -i for i in range(num_quantizers)])
    table = fsq_ops.bound_table(levels, hard_clamp=hard_clamp, symmetric=True)
    basis = fsq_ops.fsq_tables(levels)[1]
    x = torch.randn(2, 41, len(levels)) * 2
    for train in (False, True):
        model.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref = model(xa)
        out, indices = fsq_ops.residual_fsq(model._prepare(xb), scales, table, basis, model.codebook_size,
                                            hard_clamp=hard_clamp)
        assert torch.equal(out, ref.quantized) and torch.equal(indices.long(), ref.indices.long())
        w = torch.randn(out.shape)
        (ref.quantized * w).sum().backward()
        (out * w).sum().backward()
        assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kwargs,shape", [
    (dict(levels=[8, 5, 5, 5], num_quantizers=4, dim=12), (2, 9, 12)),
    (dict(levels=[7, 4, 3], num_quantizers=3, bound_hard_clamp=False, soft_clamp_input_value=1.5,
          is_channel_first=True), (2, 3, 9)),
    (dict(levels=[5, 3], num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=1), (2, 9, 2)),
], ids=["proj", "soft", "dropout"])
def test_residual_fsq_one_pass_equals_the_per_level_loop(kwargs, shape, train):
    """ResidualFSQ's one-pass levels give what calling each level gives: outputs, indices, input gradients."""
    torch.manual_seed(0)
    fast = hf_vq.ResidualFSQ(**kwargs).train(train)
    assert fast.levels_path == "one_pass"
    slow = hf_vq.ResidualFSQ(**kwargs).train(train)
    slow.load_state_dict(fast.state_dict())
    slow.levels_path = "per_level"
    x = torch.randn(*shape) * 2
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    a = fast(xa, dropout_cutoff=1 if kwargs.get("quantize_dropout") else None)
    torch.manual_seed(1)
    b = slow(xb, dropout_cutoff=1 if kwargs.get("quantize_dropout") else None)
    assert torch.equal(a.quantized, b.quantized)
    assert torch.equal(a.indices.long(), b.indices.long())
    w = torch.randn(a.quantized.shape)
    (a.quantized * w).sum().backward()
    (b.quantized * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)


def test_residual_fsq_takes_the_per_level_loop_for_any_non_default_level_option():
    """Every FSQ level option at a non-default value sends ResidualFSQ to the per-level loop (the one-pass op
    implements plain symmetric levels only), so no option is silently ignored."""
    from hf_vq.models.residual import ResidualFSQConfig

    defaults = hf_vq.FSQConfig(levels=[5, 3], dim=2, preserve_symmetry=True, check_inputs=False).to_kwargs()
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.25}
    checked = []
    for name in sorted(ResidualFSQConfig.level_fields):
        value = defaults[name]
        if type(value) in other:
            new = other[type(value)](value)
        elif value is None:
            new = {"scale": 0.5, "allowed_dtypes": ["float32"]}.get(name, 2)
        else:
            continue  # lists/strings: covered by the config's own validation
        try:
            model = hf_vq.ResidualFSQ(levels=[5, 3], num_quantizers=2, fsq_kwargs={name: new})
        except (ValueError, TypeError):
            continue  # not a valid level option value
        assert model.levels_path == "per_level", name
        checked.append(name)
    assert len(checked) >= 4, checked


def test_unit_clamp_matches_clamp_values_and_gradient():
    """`ops.fsq.clamp_unit` (the hard bound's clamp, its backward through a float mask) gives `clamp(-1, 1)`'s
    values and gradient, both ends of the interval included, and no gradient for +-inf and NaN."""
    from hf_vq.ops.fsq import clamp_unit

    z = torch.cat([torch.tensor([-2.0, -1.0, 1.0, 2.0, float("inf"), -float("inf"), float("nan")]),
                   torch.randn(200) * 1.5])
    ours, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, want = clamp_unit(ours), ref.clamp(-1.0, 1.0)
    assert torch.equal(out.detach().nan_to_num(), want.detach().nan_to_num())
    g = torch.randn_like(z)
    out.backward(g)
    want.backward(g)
    assert torch.equal(ours.grad, ref.grad)


@pytest.mark.parametrize("hard_clamp", [False, True])
def test_vqp_bound_methods(hard_clamp):
    """vqp 1.32's public `bound`, `symmetry_preserving_bound` and `maybe_apply_noise` on the same features."""
    levels = [8, 5, 4, 3]
    ours, ref = hf_vq.FSQ(levels=levels), RefFSQ(levels=levels)
    z = torch.randn(4, 30, len(levels)) * 2
    torch.testing.assert_close(ours.bound(z, hard_clamp=hard_clamp), ref.bound(z, hard_clamp=hard_clamp))
    torch.testing.assert_close(ours.bound(z, eps=0.1), ref.bound(z, eps=0.1))
    torch.testing.assert_close(ours.symmetry_preserving_bound(z, hard_clamp=hard_clamp),
                               ref.symmetry_preserving_bound(z, hard_clamp=hard_clamp))
    noisy = hf_vq.FSQ(levels=levels, preserve_symmetry=True, noise_dropout=0.5)
    codes = noisy.quantize(z)
    assert torch.equal(noisy.eval().maybe_apply_noise(codes), codes)
    moved = noisy.train().maybe_apply_noise(codes)
    assert moved.abs().max() <= 1 and 0.3 < (moved != codes).float().mean() < 0.7

