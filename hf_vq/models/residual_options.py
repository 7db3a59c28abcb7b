"""ResidualVQ's options beyond the plain residual loop (vector-quantize-pytorch 1.32 semantics): per-level codebook
sizes, the fraction of gradient a level passes back through the residual (`quant_grad_frac`) and beam search.

Kept apart from `residual.py` so the loop there stays the one place for the residual algorithm; these are the
small, separately tested pieces it calls.
"""

from __future__ import annotations

import torch
from torch import Tensor


def level_overrides(config) -> dict:
    """Level options a ResidualVQ config imposes on every level, over its `vq_kwargs` (as vqp 1.32): a shared
    codebook is updated once per step by the wrapper; DiVeQ learns the codebooks by gradient alone."""
    overrides = {}
    if config.shared_codebook:
        overrides["manual_ema_update"] = True
    if config.implicit_neural_codebook:
        overrides.update(learnable_codebook=True, ema_update=False)
    if config.diveq:
        overrides.update(ema_update=False, learnable_codebook=True, route_gradients_to_input=False,
                         commitment_weight=0.0)
    return overrides


def level_codebook_sizes(codebook_size: int | list[int], num_quantizers: int) -> list[int]:
    """One codebook size per level: a list as given, an int repeated `num_quantizers` times."""
    if isinstance(codebook_size, (list, tuple)):
        return [int(size) for size in codebook_size]
    return [codebook_size] * num_quantizers


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_level_codebook_sizes(codebook_size, num_quantizers) -> None:
    """ValueError unless `num_quantizers` is a positive int and `codebook_size` a positive int or a list of one
    positive int per level."""
    if not _positive_int(num_quantizers):
        raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
    if isinstance(codebook_size, (list, tuple)):
        if len(codebook_size) != num_quantizers:
            raise ValueError(f"codebook_size lists {len(codebook_size)} sizes for {num_quantizers} levels "
                             "(num_quantizers): give one size per level")
        if not all(_positive_int(size) for size in codebook_size):
            raise ValueError(f"codebook_size must hold positive ints, got {list(codebook_size)!r}")
    elif not _positive_int(codebook_size):
        raise ValueError(f"codebook_size must be a positive int or a list of them, got {codebook_size!r}")


def check_quant_grad_frac(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"quant_grad_frac must be a number in [0, 1], got {value!r}")


def check_level_indices(indices: Tensor, sizes: list[int]) -> None:
    """ValueError unless every level's indices `(..., levels)` are -1 (dropped) or within that level's codebook."""
    if not indices.numel():
        return
    if indices.is_floating_point():
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    bounds = torch.tensor(sizes[: indices.shape[-1]], device=indices.device)
    if bool((indices < -1).any()) or bool((indices >= bounds).any()):
        limit = f"[0, {sizes[0]})" if len(set(sizes)) == 1 else f"[0, codebook_size) of their level (sizes {sizes})"
        raise ValueError(f"indices must be -1 (dropped) or in {limit}")


def frac_gradient(t: Tensor, frac: float) -> Tensor:
    """The value of `t`, with `frac` of its gradient (0: detached)."""
    if frac <= 0:
        return t.detach()
    return t * frac + t.detach() * (1.0 - frac)


def vqp_codebook_size(module) -> int | list[int]:
    """A vqp ResidualVQ's codebook size in config form: one int, or one per level when they differ."""
    sizes = [int(size) for size in module.codebook_sizes]
    return sizes[0] if len(set(sizes)) == 1 else sizes


# -- beam search -------------------------------------------------------------------------------------


def check_beam_options(beam_size, eval_beam_size, weights, num_quantizers) -> None:
    """ValueErrors naming the beam-search field that is not a positive int / a list of one weight per level."""
    for name, value in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
        if value is not None and not _positive_int(value):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if eval_beam_size is not None and beam_size is None:
        raise ValueError("eval_beam_size needs beam_size (the training beam) to be set, as vqp 1.32")
    if weights is not None:
        if not isinstance(weights, (list, tuple)) or len(weights) != num_quantizers:
            raise ValueError(f"beam_score_quantizer_weights must list one weight per level ({num_quantizers}), "
                             f"got {weights!r}")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise ValueError(f"beam_score_quantizer_weights must hold numbers, got {list(weights)!r}")


def _select(t: Tensor, chosen: Tensor) -> Tensor:
    """`t (b, n, J, ...)` at the beams `chosen (b, n, k)` -> `(b, n, k, ...)`."""
    index = chosen.view(*chosen.shape, *([1] * (t.ndim - 3))).expand(*chosen.shape, *t.shape[3:])
    return torch.gather(t, 2, index)


