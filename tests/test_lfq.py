"""LFQ: parity with vector-quantize-pytorch 1.32 `LFQ`, CogVideo sgm's formulas, the factorized entropy ops, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import LFQ as RefLFQ

import hf_vq
from hf_vq.ops import lfq as ops

VQP_ONLY = {"straight_through_activation", "inv_temperature", "entropy_loss_method"}


def _pair(**kwargs):
    """An hf_vq LFQ and a vqp LFQ with the same weights (vqp's state dict, incl. its `mask`, loaded into ours)."""
    kwargs.setdefault("commitment_loss_weight", 0.25)  # CogVideo sgm's default; vqp's is 0
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in VQP_ONLY}
    if "straight_through_activation" in kwargs:
        ref_kwargs["straight_through_activation"] = hf_vq.models.lfq.ACTIVATIONS[kwargs["straight_through_activation"]]()
    ref = RefLFQ(**ref_kwargs)
    ours = hf_vq.LFQ(**kwargs)
    ours.load_state_dict(ref.state_dict())  # strict: keys match (vqp's `mask` buffer is accepted and dropped)
    return ours, ref


def _full_softmax_probs(x, scale, inv_temperature):
    """CogVideo sgm's formula: softmax over all codes of `2 * inv_temp * <x, c>` -> `(N, c, 2**C)`."""
    nbits = x.shape[-1]
    codebook = ops.bits_to_codes(ops.bits_of(torch.arange(2**nbits), nbits), scale).to(x.dtype)
    return (2 * inv_temperature * torch.einsum("...d,kd->...k", x, codebook)).softmax(-1)


