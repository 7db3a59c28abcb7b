"""CogVideo sgm's `EMAVectorQuantizer`: a codebook learned by an exponential moving average of its assignments
(`EmbeddingEMA`, sgm's keys `embedding.weight`, `embedding.cluster_size`, `embedding.embed_avg`), with sgm's
constructor arguments and return conventions (see `sgm.py`, which re-exports it). The EMA statistics are summed over
processes when a process group is up, and a non-finite batch never reaches them (`ops.ema.finite_flag`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..modeling_utils import QuantizerConfig, QuantizerModel, check_features, register_quantizer
from ..ops import graphs
from ..ops.ema import PendingCheck, cluster_stats, decay_into_, finite_flag, laplace_smoothing, report_finite, write_if_
from ..ops.nearest import nearest_code
from .sgm import (SgmConfigMixin, SgmQuantizerOutput, _config_from_args, _is_number, _RemapMixin, _require,
                  measure_perplexity)


@dataclass
class EMAQuantizerOutput(SgmQuantizerOutput):
    """sgm's EMA log dict also holds `encodings`, the N x K one-hot of the indices: built only for the tuple."""

    def to_tuple_output(self) -> tuple:
        (loss_key, loss), *rest = self.log_dict.items()
        encodings = F.one_hot(self.indices, self.num_codes).to(self.quantized.dtype)
        return self.quantized, {loss_key: loss, "encodings": encodings, **dict(rest)}


class EMAVectorQuantizerConfig(SgmConfigMixin, QuantizerConfig):
    """Configuration of [`EMAVectorQuantizer`] (sgm's `n_embed, embedding_dim, beta, decay, eps, remap,
    unknown_index, loss_key`), plus `sync_codebook` (`bool`, *optional*): sum the EMA statistics over
    processes (default: when a process group is up), so every rank keeps the same codebook."""

    model_type = "hf_vq_sgm_ema_vector_quantizer"

    def __init__(self, n_embed: int = 512, embedding_dim: int = 256, beta: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, remap: str | None = None, unknown_index: Any = "random",
                 loss_key: str = "loss/vq", sync_codebook: bool | None = None, remap_size: int | None = None,
                 **kwargs):
        self.n_embed, self.embedding_dim, self.beta, self.decay, self.eps = n_embed, embedding_dim, beta, decay, eps
        self.remap, self.remap_size, self.unknown_index, self.loss_key = remap, remap_size, unknown_index, loss_key
        self.sync_codebook = sync_codebook
        super().__init__(**self._sgm_defaults(kwargs))

    def validate(self):
        self._require_positive_ints("n_embed", "embedding_dim")
        self._require_non_negative("beta")
        _require(self, "decay", lambda v: _is_number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]")
        _require(self, "eps", lambda v: _is_number(v) and v > 0, "a number > 0")
        _require(self, "loss_key", lambda v: isinstance(v, str), "a str")
        _require(self, "sync_codebook", lambda v: v is None or isinstance(v, bool), "None or a bool")
        self._validate_remap()


