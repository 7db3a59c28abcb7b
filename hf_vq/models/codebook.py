"""The state of a VectorQuantize codebook and every update to it (semantics of vector-quantize-pytorch 1.32's
`EuclideanCodebook` / `CosineSimCodebook`): EMA counts and sums, the codebook from the EMA, k-means
initialization, dead-code expiry, affine re-normalization statistics and the distributed syncs they need.

State-dict keys match vqp's `_codebook` submodule: `embed`, `cluster_size`, `embed_avg`, `initted` and the affine
buffers (`batch_mean`, `batch_variance`, `codebook_mean`, `codebook_variance`, each with `<name>_needs_init`).

An update is split into two steps so a caller with several codebooks (residual levels, groups) can sum-reduce
all their statistics in one collective: `batch_stats` computes this rank's per-code counts and sums,
`apply_stats` writes reduced statistics into the state. Non-finite statistics never reach the state, whatever the
model's `check_inputs` says: a plain step (EMA codebook, no dead-code expiry, no per-code weights or accumulation)
applies its update on the device only where the statistics are finite (`ops.ema.finite_flag`) and raises the
`ValueError` without waiting for the GPU: at once on the CPU, at the codebook's next update on a GPU
(`ops.ema.report_finite`); any other update reads the flag first and raises before writing anything
(`ops.ema.require_all_finite`).

Such a caller opens `deferred_updates(codebooks)` around its levels: each codebook's `update` then only records
its batch statistics, and on exit `apply_updates` sums all of them across processes in one all-reduce, applies
them, and expires dead codes (a collective only where a code expired).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..ops import ema as ema_ops
from ..ops import graphs
from ..ops import kmeans as kmeans_ops

AFFINE_BUFFERS = ("batch_mean", "batch_variance", "codebook_mean", "codebook_variance")
_STATS = "codebook EMA statistics"  # what a non-finite-statistics error names
_AFFINE = "affine batch statistics"


class CodebookStats(NamedTuple):
    """One batch's per-code statistics: `counts (H, K)` and feature `sums (H, K, d)`, float32."""

    counts: Tensor
    sums: Tensor


class StatsUpdate(NamedTuple):
    """One codebook's recorded update: this rank's `stats`, the rows they came from (`flat (H, N, d)`, or a
    function that computes them, read only when a code expires) with their `mask`, and `update`'s options."""

    codebook: "Codebook"
    stats: CodebookStats
    flat: Tensor | Callable[[], Tensor]
    mask: Tensor | None
    ema_update: bool
    weight: Tensor | Callable | None
    accum: bool


def l2norm(t: Tensor) -> Tensor:
    return F.normalize(t, p=2, dim=-1, eps=1e-6)


