"""The fused residual kernels (`hf_vq.ops.triton_residual`). `residual_step_` against PyTorch's lookup, sub and add:
bit-equal float32 values for one and several groups, other dtypes through the PyTorch ops. `residual_train_levels`
(ResidualVQ's fused training levels) against every level's own forward: indices, output, losses, input gradient and
every buffer after several steps, with dead-code expiry, projections, a commitment weight and quantize dropout.
GroupedResidualVQ's all-groups pass against its groups called in turn. CPU under `TRITON_INTERPRET=1`
(subprocess), and the GPU."""

import os
import textwrap

import pytest
from kernel_checks import SHARD_PREAMBLE, gpu_check, gpu_env, interpreter_env, run_check, run_sharded

CHECK = textwrap.dedent(
    """
    import json, sys, torch
    from hf_vq.ops.triton_residual import residual_step_
    dev = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 37, 20, 5), (3, 64, 16, 33), (1, 1, 3, 1), (2, 100, 1000, 7)]  # (groups, N, d, K)
    if dev == "cuda":
        shapes += [(1, 131073, 128, 1024), (4, 4099, 256, 8192)]
    out = {}
    for groups, n, d, k in shapes:
        for dt in (torch.float32, torch.bfloat16):
            r = torch.randn(groups, n, d, generator=g).to(dev, dt)
            o = torch.randn(groups, n, d, generator=g).to(dev, dt)
            cb = torch.randn(groups, k, d, generator=g).to(dev)
            idx = torch.randint(0, k, (groups, n), generator=g).to(dev)
            code = torch.stack([cb[i][idx[i]] for i in range(groups)]).to(dt)  # each group's own codebook
            r_ref, o_ref = r - code, o + code
            residual_step_(r, o, cb, idx)
            out[f"{groups}x{n}x{d}x{k}-{dt}"] = torch.equal(r, r_ref) and torch.equal(o, o_ref)
    print("RESULT" + json.dumps(out))
    """
)
TRAIN_CHECK = SHARD_PREAMBLE + textwrap.dedent(
    """
    import copy, json, sys, torch
    from hf_vq import ResidualVQ
    from hf_vq.models.codebook import Codebook
    from hf_vq.ops import triton_nearest
    dev = sys.argv[1]
    if dev == "cpu":  # the interpreted search is slow and has its own tests: the PyTorch search, same in both paths
        triton_nearest.available = lambda x: False
    used, expired = [], []
    fused_levels, replace_codes = ResidualVQ._fused_levels, Codebook.replace_codes
    def spy(self, *a, **k):
        r = fused_levels(self, *a, **k)
        used.append(r is not None)
        return r
    def expire_spy(self, *a, **k):
        expired.append(1)
        return replace_codes(self, *a, **k)
    Codebook.replace_codes = expire_spy

    def step(m, x, fused, seed):
        ResidualVQ._fused_levels = spy if fused else (lambda *a, **k: None)
        torch.manual_seed(seed)
        x = x.clone().requires_grad_()
        o = m(x)
        w = torch.randn(o.quantized.shape, device=x.device)  # (not randn_like: the layouts may differ)
        lw = torch.arange(1, o.loss.numel() + 1, device=x.device, dtype=o.loss.dtype)
        ((o.quantized * w).sum() + (o.loss * lw).sum()).backward()
        return o.indices.reshape(-1, levels), token_rows(o.quantized.detach()), o.loss.detach(), token_rows(x.grad)

    def token_rows(t):  # (b, n, d) or channel-first (b, d, h, w) to (N, d)
        return (t.movedim(1, -1) if t.ndim == 4 else t).reshape(-1, t.shape[1 if t.ndim == 4 else -1])

    def near_tie(row, level, i, j, inputs, books):
        # float64 distances of the reference's level input to both codes differ by float32 rounding only
        d = ((inputs[level][row].double() - books[level][[i, j]].double()) ** 2).sum(-1)
        return bool((d[0] - d[1]).abs() <= 1e-5 * d.max())

    def compare(model, xs):
        # Both paths step by step from the same state: the reference starts each step from the fused model's state
        # (the two round the residuals differently in the last bits, so a float32 near tie may be chosen either
        # way and change the state; restarting from one state keeps such a row from spreading). A row whose codes
        # differ must be a near tie at its first differing level (checked in float64); the other rows' values and
        # gradients are compared, and the losses and state on steps without such a row.
        fused, ref = copy.deepcopy(model), copy.deepcopy(model)
        inputs = []  # each level's input rows in the reference step
        for layer in ref.layers:
            layer.register_forward_pre_hook(lambda mod, args: inputs.append(token_rows(args[0].detach())))
        r = dict(rows=0, ties=0, untied=0, value=0.0, loss=0.0, grad=0.0, state=0.0)
        err = lambda p, q: float((p - q).abs().max()) if p.numel() else 0.0
        for seed, x in enumerate(xs):
            ref.load_state_dict(fused.state_dict())
            books = [layer._codebook.embed.detach()[0].clone() for layer in ref.layers]
            inputs.clear()
            p = step(fused, x, True, seed)
            counted = len(expired)
            q = step(ref, x, False, seed)
            del expired[counted:]  # (the fused path's expiries only)
            differ = p[0] != q[0]
            r["rows"] += differ.shape[0]
            for row in differ.any(1).nonzero().flatten().tolist():
                level = int(differ[row].nonzero()[0])
                tie = near_tie(row, level, int(p[0][row, level]), int(q[0][row, level]), inputs, books)
                r["ties" if tie else "untied"] += 1
            same = ~differ.any(1)
            r["value"] = max(r["value"], err(p[1][same], q[1][same]))
            r["grad"] = max(r["grad"], err(p[3][same], q[3][same]) / float(q[3].abs().max()))
            if bool(same.all()):
                r["loss"] = max(r["loss"], err(p[2], q[2]) / float(q[2].abs().max()))
                r["state"] = max(r["state"], max(err(u, v) / (float(v.abs().max()) + 1e-6)  # (atomics: any order)
                                                 for u, v in zip(fused.state_dict().values(), ref.state_dict().values())
                                                 if v.is_floating_point()))
        return r

    dim, levels, size, n = (128, 8, 1024, 4099) if dev == "cuda" else (16, 4, 32, 100)
    configs = dict(plain={}, dead_codes=dict(threshold_ema_dead_code=2),
                   projected=dict(commitment_weight=0.25, codebook_dim=dim // 2),
                   dropout=dict(quantize_dropout=True, quantize_dropout_cutoff_index=1),
                   image=dict(accept_image_fmap=True),  # channel-first input: strided token rows
                   cosine=dict(use_cosine_sim=True))
    out = {}
    for name, kw in configs.items():
        if not mine():
            continue
        torch.manual_seed(0)
        model = ResidualVQ(dim=dim, num_quantizers=levels, codebook_size=size, decay=0.9, **kw).to(dev).train()
        xs = torch.randn(3, 2, n // 2, dim, device=dev)
        if kw.get("accept_image_fmap"):
            xs = torch.randn(3, 2, dim, 5, n // 10, device=dev)
        used.clear(); expired.clear()
        out[name] = dict(compare(model, xs), used=used[:], expired=len(expired))
    print("RESULT" + json.dumps(out))
    """
)
GROUPED_CHECK = SHARD_PREAMBLE + textwrap.dedent(
    """
    import copy, json, sys, torch
    import hf_vq
    from hf_vq.models import grouped
    from hf_vq.models.codebook import Codebook
    from hf_vq.ops import triton_nearest
    dev = sys.argv[1]
    if dev == "cpu":  # the interpreted search is slow and has its own tests
        triton_nearest.available = lambda x: False
    from hf_vq.models import residual
    used, expired = [], []
    for module, name in ((grouped, "fused_train_levels"), (residual, "lean_eval_levels")):  # the all-groups passes
        fn = getattr(module, name)
        setattr(module, name, lambda rows, *a, _fn=fn, _name=name: (rows.shape[0] > 1 and used.append(_name))
                or _fn(rows, *a))
    replace_codes = Codebook.replace_codes
    Codebook.replace_codes = lambda self, *a, **k: expired.append(1) or replace_codes(self, *a, **k)
    at_once = grouped.GroupedResidualBase._forward_groups_at_once
    one_by_one = lambda self, *a, **k: None  # (no all-groups pass: each group is called in turn)

    def step(model, x, together, seed, train):
        grouped.GroupedResidualBase._forward_groups_at_once = at_once if together else one_by_one
        torch.manual_seed(seed)
        x = x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            o = model.train(train)(x)
            if train:
                w = torch.randn(o.quantized.shape, device=x.device)
                lw = torch.arange(1, o.loss.numel() + 1, device=x.device, dtype=o.loss.dtype).view(o.loss.shape)
                ((o.quantized * w).sum() + (o.loss * lw).sum()).backward()
        return o.indices, o.quantized.detach(), o.loss.detach(), x.grad

    err = lambda p, q: float((p - q).abs().max() / (q.abs().max() + 1e-6))
    dim, levels, size, n = (256, 4, 1024, 4099) if dev == "cuda" else (16, 3, 16, 50)
    configs = dict(plain={}, dead_codes=dict(threshold_ema_dead_code=2),
                   projected=dict(commitment_weight=0.25, codebook_dim=dim // 4),
                   dropout=dict(quantize_dropout=True, quantize_dropout_cutoff_index=1),
                   image=dict(accept_image_fmap=True))
    out = {}
    for name, kw in configs.items():
        if not mine():
            continue
        torch.manual_seed(0)
        model = hf_vq.GroupedResidualVQ(dim=dim, groups=2, num_quantizers=levels, codebook_size=size, decay=0.9,
                                        **kw).to(dev)
        ref = copy.deepcopy(model)
        r = dict(indices=True, value=0.0, loss=0.0, grad=0.0, state=0.0)
        used.clear(); expired.clear()
        for seed in range(3):
            shape = (2, dim, 5, n // 10) if kw.get("accept_image_fmap") else (2, n // 2, dim)
            x = torch.randn(shape, device=dev)
            for train in (True, False):
                ref.load_state_dict(model.state_dict())  # both from one state (atomics sum in any order)
                p, q = step(model, x, True, seed, train), step(ref, x, False, seed, train)
                r["indices"] &= bool(torch.equal(p[0], q[0]))
                r["value"] = max(r["value"], err(p[1], q[1]))
                r["loss"] = max(r["loss"], err(p[2], q[2]))
                if train:
                    r["grad"] = max(r["grad"], err(p[3], q[3]))
                    r["state"] = max(r["state"], max(err(u, v) for u, v in zip(model.state_dict().values(),
                                                                              ref.state_dict().values())
                                                     if v.is_floating_point()))
        out[name] = dict(r, used=used[:], expired=len(expired))
    print("RESULT" + json.dumps(out))
    """
)
def _run(dev, env, check=CHECK):
    # the training checks' configurations as shards (processes at once: compilation or interpretation dominates)
    res = run_check(check, dev, env=env) if check is CHECK else run_sharded(check, dev, 3 if dev == "cuda" else 2,
                                                                            env=env)
    if check is CHECK:
        assert all(res.values()), res
    return res


