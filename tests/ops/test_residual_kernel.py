"""The fused residual step (`hf_vq.ops.triton_residual.residual_step_`) against PyTorch's lookup, sub and add:
bit-equal float32 values, other dtypes through the PyTorch ops. CPU under `TRITON_INTERPRET=1` (subprocess), and
the GPU."""

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
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(dev, env):
    proc = subprocess.run([sys.executable, "-c", CHECK, dev], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert all(res.values()), res


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
