"""VectorQuantize's per-call options of vqp 1.32: `forward(..., topk=k)`, `forward(..., ema_update=False)`,
`forward(..., codebook_transform_fn=f)` and `update_ema_indices(...)`: parity with vector-quantize-pytorch 1.32 on
shared weights and inputs (outputs, indices, losses, input gradients, and the state after several steps), and
errors.

Tolerances: float32 on CPU with the same operations, so the defaults of `torch.testing.assert_close` (1.3e-6
relative, 1e-5 absolute) hold; indices are compared exactly."""

import pytest
import torch
from vector_quantize_pytorch import VectorQuantize as VqpVectorQuantize

import hf_vq

MASK = torch.tensor([[True] * 5, [True, True, False, False, False]])

TOPK_CASES = {
    "plain": (dict(dim=8, codebook_size=16), (2, 5, 8), {}),
    "projection": (dict(dim=8, codebook_size=16, codebook_dim=4, commitment_weight=0.5), (2, 5, 8), {}),
    "image": (dict(dim=8, codebook_size=16, accept_image_fmap=True), (2, 8, 3, 4), {}),
    "channel_first": (dict(dim=8, codebook_size=16, channel_last=False), (2, 8, 5), {}),
    "one_token": (dict(dim=8, codebook_size=16), (2, 8), {}),
    "masked": (dict(dim=8, codebook_size=16), (2, 5, 8), dict(mask=MASK)),
    "no_commitment": (dict(dim=8, codebook_size=16, commitment_weight=0.0), (2, 5, 8), {}),
    "learnable_losses": (dict(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False,
                              orthogonal_reg_weight=0.1, codebook_diversity_loss_weight=0.1), (2, 5, 8), {}),
    "cosine_ste": (dict(dim=8, codebook_size=16, use_cosine_sim=True, rotation_trick=False), (2, 5, 8), {}),
    "topk_over_size": (dict(dim=8, codebook_size=2), (2, 5, 8), {}),
}


def _twin(kwargs, seed=0):
    torch.manual_seed(seed)
    ref = VqpVectorQuantize(**kwargs)
    return ref, hf_vq.VectorQuantize.from_vector_quantize_pytorch(ref)


def _same_state(ref, ours):
    ref_state = ref.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], msg=key)


def _call_both(ref, ours, shape, train, **call) -> torch.Tensor:
    """One call of each on the same input with `call`'s options: equal indices, outputs, losses and (in training)
    input gradients. Returns hf_vq's indices."""
    x = torch.randn(*shape, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_()
    q_ref, i_ref, l_ref = ref(x, **call)
    q, i, l = ours(x_ours, return_dict=False, **call)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(l, l_ref)
    if train:
        (q_ref.square().sum() + l_ref.sum()).backward()
        (q.square().sum() + l.sum()).backward()
        torch.testing.assert_close(x_ours.grad, x.grad)
    return i


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(TOPK_CASES))
def test_topk_matches_vqp(case, train):
    kwargs, shape, call = TOPK_CASES[case]
    ref, ours = _twin(kwargs)
    ref.train(train), ours.train(train)
    for _ in range(3):
        i = _call_both(ref, ours, shape, train, topk=3, **call)
        assert i.shape[-1] == min(3, kwargs["codebook_size"])
    _same_state(ref, ours)  # a top-k call never updates the codebook


def test_topk_candidates_are_the_k_nearest_codes_in_order():
    vq = hf_vq.VectorQuantize(dim=4, codebook_size=10).eval()
    x = torch.randn(1, 6, 4)
    out = vq(x, topk=4)
    dist = torch.cdist(x[0], vq.codebook)
    assert torch.equal(out.indices[0], dist.topk(4, largest=False).indices)
    torch.testing.assert_close(out.quantized[0], vq.codebook[out.indices[0]])
    torch.testing.assert_close(out.loss[0], (out.quantized[0] - x[0, :, None]).square().mean(-1))
    assert torch.equal(out.indices[..., 0], vq(x).indices)  # the first candidate is the nearest code


