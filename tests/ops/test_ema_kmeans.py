"""hf_vq.ops.ema and hf_vq.ops.kmeans against dense references and vector-quantize-pytorch 1.32's helpers."""

import pytest
import torch
from vector_quantize_pytorch import vector_quantize_pytorch as vqp

import hf_vq
from hf_vq.ops import ema
from hf_vq.ops.ema import cluster_stats, ema_update_, laplace_smoothing
from hf_vq.ops.kmeans import global_row_count, kmeans, sample_rows, sample_rows_across_ranks
from hf_vq.ops.nearest import nearest_code


def _dense_stats(x, idx, k, mask):
    onehot = torch.zeros(*idx.shape, k).scatter_(-1, idx.unsqueeze(-1), 1.0)  # reference only
    if mask is not None:
        onehot = onehot * mask.unsqueeze(-1)
    return onehot.sum(-2), torch.einsum("...nk,...nd->...kd", onehot, x)


@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_cluster_stats_match_a_dense_reference(heads, masked):
    lead = () if heads is None else (heads,)
    x = torch.randn(*lead, 50, 3)
    idx = torch.randint(0, 7, (*lead, 50))
    mask = (torch.rand(*lead, 50) > 0.5) if masked else None
    counts, sums = cluster_stats(x, idx, 7, mask)
    want_counts, want_sums = _dense_stats(x, idx, 7, mask)
    assert counts.shape == (*lead, 7) and sums.shape == (*lead, 7, 3)
    assert counts.dtype == sums.dtype == torch.float32
    torch.testing.assert_close(counts, want_counts)
    torch.testing.assert_close(sums, want_sums)


def test_cluster_stats_counts_in_float32_from_half_input_and_empty_batches():
    x = torch.randn(2, 10, 4).half()
    idx = torch.randint(0, 5, (2, 10))
    counts, sums = cluster_stats(x, idx, 5)
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums, _dense_stats(x.float(), idx, 5, None)[1])
    counts, sums = cluster_stats(torch.randn(2, 0, 4), torch.zeros(2, 0, dtype=torch.long), 5)
    assert counts.shape == (2, 5) and not counts.any() and sums.shape == (2, 5, 4) and not sums.any()


def test_ema_update_and_laplace_smoothing_match_vqp():
    old, new = torch.rand(2, 6, 3), torch.rand(2, 6, 3)
    ours, theirs = old.clone(), old.clone()
    ema_update_(ours, new, 0.8)
    vqp.ema_inplace(theirs, new.clone(), 0.8)
    assert torch.equal(ours, theirs)
    weight = torch.rand(2, 6)
    ours, theirs = old.clone(), old.clone()
    ema_update_(ours, new, 0.8, weight)
    vqp.ema_inplace(theirs, new.clone(), 0.8, weight)
    assert torch.equal(ours, theirs)
    counts = torch.rand(2, 6) * 10
    assert torch.equal(laplace_smoothing(counts, 6, 1e-5), vqp.laplace_smoothing(counts, 6, 1e-5))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kmeans_matches_vqp_from_the_same_start(metric):
    torch.manual_seed(0)
    samples = torch.randn(2, 200, 5)
    if metric == "cosine":
        samples = torch.nn.functional.normalize(samples, dim=-1)
    init = samples[:, :12].clone()
    means, counts = kmeans(samples, 12, 6, metric=metric, init=init)
    ref_means, ref_bins = vqp.kmeans(samples, 12, 6, use_cosine_sim=metric == "cosine",
                                     sample_fn=lambda s, n: init.clone())
    torch.testing.assert_close(means, ref_means, atol=1e-6, rtol=1e-6)
    assert torch.equal(counts, ref_bins.float())


def test_kmeans_lowers_distortion_versus_random_init():
    torch.manual_seed(0)
    centers = torch.randn(8, 4) * 5
    data = (centers[torch.randint(0, 8, (400,))] + 0.1 * torch.randn(400, 4)).unsqueeze(0)
    start = sample_rows(data[0], 8).unsqueeze(0)

    def distortion(m):
        idx, _ = nearest_code(data, m)
        return ((data - torch.gather(m, 1, idx.unsqueeze(-1).expand(-1, -1, 4))) ** 2).sum(-1).mean()

    means, counts = kmeans(data, 8, 10, init=start)
    assert distortion(means) < 0.5 * distortion(start)
    assert counts.sum() == 400


def test_kmeans_keeps_the_mean_of_an_empty_cluster():
    samples = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]]])
    init = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]]])
    means, counts = kmeans(samples, 3, 3, init=init)
    assert counts.tolist() == [[2.0, 1.0, 0.0]]
    torch.testing.assert_close(means[0, 2], init[0, 2])
    torch.testing.assert_close(means[0, 0], torch.tensor([0.05, 0.0]))


def test_sample_rows_draws_batch_rows_without_replacement_when_possible():
    rows = torch.arange(20.0).view(10, 2)
    picked = sample_rows(rows, 6, torch.Generator().manual_seed(0))
    assert len({tuple(r) for r in picked.tolist()}) == 6
    assert all(any(torch.equal(p, r) for r in rows) for p in picked)
    more = sample_rows(rows[:3], 7, torch.Generator().manual_seed(0))  # fewer rows than asked: with replacement
    assert more.shape == (7, 2) and all(any(torch.equal(p, r) for r in rows[:3]) for p in more)


