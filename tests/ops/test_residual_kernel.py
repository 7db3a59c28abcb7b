"""The fused residual kernels (`hf_vq.ops.triton_residual`). `residual_step_` against PyTorch's lookup, sub and add:
bit-equal float32 values, other dtypes through the PyTorch ops. `residual_train_levels` (ResidualVQ's fused
training levels) against every level's own forward: indices, output, losses, input gradient and every buffer after
several steps, with dead-code expiry, projections, a commitment weight and quantize dropout. CPU under
`TRITON_INTERPRET=1` (subprocess), and the GPU."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

CHECK = textwrap.dedent(
    """
    import json, sys, torch
    from hf_vq.ops.triton_residual import residual_step_
    dev = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    shapes = [(37, 20, 5), (64, 16, 33), (1, 3, 1), (100, 1000, 7)]  # (N, d, K)
    if dev == "cuda":
        shapes += [(131073, 128, 1024), (4099, 256, 8192)]
    out = {}
    for n, d, k in shapes:
        for dt in (torch.float32, torch.bfloat16):
            r = torch.randn(n, d, generator=g).to(dev, dt)
            o = torch.randn(n, d, generator=g).to(dev, dt)
            cb = torch.randn(k, d, generator=g).to(dev)
            idx = torch.randint(0, k, (n,), generator=g).to(dev)
            code = cb[idx].to(dt)
            r_ref, o_ref = r - code, o + code
            residual_step_(r, o, cb, idx)
            out[f"{n}x{d}x{k}-{dt}"] = torch.equal(r, r_ref) and torch.equal(o, o_ref)
    print("RESULT" + json.dumps(out))
    """
)
TRAIN_CHECK = textwrap.dedent(
    """
    import copy, json, sys, torch
    from hf_vq import ResidualVQ
    from hf_vq.models.vector_quantize import VectorQuantize
    from hf_vq.ops import triton_nearest
    dev = sys.argv[1]
    if dev == "cpu":  # the interpreted search is slow and has its own tests: the PyTorch search, same in both paths
        triton_nearest.available = lambda x: False
    used, expired = [], []
    fused_levels, expire_codes = ResidualVQ._fused_levels, VectorQuantize.expire_codes
    def spy(self, *a, **k):
        r = fused_levels(self, *a, **k)
        used.append(r is not None)
        return r
    def expire_spy(self, *a, **k):
        expired.append(1)
        return expire_codes(self, *a, **k)
    VectorQuantize.expire_codes = expire_spy

    def run(model, xs, fused):
        m = copy.deepcopy(model)
        ResidualVQ._fused_levels = spy if fused else (lambda *a, **k: None)
        torch.manual_seed(1)
        steps = []
        for x in xs:
            x = x.clone().requires_grad_()
            o = m(x)
            w = torch.randn(o.quantized.shape, device=x.device)  # (not randn_like: the layouts may differ)
            lw = torch.arange(1, o.loss.numel() + 1, device=x.device, dtype=o.loss.dtype)
            ((o.quantized * w).sum() + (o.loss * lw).sum()).backward()
            steps.append((o.indices, o.quantized.detach(), o.loss.detach(), x.grad))
        return m, steps

    dim, levels, size, n = (128, 8, 1024, 4099) if dev == "cuda" else (16, 4, 32, 100)
    configs = dict(plain={}, dead_codes=dict(threshold_ema_dead_code=2),
                   projected=dict(commitment_weight=0.25, codebook_dim=dim // 2),
                   dropout=dict(quantize_dropout=True, quantize_dropout_cutoff_index=1),
                   image=dict(accept_image_fmap=True),  # channel-first input: strided token rows
                   cosine=dict(use_cosine_sim=True))
    out = {}
    for name, kw in configs.items():
        torch.manual_seed(0)
        model = ResidualVQ(dim=dim, num_quantizers=levels, codebook_size=size, decay=0.9, **kw).to(dev).train()
        xs = torch.randn(3, 2, n // 2, dim, device=dev)
        if kw.get("accept_image_fmap"):
            xs = torch.randn(3, 2, dim, 5, n // 10, device=dev)
        used.clear(); expired.clear()
        fused, a = run(model, xs, True)
        n_expired = len(expired)
        ref, b = run(model, xs, False)
        err = lambda p, q: float((p - q).abs().max())
        out[name] = dict(
            used=used[:], expired=n_expired,
            indices=all(torch.equal(p[0], q[0]) for p, q in zip(a, b)),
            value=max(err(p[1], q[1]) for p, q in zip(a, b)),
            loss=max(err(p[2], q[2]) / float(q[2].abs().max()) for p, q in zip(a, b)),
            grad=max(err(p[3], q[3]) / float(q[3].abs().max()) for p, q in zip(a, b)),
            state=max(err(p, q) / (float(q.abs().max()) + 1e-6)  # (EMA sums: atomics add in any order)
                      for p, q in zip(fused.state_dict().values(), ref.state_dict().values()) if p.is_floating_point()))
    print("RESULT" + json.dumps(out))
    """
)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(dev, env, check=CHECK):
    proc = subprocess.run([sys.executable, "-c", check, dev], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    if check is CHECK:
        assert all(res.values()), res
    return res


def _assert_train_levels(res):
    for name, r in res.items():
        assert r["used"] == ([False] * 3 if name == "cosine" else [True] * 3), (name, r)  # cosine: each level
        assert r["indices"], (name, r)
        assert r["value"] < 1e-5 and r["loss"] < 1e-5 and r["grad"] < 1e-5 and r["state"] < 1e-5, (name, r)
    assert res["dead_codes"]["expired"] > 0 and res["plain"]["expired"] == 0, res


def test_residual_step_interpreted_on_cpu():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("HF_VQ_DISABLE_TRITON", None)
    _run("cpu", env)


def test_residual_step_pytorch_path():
    _run("cpu", dict(os.environ, HF_VQ_DISABLE_TRITON="1"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_residual_step_on_gpu():
    pytest.importorskip("triton")
    _run("cuda", {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HF_VQ_DISABLE_TRITON")})


def test_residual_train_levels_interpreted_on_cpu():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("HF_VQ_DISABLE_TRITON", None)
    _assert_train_levels(_run("cpu", env, TRAIN_CHECK))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_residual_train_levels_on_gpu():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HF_VQ_DISABLE_TRITON")}
    _assert_train_levels(_run("cuda", env, TRAIN_CHECK))
