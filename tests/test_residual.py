"""ResidualVQ: parity with vector-quantize-pytorch 1.32 at every level, quantize-dropout invariants,
index <-> code round trips, state round trip, errors."""

import pytest
import torch
from transformers import AutoModel
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