class Codebook(nn.Module):
    """Codes `embed (H, K, d)` (a buffer, or a parameter when learnable or orthogonally regularized), their EMA
    state and the updates. `config` is a `VectorQuantizeConfig`; what the updates need is copied from it here."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.num_codebooks = c.heads if c.separate_codebook_per_head else 1
        self.codebook_size = c.codebook_size
        self.codebook_dim = c.resolved_codebook_dim
        self.decay, self.eps = c.decay, c.eps
        self.kmeans_init, self.kmeans_iters = c.kmeans_init, c.kmeans_iters
        self.use_cosine_sim = c.use_cosine_sim
        self.metric = "cosine" if c.use_cosine_sim else "euclidean"
        self.threshold_ema_dead_code = c.threshold_ema_dead_code
        self.reset_cluster_size = (c.reset_cluster_size if c.reset_cluster_size is not None
                                   else c.threshold_ema_dead_code)
        self.ema_update, self.manual_ema_update = c.resolved_ema_update, c.manual_ema_update
        self.learnable = c.resolved_learnable_codebook
        self.sync_codebook, self.sync_kmeans = c.sync_codebook, c.sync_kmeans
        self.sync_affine_param = c.sync_affine_param
        self.affine_param, self.affine_param_batch_decay = c.affine_param, c.affine_param_batch_decay
        self.affine_param_codebook_decay = c.affine_param_codebook_decay
        # the host-side answer of `is_initted` (buffer identity and version), and statistics accumulated by
        # `update(accum=True)` for the next update (vqp keeps them in the buffers' `.grad`; not checkpointed)
        self._initted_key: tuple | None = None
        self.pending_stats: CodebookStats | None = None
        # the `DeferredUpdates` of the step in progress when an owner (residual levels, groups) collects updates
        self.deferred: DeferredUpdates | None = None
        # per kind of update (`_STATS`, `_AFFINE`), the finiteness of the last one's statistics, not yet read on the
        # host (GPU); the next update of that kind reads it (see `apply_updates`, `update_affine`)
        self.pending_checks: dict[str, ema_ops.PendingCheck] = {}

        shape = (self.num_codebooks, self.codebook_size, self.codebook_dim)
        if c.kmeans_init:
            embed = torch.zeros(shape)
        else:
            embed = torch.empty(shape)
            nn.init.kaiming_uniform_(embed)
            if c.use_cosine_sim:
                embed = l2norm(embed)
        self.register_buffer("initted", torch.tensor(not c.kmeans_init))
        self.register_buffer("cluster_size", torch.ones(self.num_codebooks, self.codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if self.learnable or c.orthogonal_reg_weight > 0:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        if self.affine_param:
            for name in AFFINE_BUFFERS:
                self.register_buffer(name, torch.zeros(self.num_codebooks, 1, self.codebook_dim))
                self.register_buffer(f"{name}_needs_init", torch.tensor(True))

    # -- codes as the forward reads them ------------------------------------------------------------

    def codes(self) -> Tensor:
        """The codebook the search reads, float32 as the rows (also in a half-precision model, as vqp 1.32): with
        its autograd link when learnable, affine-mapped when enabled."""
        learnable = isinstance(self.embed, nn.Parameter) and self.learnable
        embed = (self.embed if learnable else self.embed.detach()).float()
        if "vq_bridge" in self._modules:  # a VectorQuantize `vq_bridge` module maps the codebook (vqp 1.32)
            embed = self._modules["vq_bridge"](embed)
        return self.affine_embed(embed) if self.affine_param else embed

    def affine_embed(self, embed: Tensor) -> Tensor:
        codebook_std = self.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = self.batch_variance.clamp(min=1e-5).sqrt()
        return (embed - self.codebook_mean) * (batch_std / codebook_std) + self.batch_mean

    # -- distributed --------------------------------------------------------------------------------

    def syncs(self) -> bool:
        """Whether statistics are summed over processes (a process group may come up after construction)."""
        if self.sync_codebook is None:
            return distributed.is_distributed()
        return bool(self.sync_codebook) and distributed.is_distributed()

    def syncs_samples(self) -> bool:
        """k-means and dead-code samples drawn from every rank (vqp: `use_ddp and sync_kmeans`)."""
        return self.syncs() and self.sync_kmeans

    def syncs_affine(self) -> bool:
        if self.sync_affine_param is None:
            return self.syncs()
        return bool(self.sync_affine_param) and distributed.is_distributed()

    def all_reduce_(self, *tensors: Tensor) -> None:
        if self.syncs():
            distributed.all_reduce_sum_(*tensors)

    # -- initialization -----------------------------------------------------------------------------

    def is_initted(self) -> bool:
        """`bool(initted)` without a host sync per forward once it is True: the answer is kept with the buffer's
        identity and version counter (any in-place write, e.g. `load_state_dict` or `fill_`, bumps it).

        Under torch.compile the buffer cannot be read: a codebook without k-means init is initialized at
        construction, and one with it must have been seen initialized by an eager call (k-means runs eagerly)."""
        if torch.compiler.is_compiling():
            if not self.kmeans_init or self._initted_key is not None:
                return True
            raise RuntimeError("kmeans_init=True: run one forward outside torch.compile first (k-means initializes "
                               "the codebook eagerly; a loaded, initialized checkpoint also needs one eager call)")
        t = self.initted
        key = (t.data_ptr(), t._version, t.device)
        if self._initted_key == key:
            return True
        if not bool(t):
            return False
        self._initted_key = key
        return True

    @torch.no_grad()
    def init_from_kmeans(self, flat: Tensor, mask: Tensor | None) -> None:
        """k-means on the first batch `flat (H, N, d)`; every rank ends with the same centroids."""
        if mask is not None:
            flat = flat[:, mask[0]] if flat.shape[0] == 1 else torch.stack([f[m] for f, m in zip(flat, mask)])
        ema_ops.require_finite(flat, "k-means initialization input")
        sync = self.syncs_samples()
        # initial centroids drawn from the union of all ranks' rows (only the drawn rows travel)
        init = torch.stack([kmeans_ops.sample_rows_across_ranks(f, self.codebook_size, sync) for f in flat])
        embed, counts = kmeans_ops.kmeans(flat, self.codebook_size, self.kmeans_iters, metric=self.metric, init=init,
                                          all_reduce=self.all_reduce_ if sync else None)
        self.embed_avg.copy_(embed * counts.unsqueeze(-1))
        self.cluster_size.copy_(counts)
        self.update_embed_from_ema()
        self.initted.fill_(True)
        self.is_initted()  # keep the answer on the host (torch.compile reads only that)

    # -- affine statistics --------------------------------------------------------------------------

    @torch.no_grad()
    def update_affine(self, flat: Tensor, mask: Tensor | None, training: bool) -> None:
        """Running batch moments of `flat (H, N, d)` (and, in training, of the codebook), vqp's affine_param. Without
        a host read (in eval too): the moments are written only where they are finite, decided on the device, and a
        non-finite batch raises the ValueError at once on the CPU, at the next call on a GPU (`report_finite`)."""
        graphs.host_effect(lambda: self.raise_pending(_AFFINE), before=True)
        if mask is not None:
            flat = torch.stack([f[m] for f, m in zip(flat, mask)])
        if self.syncs_affine():
            count = torch.tensor(float(flat.shape[1]), device=flat.device)
            total = flat.sum(dim=1, keepdim=True)
            self.all_reduce_(count, total)
            mean = total / count
            sq = ((flat - mean) ** 2).sum(dim=1, keepdim=True)
            self.all_reduce_(sq)
            var = sq / count
        else:
            mean, var = flat.mean(dim=1, keepdim=True), flat.var(dim=1, unbiased=False, keepdim=True)
        state = [self.get_buffer(f"{name}{part}") for name in AFFINE_BUFFERS for part in ("", "_needs_init")]
        (finite,) = ema_ops.AFFINE_STEPS([mean, var], [*state, self.embed.data], training,
                                         self.affine_param_batch_decay, self.affine_param_codebook_decay)
        graphs.host_effect(lambda: self.defer_check(_AFFINE, ema_ops.report_finite(finite, _AFFINE)))

    def raise_pending(self, what: str) -> None:
        """Raise the ValueError of the last `what` update if its statistics were not finite (`pending_checks`)."""
        check = self.pending_checks.pop(what, None)
        if check is not None:
            check.raise_if_failed()

    def defer_check(self, what: str, check: ema_ops.PendingCheck | None) -> None:
        """Keep `check` (from `ops.ema.report_finite`; None on the CPU) for the next `what` update to read."""
        if check is not None:
            self.pending_checks[what] = check

    # -- EMA updates --------------------------------------------------------------------------------

    def batch_stats(self, flat: Tensor, indices: Tensor, mask: Tensor | None) -> CodebookStats:
        """This rank's counts and sums of `flat (H, N, d)` per chosen code `indices (H, N)`, in the codebook's own
        space (affine: the rows mapped back from the batch statistics to the codebook's)."""
        if self.affine_param:
            codebook_std = self.codebook_variance.clamp(min=1e-5).sqrt()
            batch_std = self.batch_variance.clamp(min=1e-5).sqrt()
            flat = (flat - self.batch_mean) * (codebook_std / batch_std) + self.codebook_mean
        return CodebookStats(*ema_ops.cluster_stats(flat, indices, self.codebook_size, mask))

    @torch.no_grad()
    def apply_stats(self, stats: CodebookStats, ema_update: bool | None = None,
                    weight: Tensor | Callable | None = None, checked: bool = False) -> None:
        """One EMA step of `cluster_size`/`embed_avg` from reduced `stats`, then (with EMA codebook updates, unless
        `manual_ema_update`) the codebook from the EMA. Refuses non-finite statistics before writing anything
        (`checked`: the caller already did)."""
        if not checked:
            ema_ops.require_finite(stats.sums, "codebook EMA statistics")
        if callable(weight):
            weight = weight(stats.sums, stats.counts)
        ema_ops.ema_update_((self.cluster_size, self.embed_avg), stats, self.decay, weight)
        if (self.ema_update if ema_update is None else ema_update) and not self.manual_ema_update:
            self.update_embed_from_ema()

    @torch.no_grad()
    def update(self, flat: Tensor, indices: Tensor, mask: Tensor | None, ema_update: bool | None = None,
               weight: Tensor | Callable | None = None, accum: bool = False) -> Tensor | None:
        """A training step's update from `flat (H, N, d)` and its codes: EMA statistics (one all-reduce), codebook
        from the EMA, then dead-code expiry; inside `deferred_updates` only recorded, applied when it closes.
        Returns this rank's code counts `(H, K)` (what the perplexity counts), or None when no statistics are kept
        (no EMA, no dead-code expiry).

        `weight` scales each code's EMA step (a tensor `(K,)`/`(H, K)`, or a function of the batch's
        `(sums, counts)`); `accum` only accumulates the statistics, which the next update adds to its own."""
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and self.threshold_ema_dead_code <= 0:
            return None
        stats = self.batch_stats(flat, indices, mask)
        step = StatsUpdate(self, stats, flat, mask, ema_update, weight, accum)
        if self.deferred is not None:
            self.deferred.updates.append(step)
        else:
            apply_updates([step])
        return stats.counts  # (reduced statistics are a separate buffer: these stay this rank's)

    def rank_rows(self, stats: CodebookStats) -> Tensor | None:
        """`(H, world)`: this rank's valid row count per head in its own column, zeros elsewhere, so the sum over
        ranks (in the statistics' all-reduce) tells every rank how many rows each rank holds, which dead-code
        sampling needs. None when no rows are sampled across ranks."""
        if self.threshold_ema_dead_code <= 0 or not self.syncs_samples():
            return None
        rows = stats.counts.new_zeros(stats.counts.shape[0], distributed.world_size())
        rows[:, distributed.rank()] = stats.counts.sum(dim=-1)
        return rows

    @torch.no_grad()
    def apply_step(self, stats: CodebookStats, ema_update: bool, weight: Tensor | Callable | None,
                   accum: bool) -> bool:
        """Reduced `stats` (plus any accumulated ones) into the state, or kept for the next step with `accum`.
        Returns whether the state was updated (dead codes are then checked)."""
        pending = self.pending_stats
        if pending is not None:
            stats = CodebookStats(stats.counts + pending.counts, stats.sums + pending.sums)
        if accum:
            self.pending_stats = stats
            return False
        self.apply_stats(stats, ema_update, weight, checked=True)
        self.pending_stats = None
        return True

    @torch.no_grad()
    def update_embed_from_ema(self) -> None:
        """`embed <- embed_avg / smoothed cluster_size` (l2-normalized for the cosine codebook)."""
        ema_ops.codebooks_from_ema_([self.cluster_size], [self.embed_avg], [self.embed.data], self.eps,
                                    normalize=self.use_cosine_sim)

    def expired(self) -> Tensor:
        """`(H, K)` bool: codes whose EMA count is below the threshold. The same on every rank without a
        collective: the counts come from statistics summed over ranks."""
        return self.cluster_size < self.threshold_ema_dead_code

    @torch.no_grad()
    @torch.compiler.disable  # data-dependent (which codes, how many samples): runs eagerly, one graph break
    def expire_codes(self, flat: Tensor, mask: Tensor | None, rank_rows: Tensor | None = None) -> None:
        """Replace codes whose EMA count fell below the threshold by rows of `flat (H, N, d)`, and reset their EMA
        state (count and sum) so the stale average cannot overwrite the new vector. `rank_rows (H, world)`: every
        rank's valid row count per head (`rank_rows`, summed), when the caller has it."""
        expire_dead_codes([_Expiry(self, flat, mask, rank_rows)])

    @torch.no_grad()
    def replace_codes(self, head: int, dead_ids: Tensor, new: Tensor) -> None:
        """Codes `dead_ids` of `head` become the rows `new`, with their EMA count and sum reset."""
        new = new.to(self.embed.dtype)
        self.embed.data[head, dead_ids] = new
        self.cluster_size[head, dead_ids] = self.reset_cluster_size
        self.embed_avg[head, dead_ids] = new * self.reset_cluster_size


class _Expiry(NamedTuple):
    """A codebook to check for dead codes, the rows `flat (H, N, d)` (or a function computing them) and `mask` of
    this step, and every rank's row count per head `rank_rows (H, world)` (None: counted here if needed)."""

    codebook: Codebook
    flat: Tensor | Callable[[], Tensor]
    mask: Tensor | None
    rank_rows: Tensor | None


class _Replacement(NamedTuple):
    """One head's replacement: the codes to replace, the global positions of their new rows among every rank's
    rows, and this rank's rows (which start at global position `start`); `sync`: drawn across ranks."""

    codebook: Codebook
    head: int
    dead_ids: Tensor
    positions: Tensor
    samples: Tensor
    start: int
    sync: bool


@torch.no_grad()
@torch.compiler.disable
def expire_dead_codes(expiries: list[_Expiry], finite: Tensor | None = None) -> None:
    """Dead-code expiry of several codebooks with one host read (how many codes expired and how many rows each
    rank holds, per codebook and head, and the 0-dim bool `finite` of the step's statistics when given: False
    raises the ValueError before any code is replaced). Where codes expired, their replacement rows are drawn as
    one process would from the concatenation of every rank's rows (rank 0's random state), and only they travel:
    one broadcast of the drawn positions and one all-reduce of the chosen rows, for all codebooks together."""
    expiries = [e for e in expiries if e.codebook.threshold_ema_dead_code > 0]
    if not expiries:
        return
    syncs = [e.codebook.syncs_samples() for e in expiries]
    expiries = _with_rank_rows(expiries, syncs)
    expired = [e.codebook.expired() for e in expiries]
    parts = [torch.cat([dead.sum(dim=-1, dtype=torch.float32).unsqueeze(-1), e.rank_rows], dim=-1)
             for e, dead in zip(expiries, expired)]
    if finite is not None:
        parts.append(finite.float().expand(1, parts[0].shape[-1]))
    table = torch.cat(parts).long().tolist()  # the one host read
    if finite is not None and not table.pop()[0]:
        raise ValueError(ema_ops.refusal(_STATS))
    plans, row = [], 0
    for e, dead, sync in zip(expiries, expired, syncs):
        info, row = table[row : row + dead.shape[0]], row + dead.shape[0]
        if any(num_dead and sum(sizes) for num_dead, *sizes in info):
            plans += _plan_replacements(e, dead, info, sync)
    if not plans:
        return
    for plan, new in zip(plans, _exchange_rows(plans)):
        plan.codebook.replace_codes(plan.head, plan.dead_ids, new)


def _with_rank_rows(expiries: list[_Expiry], syncs: list[bool]) -> list[_Expiry]:
    """Fill in `rank_rows`: this rank's valid row count per head (one column) where rows stay local; summed over
    ranks (one all-reduce for all codebooks that lack them) where rows are drawn across ranks."""
    out, missing = [], []
    for e, sync in zip(expiries, syncs):
        if e.rank_rows is not None:
            out.append(e)
            continue
        flat = e.flat() if callable(e.flat) else e.flat
        local = (torch.full((flat.shape[0],), float(flat.shape[1]), device=flat.device) if e.mask is None
                 else e.mask.sum(dim=-1, dtype=torch.float32))
        rows = local.unsqueeze(-1)
        if sync:
            rows = local.new_zeros(local.shape[0], distributed.world_size())
            rows[:, distributed.rank()] = local
            missing.append(len(out))
        out.append(_Expiry(e.codebook, flat, e.mask, rows))
    if missing:
        summed = distributed.all_reduce_sum([out[i].rank_rows for i in missing])
        for i, rows in zip(missing, summed):
            out[i] = out[i]._replace(rank_rows=rows)
    return out


def _plan_replacements(e: _Expiry, expired: Tensor, info: list[list[int]], sync: bool) -> list[_Replacement]:
    """Per head with expired codes and rows: which codes, and the positions of their new rows (drawn in the order
    a single process draws them)."""
    flat = e.flat() if callable(e.flat) else e.flat
    samples_all = l2norm(flat) if e.codebook.use_cosine_sim else flat
    rank = distributed.rank() if sync else 0
    plans = []
    for head, (num_dead, *sizes) in enumerate(info):
        available = sum(sizes)
        if num_dead == 0 or available == 0:
            continue
        samples = samples_all[head]
        if e.mask is not None:
            samples = samples[torch.nonzero_static(e.mask[head], size=sizes[rank]).squeeze(-1)]
        dead_ids = torch.nonzero_static(expired[head], size=num_dead).squeeze(-1)
        if num_dead > available:
            # more dead codes than samples: replace a random subset now, the rest in later steps
            chosen = torch.randperm(num_dead, device=dead_ids.device)[:available]
            dead_ids = dead_ids[chosen.sort().values]  # ascending, as vqp fills its boolean mask
        positions = kmeans_ops.sample_positions(available, dead_ids.numel(), samples.device)
        plans.append(_Replacement(e.codebook, head, dead_ids, positions, samples, sum(sizes[:rank]), sync))
    return plans


def _exchange_rows(plans: list[_Replacement]) -> list[Tensor]:
    """Each replacement's new rows. Across ranks: rank 0's codes and positions broadcast in one tensor, each
    rank's own chosen rows summed in one all-reduce (for all replacements drawn across ranks together)."""
    shared = [p for p in plans if p.sync]
    rows = iter(_exchange_shared_rows(shared) if shared else [])
    return [next(rows) if p.sync else p.samples[p.positions] for p in plans]


def _exchange_shared_rows(plans: list[_Replacement]) -> list[Tensor]:
    """The new rows of replacements drawn across ranks: one broadcast (codes, positions), one all-reduce (rows)."""
    ids = distributed.broadcast_(torch.cat([t for p in plans for t in (p.dead_ids, p.positions)]))
    parts = ids.split([t.numel() for p in plans for t in (p.dead_ids, p.positions)])
    plans = [p._replace(dead_ids=parts[2 * i], positions=parts[2 * i + 1]) for i, p in enumerate(plans)]
    rows = torch.cat([kmeans_ops.own_rows(p.samples, p.positions, p.start).reshape(-1) for p in plans])
    distributed.all_reduce_sum_(rows, shapes_agreed=True)  # (sizes follow from values every rank shares)
    sizes = [p.positions.numel() * p.samples.shape[-1] for p in plans]
    return [r.view(p.positions.numel(), -1).to(p.samples.dtype) for r, p in zip(rows.split(sizes), plans)]


class DeferredUpdates:
    """The codebook updates recorded during one training step (`deferred_updates`), applied together."""

    def __init__(self):
        self.updates: list[StatsUpdate] = []
        self.finishers: list[Callable[[], None]] = []

    def after(self, fn: Callable[[], None]) -> None:
        """Run `fn` once the recorded updates are applied (e.g. a shared codebook's update from its EMA)."""
        self.finishers.append(fn)

    def apply(self) -> None:
        updates, self.updates = self.updates, []
        apply_updates(updates)
        for fn in self.finishers:
            fn()
        self.finishers = []


class _Immediate(DeferredUpdates):
    """Not deferring: `after` runs its function at once."""

    def after(self, fn: Callable[[], None]) -> None:
        fn()


@contextmanager
def deferred_updates(codebooks: list[Codebook], enabled: bool = True) -> Iterator[DeferredUpdates]:
    """Record the `update`s of `codebooks` made inside the block and apply them when it closes: one all-reduce
    for all of their statistics. Nested inside another owner's block (a residual quantizer within a grouped one)
    it joins the outer one. Deferring assumes no codebook is read after another one's update in the block."""
    outer = next((cb.deferred for cb in codebooks if cb.deferred is not None), None)
    if outer is not None:
        yield outer
        return
    if not enabled:
        yield _Immediate()
        return
    batch = DeferredUpdates()
    for cb in codebooks:
        cb.deferred = batch
    try:
        yield batch
    finally:
        for cb in codebooks:
            cb.deferred = None
    batch.apply()


@torch.no_grad()
def apply_updates(updates: list[StatsUpdate]) -> None:
    """Apply recorded codebook updates: the statistics of every syncing codebook summed over ranks in one
    all-reduce (with the row counts dead-code sampling needs), one finiteness check for all, the EMA steps (one
    multi-tensor update for codebooks of one kind), then dead-code expiry with one host read for all codebooks.

    When every update is plain (`_plain`), the step does not wait for the GPU to learn whether the statistics are
    finite: the device applies the EMA steps only where they are (`_apply_plain`, replayed as one CUDA graph on
    a GPU), and the host reads that flag with dead-code expiry's table (raising before any code is replaced), or else
    at the codebooks' next update (on the CPU at once). Otherwise the flag is read first, and non-finite statistics
    raise before any write."""
    if not updates:
        return
    codebooks = [u.codebook for u in updates]
    graphs.host_effect(lambda: _raise_pending(codebooks), before=True)
    reduced, rank_rows = _reduce(updates)
    if all(_plain(u) for u in updates):
        finite, applied = _apply_plain(updates, reduced), [True] * len(updates)
    else:
        finite = None
        ema_ops.require_all_finite([stats.sums for stats in reduced], _STATS)
        applied = _apply_all(updates, reduced)
    expiries = [_Expiry(u.codebook, u.flat, u.mask, rows) for u, rows, done in zip(updates, rank_rows, applied)
                if done and u.codebook.threshold_ema_dead_code > 0]
    if expiries:  # (eager: a compiled step without dead-code expiry stays one graph)
        expire_dead_codes(expiries, finite)
    elif finite is not None:
        graphs.host_effect(lambda: _defer_to_all(codebooks, ema_ops.report_finite(finite, _STATS)))


def _raise_pending(codebooks: list[Codebook]) -> None:
    """Each codebook's pending check of its last statistics (`Codebook.raise_pending`)."""
    for cb in codebooks:
        cb.raise_pending(_STATS)


def _defer_to_all(codebooks: list[Codebook], check: ema_ops.PendingCheck | None) -> None:
    """`check` (of these codebooks' statistics, updated together) for each codebook's next update to read."""
    for cb in codebooks:
        cb.defer_check(_STATS, check)


def _reduce(updates: list[StatsUpdate]) -> tuple[list[CodebookStats], list[Tensor | None]]:
    """Every update's statistics summed over ranks (those of codebooks that sync) in one all-reduce, and each
    codebook's `rank_rows` summed alike (None where not needed)."""
    parts, slots = [], []
    for u in updates:
        if u.codebook.syncs():
            rows = u.codebook.rank_rows(u.stats)
            slots.append((len(parts), rows is not None))
            parts += [u.stats.counts, u.stats.sums] + ([rows] if rows is not None else [])
        else:
            slots.append(None)
    summed = distributed.all_reduce_sum(parts) if parts else []
    reduced, rank_rows = [], []
    for u, slot in zip(updates, slots):
        if slot is None:
            reduced.append(u.stats)
            rank_rows.append(None)
        else:
            at, has_rows = slot
            reduced.append(CodebookStats(summed[at], summed[at + 1]))
            rank_rows.append(summed[at + 2] if has_rows else None)
    return reduced, rank_rows


def _plain(u: StatsUpdate) -> bool:
    """An EMA step with the codebook from the EMA: no per-code weight, no accumulation (these batch together)."""
    cb = u.codebook
    return u.weight is None and not u.accum and cb.pending_stats is None and u.ema_update and not cb.manual_ema_update


def _apply_all(updates: list[StatsUpdate], reduced: list[CodebookStats]) -> list[bool]:
    """Each update's EMA step (statistics known to be finite); plain ones batched per codebook kind. Returns which
    updates wrote the state."""
    applied = [False] * len(updates)
    plain = [i for i, u in enumerate(updates) if _plain(u)]
    for i, u in enumerate(updates):
        if not _plain(u):
            applied[i] = u.codebook.apply_step(reduced[i], u.ema_update, u.weight, u.accum)
    if plain:
        _apply_plain([updates[i] for i in plain], [reduced[i] for i in plain], guard=False)
        for i in plain:
            applied[i] = True
    return applied


def _apply_plain(updates: list[StatsUpdate], reduced: list[CodebookStats], guard: bool = True) -> Tensor | None:
    """The plain updates' EMA steps and codebooks from the EMA, batched per codebook kind; with `guard` only where
    the statistics are finite, and their `finite_flag` returned. One CUDA graph replay on a GPU
    (`ops.ema.PLAIN_EMA_STEPS`)."""
    kinds: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        cb = u.codebook
        key = (cb.decay, cb.eps, cb.use_cosine_sim, tuple(cb.embed.shape), cb.embed.dtype, cb.embed.device)
        kinds.setdefault(key, []).append(i)
    groups = tuple((tuple(ids), *key[:3]) for key, ids in kinds.items())
    inputs = [stats.counts for stats in reduced] + [stats.sums for stats in reduced]
    state = [t for u in updates for t in (u.codebook.cluster_size, u.codebook.embed_avg, u.codebook.embed.data)]
    outputs = ema_ops.PLAIN_EMA_STEPS(inputs, state, groups, guard)
    return outputs[0] if guard else None
