"""SimVQ and ResidualSimVQ against vector-quantize-pytorch 1.32 on shared weights and inputs.

Tolerances: indices exact; outputs and losses within 1e-6 (float32; the distance arithmetic differs from vqp's
`torch.cdist`, so a float32 near-tie could in principle pick the other code: the random inputs here have none);
trained weights after optimizer steps within 1e-5."""

import copy

import pytest
import torch
import vector_quantize_pytorch as vqp
from torch import nn
from transformers import AutoModel

import hf_vq
from hf_vq.diffusers_support import DiffusersQuantizer

ATOL = 1e-6


def _close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.is_floating_point():
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(dim=8, codebook_size=32), (2, 12, 8)),
    (dict(dim=8, codebook_size=32, channel_first=True, rotation_trick=False), (2, 8, 3, 4)),
    (dict(dim=8, codebook_size=32, frozen_codebook_dim=5, commitment_weight=0.5,
          input_to_quantize_commit_loss_weight=0.1), (3, 7, 8)),
])
def test_sim_vq_matches_vqp_outputs_gradients_and_training(kwargs, shape):
    torch.manual_seed(0)
    ref = vqp.SimVQ(**kwargs)
    ours = hf_vq.SimVQ.from_vector_quantize_pytorch(ref)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2)
    for step in range(4):
        x = torch.randn(*shape)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_r, i_r, l_r = ref(xr)
        q_o, i_o, l_o = ours(xo, return_dict=False)
        _close(q_o, q_r)
        _close(i_o, i_r)
        _close(l_o, l_r)
        ((q_r**2).sum() + l_r).backward()
        ((q_o**2).sum() + l_o).backward()
        _close(xo.grad, xr.grad, atol=1e-5)
        for (name, p_o), p_r in zip(ours.named_parameters(), ref.parameters()):
            _close(p_o.grad, p_r.grad, atol=1e-5)
        opt_ref.step(), opt_ours.step()
        opt_ref.zero_grad(), opt_ours.zero_grad()
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        _close(v, v2, atol=1e-5)


def test_sim_vq_mlp_transform_module_and_positional_args():
    torch.manual_seed(0)
    transform = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    ref = vqp.SimVQ(8, 32, copy.deepcopy(transform), channel_first=True)
    ours = hf_vq.SimVQ(8, 32, transform, channel_first=True)  # vqp's positional order
    assert ours.config.codebook_transform == {"hidden_dims": [16], "activation": "gelu", "bias": True}
    assert all(torch.equal(a, b) for a, b in zip(ours.code_transform.state_dict().values(),
                                                 transform.state_dict().values()))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 4, 4)
    for a, b in zip(ours(x, return_dict=False), ref(x)):
        _close(a, b)
    migrated = hf_vq.SimVQ.from_vector_quantize_pytorch(ref)
    assert migrated.config.codebook_transform == ours.config.codebook_transform
    assert hf_vq.SimVQ(16, 64).config.to_kwargs() == hf_vq.SimVQ(dim=16, codebook_size=64).config.to_kwargs()


def test_sim_vq_init_fn_and_indices_to_codes_as_vqp_readme():
    torch.manual_seed(0)
    sim_vq = hf_vq.SimVQ(dim=16, codebook_size=64, init_fn=lambda t: t * 0 + 1.5)
    assert torch.all(sim_vq.frozen_codebook == 1.5)
    sim_vq = hf_vq.SimVQ(dim=16, codebook_size=64)
    x = torch.randn(1, 50, 16)
    quantized, indices, commit_loss = sim_vq(x, return_dict=False)
    assert x.shape == quantized.shape and indices.shape == (1, 50) and commit_loss.ndim == 0
    assert torch.allclose(quantized, sim_vq.indices_to_codes(indices), atol=1e-6)
    # every index is the nearest transformed code (float64 check)
    d = torch.cdist(x.double()[0], sim_vq.codebook.double())
    assert torch.equal(indices[0], d.argmin(-1))