CASES = {
    "default": (dict(codebook_size=2**6), (2, 5, 6)),
    "projections_image": (dict(dim=16, codebook_size=2**8), (2, 16, 4, 4)),
    "video": (dict(dim=8, codebook_size=2**5), (2, 8, 2, 3, 3)),
    "num_codebooks": (dict(dim=12, codebook_size=2**4, num_codebooks=2), (2, 12, 3, 3)),
    "keep_codebook_dim": (dict(codebook_size=2**5, keep_num_codebooks_dim=True), (2, 7, 5)),
    "codebook_scale": (dict(codebook_size=2**6, codebook_scale=0.5), (2, 9, 6)),
    "weights_and_gamma": (dict(codebook_size=2**6, entropy_loss_weight=0.3, commitment_loss_weight=1.5,
                               diversity_gamma=2.5), (2, 9, 6)),
    "frac_per_sample_entropy": (dict(codebook_size=2**6, frac_per_sample_entropy=0.5), (2, 16, 6)),
    "soft_clamp": (dict(dim=10, codebook_size=2**6, soft_clamp_input_value=1.5), (2, 9, 10)),
    "spherical": (dict(dim=10, codebook_size=2**6, spherical=True), (2, 9, 10)),
    "channel_first_rank3": (dict(dim=10, codebook_size=2**6, channel_first=True), (2, 10, 9)),
    "softplus_entropy": (dict(codebook_size=2**6, experimental_softplus_entropy_loss=True,
                              entropy_loss_offset=2.0), (2, 9, 6)),
    "orthogonal_rotation": (dict(dim=10, codebook_size=2**6, orthogonal_rotation=True), (2, 9, 10)),
    "cosine_sim_project_in": (dict(dim=10, codebook_size=2**6, cosine_sim_project_in=True,
                                   cosine_sim_project_in_scale=2.0), (2, 9, 10)),
    "no_bias_forced_projection": (dict(dim=6, codebook_size=2**6, has_projections=True,
                                       projection_has_bias=False), (2, 9, 6)),
    "tanh_activation": (dict(codebook_size=2**6, straight_through_activation="tanh"), (2, 9, 6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_vqp_train_and_eval(case):
    kwargs, shape = CASES[case]
    ours, ref = _pair(**kwargs)
    x = torch.randn(*shape)
    for train in (True, False):
        ours.train(train), ref.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(3)  # frac_per_sample_entropy draws the same random subset
        (q_ref, i_ref, loss_ref), bd_ref = ref(xa, return_loss_breakdown=True)
        torch.manual_seed(3)
        out = ours(xb, return_loss_breakdown=True)
        assert torch.equal(out.indices, i_ref)
        torch.testing.assert_close(out.quantized, q_ref, rtol=0, atol=1e-6)
        # entropies: ours sums per-bit entropies / a factorized matmul, vqp a softmax over all codes; float
        # summation order differs (and vqp clamps p at 1e-5 inside the log, negligible at inv_temperature=100)
        torch.testing.assert_close(out.loss, loss_ref, rtol=0, atol=1e-5)
        for a, b in zip(out.loss_breakdown, bd_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        if train:
            (q_ref.square().sum() + loss_ref).backward()
            (out.quantized.square().sum() + out.loss).backward()
            torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inv_temperature", [100.0, 30.0])
def test_inv_temperature_forward_argument_and_config(inv_temperature):
    ours, ref = _pair(codebook_size=2**5, inv_temperature=inv_temperature)
    x = torch.randn(2, 8, 5)
    loss_ref = ref(x, inv_temperature=inv_temperature).entropy_aux_loss
    torch.testing.assert_close(ours(x).loss, loss_ref, rtol=0, atol=1e-5)
    # the forward argument overrides the config, as in CogVideo sgm
    torch.testing.assert_close(ours(x, inv_temperature=7.0).loss, ref(x, inv_temperature=7.0).entropy_aux_loss,
                               rtol=0, atol=1e-5)


def test_mask_restricts_losses_like_sgm():
    ours, ref = _pair(dim=16, codebook_size=2**6)
    x = torch.randn(3, 16, 2, 4)
    mask = torch.rand(3, 2, 4) > 0.4
    mask[0, 0, 0] = True
    (q_ref, i_ref, loss_ref), bd_ref = ref(x, mask=mask.flatten(1), return_loss_breakdown=True)
    out = ours(x, mask=mask, return_loss_breakdown=True)  # (b, h, w) mask, flattened like the tokens
    assert torch.equal(out.indices, i_ref)
    torch.testing.assert_close(out.loss_breakdown.per_sample_entropy, bd_ref.per_sample_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss_breakdown.commitment, bd_ref.commitment, rtol=0, atol=1e-6)
    # vqp 1.32 flattens the masked (M, c, d) input to (M*c, d), so its "batch" entropy with a mask is the
    # per-sample entropy (no mean over tokens). CogVideo sgm averages the masked (M, c, K) probs over tokens: we
    # follow CogVideo sgm and check its formula.
    tokens = ours.project_in(x.flatten(2).transpose(1, 2)).unflatten(-1, (1, 6))[mask.flatten(1)]
    sgm_batch = ops.entropy(_full_softmax_probs(tokens, 1.0, 100.0).mean(0)).mean()
    torch.testing.assert_close(out.loss_breakdown.batch_entropy, sgm_batch, rtol=0, atol=1e-5)
    expected = 0.1 * (bd_ref.per_sample_entropy - sgm_batch) + 0.25 * bd_ref.commitment
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)
    unmasked = ours(x, return_loss_breakdown=True)
    assert not torch.allclose(unmasked.loss_breakdown.commitment, out.loss_breakdown.commitment)


def test_commitment_reported_in_breakdown_even_with_zero_weight_as_sgm():
    # CogVideo sgm computes the commitment loss in training whatever its weight (vqp reports 0 when weight is 0)
    lfq = hf_vq.LFQ(codebook_size=2**4, commitment_loss_weight=0.0, entropy_loss_weight=0.0)
    x = torch.randn(2, 5, 4)
    out = lfq(x, return_loss_breakdown=True)
    torch.testing.assert_close(out.loss_breakdown.commitment, F.mse_loss(x, x.sign()))
    assert out.loss == 0


def test_eval_loss_is_zero_and_sgm_tuples():
    lfq = hf_vq.LFQ(codebook_size=2**4).eval()
    x = torch.randn(2, 5, 4)
    quantized, indices, loss = lfq(x, return_dict=False)
    assert loss == 0 and torch.equal(quantized, x.sign())
    (q, i, l), breakdown = lfq(x, return_dict=False, return_loss_breakdown=True)
    assert type(breakdown).__name__ == "LFQLossBreakdown" and breakdown._fields == (
        "per_sample_entropy", "batch_entropy", "commitment")
    assert hf_vq.LFQOutput.tuple_fields == ("quantized", "indices", "loss")


def test_force_quantization_f32_bf16_matches_vqp_and_keeps_dtype():
    ours, ref = _pair(codebook_size=2**6)
    x = torch.randn(2, 9, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x, return_loss_breakdown=True)
    q_ref, i_ref, loss_ref = ref(x)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.equal(out.quantized, q_ref) and torch.equal(out.indices, i_ref)
    torch.testing.assert_close(out.loss, loss_ref.float(), rtol=0, atol=1e-5)


def test_straight_through_gradient():
    lfq = hf_vq.LFQ(codebook_size=2**4, entropy_loss_weight=0.0, commitment_loss_weight=0.0)
    x = torch.randn(2, 5, 4, requires_grad=True)
    lfq(x).quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_indices_to_codes_matches_forward_and_vqp():
    ours, ref = _pair(dim=16, codebook_size=2**8)
    ours.eval(), ref.eval()
    x = torch.randn(2, 16, 3, 3)
    out = ours(x)
    torch.testing.assert_close(ours.indices_to_codes(out.indices), out.quantized, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.indices_to_codes(out.indices), ref.indices_to_codes(out.indices), rtol=0, atol=1e-6)
    raw = ours.indices_to_codes(out.indices, project_out=False)
    assert raw.shape == (2, 8, 3, 3) and set(raw.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("kwargs", [dict(codebook_size=2**5, num_codebooks=3, codebook_scale=0.5),
                                    dict(codebook_size=2**5, spherical=True, orthogonal_rotation=True)])
def test_indices_codes_round_trip(kwargs):
    lfq = hf_vq.LFQ(**kwargs).eval()
    indices = torch.randint(0, 2**5, (2, 7, kwargs.get("num_codebooks", 1))).squeeze(-1)
    codes = lfq.indices_to_codes(indices)
    again = lfq(codes).indices
    assert torch.equal(again, indices)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("kwargs", [dict(), dict(orthogonal_rotation=True), dict(dim=8)])
def test_indices_to_codes_of_a_cast_model_matches_vqp(kwargs, dtype):
    ours, ref = _pair(codebook_size=2**4, **kwargs)
    ours.to(dtype).eval(), ref.to(dtype).eval()
    indices = torch.randint(0, 2**4, (2, 5))
    codes, expected = ours.indices_to_codes(indices), ref.indices_to_codes(indices)
    assert codes.dtype == expected.dtype == dtype
    torch.testing.assert_close(codes, expected)


def test_float16_entropy_of_large_inputs_stays_finite():
    """Bit logits are `4 inv_temperature` times the input: in float16 they overflow at |x| ~ 160 (inv_temperature
    100), so the entropy terms of a float16 call are computed in float32."""
    lfq = hf_vq.LFQ(dim=2, codebook_size=4, force_quantization_f32=False).half().train()
    x = torch.full((1, 4, 2), 200.0, dtype=torch.float16, requires_grad=True)
    out = lfq(x, return_loss_breakdown=True)
    assert all(torch.isfinite(t) for t in out.loss_breakdown) and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(x.grad).all()


def test_codebook_property_matches_vqp():
    ours, ref = _pair(codebook_size=2**5, codebook_scale=0.7, spherical=True)
    torch.testing.assert_close(ours.codebook, F.normalize(ref.codebook, dim=-1) * 0.7)


def test_indices_to_codes_errors():
    lfq = hf_vq.LFQ(codebook_size=2**4)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 16\)"):
        lfq.indices_to_codes(torch.tensor([[16]]))
    with pytest.raises(ValueError, match="integer tensor"):
        lfq.indices_to_codes(torch.zeros(2, 3))


# ---- ops: the factorized entropies against the full formulas -------------------------------------


@pytest.mark.parametrize("nbits,inv_temperature,scale", [(5, 1.0, 1.0), (8, 3.0, 0.5), (9, 100.0, 1.0)])
def test_factorized_entropies_equal_full_formula(nbits, inv_temperature, scale):
    x = torch.randn(64, 2, nbits, dtype=torch.float64)
    probs = _full_softmax_probs(x, scale, inv_temperature)
    logits = ops.bit_logits(x, inv_temperature, scale)
    # per-sample entropy: exact Shannon entropy, no clamp (vqp clamps p >= 1e-5 inside the log, which lowers
    # its value when many codes have p < 1e-5: low inv_temperature and many bits)
    shannon = (-probs * probs.clamp_min(1e-300).log()).sum(-1).mean()
    torch.testing.assert_close(ops.per_sample_entropy(logits), shannon, rtol=0, atol=1e-10)
    torch.testing.assert_close(ops.mean_code_probs(logits).double(), probs.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ops.codebook_entropy(logits).double(), ops.entropy(probs.mean(0)).mean(),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("nbits,inv_temperature", [(10, 100.0), (14, 100.0), (16, 10.0)])
def test_mean_code_probs_keep_float32_relative_precision(nbits, inv_temperature):
    # float32 logits against the float64 softmax over all codes: every probability above 1e-6 to a relative 1e-5
    # (the product of bit probabilities in log space has no cancellation, even where the logits are large)
    x = torch.randn(256, 1, nbits)
    ref = _full_softmax_probs(x.double(), 1.0, inv_temperature).mean(0)[0]
    got = ops.mean_code_probs(ops.bit_logits(x, inv_temperature, 1.0))[0].double()
    big = ref > 1e-6
    torch.testing.assert_close(got[big], ref[big], rtol=1e-5, atol=0)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)


def test_codebook_entropy_gradient_equals_full_formula():
    x = torch.randn(40, 1, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ops.codebook_entropy(ops.bit_logits(x, 2.0, 1.0)).backward()
    ops.entropy(_full_softmax_probs(x_ref, 1.0, 2.0).mean(0)).mean().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)


def test_mean_code_probs_memory_is_sublinear_in_codes():
    # 2**20 codes for 32 samples: a full N x K matrix would be 128 MiB; the split tables are N x 2**10
    x = torch.randn(32, 1, 20)
    avg = ops.mean_code_probs(ops.bit_logits(x, 1.0, 1.0))
    assert avg.shape == (1, 2**20)
    torch.testing.assert_close(avg.sum(), torch.tensor(1.0), rtol=0, atol=1e-4)
    idx = torch.randint(0, 2**20, (5,))
    bits = ops.bits_of(idx, 20).float()
    p = torch.sigmoid(ops.bit_logits(x, 1.0, 1.0))[:, 0]  # (N, C)
    direct = (bits * p[:, None] + (1 - bits) * (1 - p[:, None])).prod(-1).mean(0)
    torch.testing.assert_close(avg[0, idx], direct, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("codebooks,rows", [(1, 2048 * 3), (2, 2048 * 2 + 37), (3, 100)])
def test_row_chunked_gram_equals_float64_product(codebooks, rows):
    # one chunk, several chunks with a remainder, and several without: values and both gradients
    a = torch.rand(codebooks, rows, 16, requires_grad=True)
    b = torch.rand(codebooks, rows, 8, requires_grad=True)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    got, ref = ops.row_chunked_gram(a, b), torch.einsum("cna,cnb->cab", a64, b64)
    assert got.shape == (codebooks, 16, 8)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    weight = torch.randn(codebooks, 16, 8, dtype=torch.float64)
    (got * weight.float()).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,frac", [(16, 0.5), (1000, 0.25), (4099, 0.1)])
def test_sample_fraction_rows_by_rank_equal_the_argsort_mask(n, frac):
    # the device route (ranks of the first draws, gathered by index) keeps the rows of CogVideo sgm's mask
    draws, keep = torch.randn(n), int(n * frac)
    by_mask = (draws.argsort(dim=-1) < keep).nonzero().squeeze(1)
    by_rank = ops.kept_positions(draws, keep)
    assert by_rank.shape == (keep,)
    assert torch.equal(by_rank.sort().values, by_mask)
    tokens = torch.randn(n, 3)
    torch.manual_seed(5)
    sampled = ops.sample_fraction(tokens, frac)
    torch.manual_seed(5)
    assert torch.equal(sampled, tokens[torch.randn(n).argsort(dim=-1) < keep])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_fraction_on_cuda_keeps_the_cpu_rows():
    tokens = torch.randn(5000, 4)
    torch.manual_seed(2)
    cpu = ops.sample_fraction(tokens, 0.3)
    torch.manual_seed(2)
    gpu = ops.sample_fraction(tokens.cuda(), 0.3).cpu()
    order = lambda t: t[t[:, 0].argsort()]  # noqa: E731 (the same rows in any order)
    assert torch.equal(order(gpu), order(cpu))


def test_factorized_codebook_entropy_formula():
    x = torch.randn(50, 2, 6)
    logits = ops.bit_logits(x, 0.5, 1.0)
    q = torch.sigmoid(logits).mean(0)
    expected = (-(q * q.log() + (1 - q) * (1 - q).log())).sum(-1).mean()
    torch.testing.assert_close(ops.factorized_codebook_entropy(logits), expected)
    # it upper-bounds the exact codebook entropy (entropy is subadditive)
    assert ops.factorized_codebook_entropy(logits) >= ops.codebook_entropy(logits) - 1e-6


def test_factorized_method_in_model():
    lfq = hf_vq.LFQ(codebook_size=2**6, entropy_loss_method="factorized", diversity_gamma=1.3)
    x = torch.randn(2, 9, 6)
    bd = lfq(x, return_loss_breakdown=True).loss_breakdown
    logits = ops.bit_logits(x.flatten(0, 1).unsqueeze(1), 100.0, 1.0)
    torch.testing.assert_close(bd.batch_entropy, ops.factorized_codebook_entropy(logits))
    torch.testing.assert_close(bd.per_sample_entropy, ops.per_sample_entropy(logits))


# ---- config and input errors ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(codebook_size=100), r"codebook_size must be a power of 2 .* \(suggested 128\)"),
    (dict(), "LFQ needs dim or codebook_size"),
    (dict(codebook_size=16, frac_per_sample_entropy=0.0), r"frac_per_sample_entropy must be in \(0, 1\]"),
    (dict(codebook_size=16, straight_through_activation="swish"), "straight_through_activation must be one of"),
    (dict(codebook_size=16, entropy_loss_method="approx"), "entropy_loss_method must be one of"),
    (dict(codebook_size=16, soft_clamp_input_value=0.5), "soft_clamp_input_value must be >= codebook_scale"),
    (dict(codebook_size=16, num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim=False"),
    (dict(codebook_size=16, dim=0), "dim must be a positive int"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_vq.LFQConfig(**kwargs)


def test_input_errors():
    lfq = hf_vq.LFQ(dim=8, codebook_size=2**4)
    with pytest.raises(ValueError, match="expected feature dim 8, got 7"):
        lfq(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="must have rank"):
        lfq(torch.randn(8))
    assert lfq.eval()(torch.full((2, 5, 8), float("inf"))).quantized.shape == (2, 5, 8)  # (no value check)
    with pytest.raises(ValueError, match="mask selects no tokens"):
        lfq(torch.randn(2, 5, 8), mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        lfq(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))


# ---- the eval path's ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [5, 24, 30])
def test_bits_to_indices_and_sign_codes_equal_the_reference_ops(bits):
    x = torch.randn(300, 2, bits)
    x[0] = 0.0  # zero is not positive: code -scale, bit 0
    positive = x > 0
    bit_values = 2 ** torch.arange(bits - 1, -1, -1)
    for scale in (1.0, 0.25, 0.3):
        assert torch.equal(ops.sign_codes(positive, scale), ops.sign_quantize(x, scale))
    assert torch.equal(ops.bits_to_indices(positive, bit_values), ops.codes_to_indices(ops.sign_quantize(x, 1.0)))


def test_video_eval_indices_match_vqp_channel_first():
    ours, ref = _pair(codebook_size=2**6, dim=6)
    ours.eval(), ref.eval()
    x = torch.randn(2, 6, 3, 4, 5)
    x[0, :, 0] = 0.0
    out = ours(x)
    q_ref, i_ref, _ = ref(x)
    assert torch.equal(out.indices, i_ref) and torch.equal(out.quantized, q_ref)
    assert float(out.loss) == 0.0


@pytest.mark.parametrize("shape", [(3, 16, 2, 4), (3, 5, 16)])
def test_per_sample_mask_matches_vqp(shape):
    # vqp 1.32 indexes its (b, n, c, d) input with a (b,) mask: whole samples are kept or dropped for the entropy
    # and commitment losses; the indices and the quantized output are those of the unmasked call.
    ours, ref = _pair(dim=16, codebook_size=2**6, entropy_loss_weight=0.3, commitment_loss_weight=0.7)
    x = torch.randn(shape)
    mask = torch.tensor([True, False, True])
    (q_ref, i_ref, loss_ref), bd_ref = ref(x, mask=mask, return_loss_breakdown=True)
    out = ours(x, mask=mask, return_loss_breakdown=True)
    assert ours.training and out.loss_breakdown.commitment > 0 and out.loss_breakdown.batch_entropy > 0
    assert torch.equal(out.indices, i_ref)
    torch.testing.assert_close(out.quantized, q_ref, rtol=0, atol=1e-6)
    for name in ("per_sample_entropy", "batch_entropy", "commitment"):
        torch.testing.assert_close(getattr(out.loss_breakdown, name), getattr(bd_ref, name), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, loss_ref, rtol=0, atol=1e-5)
    kept = ours(x[mask], return_loss_breakdown=True)  # the same losses as calling on the kept samples only
    torch.testing.assert_close(out.loss, kept.loss, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="mask selects no tokens"):
        ours(x, mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        ours(x, mask=torch.ones(2, dtype=torch.bool))


def test_lfq_bits_to_codes_matches_vqp():
    bits = torch.randint(0, 2, (3, 7, 10)).float()
    for scale in (1.0, 0.5):
        ours = hf_vq.LFQ(codebook_size=2**10, codebook_scale=scale)
        ref = RefLFQ(codebook_size=2**10, codebook_scale=scale)
        assert torch.equal(ours.bits_to_codes(bits), ref.bits_to_codes(bits))
        half = ours.bits_to_codes(bits.bfloat16())  # vqp keeps the bits' dtype
        assert half.dtype == torch.bfloat16 and torch.equal(half, ref.bits_to_codes(bits.bfloat16()))