class EmbeddingEMA(nn.Module):
    """sgm's EMA embedding: `weight`, `cluster_size`, `embed_avg` (buffers; sgm's keys)."""

    def __init__(self, num_tokens: int, codebook_dim: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.decay, self.eps, self.update = decay, eps, True
        weight = torch.randn(num_tokens, codebook_dim)
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size", torch.zeros(num_tokens))
        self.register_buffer("embed_avg", weight.clone())

    def forward(self, embed_id: Tensor) -> Tensor:
        return F.embedding(embed_id, self.weight)

    # sgm's updates; with `finite` (a 0-dim bool tensor) written only where it is True
    def cluster_size_ema_update(self, new_cluster_size: Tensor, finite: Tensor | None = None) -> None:
        decay_into_(self.cluster_size, new_cluster_size, self.decay, finite)

    def embed_avg_ema_update(self, new_embed_avg: Tensor, finite: Tensor | None = None) -> None:
        decay_into_(self.embed_avg, new_embed_avg, self.decay, finite)

    def weight_update(self, num_tokens: int, finite: Tensor | None = None) -> None:
        _weight_from_ema(self.weight, self.cluster_size, self.embed_avg, num_tokens, self.eps, finite)


def _weight_from_ema(weight: Tensor, cluster_size: Tensor, embed_avg: Tensor, num_tokens: int, eps: float,
                     finite: Tensor | None) -> None:
    """sgm's `weight <- embed_avg / (Laplace-smoothed cluster_size * n)`, where `finite` is True."""
    n = cluster_size.sum()
    smoothed = laplace_smoothing(cluster_size, num_tokens, eps) * n
    write_if_(weight, embed_avg / smoothed.unsqueeze(1), finite)


def _ema_step(inputs: list[Tensor], state: list[Tensor], num_tokens: int, decay: float, eps: float) -> list[Tensor]:
    """`EmbeddingEMA`'s three updates from `inputs` (counts, sums) on `state` (`cluster_size`, `embed_avg`,
    `weight`), written only where the sums are finite; returns `[finite_flag]`. Replayed as one CUDA graph on a GPU
    (`_EMA_STEPS`)."""
    (counts, sums), (cluster_size, embed_avg, weight) = inputs, state
    finite = finite_flag([sums])
    decay_into_(cluster_size, counts.to(cluster_size.dtype), decay, finite)
    decay_into_(embed_avg, sums.to(embed_avg.dtype), decay, finite)
    _weight_from_ema(weight, cluster_size, embed_avg, num_tokens, eps, finite)
    return [finite]


_EMA_STEPS = graphs.GraphedUpdate(_ema_step)


@register_quantizer
class EMAVectorQuantizer(_RemapMixin, QuantizerModel):
    """sgm's EMA vector quantizer (codebook learned by EMA of assignments, loss = beta * commitment)."""

    config_class = EMAVectorQuantizerConfig

    def __init__(self, *args, config: EMAVectorQuantizerConfig | None = None, **kwargs):
        config = _config_from_args(self.config_class, args, config, kwargs)
        super().__init__(config)
        c = self.config
        self.embedding = EmbeddingEMA(c.n_embed, c.embedding_dim, c.decay, c.eps)
        self.pending_check: PendingCheck | None = None  # the last update's finiteness, unread (GPU: `_ema_update`)
        self._init_remap(c.n_embed)
        self.post_init()

    def forward(self, z: Tensor, return_dict: bool | None = None):
        c = self.config
        if c.check_inputs:
            check_features(z, c.embedding_dim, name="z")
        if z.ndim < 4 or z.shape[1] != c.embedding_dim:
            raise ValueError(f"expected (b, {c.embedding_dim}, h, w) or (b, {c.embedding_dim}, t, h, w) input, "
                             f"got shape {tuple(z.shape)}")
        z = z.movedim(1, -1)
        z_flat = z.reshape(-1, c.embedding_dim)
        indices = nearest_code(z_flat, self.embedding.weight)[0]
        z_q = self.embedding(indices).view(z.shape).to(z.dtype)
        perplexity, usage = measure_perplexity(indices, c.n_embed)
        if self.training and self.embedding.update:
            self._ema_update(z_flat, indices)
        loss = c.beta * F.mse_loss(z_q.detach(), z)
        z_q = (z + (z_q - z).detach()).movedim(-1, 1)
        log = {c.loss_key: loss, "encoding_indices": indices, "perplexity": perplexity}
        out = EMAQuantizerOutput(quantized=z_q, indices=indices, loss=loss, perplexity=perplexity,
                                 cluster_usage=usage, log_dict=log)
        object.__setattr__(out, "num_codes", c.n_embed)  # not a field: for the one-hot of sgm's tuple
        return self._output(out, return_dict)

    @torch.no_grad()
    def _ema_update(self, z_flat: Tensor, indices: Tensor) -> None:
        """sgm's EmbeddingEMA step from float32 counts and sums (bincount / index_add_, no one-hot), written only if
        they are finite, decided on the device; a non-finite batch raises at once on the CPU, at the next update on
        a GPU (`ops.ema.report_finite`, as VectorQuantize's codebook)."""
        check, self.pending_check = self.pending_check, None
        if check is not None:
            check.raise_if_failed()
        counts, sums = cluster_stats(z_flat.detach(), indices, self.config.n_embed)
        sync = self.config.sync_codebook
        if distributed.is_distributed() and (sync is None or sync):
            distributed.all_reduce_sum_(counts, sums)
        emb = self.embedding
        (finite,) = _EMA_STEPS([counts, sums], [emb.cluster_size, emb.embed_avg, emb.weight], self.config.n_embed,
                               emb.decay, emb.eps)
        self.pending_check = report_finite(finite, "codebook EMA statistics")