def test_residual_sim_vq_matches_vqp_and_reconstructs_from_indices():
    torch.manual_seed(0)
    ref = vqp.ResidualSimVQ(dim=8, num_quantizers=3, codebook_size=32, channel_first=True)
    ours = hf_vq.ResidualSimVQ.from_vector_quantize_pytorch(ref)
    x = torch.randn(2, 8, 4, 4)
    got = ours(x, return_all_codes=True, return_dict=False)
    want = ref(x, return_all_codes=True)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        _close(a, b)
    assert got[1].shape == (2, 4, 4, 3) and got[3].shape == (3, 2, 8, 4, 4)
    assert torch.allclose(got[0], ours.get_output_from_indices(got[1]), atol=1e-5)
    _close(ours.get_output_from_indices(got[1]), ref.get_output_from_indices(want[1]))


def test_residual_sim_vq_training_with_quantize_dropout_matches_vqp():
    torch.manual_seed(0)
    ref = vqp.ResidualSimVQ(dim=8, num_quantizers=4, codebook_size=16, quantize_dropout=True,
                            quantize_dropout_multiple_of=2, rotation_trick=False)
    ours = hf_vq.ResidualSimVQ.from_vector_quantize_pytorch(ref)
    assert ours.config.quantize_dropout_multiple_of == 2 and not ours.config.rotation_trick
    opt_ref, opt_ours = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours))
    dropped = set()
    for step in range(6):
        x = torch.randn(2, 10, 8)
        torch.manual_seed(step)
        q_r, i_r, l_r = ref(x)
        torch.manual_seed(step)  # the same seed draw for the dropout cutoff
        q_o, i_o, l_o = ours(x, return_dict=False)
        _close(q_o, q_r), _close(i_o, i_r), _close(l_o, l_r)
        dropped.add(int((i_o[0, 0] == -1).sum()))
        (q_r.square().mean() + l_r.sum()).backward()
        (q_o.square().mean() + l_o.sum()).backward()
        opt_ref.step(), opt_ours.step()
        opt_ref.zero_grad(), opt_ours.zero_grad()
    assert dropped - {0}, "some step should drop levels"
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        _close(v, v2, atol=1e-5)
    # a fixed seed, and coarse indices (fewer levels) reconstruct with the dropped levels as zeros
    _, idx, _ = ours(x, rand_quantize_dropout_fixed_seed=3, return_dict=False)
    _, idx_ref, _ = ref(x, rand_quantize_dropout_fixed_seed=3)
    _close(idx, idx_ref)
    ours.eval()
    q, idx, _ = ours(x, return_dict=False)
    coarse = ours.get_output_from_indices(idx[..., :2])
    assert torch.allclose(coarse, ours.get_codes_from_indices(idx)[:2].sum(0), atol=1e-6)


def test_residual_sim_vq_quantize_dropout_under_compile_matches_eager():
    model = hf_vq.ResidualSimVQ(dim=8, num_quantizers=3, codebook_size=16, quantize_dropout=True).train()
    x = torch.randn(2, 6, 8)
    compiled = torch.compile(copy.deepcopy(model), backend="eager")
    torch._dynamo.reset()
    for seed in range(3):
        torch.manual_seed(seed)
        want = model(x, return_dict=False)
        torch.manual_seed(seed)
        got = compiled(x, return_dict=False)
        for a, b in zip(got, want):
            _close(a, b)