def test_topk_loss_breakdown_and_errors():
    vq = hf_vq.VectorQuantize(dim=4, codebook_size=10)
    quantized, indices, loss, breakdown = vq(torch.randn(2, 3, 4), topk=2, return_loss_breakdown=True,
                                             return_dict=False)
    assert quantized.shape == (2, 3, 2, 4) and torch.equal(breakdown.commitment, loss)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="topk must be a positive int"):
            vq(torch.randn(2, 3, 4), topk=bad)
    with pytest.raises(ValueError, match="heads=1"):
        hf_vq.VectorQuantize(dim=4, codebook_size=10, heads=2)(torch.randn(2, 3, 4), topk=2)
    with pytest.raises(ValueError, match="commitment_use_cross_entropy_loss"):
        hf_vq.VectorQuantize(dim=4, codebook_size=10, commitment_use_cross_entropy_loss=True)(
            torch.randn(2, 3, 4), topk=2)
    with pytest.raises(ValueError, match="straight_through"):
        hf_vq.VectorQuantize(dim=4, codebook_size=10, straight_through=True)(torch.randn(2, 3, 4), topk=2)
    with pytest.raises(ValueError, match="either indices"):
        vq(torch.randn(2, 3, 4), topk=2, indices=torch.zeros(2, 3, dtype=torch.long))


UPDATE_CASES = {
    "ema": (dict(dim=8, codebook_size=16, decay=0.9), (2, 5, 8), (2, 5), None),
    "projection_masked": (dict(dim=8, codebook_size=16, decay=0.9, codebook_dim=4), (2, 5, 8), (2, 5), MASK),
    "separate_heads": (dict(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True), (2, 5, 8),
                       (2, 5, 2), None),
    "shared_heads_masked": (dict(dim=8, codebook_size=16, heads=2), (2, 5, 8), (2, 5, 2), MASK),
    "cosine": (dict(dim=8, codebook_size=16, use_cosine_sim=True), (2, 5, 8), (2, 5), None),
    "image": (dict(dim=8, codebook_size=16, accept_image_fmap=True), (2, 8, 3, 2), (2, 3, 2), None),
    "dead_codes": (dict(dim=8, codebook_size=16, threshold_ema_dead_code=2.0), (2, 5, 8), (2, 5), None),
}


@pytest.mark.parametrize("case", sorted(UPDATE_CASES))
def test_update_ema_indices_and_ema_update_false_match_vqp(case):
    kwargs, shape, index_shape, mask = UPDATE_CASES[case]
    ref, ours = _twin(kwargs)
    ref.train(), ours.train()
    for step in range(3):
        torch.manual_seed(100 + step)  # dead-code replacement samples: the same draws on both sides
        x, idx = torch.randn(*shape), torch.randint(0, kwargs["codebook_size"], index_shape)
        ref.update_ema_indices(x, idx, mask=mask)
        torch.manual_seed(100 + step)
        torch.randn(*shape), torch.randint(0, kwargs["codebook_size"], index_shape)
        ours.update_ema_indices(x, idx, mask=mask)
    _same_state(ref, ours)
    for step in range(2):  # ema_update=False: no EMA codebook update (dead codes still tracked and replaced)
        x = torch.randn(*shape)
        torch.manual_seed(200 + step)
        q_ref, i_ref, _ = ref(x, ema_update=False)
        torch.manual_seed(200 + step)
        out = ours(x, ema_update=False)
        assert torch.equal(out.indices, i_ref)
        torch.testing.assert_close(out.quantized, q_ref)
    _same_state(ref, ours)


def test_ema_update_false_leaves_the_codebook():
    vq = hf_vq.VectorQuantize(dim=4, codebook_size=8, decay=0.5).train()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 6, 4), ema_update=False)
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())
    vq(torch.randn(2, 6, 4))
    assert not torch.equal(before["_codebook.embed"], vq.state_dict()["_codebook.embed"])


def test_update_ema_indices_moves_codes_to_their_assigned_rows_and_ignores_minus_one():
    vq = hf_vq.VectorQuantize(dim=2, codebook_size=3, decay=0.0, eps=0.0)
    x = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [5.0, -5.0], [9.0, 9.0]]])
    vq.update_ema_indices(x, torch.tensor([[0, 0, 2, -1]]))
    torch.testing.assert_close(vq.codebook[0], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(vq.codebook[2], torch.tensor([5.0, -5.0]))
    assert vq._codebook.cluster_size[0].tolist() == [2.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="indices must be"):
        vq.update_ema_indices(x, torch.tensor([[0, 0, 3, 1]]))
    with pytest.raises(ValueError, match="entries"):
        vq.update_ema_indices(x, torch.tensor([[0, 0]]))


# codebook_transform_fn: per-token codebooks (h, b, n, K, d) from the codebook (h, K, d)
TRANSFORM_CASES = {
    "plain": (dict(dim=8, codebook_size=16), (2, 5, 8), {}),
    "cosine": (dict(dim=8, codebook_size=16, use_cosine_sim=True), (2, 5, 8), {}),
    "heads_separate": (dict(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True), (2, 5, 8), {}),
    "projection": (dict(dim=8, codebook_size=16, codebook_dim=4, commitment_weight=0.5), (2, 5, 8), {}),
    "masked": (dict(dim=8, codebook_size=16), (2, 5, 8), dict(mask=MASK)),
    "image": (dict(dim=8, codebook_size=16, accept_image_fmap=True), (2, 8, 3, 4), {}),
}


def _per_token_transform(shape, seed):
    """A transform whose codebooks differ per token: each token scales and shifts the codebook."""
    g = torch.Generator().manual_seed(seed)
    scale = 1 + 0.5 * torch.rand(*shape, generator=g)
    shift = 0.1 * torch.randn(*shape, generator=g)
    return lambda embed: embed[:, None, None] * scale[None, ..., None, None] + shift[None, ..., None, None]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(TRANSFORM_CASES))
