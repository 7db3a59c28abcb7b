"""VectorQuantize's per-call options that leave the single-code path (vector-quantize-pytorch 1.32 semantics):

- `forward(x, topk=k)`: the `k` best codes of every token (ResidualVQ's beam search calls its levels this way).
  Outputs gain a `k` axis after the token axes: quantized `(b, n, k, d)`, indices `(b, n, k)` and, when a
  commitment loss is computed, a per-candidate loss `(b, n, k)` (mean squared error over features, times the
  commitment weight). Such a call never updates the codebook.
- `update_ema_indices(x, indices)`: the codebook update of a training step for codes chosen elsewhere (a beam
  search's winners).

They are functions of the model, kept out of `vector_quantize.py` so its forward stays the common case.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..modeling_utils import TokenLayout
from ..ops.estimators import gumbel_noise
from ..ops.nearest import gather_codes, scores
from .codebook import l2norm
from .vq_losses import mean_position_entropy, orthogonal_loss


def _check_topk(model, topk) -> int:
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if model.heads != 1:
        raise ValueError("topk needs a single-head VectorQuantize (heads=1), as vqp 1.32")
    if model.training and model.commitment_use_cross_entropy_loss:
        raise ValueError("topk is not supported in training with commitment_use_cross_entropy_loss=True")
    if model.training and model.in_place_codebook_optimizer is not None:
        raise ValueError("topk is not supported in training with an in_place_codebook_optimizer")
    if model.training and model.straight_through:
        raise ValueError("topk is not supported in training with straight_through=True (one soft mixture per "
                         "token cannot route k codes' gradients)")
    return min(topk, model.codebook_size)


def _tokens(model, x: Tensor, mask: Tensor | None, lens: Tensor | None) -> tuple[TokenLayout, Tensor, Tensor | None]:
    """The token layout, `(b, n, dim)` tokens and a `(b, n)` mask of `x` (as `VectorQuantize.forward` reads it)."""
    if mask is not None and lens is not None:
        raise ValueError("pass either mask or lens, not both")
    layout = TokenLayout.of_fmap(x, **model.layout_flags)
    tokens = layout.to_tokens(x)
    if tokens.shape[-1] != model.dim:
        raise ValueError(f"expected feature dim {model.dim}, got {tokens.shape[-1]} (input shape {tuple(x.shape)})")
    if lens is not None:
        mask = torch.arange(tokens.shape[1], device=x.device) < lens[:, None]
    if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape[:2]):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(tokens.shape[:2])}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    return layout, tokens, mask


def _code_rows(model, tokens: Tensor) -> Tensor:
    """`(b, n, dim)` tokens to the float32 code-space rows `(1, b * n, codebook_dim)` the codebook compares."""
    rows = model.project_in(tokens)
    if model.use_cosine_sim:
        rows = l2norm(rows)
    return rows.float().reshape(1, -1, rows.shape[-1])


def _candidate_layout(layout: TokenLayout, t: Tensor) -> Tensor:
    """`(b, n, k, d)` candidates to the input layout with the `k` axis after the token axes (vqp 1.32):
    `(b, n, k, d)`, `(b, d, n, k)`, `(b, c, h, w, k)`, `(b, k, d)` for one token per row."""
    if layout.is_tokens:
        return t
    if layout.single_token:
        return t.squeeze(1)
    t = t.movedim(-1, 1)  # (b, d, n, k)
    return t.reshape(t.shape[0], t.shape[1], *layout.spatial, t.shape[-1])


def topk_forward(model, x: Tensor, topk: int, mask: Tensor | None, lens: Tensor | None,
                 temperature: float, freeze_codebook: bool) -> dict:
    """`VectorQuantize.forward(x, topk=topk)`: quantized, indices, loss and loss terms of the `topk` best codes
    (Gumbel-perturbed scores when sampling stochastically in training). No codebook update."""
    k = _check_topk(model, topk)
    layout, tokens, mask = _tokens(model, x, mask, lens)
    b, n = tokens.shape[:2]
    cb = model._codebook
    with torch.autocast(device_type=x.device.type, enabled=False):
        flat = _code_rows(model, tokens)
        flat_mask = None if mask is None else mask.reshape(1, -1)
        if not cb.is_initted():
            cb.init_from_kmeans(flat.detach(), flat_mask)
        if model.affine_param:
            cb.update_affine(flat.detach(), flat_mask, model.training)
        embed = cb.codes()
        logits = scores(flat, embed, model.metric)  # (1, N, K): one row of scores per token is what top-k reads
        if model.training and model.stochastic_sample_codes and temperature > 0:
            logits = logits / temperature + gumbel_noise(logits)
        indices = logits.detach().topk(k, dim=-1).indices  # (1, N, k)
        codes = gather_codes(embed, indices.reshape(1, -1)).view(1, -1, k, embed.shape[-1])
        candidates = flat.unsqueeze(-2).expand(-1, -1, k, -1)
        terms, loss = _topk_losses(model, flat, candidates, codes, indices, embed, mask, b, freeze_codebook)
        if model.training:
            codes = model._estimator(candidates, codes, x.requires_grad)
    quantized = model.project_out(codes.reshape(b, n, k, -1).to(x.dtype))
    indices = indices.reshape(b, n, k)
    if mask is not None:
        fill = torch.zeros_like(tokens) if model.return_zeros_for_masked_padding else tokens
        quantized = torch.where(mask[..., None, None], quantized, fill.unsqueeze(-2))
        indices = indices.masked_fill(~mask.unsqueeze(-1), -1)
    if loss.ndim:
        loss = layout.indices_from_tokens(loss)
    return dict(quantized=_candidate_layout(layout, quantized), indices=layout.indices_from_tokens(indices),
                loss=loss, **terms)


def _topk_losses(model, flat, candidates, codes, indices, embed, mask, batch, freeze_codebook):
    """vqp 1.32's losses of a top-k call: a per-candidate commitment loss `(b, n, k)` (always outside training,
    scaled only when a commitment loss is configured), plus the scalar terms in training."""
    zero = torch.zeros((), device=flat.device)
    terms = dict(commitment_loss=zero, codebook_diversity_loss=zero, orthogonal_reg_loss=zero)
    b_mask = None if mask is None else mask.reshape(1, -1, 1)

    def per_candidate(q):
        err = (q - candidates).square().mean(dim=-1)  # (1, N, k)
        err = err if b_mask is None else err.masked_fill(~b_mask, 0.0)
        return err.reshape(batch, -1, err.shape[-1])

    if not model.training:
        commit = per_candidate(codes)
        terms["commitment_loss"] = commit
        return terms, commit * model.commitment_weight if model.has_commitment_loss else commit
    loss = zero
    if model.codebook_diversity_loss_weight > 0:
        diversity = -mean_position_entropy(flat, embed, model.metric, model.codebook_diversity_temperature, batch)
        terms["codebook_diversity_loss"] = diversity
        loss = loss + diversity * model.codebook_diversity_loss_weight
    if model.has_commitment_loss:
        learn = model.learnable_codebook and not freeze_codebook
        commit = per_candidate(codes if learn else codes.detach())
        terms["commitment_loss"] = commit
        loss = loss + commit * model.commitment_weight
    if model.orthogonal_reg_weight > 0:
        ortho = orthogonal_loss(model._orthogonal_reg_codes(indices))
        terms["orthogonal_reg_loss"] = ortho
        loss = loss + ortho * model.orthogonal_reg_weight
    if torch.is_grad_enabled() and not loss.requires_grad:
        loss = loss.detach().requires_grad_()
    return terms, loss


@torch.no_grad()
def update_from_indices(model, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
    """`VectorQuantize.update_ema_indices`: the codebook update of a training step (EMA statistics, the codebook
    from the EMA, dead-code expiry) for input `x` and given codes `indices` (the output layout). As vqp 1.32 it
    runs whatever the train/eval mode and does not k-means-initialize the codebook. Indices of -1 are left out of
    the statistics (vqp 1.32 counts them as code 0)."""
    layout, tokens, mask = _tokens(model, x, mask, None)
    b, n = tokens.shape[:2]
    heads_x = model._split_heads(model.project_in(tokens))
    if model.use_cosine_sim:
        heads_x = l2norm(heads_x)
    H, B = heads_x.shape[:2]
    flat = heads_x.float().reshape(H, B * n, -1)
    rows = model._indices_to_rows(indices, b, n)  # (H, B * n), checks the shape and the range
    valid = rows >= 0
    if mask is not None:
        per_row = mask if B == b else mask.repeat_interleave(model.heads, dim=0)
        valid = valid & per_row.reshape(1, -1)
    model._codebook.update(flat, rows.clamp(min=0), valid)
