"""Every `FSQConfig` field against FSQ's Triton paths: a model with one field away from its default gives the same
codes, indices, input gradients and projection gradients with the kernels as with the PyTorch ops, in training and
in eval, and the plain options do take a kernel (so a new option is either honoured by the kernels or sends the
call to the PyTorch ops, never silently ignored). On CPU under `TRITON_INTERPRET=1` (subprocess); on the GPU when
there is one. (`test_fsq_projected_kernel.py` walks the fields through the one-pass projected kernel alone.)"""

import textwrap

import pytest
from kernel_checks import SHARD_PREAMBLE, gpu_check, gpu_env, interpreter_env, run_sharded

FIELDS_CHECK = SHARD_PREAMBLE + textwrap.dedent(
    """
    import json, os, torch
    import hf_vq
    from hf_vq.ops import triton_fsq, triton_fsq_projected
    dev = sys.argv[1]
    # field: (options besides levels [8, 5, 5, 5], input shape, input dtype)
    CASES = {
        "levels": (dict(levels=[7, 5, 4]), (2, 9, 3), torch.float32),
        "dim": (dict(dim=12), (2, 9, 12), torch.float32),
        "num_codebooks": (dict(num_codebooks=2), (2, 9, 8), torch.float32),
        "keep_num_codebooks_dim": (dict(num_codebooks=2, keep_num_codebooks_dim=True), (2, 9, 8), torch.float32),
        "scale": (dict(scale=2.0), (2, 9, 4), torch.float32),
        "allowed_dtypes": (dict(allowed_dtypes=["float32"]), (2, 9, 4), torch.float64),
        "channel_first": (dict(dim=12, channel_first=True), (2, 12, 9), torch.float32),
        "projection_has_bias": (dict(dim=12, projection_has_bias=False), (2, 9, 12), torch.float32),
        "return_indices": (dict(return_indices=False), (2, 9, 4), torch.float32),
        "force_quantization_f32": (dict(force_quantization_f32=False), (2, 9, 4), torch.float16),
        "preserve_symmetry": (dict(preserve_symmetry=True), (2, 9, 4), torch.float32),
        "noise_dropout": (dict(preserve_symmetry=True, noise_dropout=0.5), (2, 9, 4), torch.float32),
        "bound_hard_clamp": (dict(bound_hard_clamp=True), (2, 9, 4), torch.float32),
        "orthogonal_rotation": (dict(dim=12, orthogonal_rotation=True), (2, 9, 12), torch.float32),
        "check_inputs": (dict(check_inputs=False), (2, 9, 4), torch.float32),
        "image_projections": (dict(dim=12), (2, 12, 3, 3), torch.float32),  # (the one-pass projected kernel)
    }
    fields = set(hf_vq.FSQConfig.field_names())
    assert fields <= set(CASES), f"FSQConfig fields without a case here: {sorted(fields - set(CASES))}"
    launches = []  # the FSQ forward's kernel entry points, counted
    for module, name in ((triton_fsq, "fsq_quantize_fused"), (triton_fsq_projected, "projected_fsq")):
        setattr(module, name, (lambda f: lambda *a, **k: launches.append(1) or f(*a, **k))(getattr(module, name)))
    out = {}
    for field, (kwargs, shape, dtype) in CASES.items():
        if not mine():
            continue
        torch.manual_seed(0)
        m = hf_vq.FSQ(**{"levels": [8, 5, 5, 5], **kwargs}).to(dev)
        z = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2).to(dev, dtype)
        runs = {}
        for disable in ("0", "1"):
            os.environ["HF_VQ_DISABLE_TRITON"] = disable
            launches.clear()
            for train in (True, False):
                m.train(train)
                m.zero_grad()
                zz = z.clone().requires_grad_(train)
                torch.manual_seed(2)
                o = m(zz)
                if train:
                    w = torch.linspace(-1, 1, o.quantized.numel(), device=dev).view_as(o.quantized)
                    (o.quantized.double() * w).sum().backward()
                    grads = [zz.grad] + [p.grad for p in m.parameters() if p.grad is not None]
                runs[(disable, train)] = (o.quantized.detach(), o.indices, grads if train else [], len(launches))
        os.environ.pop("HF_VQ_DISABLE_TRITON")
        same = lambda a, b: (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        rel = lambda a, b: float((a - b).abs().max() / (b.abs().max() + 1e-12))
        res = dict(kernel=runs[("0", False)][3] > 0)
        for train in (True, False):
            (q, i, g, _), (qt, it, gt, _) = runs[("0", train)], runs[("1", train)]
            # (exact, except through the projected kernel's own products: float32 rounding)
            res[f"codes_{train}"] = bool(q.dtype == qt.dtype and rel(q.double(), qt.double()) <= 1e-5)
            res[f"indices_{train}"] = bool(same(i, it))
            res[f"grad_{train}"] = max([rel(a.double(), b.double()) for a, b in zip(g, gt)] + [0.0])
            res[f"grads_{train}"] = len(g) == len(gt)
        out[field] = res
    print("RESULT" + json.dumps(out))
    """
)

# the options the kernels serve; the others must send the call to the PyTorch ops (and agree trivially)
KERNEL_FIELDS = {"levels", "dim", "num_codebooks", "keep_num_codebooks_dim", "scale", "channel_first",
                 "projection_has_bias", "return_indices", "bound_hard_clamp", "check_inputs", "image_projections"}


def _check(res, grad_tol):
    for field, r in res.items():
        assert all(r[f"{k}_{t}"] for k in ("codes", "indices", "grads") for t in (True, False)), (field, r)
        assert r["grad_True"] <= grad_tol, (field, r)
        assert r["kernel"] == (field in KERNEL_FIELDS), (field, r)


def test_each_fsq_field_keeps_the_kernels_equal_to_the_ops_interpreted_on_cpu():
    pytest.importorskip("triton")
    _check(run_sharded(FIELDS_CHECK, "cpu", 2, env=interpreter_env()), 1e-5)


@gpu_check(FIELDS_CHECK, 2)
def test_each_fsq_field_keeps_the_kernels_equal_to_the_ops_on_gpu():
    pytest.importorskip("triton")
    _check(run_sharded(FIELDS_CHECK, "cuda", 2, env=gpu_env()), 1e-4)  # (as test_fsq_projected_kernel)
