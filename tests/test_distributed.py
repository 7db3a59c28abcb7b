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
from hf_vq.models.codebook import Codebook

STEPS = 4
CONFIG = dict(dim=8, codebook_size=16, decay=0.8, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2,
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


def _worker(rank, world, init_file, out_dir, rank_sizes, masked, kind):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _model(kind)
        steps = _batches(rank_sizes, masked)
        state = _train(model, [step[rank] for step in steps])
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
        # the debugging helper agrees that all ranks hold the same codebook
        distributed.assert_same_across_ranks(model)
    finally:
        dist.destroy_process_group()


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def _model(kind):
    """Every quantizer with codebook state, with k-means init, EMA and dead-code expiry; `inplace`: a learnable
    codebook stepped by an in-place optimizer (its gradient averaged over the ranks)."""
    level = dict(codebook_size=16, decay=0.8, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2)
    if kind == "inplace":
        return hf_vq.VectorQuantize(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False,
                                    sync_codebook=True, in_place_codebook_optimizer=_sgd)
    if kind == "rvq":
        return hf_vq.ResidualVQ(dim=8, num_quantizers=2, **level)
    if kind == "grvq":
        return hf_vq.GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, **level)
    if kind in ("hvq", "hvq_shared"):
        return hf_vq.HierarchicalVQ(dim=8, scales=[1, 3, 12], channel_first=False,
                                    shared_codebook=kind == "hvq_shared", **level)
    return hf_vq.VectorQuantize(**CONFIG)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("kind", ["vq", "rvq", "grvq", "hvq", "hvq_shared", "inplace"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(masked, kind, monkeypatch):
    """Ranks identical and equal to one process on the joint batch, with k-means init, EMA and dead codes
    replaced on the way (counted in the single-process run)."""
    if kind == "inplace" and masked:
        pytest.skip("a masked in-place loss is a mean over each rank's valid rows: ranks weigh rows differently")
    rank_sizes = (3, 2) if kind != "inplace" else (2, 2)  # uneven; even for a mean of per-rank mean gradients
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_worker, args=(2, init_file, out_dir, rank_sizes, masked, kind), nprocs=2, join=True)
        states = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]

    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"ranks differ on {key}"

    replaced = []
    replace_codes = Codebook.replace_codes
    monkeypatch.setattr(Codebook, "replace_codes", lambda self, *a: replaced.append(1) or replace_codes(self, *a))
    torch.manual_seed(0)
    single = _model(kind)
    inputs = []
    for step in _batches(rank_sizes, masked):
        x = torch.cat([x for x, _ in step])
        mask = torch.cat([m for _, m in step]) if masked else None
        inputs.append((x, mask))
    expected = _train(single, inputs)
    assert bool(expected[[k for k in expected if k.endswith("initted")][0]])
    assert replaced or kind == "inplace", "no dead code was replaced: the test would not exercise expiry"
    if kind == "inplace":  # the optimizer moved the codebook
        torch.manual_seed(0)
        assert not torch.equal(expected["_codebook.embed"], _model(kind).state_dict()["_codebook.embed"])
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
    distributed.all_reduce_mean_(t)
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
        fused = []
        if kind == "rvq_fused":  # the interpreted search is slow and tested elsewhere: the PyTorch search
            from hf_vq.ops import triton_nearest
            triton_nearest.available = lambda x: False
            fused_levels = hf_vq.ResidualVQ._fused_levels
            hf_vq.ResidualVQ._fused_levels = lambda *a, **k: fused.append(fused_levels(*a, **k)) or fused[-1]
        torch.manual_seed(0)
        model, make_input = _counted_model(kind)
        model.train()
        g = torch.Generator().manual_seed(rank)
        counts = _count_collectives(originals)
        per_step, kept = [], []
        for _ in range(STEPS):
            x = make_input(g).requires_grad_()
            before = dict(counts)
            out = model(x)
            out.quantized.sum().backward()
            per_step.append({k: counts[k] - before[k] for k in counts if counts[k] != before[k]})
            if kind == "rvq_dropout":  # levels kept by quantize dropout this step
                kept.append(int((out.indices.reshape(-1, out.indices.shape[-1]) >= 0).any(0).sum()))
        for name, original in originals.items():
            setattr(dist, name, original)
        originals.clear()
        distributed.assert_same_across_ranks(model)  # (ranks identical after the counted steps)
        torch.save({"steps": per_step, "fused": [f is not None for f in fused], "kept": kept},
                   os.path.join(out_dir, f"counts{rank}.pt"))
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        dist.destroy_process_group()


def _tokens(g):
    return torch.randn(2, 12, 8, generator=g)


