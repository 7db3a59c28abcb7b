"""FSQ with its projections in one kernel pass (`hf_vq.ops.triton_fsq_projected`), through the `FSQ` module as a user
calls it, against the same module's PyTorch path in float64: output, indices, and the gradients of the input and
of both projections, for channel-first inputs and channel-last ones with strided features (the calls the module
gives the kernel; contiguous rows take nn.Linear's products, checked too), strided gradients (a broadcast gradient,
a transposed one), several feature widths (one and several feature chunks), codebooks, biases and bounds; and
every config field set away from its default, which either keeps the kernel with the same values or takes the
general path (only the options the kernel lacks). On CPU under `TRITON_INTERPRET=1` (subprocess, small shapes);
on the GPU when there is one (larger shapes). Which calls take the kernel (dtype, autocast, layout, adapters) is
also checked in-process."""

import copy
import textwrap

import pytest
import torch
from kernel_checks import SHARD_PREAMBLE, gpu_check, gpu_env, interpreter_env, run_sharded

import hf_vq

CHECK = SHARD_PREAMBLE + textwrap.dedent(
    """
    import copy, json, torch
    import hf_vq
    dev = sys.argv[1]
    big = dev == "cuda"
    out = {}
    rel = lambda a, b: float((a.double() - b).abs().max() / (b.abs().max() + 1e-30))
    cases = [  # (name, FSQ kwargs, input shape, channel_first input, gradient kind)
        ("tokens", dict(levels=[8, 8, 8, 5, 5, 5], dim=40), (2, 50, 40), False, "dense"),
        ("contiguous-tokens", dict(levels=[8, 8, 8, 5, 5, 5], dim=40), (2, 50, 40), False, "dense"),
        ("tokens-broadcast-grad", dict(levels=[8, 8, 8, 5, 5, 5], dim=40), (2, 50, 40), False, "sum"),
        ("wide-chunks", dict(levels=[7, 5, 4], dim=300), (3, 20, 300), False, "dense"),
        ("codebooks-hard-nobias", dict(levels=[3, 6, 9, 4], dim=24, num_codebooks=2, bound_hard_clamp=True,
                                       projection_has_bias=False), (2, 30, 24), False, "transposed"),
        ("image", dict(levels=[8, 5, 5, 5], dim=20), (2, 20, 5, 7), True, "dense"),
        ("video-broadcast-grad", dict(levels=[8, 5, 5, 5], dim=20), (1, 20, 2, 3, 5), True, "sum"),
        ("channel-first-3d", dict(levels=[5, 5, 5], dim=16, channel_first=True), (2, 16, 33), True, "transposed"),
        ("rows-2d", dict(levels=[5], dim=17), (45, 17), False, "dense"),
        ("no-indices", dict(levels=[8, 5, 5, 5], dim=20, return_indices=False), (2, 9, 20), False, "dense"),
        ("wide-codes", dict(levels=[5, 4, 3, 3, 3, 3, 3, 3], dim=40, num_codebooks=6), (2, 40, 3, 5), True, "dense"),
        # gradients for the projections only (an input without grad), for the input only (frozen projections)
        ("projections-only-grad", dict(levels=[8, 5, 5, 5], dim=20), (2, 20, 3, 4), True, "dense"),
        ("input-only-grad", dict(levels=[8, 5, 5, 5], dim=20), (2, 20, 3, 4), True, "dense"),
    ]
    if big:  # the compiled kernels on larger shapes; of the small cases (each compiles its own kernel variants),
        # the two with flags and strides the large ones lack
        cases = [c for c in cases if c[0] in ("codebooks-hard-nobias", "video-broadcast-grad")] + [
            ("big-tokens", dict(levels=[8, 8, 8, 5, 5, 5], dim=256), (4, 4099, 256), False, "dense"),
            ("big-broadcast", dict(levels=[8, 8, 8, 5, 5, 5], dim=256), (4, 4099, 256), False, "sum"),
            ("big-image", dict(levels=[8, 5, 5, 5], dim=96), (2, 96, 33, 65), True, "dense"),
            ("big-wide", dict(levels=[7, 5, 5, 5, 5], dim=1000, num_codebooks=3), (2, 999, 1000), False, "dense"),
        ]
    else:  # every config field set away from its default, one at a time (routing and values, either path)
        base = dict(levels=[8, 5, 5, 5], dim=20)
        walk = dict(levels=[7, 5, 4], dim=None, num_codebooks=2, keep_num_codebooks_dim=True, scale=2.0,
                    allowed_dtypes=["float64"], channel_first=True, projection_has_bias=False, return_indices=False,
                    force_quantization_f32=False, preserve_symmetry=True, noise_dropout=0.5, bound_hard_clamp=True,
                    orthogonal_rotation=True, check_inputs=True)
        assert set(walk) == {*hf_vq.FSQConfig.vqp_positional, "check_inputs"}  # (a new field must join the walk)
        for field, value in walk.items():
            kwargs = {**base, field: value, **(dict(preserve_symmetry=True) if field == "noise_dropout" else {})}
            cases.append((f"field {field}", kwargs, (2, 20, 3, 4) if field != "dim" else (2, 4, 3, 4), True,
                          "dense"))
    g = torch.Generator()
    for case_no, (name, kwargs, shape, channel_first, grad_kind) in enumerate(cases):
        if not mine():
            continue
        torch.manual_seed(0)
        g.manual_seed(case_no)
        m = hf_vq.FSQ(**{"check_inputs": False, **kwargs}).to(dev)
        m.requires_grad_(name != "input-only-grad")
        m64 = copy.deepcopy(m).double()
        if name.startswith("field"):  # (eval mode: noise dropout would make the two calls differ)
            m.eval(), m64.eval()
        x = (torch.randn(shape, generator=g) * 1.5).to(dev)
        if not channel_first and name != "contiguous-tokens":  # features strided: the transpose of a (d, n) layout
            x = x.transpose(-2, -1).contiguous().transpose(-2, -1)
        kernel = m.projects_in_kernel(x, 1 if channel_first else -1)
        input_grad = name != "projections-only-grad"
        xk, x64 = x.clone().requires_grad_(input_grad), x.double().requires_grad_(input_grad)
        res, ref = m(xk), m64(x64)
        with torch.no_grad():
            ev = m(x)
        if grad_kind == "sum":
            res.quantized.sum().backward()
            ref.quantized.sum().backward()
        else:
            w = torch.randn(res.quantized.shape, generator=g).to(dev)
            if grad_kind == "transposed":
                w = w.transpose(0, -1).contiguous().transpose(0, -1)
            (res.quantized * w).sum().backward()
            (ref.quantized * w.double()).sum().backward()
        pairs = [(xk.grad, x64.grad)] + [(p.grad, q.grad) for p, q in zip(m.parameters(), m64.parameters())]
        grads = [(a, b) for a, b in pairs if b is not None]
        indices_ok = (res.indices is None and ref.indices is None and not m.return_indices) or (
            torch.equal(res.indices, ref.indices.to(res.indices.dtype)) and torch.equal(ev.indices, res.indices))
        out[name] = dict(
            layout_ok=res.quantized.shape == x.shape and res.quantized.dtype == torch.float32,
            indices_ok=bool(indices_ok),
            out_err=max(rel(res.quantized, ref.quantized), rel(ev.quantized, ref.quantized)),
            grad_err=max(rel(a, b) for a, b in grads),
            grads_where_expected=all((a is None) == (b is None) for a, b in pairs),
            n_grads=len(grads), kernel=kernel)
    print("RESULT" + json.dumps(out))
    """
)