@pytest.mark.parametrize("name", ["SimVQ", "ResidualSimVQ"])
def test_migration_round_trip_through_save_pretrained(name, tmp_path):
    torch.manual_seed(0)
    ref = getattr(vqp, name)(dim=8, codebook_size=16, **({"num_quantizers": 2} if name == "ResidualSimVQ" else {}))
    ours = getattr(hf_vq, name).from_vector_quantize_pytorch(ref)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").exists()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is type(ours)
    for (k, v), (k2, v2) in zip(loaded.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.randn(2, 5, 8)
    for a, b in zip(loaded(x, return_dict=False), ref(x)):
        _close(a, b)
    face = DiffusersQuantizer.from_quantizer(loaded)
    face.save_pretrained(tmp_path / "diffusers")
    again = DiffusersQuantizer.from_pretrained(tmp_path / "diffusers").quantizer
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        hf_vq.SimVQConfig(dim=0)
    with pytest.raises(ValueError, match="commitment_weight must be a number >= 0"):
        hf_vq.SimVQConfig(commitment_weight=-1.0)
    with pytest.raises(ValueError, match=r"codebook_transform has unknown key\(s\) \['depth'\]"):
        hf_vq.SimVQConfig(codebook_transform={"depth": 2})
    with pytest.raises(ValueError, match="activation"):
        hf_vq.SimVQConfig(codebook_transform={"hidden_dims": [4], "activation": "swish"})
    with pytest.raises(TypeError, match="codebook_transform must be an nn.Linear or an nn.Sequential"):
        hf_vq.SimVQ(8, 16, nn.Sequential(nn.Linear(8, 8), nn.Dropout()))
    with pytest.raises(ValueError, match="must map frozen_codebook_dim=8 to dim=8"):
        hf_vq.SimVQ(8, 16, nn.Linear(4, 8, bias=False))
    with pytest.raises(TypeError, match="at most 9 positional arguments"):
        hf_vq.SimVQ(*range(1, 11))
    with pytest.raises(TypeError, match="multiple values for argument 'dim'"):
        hf_vq.SimVQ(8, dim=8)
    with pytest.raises(TypeError, match="either a config or vqp's positional arguments"):
        hf_vq.SimVQ(hf_vq.SimVQConfig(dim=8), 16)
    with pytest.raises(ValueError, match="heads must be 1"):
        hf_vq.ResidualSimVQ(dim=8, num_quantizers=2, codebook_size=16, heads=2)
    with pytest.raises(ValueError, match="quantize_dropout_cutoff_index must be an int in"):
        hf_vq.ResidualSimVQConfig(num_quantizers=2, quantize_dropout_cutoff_index=2)
    with pytest.raises(ValueError, match="pass codebook_transform as a spec dict"):
        hf_vq.ResidualSimVQ(dim=8, codebook_transform=nn.Linear(8, 8))
    model = hf_vq.SimVQ(8, 16)
    with pytest.raises(ValueError, match="expected feature dim 8, got 5"):
        model(torch.randn(2, 3, 5))
    model.eval()(torch.full((2, 3, 8), float("nan")))  # no value check on the input (no device sync)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 16\)"):
        model.indices_to_codes(torch.tensor([[16]]))
    rq = hf_vq.ResidualSimVQ(dim=8, num_quantizers=3, codebook_size=16)
    with pytest.raises(ValueError, match="fewer levels than num_quantizers need quantize_dropout=True"):
        rq.get_output_from_indices(torch.zeros(2, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must be in \[-1, 16\)"):
        rq.get_output_from_indices(torch.full((2, 4, 3), -2))
    # -1 marks a dropped level (zero codes) also without quantize dropout, as vqp 1.32
    dropped = torch.tensor([[[3, -1, 2]]])
    assert not rq.get_codes_from_indices(dropped)[1].any() and rq.get_codes_from_indices(dropped)[2].any()


@pytest.mark.parametrize("cls, kwargs", [(hf_vq.SimVQ, dict(dim=8, codebook_size=16, channel_first=True)),
                                         (hf_vq.ResidualSimVQ, dict(dim=8, codebook_size=16, num_quantizers=2,
                                                                    channel_first=True))])
def test_bfloat16_input_keeps_its_dtype_and_trains(cls, kwargs):
    model = cls(**kwargs)
    x = torch.randn(2, 8, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    out = model(x)
    assert out.quantized.dtype == torch.bfloat16 and out.quantized.shape == x.shape
    (out.quantized.float().sum() + out.loss.float().sum()).backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


KERNEL_PATH = """
import torch, hf_vq, vector_quantize_pytorch as vqp
from hf_vq.ops import triton_nearest
torch.manual_seed(0)
x = torch.randn(2, 12, 8)
assert triton_nearest.available(x.reshape(1, -1, 8))
for name, ref in [("SimVQ", vqp.SimVQ(dim=8, codebook_size=32)),
                  ("ResidualSimVQ", vqp.ResidualSimVQ(dim=8, num_quantizers=2, codebook_size=32))]:
    ours = getattr(hf_vq, name).from_vector_quantize_pytorch(ref)
    a, b = ref(x), ours(x, return_dict=False)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-6), name
print("KERNEL-OK")
"""


def test_nearest_code_kernel_path_interpreted_gives_vqp_indices():
    """With the Triton kernel available (its CPU interpreter here), the code search runs in the kernel: vqp's
    indices on these inputs."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("HF_VQ_DISABLE_TRITON", None)
    proc = subprocess.run([sys.executable, "-c", KERNEL_PATH], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "KERNEL-OK" in proc.stdout, proc.stderr[-3000:]
