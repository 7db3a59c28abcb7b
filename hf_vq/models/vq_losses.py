"""The VectorQuantize losses and statistics that score rows against a whole codebook (vqp 1.32 semantics), in row
chunks of at most `SCORE_CHUNK_BYTES` of scores. With several chunks each is recomputed in backward (checkpoint), so
one chunk's scores live at a time; a single chunk keeps its activations for backward (a few tensors of at most that
budget) instead of computing its scores twice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..ops import ema as ema_ops
from ..ops.nearest import scores
from .codebook import l2norm

SCORE_CHUNK_BYTES = 256 * 2**20  # float32 scores of one chunk of rows


def orthogonal_loss(codes: Tensor) -> Tensor:
    """Eq. 2 of arXiv:2112.00384 over `(h, n, d)` codes."""
    h, n = codes.shape[:2]
    normed = l2norm(codes)
    cosine = torch.einsum("hid,hjd->hij", normed, normed)
    return (cosine**2).sum() / (h * n**2) - (1 / n)


def perplexity(indices: Tensor, num_codes: int, mask: Tensor | None, counts: Tensor | None = None) -> Tensor:
    """`exp(entropy)` of code usage per head `(H, N)` (valid rows only), averaged over heads; by bincount, unless
    the codebook update already counted them (`counts (H, K)`). Not differentiable: it reads only integer
    indices, the bool mask and counts (no `no_grad` context needed)."""
    if mask is None and indices.shape[1] > 0:
        # every head counts all N rows: the usage is the integer counts over N (the same float32 division)
        heads = indices.shape[0]
        if counts is None:
            counts = ema_ops.code_counts(ema_ops.head_code_ids(indices, num_codes), heads * num_codes)
        prob = counts.view(heads, num_codes) / indices.shape[1]
    else:
        if counts is None:
            heads = indices.shape[0]
            weights = None if mask is None else mask.reshape(-1).float()
            counts = ema_ops.code_counts(ema_ops.head_code_ids(indices, num_codes), heads * num_codes, weights)
            counts = counts.view(heads, num_codes)
        prob = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    per_head = torch.special.entr(prob).sum(-1).exp()  # entr(p) = -p log p, 0 at p = 0
    return per_head.view(()) if per_head.numel() == 1 else per_head.mean()  # (one head: no reduction launch)


def masked_mse(a: Tensor, b: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return F.mse_loss(a, b)
    return F.mse_loss(a, b, reduction="none")[mask].mean()


def mean_position_entropy(flat: Tensor, embed: Tensor, metric: str, temperature: float, batch: int) -> Tensor:
    """vector-quantize-pytorch 1.32's codebook diversity term: `softmax(scores * temperature)` averaged over
    heads and batch for each sequence position, its entropy, averaged over positions. Positions are taken in
    chunks (`sum_over_chunks`)."""
    heads, rows, dim = flat.shape
    per_position = flat.view(heads, batch, rows // batch, dim)

    def chunk_sum(x_chunk, emb):
        h, b, m, d = x_chunk.shape
        prob = (scores(x_chunk.reshape(h, b * m, d), emb, metric) * temperature).softmax(-1)
        prob = prob.view(h, b, m, -1).mean(dim=(0, 1))
        return (-prob * prob.clamp(min=1e-5).log()).sum()

    step = max(1, SCORE_CHUNK_BYTES // (4 * embed.shape[-2] * heads * batch))
    chunks = [(per_position[:, :, start : start + step], embed) for start in range(0, per_position.shape[2], step)]
    return sum_over_chunks(chunk_sum, chunks) / per_position.shape[2]


def cross_entropy_to_codes(flat, embed, metric, indices, mask) -> Tensor:
    """Cross-entropy of the scores as logits against the chosen codes, in row chunks (`sum_over_chunks`)."""

    def chunk_sum(x_chunk, emb, target, valid):
        logp = scores(x_chunk, emb, metric).log_softmax(-1)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (nll * valid).sum()

    valid_all = torch.ones_like(indices, dtype=flat.dtype) if mask is None else mask.to(flat.dtype)
    chunks = [(flat[:, sl], embed, indices[:, sl], valid_all[:, sl]) for sl in row_slices(flat, embed)]
    return sum_over_chunks(chunk_sum, chunks) / valid_all.sum().clamp(min=1)


def sum_over_chunks(chunk_sum, chunks: list[tuple]) -> Tensor:
    """The sum of `chunk_sum(*args)` over `chunks` (argument tuples): recomputed in backward when there are several
    (so one chunk's scores live at a time), kept when there is one."""
    if len(chunks) == 1:
        return chunk_sum(*chunks[0])
    total = 0
    for args in chunks:
        total = total + checkpoint(chunk_sum, *args, use_reentrant=False)
    return total


def row_slices(flat: Tensor, embed: Tensor):
    """Row chunks of at most `SCORE_CHUNK_BYTES` of float32 scores against `embed (H, K, d)`."""
    rows = max(1, SCORE_CHUNK_BYTES // (4 * embed.shape[-2] * flat.shape[0]))
    for start in range(0, flat.shape[1], rows):
        yield slice(start, start + rows)