# the config fields whose non-default value takes the general path (the kernel lacks the option, or there are no
# projections)
GENERAL_PATH_FIELDS = ("field dim", "field preserve_symmetry", "field noise_dropout", "field orthogonal_rotation")


def _check(res, grad_tol):
    for name, r in res.items():
        assert r["kernel"] == (name not in ("contiguous-tokens", *GENERAL_PATH_FIELDS)), (name, r)
        assert r["layout_ok"] and r["indices_ok"], (name, r)
        assert r["out_err"] <= 1e-5 and r["grad_err"] <= grad_tol, (name, r)
        expected = 1 if name in ("input-only-grad", "field dim") else 4 if name == "projections-only-grad" else \
            3 if "nobias" in name or name == "field projection_has_bias" else 5
        assert r["grads_where_expected"] and r["n_grads"] == expected, (name, r)
    if "tokens" in res:  # (the interpreter run) every field was walked
        assert sum(name.startswith("field") for name in res) == 15


def test_projected_fsq_interpreted_on_cpu():
    pytest.importorskip("triton")
    _check(run_sharded(CHECK, "cpu", 2, env=interpreter_env()), 1e-5)


@gpu_check(CHECK, 3)
def test_projected_fsq_on_gpu():
    pytest.importorskip("triton")
    _check(run_sharded(CHECK, "cuda", 3, env=gpu_env()), 1e-4)  # gradients summed over 2^14 rows in another order


