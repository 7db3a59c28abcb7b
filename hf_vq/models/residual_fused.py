"""ResidualVQ's two fast paths, for G residual quantizers of one shape at once: the groups of a
`GroupedResidualVQ`, or one `ResidualVQ` (`G = 1`).

- `lean_eval_levels`: outside training, every level is "nearest euclidean code of the residual, looked up by
  index" (`VQPlan.lean_eval`), so the loop runs `nearest_code` and `residual_step_` per level without the levels'
  forwards (layout, heads, losses, perplexity, output objects).
- `fused_train_levels`: in training, every level is one level of `ops.triton_residual.residual_train_levels`
  (`VQPlan.fused_levels`): the levels' searches, rotation trick, commitment losses and EMA statistics as one
  autograd node, then every codebook's update recorded for `deferred_updates`.

The groups run as the second axis of every launch (their rows and codebooks stacked), so a grouped quantizer costs
the launches of one group. Each function computes what each group's ResidualVQ computes on its own.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ..ops.nearest import nearest_code
from ..ops.triton_residual import level_inputs, residual_step_, residual_train_levels
from .codebook import CodebookStats, StatsUpdate, deferred_updates


def stack_groups(rows: list[Tensor]) -> Tensor:
    """`(G, N, d)` from G groups' `(..., d)` rows of one shape: a view for one group, one copy for several."""
    if len(rows) == 1:
        return rows[0].reshape(1, -1, rows[0].shape[-1])
    return torch.stack([r.reshape(-1, r.shape[-1]) for r in rows])


def copy_groups(rows: list[Tensor]) -> Tensor:
    """`(G, N, d)` from G groups' `(..., d)` rows of one shape: one contiguous copy, whatever their layout (the
    lean eval loops update it in place)."""
    return torch.stack(rows).reshape(len(rows), -1, rows[0].shape[-1])


def _stack_level_books(books: list[list[Tensor]]) -> list[Tensor]:
    """Per level, the groups' codebooks `(G, K_l, d)` (levels may differ in K; groups of one level do not)."""
    if len(books) == 1:
        return [book.unsqueeze(0) for book in books[0]]
    return [torch.stack(level) for level in zip(*books)]


def lean_eval_levels(rows: Tensor, books: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
    """`(quantized (G, N, d), indices (G, N, L))` of the residual loop over rows `(G, N, d)` (float32 or the input
    dtype; contiguous, updated in place into the last residual: the caller's copy, `copy_groups`) with group g's
    level-l codebook `books[g][l] (K_l, d)`: the values each level's forward returns outside training (the same
    search; codes cast to the rows' dtype), differentiable in a learnable codebook."""
    residual = rows
    quantized = torch.zeros_like(residual)
    indices = []
    for book in _stack_level_books(books):
        idx, _ = nearest_code(residual, book)
        residual_step_(residual, quantized, book, idx)
        indices.append(idx)
    return quantized, torch.stack(indices, dim=-1)


def fused_train_levels(rows: Tensor, levels: list[list], num_quantizers: int) -> tuple[Tensor, Tensor, Tensor]:
    """One training step of every group's kept levels `levels[g]` (VectorQuantize modules whose plan has
    `fused_levels`; the same count in every group, the dropped ones after them) on rows `(G, N, d)` float32.

    Returns `(quantized (G, N, d), indices (G, N, num_quantizers), loss (G, num_quantizers))`, dropped levels with
    index -1 and loss 0. Every codebook's update is recorded from the batch statistics (`record_level_updates`)."""
    kept = len(levels[0])
    # the codebooks the step searched (the backward pass reads this snapshot after the EMA updates)
    books = torch.stack([group[level]._codebook.embed.detach()[0] for level in range(kept) for group in levels])
    books = books.view(kept, len(levels), *books.shape[1:])
    quantized, commits, indices, counts, sums = residual_train_levels(rows, books)
    record_level_updates(levels, rows, books, indices, counts, sums)
    weight = levels[0][0].commitment_weight  # (all levels are built from one config)
    loss = (commits * weight if weight != 1 else commits).t()
    all_indices = indices.new_full((*rows.shape[:2], num_quantizers), -1)
    all_indices[..., :kept] = indices.permute(1, 2, 0)
    if kept < num_quantizers:
        loss = torch.cat([loss, loss.new_zeros(loss.shape[0], num_quantizers - kept)], dim=1)
    return quantized, all_indices, loss


def record_level_updates(levels: list[list], rows: Tensor, books: Tensor, indices: Tensor, counts: Tensor,
                         sums: Tensor) -> None:
    """Every level's codebook update from its batch statistics `counts (L, G, K)`, `sums (L, G, K, d)`, applied
    together (`apply_updates`: one all-reduce, one multi-tensor EMA step) at the end of this call, or of the
    grouped quantizer's step that this one is part of. Dead-code expiry reads the levels' inputs, recomputed (for
    all groups at once) only when a code expired."""
    inputs: list[Tensor] = []

    def level_input(level: int, group: int) -> Tensor:
        if not inputs:
            inputs.extend(level_inputs(rows.detach(), books, indices))
        return inputs[level][group].unsqueeze(0)

    codebooks = [layer._codebook for group in levels for layer in group]
    with deferred_updates(codebooks) as updates:
        updates.updates.extend(
            StatsUpdate(layer._codebook, CodebookStats(counts[level, g].unsqueeze(0), sums[level, g].unsqueeze(0)),
                        partial(level_input, level, g), None, layer._codebook.ema_update, None, False)
            for g, group in enumerate(levels) for level, layer in enumerate(group))
