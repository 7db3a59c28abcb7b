"""The fused rotation-trick kernel (`hf_vq.ops.triton_rotation`) against `estimators.rotate_to`'s PyTorch form:
value and gradient to `x`, none to the codes; with the commitment loss from the same pass, against `mse_loss`. CPU under `TRITON_INTERPRET=1` (subprocess), and the GPU."""

import textwrap

import pytest
from kernel_checks import SHARD_PREAMBLE, gpu_check, gpu_env, interpreter_env, run_sharded

ROT_CHECK = SHARD_PREAMBLE + textwrap.dedent(
    """
    import json, torch
    from hf_vq.ops import estimators, triton_rotation
    dev = sys.argv[1]
    g = torch.Generator()
    shapes = [(2, 37, 24), (1, 5, 256), (3, 9, 7), (1, 3, 1), (1, 5, 1500)]  # 1500: 2 rows of 2048 a program
    if dev == "cuda":
        shapes += [(1, 4099, 256), (2, 1001, 129), (1, 257, 1000), (1, 129, 2048)]
    dtypes = [torch.float32] + ([torch.bfloat16] if dev == "cuda" else [])
    out = {}
    for case_no, (shape, dt) in enumerate((shape, dt) for shape in shapes for dt in dtypes):
        if mine():
            g.manual_seed(case_no)
            x = torch.randn(*shape, generator=g)
            x[..., :1, :] = 0.0  # a zero row: the clamped norms keep it finite
            c = torch.randn(*shape, generator=g).to(dev).requires_grad_()
            x = x.to(dev, dt)
            xb = x.clone().requires_grad_()
            # reference: the PyTorch form (the CPU path of rotate_to), in float32 on the CPU
            xr = x.float().cpu().requires_grad_()
            ref = estimators.rotate_to(xr, c.detach().float().cpu())
            b = triton_rotation.rotate_to_fused(xb, c)
            w = torch.randn(*shape, generator=g)
            (ref * w).sum().backward()
            (b.float() * w.to(dev)).sum().backward()
            scale = ref.abs().max().item() + 1e-6
            # with the commitment loss from the same pass: both outputs weighted, as a training loss would
            xc = x.detach().clone().requires_grad_()
            xr2 = x.detach().float().cpu().clone().requires_grad_()
            ref2 = estimators.rotate_to(xr2, c.detach().float().cpu())
            ref_loss = torch.nn.functional.mse_loss(c.detach().float().cpu(), xr2)
            b2, loss = triton_rotation.rotate_to_with_commitment(xc, c)
            ((ref2 * w).sum() + 3.0 * ref_loss).backward()
            ((b2.float() * w.to(dev)).sum() + 3.0 * loss).backward()
            out[f"{shape}-{dt}"] = dict(
                val_err=float((b.float().cpu() - ref).abs().max()) / scale,
                grad_err=float((xb.grad.float().cpu() - xr.grad).abs().max()) / (xr.grad.abs().max().item() + 1e-6),
                val2_err=float((b2.float().cpu() - ref2).abs().max()) / scale,
                loss_err=abs(loss.item() - ref_loss.item()) / ref_loss.item(),
                grad2_err=float((xc.grad.float().cpu() - xr2.grad).abs().max()) / (xr2.grad.abs().max().item() + 1e-6),
                codes_grad_none=c.grad is None, finite=bool(torch.isfinite(b).all()), dtype_ok=b.dtype == dt,
                loss_dtype_ok=loss.dtype == torch.float32 and loss.shape == ())
    print("RESULT" + json.dumps(out))
    """
)


def _check(res):
    for name, r in res.items():
        tol = 1e-2 if "bfloat16" in name else 1e-5
        assert r["val_err"] <= tol and r["grad_err"] <= tol, (name, r)
        assert r["val2_err"] <= tol and r["grad2_err"] <= tol and r["loss_err"] <= tol, (name, r)
        assert r["codes_grad_none"] and r["finite"] and r["dtype_ok"] and r["loss_dtype_ok"], (name, r)


def test_fused_rotation_interpreted_on_cpu():
    pytest.importorskip("triton")
    _check(run_sharded(ROT_CHECK, "cpu", 2, env=interpreter_env()))


@gpu_check(ROT_CHECK, 3)
def test_fused_rotation_on_gpu():
    pytest.importorskip("triton")
    _check(run_sharded(ROT_CHECK, "cuda", 3, env=gpu_env()))