def test_which_calls_take_the_kernel(monkeypatch):
    """The plain configuration with float32 projections takes the kernel for strided features (channel-first);
    contiguous rows, every option the kernel lacks (noise dropout needs symmetric levels), a half dtype, autocast
    and a replaced projection take the general path."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (`available` then accepts CPU tensors; nothing is launched)
    monkeypatch.delenv("HF_VQ_DISABLE_TRITON", raising=False)
    x = torch.randn(2, 16, 3).transpose(1, 2)  # (b, n, d) with strided features
    plain = hf_vq.FSQ(levels=[8, 5, 5], dim=16)
    assert plain.projects_in_kernel(x)
    assert plain.projects_in_kernel(torch.randn(2, 16, 4, 4), 1)
    assert not plain.projects_in_kernel(x.contiguous())
    assert not plain.projects_in_kernel(torch.randn(2, 4, 4, 16).permute(0, 3, 1, 2), 1)  # channels_last memory
    assert not plain.projects_in_kernel(x.bfloat16())
    assert not copy.deepcopy(plain).bfloat16().projects_in_kernel(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not plain.projects_in_kernel(x)
    for kwargs in (dict(preserve_symmetry=True), dict(preserve_symmetry=True, noise_dropout=0.5),
                   dict(orthogonal_rotation=True), dict()):
        assert not hf_vq.FSQ(levels=[8, 5, 5], **kwargs, dim=16 if kwargs else 3).projects_in_kernel(
            x if kwargs else x[..., :3]), kwargs
    adapted = hf_vq.FSQ(levels=[8, 5, 5], dim=16)
    adapted.project_in = torch.nn.Sequential(adapted.project_in)
    assert not adapted.projects_in_kernel(x)
    monkeypatch.setenv("HF_VQ_DISABLE_TRITON", "1")
    assert not plain.projects_in_kernel(x)


def test_op_errors():
    pytest.importorskip("triton")
    from hf_vq.ops import triton_fsq
    from hf_vq.ops.triton_fsq_projected import projected_fsq

    m = hf_vq.FSQ(levels=[8, 5, 5], dim=16)
    table, basis = triton_fsq.fsq_table(m._levels, m._basis, False)
    w_in, b_in, w_out = m.project_in.weight, m.project_in.bias, m.project_out.weight
    with pytest.raises(ValueError, match="both projection biases or neither"):
        projected_fsq(torch.randn(2, 16), w_in, b_in, w_out, None, table, basis, codebooks=1, hard_clamp=False,
                      channel_first=False)
    with pytest.raises(ValueError, match="3 code features for 2 codebooks of 3 levels"):
        projected_fsq(torch.randn(2, 16), w_in, None, w_out, None, table, basis, codebooks=2, hard_clamp=False,
                      channel_first=False)
