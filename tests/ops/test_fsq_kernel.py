"""The fused FSQ kernel (`hf_vq.ops.triton_fsq`) against the PyTorch op path of `FSQ`: codes, indices and the
straight-through gradient. On CPU under `TRITON_INTERPRET=1` (subprocess, small shapes); on the GPU when there is
one (larger shapes, half-precision inputs)."""

import textwrap

import pytest
from kernel_checks import SHARD_PREAMBLE, gpu_check, gpu_env, interpreter_env, run_sharded

FSQ_CHECK = SHARD_PREAMBLE + textwrap.dedent(
    """
    import json, torch
    import hf_vq
    dev = sys.argv[1]
    g = torch.Generator()
    out = {}
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if dev == "cuda" else [])
    sizes = (4099, 1000, 33) if dev == "cuda" else (61, 9)  # (later sizes: the compiled kernel's direct launch)
    # every dtype for the first level set, one each (in turn) for the others: each (levels, dtype) pair is a
    # compiled kernel variant, the interpreter covers every level set's logic
    cases = [(levels, hard, ncb, dt, n, offset)
             for i, (levels, hard, ncb) in enumerate((([8, 8, 8, 5, 5, 5], False, 1), ([7, 5, 4], True, 1),
                                                       ([3, 6, 9, 4], False, 2), ([5], False, 1)))
             for dt in (dtypes if i == 0 else [dtypes[i % len(dtypes)]])
             for n in sizes for offset in ((0, 1) if n == sizes[-1] else (0,))]
    for case_no, (levels, hard, ncb, dt, n, offset) in enumerate(cases):
        if not mine():
            continue
        g.manual_seed(case_no)
        m = hf_vq.FSQ(levels=levels, bound_hard_clamp=hard, num_codebooks=ncb, check_inputs=False).to(dev)
        width = len(levels) * ncb
        # offset: z starts one element into its buffer (a pointer Triton must not treat as 16-byte aligned)
        buf = (torch.randn(3 * n * width + offset, generator=g) * 2).to(dev, dt).requires_grad_()
        z = buf[offset:].view(3, n, width)
        assert m.uses_kernel(z)
        zt = z.detach().clone().requires_grad_()
        res = m(z)
        with torch.no_grad():
            ev = m(z)  # (inference: no slope)
        qt, it = m.quantize_rows(zt, use_kernel=False)
        if ncb == 1:
            it = it.squeeze(-1)
        w = torch.randn(res.quantized.shape, generator=g).to(dev)
        (res.quantized.float() * w).sum().backward()
        (qt.float() * w).sum().backward()
        gf, gt = buf.grad[offset:].view_as(zt).float(), zt.grad.float()
        out[f"{levels}-{hard}-{dt}-{n}-{offset}"] = dict(
            codes_equal=bool(torch.equal(res.quantized, qt) and torch.equal(ev.quantized, qt)),
            indices_equal=bool(torch.equal(res.indices, it) and torch.equal(ev.indices, it)),
            dtype_ok=res.quantized.dtype == dt and res.indices.dtype == it.dtype,
            grad_err=float((gf - gt).abs().max() / (gt.abs().max() + 1e-12)))
    # channel-first (image) inputs, with and without projections: the same module with the kernel and with the
    # PyTorch ops (the projections as nn.Linear's products, as for half-precision inputs: the kernel that also
    # runs the projections is checked in test_fsq_projected_kernel.py)
    import os
    rel = lambda a, b: float((a - b).abs().max() / (b.abs().max() + 1e-12))
    for name, dim in (("projected-image", 12), ("image", None)):
        if not mine():
            continue
        torch.manual_seed(0)
        g.manual_seed(0)
        m = hf_vq.FSQ(levels=[8, 5, 5, 5], dim=dim, check_inputs=False).to(dev)
        m.projections_in_kernel = False
        z = (torch.randn(2, dim or 4, 5, 7, generator=g) * 2).to(dev)
        res = {}
        for disable in ("0", "1"):
            os.environ["HF_VQ_DISABLE_TRITON"] = disable
            m.zero_grad()
            zz = z.clone().requires_grad_()
            o = m(zz)
            w = torch.linspace(-1, 1, o.quantized.numel(), device=dev).view_as(o.quantized)
            (o.quantized * w).sum().backward()
            grads = [zz.grad] + ([m.project_in.weight.grad.clone()] if dim else [])
            res[disable] = (o.quantized.detach(), o.indices, grads)
        os.environ.pop("HF_VQ_DISABLE_TRITON")
        (qf, i_f, gf), (qt, it, gt) = res["0"], res["1"]
        out[name] = dict(codes_equal=bool(torch.equal(qf, qt)), indices_equal=bool(torch.equal(i_f, it)),
                         dtype_ok=qf.shape == z.shape, grad_err=max(rel(a, b) for a, b in zip(gf, gt)))
    # the one-pass ResidualFSQ kernel against its PyTorch reference (`fsq.residual_fsq`)
    from hf_vq.ops import fsq as fsq_ops, triton_fsq
    for levels, hard, q in (([8, 5, 5, 5], True, 4), ([7, 4, 3], False, 3), ([5], True, 2)):
        scales = torch.stack([torch.tensor(levels, dtype=torch.float32) ** -i for i in range(q)]).to(dev)
        table = fsq_ops.bound_table(levels, hard_clamp=hard, symmetric=True, device=dev)
        basis = fsq_ops.fsq_tables(levels, device=dev)[1]
        size = 1
        for level in levels:
            size *= level
        for n in sizes:
            if not mine():
                continue
            g.manual_seed(n)
            x = torch.tanh(torch.randn(3, n, len(levels), generator=g) * 2).to(dev) * 1.2
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ref, ref_idx = fsq_ops.residual_fsq(xa, scales, table, basis, size, hard_clamp=hard)
            res, idx = triton_fsq.residual_fsq_fused(xb, scales, table, basis, hard, straight_through=True)
            with torch.no_grad():
                ev, ev_idx = triton_fsq.residual_fsq_fused(x, scales, table, basis, hard)
            w = torch.randn(ref.shape, generator=g).to(dev)
            (ref * w).sum().backward()
            (res * w).sum().backward()
            out[f"residual-{levels}-{hard}-{n}"] = dict(
                codes_equal=bool(torch.equal(res, ref) and torch.equal(ev, ref)),
                indices_equal=bool(torch.equal(idx, ref_idx) and torch.equal(ev_idx, ref_idx)),
                dtype_ok=res.dtype == x.dtype and idx.dtype == torch.int32,
                grad_err=float((xb.grad - xa.grad).abs().max() / (xa.grad.abs().max() + 1e-12)))
    print("RESULT" + json.dumps(out))
    """
)


def _check(res, grad_tol):
    for name, r in res.items():
        assert r["codes_equal"] and r["indices_equal"] and r["dtype_ok"], (name, r)
        assert r["grad_err"] <= grad_tol, (name, r)


def test_fused_fsq_interpreted_on_cpu():
    pytest.importorskip("triton")
    _check(run_sharded(FSQ_CHECK, "cpu", 2, env=interpreter_env()), 1e-5)


@gpu_check(FSQ_CHECK, 4)
def test_fused_fsq_on_gpu():
    pytest.importorskip("triton")
    _check(run_sharded(FSQ_CHECK, "cuda", 4, env=gpu_env()), 1e-2)  # half-precision gradients: rounding order