def _assert_train_levels(res):
    for name, r in res.items():
        assert r["used"] == ([False] * 3 if name == "cosine" else [True] * 3), (name, r)  # cosine: each level
        # codes differ only at float32 near ties (checked in float64), and those are rare: at most 1 row in 1000
        assert r["untied"] == 0 and r["ties"] <= max(2, r["rows"] // 1000), (name, r)
        assert r["value"] < 1e-5 and r["loss"] < 1e-5 and r["grad"] < 1e-5 and r["state"] < 1e-5, (name, r)
    assert res["dead_codes"]["expired"] > 0 and res["plain"]["expired"] == 0, res


def test_residual_step_interpreted_on_cpu():
    pytest.importorskip("triton")
    _run("cpu", interpreter_env())


def test_residual_step_pytorch_path():
    _run("cpu", dict(os.environ, HF_VQ_DISABLE_TRITON="1"))


@gpu_check(CHECK)
def test_residual_step_on_gpu():
    pytest.importorskip("triton")
    _run("cuda", gpu_env())


def test_residual_train_levels_interpreted_on_cpu():
    pytest.importorskip("triton")
    _assert_train_levels(_run("cpu", interpreter_env(), TRAIN_CHECK))


@gpu_check(TRAIN_CHECK, 3)
def test_residual_train_levels_on_gpu():
    pytest.importorskip("triton")
    _assert_train_levels(_run("cuda", gpu_env(), TRAIN_CHECK))


def _assert_grouped(res):
    for name, r in res.items():
        assert r["used"] == ["fused_train_levels", "lean_eval_levels"] * 3, (name, r)
        assert r["indices"], (name, r)
        assert r["value"] < 1e-5 and r["loss"] < 1e-5 and r["grad"] < 1e-5 and r["state"] < 1e-5, (name, r)
    assert res["dead_codes"]["expired"] > 0 and res["plain"]["expired"] == 0, res


def test_grouped_levels_at_once_interpreted_on_cpu():
    """GroupedResidualVQ runs all its groups in one pass (the group a launch axis): the same indices, output,
    losses, input gradient and state as each group's ResidualVQ called in turn, in training and eval."""
    pytest.importorskip("triton")
    _assert_grouped(_run("cpu", interpreter_env(), GROUPED_CHECK))


@gpu_check(GROUPED_CHECK, 3)
def test_grouped_levels_at_once_on_gpu():
    pytest.importorskip("triton")
    _assert_grouped(_run("cuda", gpu_env(), GROUPED_CHECK))