def _level_candidates(layer, residual: Tensor, mask: Tensor | None, beam: int, level_kwargs: dict):
    """The `beam` best codes of one level for every beam of every token: `residual (b, n, J, d)` ->
    quantized `(b, n, J, k, d)`, indices `(b, n, J, k)`, loss `(b, n, J, k)` (vqp's per-candidate loss plus the
    level's scalar terms; their sum ranks the candidates). The level sees the `J` beams as the sequence positions
    of `b * n` rows, as vqp 1.32's level does."""
    b, n, J, d = residual.shape
    rows_mask = None if mask is None else mask.reshape(-1, 1).expand(-1, J)
    out = layer(residual.reshape(b * n, J, d), mask=rows_mask, topk=beam, return_dict=True, **level_kwargs)
    k = out.indices.shape[-1]
    loss = out.loss.expand(b * n, J, k) if out.loss.ndim == 0 else out.loss
    return (out.quantized.view(b, n, J, k, d), out.indices.view(b, n, J, k), loss.reshape(b, n, J, k))


def beam_search_levels(model, residual: Tensor, mask: Tensor | None, cutoff: int, beam: int,
                       level_kwargs: dict) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """ResidualVQ's beam search (vqp 1.32): each level proposes its `beam` nearest codes for every kept beam;
    beams are ranked by the weighted sum of their levels' losses (lower is better) and the best `beam` kept, the
    best one after the last kept level (`cutoff`, quantize dropout). Returns the winning beam's quantized sum and
    indices `(b, n, d)`, `(b, n, levels)` (-1 for dropped levels), the per-level loss averaged over the (valid)
    tokens, and each kept level's input along the winning beam (for the codebook updates)."""
    b, n, d = residual.shape
    device = residual.device
    scores = residual.new_zeros(b, n, 1)
    residual, quantized_out = residual.unsqueeze(2), torch.zeros_like(residual).unsqueeze(2)
    inputs = residual.new_zeros(b, n, 1, 0, d)
    indices = torch.zeros(b, n, 1, 0, dtype=torch.long, device=device)
    losses = residual.new_zeros(b, n, 1, 0)
    weights = model.beam_score_weights
    for level, layer in enumerate(model.layers):
        if level > cutoff:
            continue
        inputs = torch.cat([inputs, residual.unsqueeze(3)], dim=3)
        quantized, level_indices, loss = _level_candidates(layer, residual, mask, beam, level_kwargs)
        J, k = level_indices.shape[2:]
        scores = (scores.unsqueeze(-1) - loss * weights[level]).reshape(b, n, J * k)
        residual = model._next_residual(residual.unsqueeze(3), quantized).reshape(b, n, J * k, d)
        quantized_out = (quantized_out.unsqueeze(3) + quantized).reshape(b, n, J * k, d)
        inputs = inputs.repeat_interleave(k, dim=2)
        indices = torch.cat([indices.repeat_interleave(k, dim=2), level_indices.reshape(b, n, J * k, 1)], dim=-1)
        losses = torch.cat([losses.repeat_interleave(k, dim=2), loss.reshape(b, n, J * k, 1)], dim=-1)
        keep = 1 if level == cutoff else beam
        if scores.shape[-1] > keep:
            scores, chosen = scores.topk(keep, dim=-1)
            residual, quantized_out = _select(residual, chosen), _select(quantized_out, chosen)
            inputs, indices, losses = _select(inputs, chosen), _select(indices, chosen), _select(losses, chosen)
    quantized_out, indices, losses, inputs = quantized_out[:, :, 0], indices[:, :, 0], losses[:, :, 0], inputs[:, :, 0]
    dropped = model.num_quantizers - indices.shape[-1]
    if dropped:
        indices = torch.cat([indices, indices.new_full((b, n, dropped), -1)], dim=-1)
        losses = torch.cat([losses, losses.new_zeros(b, n, dropped)], dim=-1)
    if mask is None:
        losses = losses.mean(dim=(0, 1))
    else:
        losses = losses.masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=(0, 1)) / mask.sum().clamp_min(1e-4)
    return quantized_out, indices, losses, list(inputs.unbind(dim=2))


def beam_search_forward(model, x: Tensor, mask: Tensor | None, dropout_cutoff: int | None, beam: int,
                        level_kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """ResidualVQ's `(quantized, indices, per-level loss)` of `(b, n, dim)` tokens by beam search, followed (in
    training, unless the codebook is frozen) by each kept level's codebook update along the winning beam. vqp 1.32
    updates only the first level there (its `[..., 0, :]` on the stacked level inputs picks level 0); hf_vq
    updates every level it ran, as the greedy loop does."""
    residual = start = model._prepare(model.project_in(x))
    cutoff = model.num_quantizers - 1
    if model.uses_dropout():
        cutoff = dropout_cutoff if dropout_cutoff is not None else model.dropout_cutoff(x.device)
    quantized, indices, loss, inputs = beam_search_levels(model, residual, mask, cutoff, beam, level_kwargs)
    if model.training and not level_kwargs.get("freeze_codebook", False):
        for level, (layer, level_input) in enumerate(zip(model.layers, inputs)):
            layer.update_ema_indices(level_input.detach(), indices[..., level], mask=mask)
    model._finish_step(inputs, mask)
    quantized = model.project_out(model._output_codes(start, quantized))
    if mask is not None:
        fill = torch.zeros_like(quantized) if model.return_zeros_for_masked_padding else x
        quantized = torch.where(mask.unsqueeze(-1), quantized, fill)
    return quantized, indices, loss