def _counted_model(kind):
    """`(model, input maker)` for a counting run."""
    vq = dict(dim=8, codebook_size=16, decay=0.9)
    if kind == "vq":
        return hf_vq.VectorQuantize(**vq), _tokens
    if kind == "vq_dead":  # counts start at 1 and stay above 0.9 ** 4 > 0.5: no code expires
        return hf_vq.VectorQuantize(**vq, threshold_ema_dead_code=0.5), _tokens
    if kind == "vq_expire":  # every code below the threshold on every step (48 rows cover the 16 codes)
        return hf_vq.VectorQuantize(**vq, threshold_ema_dead_code=1000), _tokens
    if kind == "vq_kmeans":
        return hf_vq.VectorQuantize(**vq, kmeans_init=True, kmeans_iters=2), _tokens
    if kind == "rvq_expire":
        return hf_vq.ResidualVQ(num_quantizers=4, threshold_ema_dead_code=1000, **vq), _tokens
    if kind in ("rvq4", "rvq_fused"):
        return hf_vq.ResidualVQ(num_quantizers=4, threshold_ema_dead_code=0.5, **vq), _tokens
    if kind == "rvq_dropout":
        return hf_vq.ResidualVQ(num_quantizers=4, quantize_dropout=True, **vq), _tokens
    if kind == "grvq":
        return hf_vq.GroupedResidualVQ(groups=2, num_quantizers=2, threshold_ema_dead_code=0.5, **vq), _tokens
    if kind in ("hvq", "hvq_shared"):  # (a shared codebook decays 3 times a step: 0.9 ** 12 > 0.1)
        model = hf_vq.HierarchicalVQ(dim=8, codebook_size=16, scales=[1, 2, 4], decay=0.9, kmeans_init=False,
                                     threshold_ema_dead_code=0.1, shared_codebook=kind == "hvq_shared")
        return model, lambda g: torch.randn(2, 8, 12, generator=g)
    raise ValueError(kind)


def _collective_counts(kind, env=None):
    with tempfile.TemporaryDirectory() as out_dir:
        old = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            mp.spawn(_collective_count_worker, args=(2, os.path.join(out_dir, "init"), out_dir, kind), nprocs=2,
                     join=True)
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        counts = [torch.load(os.path.join(out_dir, f"counts{r}.pt"), weights_only=True) for r in range(2)]
    assert counts[0] == counts[1], counts  # every rank joins the same collectives
    return counts[0]["steps"] if kind not in ("rvq_fused", "rvq_dropout") else counts[0]


ONE_ALL_REDUCE = {"all_reduce": 1}
FIRST_STEP = {"all_reduce": 1, "all_gather": 2}  # + the layout check of the statistics' buffer


@pytest.mark.parametrize("kind", ["vq", "vq_dead", "rvq4", "grvq", "hvq"])
def test_a_training_step_issues_one_all_reduce(kind):
    """Whatever the number of levels or groups, a step's EMA statistics travel in one all-reduce, and nothing
    else is exchanged (no dead-code broadcast when no code expired); the layout check runs on the first step."""
    counts = _collective_counts(kind)
    assert counts == [FIRST_STEP] + [ONE_ALL_REDUCE] * (STEPS - 1), counts


@pytest.mark.parametrize("kind", ["vq_expire", "rvq_expire"])
def test_steps_where_codes_expire_exchange_only_the_replacement_rows(kind):
    """Every code of every level expires on every step: one all-reduce for the statistics (with the ranks' row
    counts), then for all levels together a broadcast of the drawn positions and an all-reduce of the chosen
    rows."""
    counts = _collective_counts(kind)
    assert counts == [{"all_reduce": 2, "all_gather": 2, "broadcast": 1}] + [{"all_reduce": 2, "broadcast": 1}] * 3


def test_kmeans_collectives_only_on_the_first_step():
    """First step: the row counts (all-gather), the initial centroids (a broadcast of positions and an all-reduce
    of rows), one all-reduce per k-means iteration (2) with the layout check, then the EMA statistics."""
    counts = _collective_counts("vq_kmeans")
    assert counts[0] == {"all_gather": 3, "broadcast": 1, "all_reduce": 4}, counts
    assert counts[1:] == [ONE_ALL_REDUCE] * (STEPS - 1), counts


def test_quantize_dropout_adds_the_cutoff_broadcast():
    """Quantize dropout: the cutoff's broadcast, and the statistics of the kept levels in one all-reduce; the
    layout check runs again only when a number of kept levels is met for the first time."""
    result = _collective_counts("rvq_dropout")
    seen = set()
    for step, kept in zip(result["steps"], result["kept"]):
        expected = {"all_reduce": 1, "broadcast": 1, **({"all_gather": 2} if kept not in seen else {})}
        assert step == expected, result
        seen.add(kept)
    assert len(seen) < STEPS, result  # (the seed gives a repeated cutoff: a step without the check)


def test_shared_hierarchical_codebook_reduces_after_each_level():
    """A shared HierarchicalVQ codebook is updated after each level (the next level searches the new codes, as
    vqp), so each of its 3 levels reduces its own statistics; still nothing else."""
    counts = _collective_counts("hvq_shared")
    assert counts == [{"all_reduce": 3, "all_gather": 2}] + [{"all_reduce": 3}] * (STEPS - 1), counts


def test_fused_training_levels_issue_one_all_reduce():
    """ResidualVQ's fused training levels (Triton interpreter on CPU): one all-reduce for all 4 levels."""
    pytest.importorskip("triton")
    result = _collective_counts("rvq_fused", env={"TRITON_INTERPRET": "1", "HF_VQ_DISABLE_TRITON": "0"})
    assert result["fused"] == [True] * STEPS, result
    assert result["steps"] == [FIRST_STEP] + [ONE_ALL_REDUCE] * (STEPS - 1), result
