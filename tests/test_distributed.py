"""Codebook sync across processes (gloo, 2 ranks on CPU): after several training steps with k-means init,
EMA and dead-code expiry, every rank holds the same state, equal to one process fed the concatenation of
the ranks' batches (uneven batch sizes, masks)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hf_vq
from hf_vq import distributed

STEPS = 4
CONFIG = dict(dim=8, codebook_size=16, decay=0.8, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=0.5,
              affine_param=False)


def _batches(rank_sizes, masked):
    """Per step: one (x, mask) per rank; ranks get different batch sizes."""
    g = torch.Generator().manual_seed(123)
    steps = []
    for _ in range(STEPS):
        per_rank = []
        for b in rank_sizes:
            x = torch.randn(b, 12, 8, generator=g) * 2
            mask = (torch.rand(b, 12, generator=g) > 0.3) if masked else None
            per_rank.append((x, mask))
        steps.append(per_rank)
    return steps


def _train(model, inputs):
    model.train()
    for x, mask in inputs:
        model(x, mask=mask)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank, world, init_file, out_dir, rank_sizes, masked, residual):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _model(residual)
        steps = _batches(rank_sizes, masked)
        state = _train(model, [step[rank] for step in steps])
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
        # the debugging helper agrees that all ranks hold the same codebook
        distributed.assert_same_across_ranks(model)
    finally:
        dist.destroy_process_group()


def _model(residual):
    if residual:
        return hf_vq.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, decay=0.8, kmeans_init=True,
                                kmeans_iters=3, threshold_ema_dead_code=0.5)
    return hf_vq.VectorQuantize(**CONFIG)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("residual", [False, True], ids=["vq", "rvq"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(masked, residual):
    rank_sizes = (3, 2)  # uneven
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_worker, args=(2, init_file, out_dir, rank_sizes, masked, residual), nprocs=2, join=True)
        states = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]

    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"ranks differ on {key}"

    torch.manual_seed(0)
    single = _model(residual)
    inputs = []
    for step in _batches(rank_sizes, masked):
        x = torch.cat([x for x, _ in step])
        mask = torch.cat([m for _, m in step]) if masked else None
        inputs.append((x, mask))
    expected = _train(single, inputs)
    assert bool(expected[[k for k in expected if k.endswith("initted")][0]])
    for key, value in expected.items():
        torch.testing.assert_close(states[0][key].float(), value.float(), atol=1e-5, rtol=1e-5, msg=key)


def _lfq_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        lfq = hf_vq.LFQ(dim=6, codebook_size=2**6).train()
        x = torch.randn(4, 10, 6, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        out = lfq(x, return_loss_breakdown=True)
        out.loss.backward()
        torch.save({"batch_entropy": out.loss_breakdown.batch_entropy.detach(), "grad": x.grad}, os.path.join(out_dir, f"lfq{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_lfq_codebook_entropy_is_computed_over_the_global_batch():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_lfq_worker, args=(2, os.path.join(out_dir, "init"), out_dir), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"lfq{r}.pt"), weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    lfq = hf_vq.LFQ(dim=6, codebook_size=2**6).train()
    xs = [torch.randn(4, 10, 6, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    x = torch.cat(xs).requires_grad_()
    out = lfq(x, return_loss_breakdown=True)
    for r in ranks:
        torch.testing.assert_close(r["batch_entropy"], out.loss_breakdown.batch_entropy, atol=1e-6, rtol=1e-6)
    local = hf_vq.LFQ(dim=6, codebook_size=2**6).train()(xs[0], return_loss_breakdown=True)
    assert not torch.allclose(local.loss_breakdown.batch_entropy, out.loss_breakdown.batch_entropy)
    for r in ranks:  # the global term is differentiable: every rank gets a gradient for its own rows
        assert torch.isfinite(r["grad"]).all() and r["grad"].abs().sum() > 0


def _mismatch_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = hf_vq.VectorQuantize(dim=8, codebook_size=16 if rank == 0 else 32, decay=0.9).train()
        try:
            model(torch.randn(2, 10, 8))
        except RuntimeError as e:
            with open(os.path.join(out_dir, f"err{rank}.txt"), "w") as f:
                f.write(str(e))
    finally:
        dist.destroy_process_group()


def test_mismatched_codebooks_fail_fast_instead_of_hanging():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_mismatch_worker, args=(2, os.path.join(out_dir, "init"), out_dir), nprocs=2, join=True)
        errors = [open(os.path.join(out_dir, f"err{r}.txt")).read() for r in range(2)]
    assert all("differ from another rank's" in e for e in errors)


def _masked_rank_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = hf_vq.VectorQuantize(**CONFIG).train()
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x = torch.randn(2, 12, 8, generator=g)
            mask = torch.ones(2, 12, dtype=torch.bool) if rank == 0 else torch.zeros(2, 12, dtype=torch.bool)
            model(x, mask=mask)  # rank 1 has nothing valid but still joins every collective
        distributed.assert_same_across_ranks(model)
        torch.save(model.state_dict(), os.path.join(out_dir, f"masked{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_fully_masked_rank_still_joins_every_collective():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_masked_rank_worker, args=(2, os.path.join(out_dir, "init"), out_dir), nprocs=2, join=True)
        states = [torch.load(os.path.join(out_dir, f"masked{r}.pt"), weights_only=True) for r in range(2)]
    assert bool(states[0]["_codebook.initted"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_single_process_helpers_are_no_ops():
    t = torch.arange(3.0)
    distributed.all_reduce_sum_(t)
    assert torch.equal(t, torch.arange(3.0))
    assert torch.equal(distributed.gather_variable(t), t)
    assert not distributed.is_distributed()
    distributed.assert_same_across_ranks(hf_vq.VectorQuantize(dim=4, codebook_size=8))


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "gather",
                "scatter", "reduce", "barrier")


def _count_collectives(monkeypatch_like: dict) -> dict:
    """Wrap torch.distributed's collectives so every call is counted by name."""
    counts = dict.fromkeys(_COLLECTIVES, 0)
    for name in _COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch_like[name] = original
        setattr(dist, name, counted)
    return counts


def _collective_count_worker(rank, world, init_file, out_dir, kind):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    originals = {}
    try:
        torch.manual_seed(0)
        model = _counted_model(kind).train()
        g = torch.Generator().manual_seed(rank)
        model(torch.randn(2, 12, 8, generator=g))  # first step: layouts checked, k-means if any
        counts = _count_collectives(originals)
        for _ in range(3):
            model(torch.randn(2, 12, 8, generator=g))
        torch.save(counts, os.path.join(out_dir, f"counts{rank}.pt"))
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        dist.destroy_process_group()


def _counted_model(kind):
    if kind == "vq":
        return hf_vq.VectorQuantize(dim=8, codebook_size=16, decay=0.9)
    if kind == "vq_kmeans":
        return hf_vq.VectorQuantize(dim=8, codebook_size=16, decay=0.9, kmeans_init=True, kmeans_iters=2)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["vq", "vq_kmeans"])
def test_a_training_step_issues_one_all_reduce(kind):
    """After the first step (layout check, k-means init), a step's EMA statistics travel in one all-reduce and
    nothing else is exchanged."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_collective_count_worker, args=(2, os.path.join(out_dir, "init"), out_dir, kind), nprocs=2, join=True)
        counts = [torch.load(os.path.join(out_dir, f"counts{r}.pt"), weights_only=True) for r in range(2)]
    for c in counts:
        assert c["all_reduce"] == 3, c
        assert sum(v for k, v in c.items() if k != "all_reduce") == 0, c
