"""The state of a VectorQuantize codebook and every update to it (semantics of vector-quantize-pytorch 1.32's
`EuclideanCodebook` / `CosineSimCodebook`): EMA counts and sums, the codebook from the EMA, k-means
initialization, dead-code expiry, affine re-normalization statistics and the distributed syncs they need.

State-dict keys match vqp's `_codebook` submodule: `embed`, `cluster_size`, `embed_avg`, `initted` and the affine
buffers (`batch_mean`, `batch_variance`, `codebook_mean`, `codebook_variance`, each with `<name>_needs_init`).

An update is split into two steps so a caller with several codebooks (residual levels, groups) can sum-reduce
all their statistics in one collective: `batch_stats` computes this rank's per-code counts and sums,
`apply_stats` writes reduced statistics into the state. Non-finite statistics are refused before anything is
written (`ops.ema.require_finite`), whatever the model's `check_inputs` says.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..ops import ema as ema_ops
from ..ops import kmeans as kmeans_ops

AFFINE_BUFFERS = ("batch_mean", "batch_variance", "codebook_mean", "codebook_variance")


class CodebookStats(NamedTuple):
    """One batch's per-code statistics: `counts (H, K)` and feature `sums (H, K, d)`, float32."""

    counts: Tensor
    sums: Tensor


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
        self.ema_update = c.resolved_ema_update
        self.manual_ema_update = c.manual_ema_update
        self.learnable = c.resolved_learnable_codebook
        self.sync_codebook, self.sync_kmeans, self.sync_affine_param = c.sync_codebook, c.sync_kmeans, c.sync_affine_param
        self.affine_param = c.affine_param
        self.affine_param_batch_decay = c.affine_param_batch_decay
        self.affine_param_codebook_decay = c.affine_param_codebook_decay
        # the host-side answer of `is_initted` (buffer identity and version), and statistics accumulated by
        # `update(accum=True)` for the next update (vqp keeps them in the buffers' `.grad`; not checkpointed)
        self.initted_key: tuple | None = None
        self.pending_stats: CodebookStats | None = None

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
        """The codebook the search reads: with its autograd link when learnable, affine-mapped when enabled."""
        embed = self.embed if isinstance(self.embed, nn.Parameter) and self.learnable else self.embed.detach()
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
            if not self.kmeans_init or self.initted_key is not None:
                return True
            raise RuntimeError("kmeans_init=True: run one forward outside torch.compile first (k-means initializes "
                               "the codebook eagerly; a loaded, initialized checkpoint also needs one eager call)")
        t = self.initted
        key = (t.data_ptr(), t._version, t.device)
        if self.initted_key == key:
            return True
        if not bool(t):
            return False
        self.initted_key = key
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
        """Running batch moments of `flat (H, N, d)` (and, in training, of the codebook), vqp's affine_param."""
        if mask is not None:
            flat = torch.stack([f[m] for f, m in zip(flat, mask)])
        count = torch.tensor(float(flat.shape[1]), device=flat.device)
        total = flat.sum(dim=1, keepdim=True)
        if self.syncs_affine():
            self.all_reduce_(count, total)
            mean = total / count
            sq = ((flat - mean) ** 2).sum(dim=1, keepdim=True)
            self.all_reduce_(sq)
            var = sq / count
        else:
            mean, var = flat.mean(dim=1, keepdim=True), flat.var(dim=1, unbiased=False, keepdim=True)
        ema_ops.require_finite(torch.stack([mean, var]), "affine batch statistics")
        if training:
            self._decayed("codebook_mean", self.embed.mean(dim=1, keepdim=True), self.affine_param_codebook_decay)
            self._decayed("codebook_variance", self.embed.var(dim=1, unbiased=False, keepdim=True),
                          self.affine_param_codebook_decay)
        self._decayed("batch_mean", mean, self.affine_param_batch_decay)
        self._decayed("batch_variance", var, self.affine_param_batch_decay)

    def _decayed(self, name: str, new: Tensor, decay: float) -> None:
        """vqp's `update_with_decay`: the first value taken as is, then `old * decay + new * (1 - decay)`."""
        flag = self.get_buffer(f"{name}_needs_init")
        old = self.get_buffer(name)
        new = new.detach()
        old.copy_(new if bool(flag) else old * decay + new * (1 - decay))
        flag.fill_(False)

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
                    weight: Tensor | Callable | None = None) -> None:
        """One EMA step of `cluster_size`/`embed_avg` from reduced `stats`, then (with EMA codebook updates, unless
        `manual_ema_update`) the codebook from the EMA. Refuses non-finite statistics before writing anything."""
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
        from the EMA, then dead-code expiry. Returns this rank's code counts `(H, K)` (what the perplexity
        counts), or None when no statistics are kept (no EMA, no dead-code expiry).

        `weight` scales each code's EMA step (a tensor `(K,)`/`(H, K)`, or a function of the batch's
        `(sums, counts)`); `accum` only accumulates the statistics, which the next update adds to its own."""
        ema_update = self.ema_update if ema_update is None else ema_update
        has_dead = self.threshold_ema_dead_code > 0
        if not ema_update and not has_dead:
            return None
        stats = self.batch_stats(flat, indices, mask)
        local = stats.counts.clone() if self.syncs() else stats.counts  # (the all-reduce sums in place)
        self.all_reduce_(*stats)
        pending = self.pending_stats
        if pending is not None:
            stats = CodebookStats(stats.counts + pending.counts, stats.sums + pending.sums)
        if accum:
            ema_ops.require_finite(stats.sums, "codebook EMA statistics")
            self.pending_stats = stats
            return local
        self.apply_stats(stats, ema_update, weight)
        self.pending_stats = None
        if has_dead:
            self.expire_codes(flat, mask)
        return local

    @torch.no_grad()
    def update_embed_from_ema(self) -> None:
        """`embed <- embed_avg / smoothed cluster_size` (l2-normalized for the cosine codebook)."""
        ema_ops.codebooks_from_ema_([self.cluster_size], [self.embed_avg], [self.embed.data], self.eps)
        if self.use_cosine_sim:
            self.embed.data.copy_(l2norm(self.embed.data))

    @torch.no_grad()
    @torch.compiler.disable  # data-dependent (which codes, how many samples): runs eagerly, one graph break
    def expire_codes(self, flat: Tensor, mask: Tensor | None) -> None:
        """Replace codes whose EMA count fell below the threshold by rows of `flat (H, N, d)`, and reset their EMA
        state (count and sum) so the stale average cannot overwrite the new vector."""
        expired = self.cluster_size < self.threshold_ema_dead_code
        if self.syncs():
            distributed.broadcast_(expired)
        if not bool(expired.any()):
            return
        samples_all = l2norm(flat) if self.use_cosine_sim else flat
        sync = self.syncs_samples()
        for head, (samples, dead) in enumerate(zip(samples_all, expired)):
            if mask is not None:
                samples = samples[mask[head]]
            available = kmeans_ops.global_row_count(samples, sync)  # the same on every rank
            if available == 0:
                continue
            dead_ids = dead.nonzero(as_tuple=True)[0]
            if dead_ids.numel() > available:
                # more dead codes than samples: replace a random subset now, the rest in later steps
                chosen = torch.randperm(dead_ids.numel(), device=dead_ids.device)[:available]
                dead_ids = dead_ids[chosen.sort().values]  # ascending, as vqp fills its boolean mask
                if sync:
                    distributed.broadcast_(dead_ids)
            new = kmeans_ops.sample_rows_across_ranks(samples, dead_ids.numel(), sync).to(self.embed.dtype)
            self.embed.data[head, dead_ids] = new
            self.cluster_size[head, dead_ids] = self.reset_cluster_size
            self.embed_avg[head, dead_ids] = new * self.reset_cluster_size