def test_codebook_transform_fn_matches_vqp(case, train):
    kwargs, shape, call = TRANSFORM_CASES[case]
    ref, ours = _twin(kwargs)
    ref.train(train), ours.train(train)
    tokens = (shape[0], shape[2] * shape[3]) if len(shape) == 4 else shape[:2]
    for step in range(3):
        _call_both(ref, ours, shape, train, codebook_transform_fn=_per_token_transform(tokens, step), **call)
    _same_state(ref, ours)  # the EMA updates from the per-token choices agree too


def test_codebook_transform_fn_errors():
    vq = hf_vq.VectorQuantize(dim=8, codebook_size=16)
    x = torch.randn(2, 5, 8)
    good = _per_token_transform((2, 5), 0)
    with pytest.raises(ValueError, match=r"per-token codebooks \(1, 2, 5, 16, 8\), got \(1, 16, 8\)"):
        vq(x, codebook_transform_fn=lambda embed: embed)
    with pytest.raises(ValueError, match="does not combine with topk or indices"):
        vq(x, codebook_transform_fn=good, topk=2)
    with pytest.raises(ValueError, match="codebook_transform_fn does not support commitment_use_cross_entropy_loss"):
        hf_vq.VectorQuantize(dim=8, codebook_size=16, commitment_use_cross_entropy_loss=True)(
            x, codebook_transform_fn=good)


def test_lens_count_tokens_of_channel_first_input():
    """`lens` marks valid positions along the token axis, which is dim 2 of `channel_last=False` input `(b, d, n)`
    (vqp 1.32 builds its mask from dim 1 there and fails)."""
    vq = hf_vq.VectorQuantize(dim=4, codebook_size=16, channel_last=False).eval()
    x = torch.randn(2, 4, 7)
    lens = torch.tensor([7, 3])
    by_lens = vq(x, lens=lens)
    by_mask = vq(x, mask=torch.arange(7) < lens[:, None])
    assert torch.equal(by_lens.indices, by_mask.indices) and torch.equal(by_lens.quantized, by_mask.quantized)
    assert (by_lens.indices[1, 3:] == -1).all() and (by_lens.indices[0] >= 0).all()


@pytest.mark.parametrize("owner, name, value", [("", "commitment_weight", 0.5), ("", "sample_codebook_temp", 0.3),
                                                ("", "codebook_diversity_loss_weight", 0.2),
                                                ("", "freeze_codebook", True), ("_codebook", "decay", 0.5),
                                                ("_codebook", "eps", 0.1)])
def test_settings_changed_as_attributes_act_as_if_built_with_them(owner, name, value):
    """README: loss weights, the temperature, freeze_codebook and the EMA's decay and eps may be set between calls."""
    torch.manual_seed(0)
    changed = hf_vq.VectorQuantize(dim=8, codebook_size=16).train()
    torch.manual_seed(0)
    built = hf_vq.VectorQuantize(dim=8, codebook_size=16, **{name: value}).train()
    built.load_state_dict(changed.state_dict())
    setattr(changed.get_submodule(owner), name, value)
    for step in range(3):
        x = torch.randn(2, 10, 8, requires_grad=True)
        outs = []
        for model in (changed, built):
            torch.manual_seed(step)
            out = model(x)
            (out.quantized.square().sum() + out.loss).backward()
            outs.append((out.indices, out.loss, x.grad.clone()))
            x.grad = None
        (i1, l1, g1), (i2, l2, g2) = outs
        assert torch.equal(i1, i2) and torch.equal(l1, l2) and torch.equal(g1, g2), (name, step)
    for key, tensor in built.state_dict().items():
        assert torch.equal(changed.state_dict()[key], tensor), key