def test_cross_rank_sampling_is_local_sampling_in_one_process():
    rows = torch.randn(9, 3)
    torch.manual_seed(5)
    a = sample_rows_across_ranks(rows, 4, sync=True)
    torch.manual_seed(5)
    b = sample_rows(rows, 4)
    assert torch.equal(a, b)
    assert global_row_count(rows, sync=True) == 9


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_require_finite_refuses_any_non_finite_entry(bad):
    stats = torch.randn(64, 8)
    ema.require_finite(stats, "sums")  # finite: passes
    stats[17, 3] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf values \(sums\)"):
        ema.require_finite(stats, "sums")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_flag_is_false_for_any_bad_entry_of_any_tensor(bad):
    stats = [torch.randn(16, 4), torch.randn(8), torch.full((3, 2), 3e38), torch.empty(0, 4)]
    assert ema.finite_flag(stats).dtype == torch.bool and bool(ema.finite_flag(stats))
    assert bool(ema.finite_flag([torch.empty(0)]))  # nothing to refuse
    for i in range(3):
        broken = [t.clone() for t in stats]
        broken[i].view(-1)[-1] = bad
        assert not bool(ema.finite_flag(broken)) and not bool(ema.finite_flag([broken[i]]))


@pytest.mark.parametrize("finite", [True, False])
def test_guarded_ema_step_writes_only_finite_statistics(finite):
    """With `finite` True the guarded step equals the plain one; with False every buffer keeps its exact value
    (decided on the device: no host read of the flag)."""
    g = torch.Generator().manual_seed(0)
    sizes, avgs = torch.rand(2, 16, generator=g) * 5, torch.randn(2, 16, 4, generator=g)
    embeds = torch.randn(2, 16, 4, generator=g)
    counts, sums = torch.rand(2, 16, generator=g), torch.randn(2, 16, 4, generator=g)
    if not finite:
        sums[1, 3, 2] = float("nan")
    flag = ema.finite_flag([sums])
    assert bool(flag) == finite
    for normalize in (False, True):
        got = [t.clone() for t in (sizes, avgs, embeds)]
        ema.ema_update_(got[:2], (counts, sums), 0.9, finite=flag)
        ema.codebooks_from_ema_([got[0]], [got[1]], [got[2]], 1e-5, normalize=normalize, finite=flag)
        if not finite:
            for g_, t in zip(got, (sizes, avgs, embeds)):
                assert torch.equal(g_, t)
            continue
        want = [t.clone() for t in (sizes, avgs, embeds)]
        ema.ema_update_(want[:2], (counts, sums), 0.9)
        ema.codebooks_from_ema_([want[0]], [want[1]], [want[2]], 1e-5)
        if normalize:
            want[2] = torch.nn.functional.normalize(want[2], dim=-1, eps=1e-6)
        for g_, w in zip(got, want):
            assert torch.equal(g_, w)


@pytest.mark.parametrize("ok", [True, False])
def test_where_each_selects_every_tensor_with_one_where_per_shape(ok):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (3, 4), (5,), (3, 4), (2, 2, 2)]
    a = [torch.randn(s, generator=g) for s in shapes]
    b = [torch.randn(s, generator=g) for s in shapes]
    got = ema.where_each(torch.tensor(ok), a, b)
    for x, y, z in zip(a, b, got):
        assert torch.equal(z, x if ok else y)


def test_report_finite_raises_at_once_on_the_cpu():
    assert ema.report_finite(torch.tensor(True), "sums") is None
    with pytest.raises(ValueError, match=r"NaN or Inf values \(sums\); the codebook state was not updated"):
        ema.report_finite(torch.tensor(False), "sums")


def test_pending_checks_raise_once_per_bad_batch():
    """A check raises once; the checks made before a raise are settled unread (the same batch's NaN reached them);
    a check made later raises again; a passing check never raises."""
    good, bad_a, bad_b = (ema.PendingCheck(torch.tensor(ok), "sums") for ok in (True, False, False))
    good.raise_if_failed()
    with pytest.raises(ValueError, match=r"an earlier call's batch had NaN or Inf values \(sums\)"):
        bad_a.raise_if_failed()
    bad_a.raise_if_failed()
    bad_b.raise_if_failed()  # settled by bad_a's error
    later = ema.PendingCheck(torch.tensor(False), "sums")
    with pytest.raises(ValueError, match="an earlier call's batch"):
        later.raise_if_failed()


def test_a_pending_check_survives_a_deep_copy_of_its_model():
    """`copy.deepcopy` / pickling of a model with a check still pending (a CUDA event, which cannot be copied, on a
    GPU): the copy holds the flag, read once it landed, and raises as the original does."""
    import copy
    import pickle

    class Landed:  # stands for the CUDA event: waited for, not copyable
        waited = 0

        def synchronize(self):
            Landed.waited += 1

        def __reduce__(self):
            raise TypeError("not copyable")

    model = hf_vq.VectorQuantize(dim=4, codebook_size=8)
    check = ema.PendingCheck(torch.tensor(False), "sums")
    check.landed = Landed()
    model._codebook.pending_checks["sums"] = check
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    assert Landed.waited == 2
    for m in (clone, restored):
        copied = m._codebook.pending_checks["sums"]
        assert copied is not check and copied.landed is None and not copied.read and not bool(copied.flag)
    with pytest.raises(ValueError, match="an earlier call's batch"):
        clone._codebook.raise_pending("sums")


def test_require_finite_accepts_finite_values_whose_sum_overflows():
    stats = torch.full((4, 2), 3e38)  # every entry finite, the float32 sum is inf
    assert not torch.isfinite(stats.sum())
    ema.require_finite(stats, "sums")
    stats[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ema.require_finite(stats, "sums")
