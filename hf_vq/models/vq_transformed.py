"""VectorQuantize against per-token codebooks: vqp 1.32's `codebook_transform_fn` forward argument, and the levels
of ResidualVQ's implicit neural codebook (`qinco.py`), which search the same way.

A transform maps the codebook `(h, K, d)` to one codebook per token `(h, b, n, K, d)` (memory `N x K x d`:
inherent to the method). The nearest code is the largest dot product (cosine codebook, the transformed codes
l2-normalized) or the smallest `pairwise_distance` (vqp 1.32's metric, with its `eps`); in training a Gumbel sample
when the model samples codes. The stored codebook is updated from the chosen indices as usual, and the loss and
gradient estimator are the model's own (`_losses`, `_estimator`). Options that score tokens against the stored
codebook itself (cross-entropy commitment, diversity loss, straight-through Gumbel) are refused, as is the
in-place optimizer (vqp steps it on the stored codebook's codes).

Functions of the model, kept out of `vector_quantize.py` as `vq_topk.py` is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.estimators import gumbel_noise
from .codebook import l2norm


def check_options(config, what: str) -> None:
    """ValueError for the options a per-token codebook search does not implement (each needs the stored codebook's
    scores); `what` names the feature in the message."""
    for name in ("commitment_use_cross_entropy_loss", "straight_through"):
        if getattr(config, name):
            raise ValueError(f"{what} does not support {name}=True")
    if config.codebook_diversity_loss_weight > 0:
        raise ValueError(f"{what} does not support codebook_diversity_loss_weight > 0")


def transformed_books(transform: Callable[[Tensor], Tensor], embed: Tensor, batch: int, n: int) -> Tensor:
    """`transform(embed)` for `embed (h, K, d)`, checked to be `(h, batch, n, K, d)`, as `(h, batch * n, K, d)`."""
    books = transform(embed)
    h, k, d = embed.shape
    if not isinstance(books, Tensor) or tuple(books.shape) != (h, batch, n, k, d):
        got = tuple(books.shape) if isinstance(books, Tensor) else type(books).__name__
        raise ValueError(f"codebook_transform_fn must map the codebook {(h, k, d)} to per-token codebooks "
                         f"{(h, batch, n, k, d)}, got {got}")
    return books.reshape(h, batch * n, k, d)


def per_token_rows(model, flat: Tensor, books: Tensor, flat_mask: Tensor | None, temperature: float,
                   freeze_codebook: bool, input_requires_grad: bool, batch: int,
                   update_kwargs: dict | None = None) -> tuple[Tensor, Tensor, Tensor, dict, Tensor | None]:
    """`(codes through the estimator, indices, loss, loss terms, counts)` for rows `flat (h, N, d)` (cosine:
    normalized) against their codebooks `books (h, N, K, d)`; the stored codebook updated from the indices in
    training (`update_kwargs`: `Codebook.update`'s EMA options)."""
    d = flat.shape[-1]
    if model.use_cosine_sim:
        books = l2norm(books)
        logits = torch.einsum("hnd,hncd->hnc", flat, books)
    else:
        logits = -F.pairwise_distance(flat.unsqueeze(-2), books)
    if model.training and model.stochastic_sample_codes and temperature > 0:
        logits = logits / temperature + gumbel_noise(logits)
    indices = logits.argmax(dim=-1)  # (h, N)
    codes = books.gather(2, indices[..., None, None].expand(-1, -1, 1, d)).squeeze(2)
    counts = None
    if model.training and not freeze_codebook:
        counts = model._codebook.update(flat.detach(), indices, flat_mask, **(update_kwargs or {}))
    loss, terms = model._losses(flat, codes, indices, None, flat_mask, freeze_codebook, batch)
    return model._estimator(flat, codes, input_requires_grad), indices, loss, terms, counts
