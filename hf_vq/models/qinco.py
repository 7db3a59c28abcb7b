"""Implicit neural codebooks for ResidualVQ (QINCo, Huijben et al., arXiv:2401.14732), with vector-quantize-pytorch
1.32's semantics and state-dict keys (`mlps.{i}.proj_in`, `mlps.{i}.layers.{j}.0` / `.2`).

Level `i > 0` does not search its codebook as stored: an MLP maps every code, conditioned on the sum of the codes
chosen by the levels before it, to a code for that token. So each token has its own `(K, d)` codebook at those
levels (memory `N x K x d` per level: inherent to the method). The codebooks are learned by gradient (the config
sets `learnable_codebook=True`, `ema_update=False`), dead codes can still be replaced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codebook import l2norm
from .vq_transformed import check_options, per_token_rows

MLP_FIELDS = ("dim_hidden", "depth")


def check_mlp_kwargs(mlp_kwargs) -> None:
    """ValueError unless `mlp_kwargs` is a dict of positive ints among `dim_hidden`, `depth`."""
    if not isinstance(mlp_kwargs, dict):
        raise ValueError(f"mlp_kwargs must be a dict, got {mlp_kwargs!r}")
    unknown = sorted(set(mlp_kwargs) - set(MLP_FIELDS))
    if unknown:
        raise ValueError(f"mlp_kwargs has unknown field(s) {unknown}; allowed: {list(MLP_FIELDS)}")
    for name, value in mlp_kwargs.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"mlp_kwargs[{name!r}] must be a positive int, got {value!r}")


def check_level_options(level_config) -> None:
    """The level options the implicit codebook levels do not implement (`vq_transformed.check_options`)."""
    check_options(level_config, "implicit_neural_codebook=True")


class QincoMLP(nn.Module):
    """QINCo's code MLP: `[condition, code] -> proj_in -> depth x (Linear, SiLU, Linear) residual blocks`
    (l2-normalized output for a cosine codebook)."""

    def __init__(self, dim: int, dim_hidden: int | None = None, depth: int = 4, l2norm_output: bool = False):
        super().__init__()
        hidden = dim_hidden if dim_hidden is not None else dim
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim)) for _ in range(depth))
        self.l2norm_output = l2norm_output

    def forward(self, codes: Tensor, condition: Tensor) -> Tensor:
        """`codes (K, d)`, `condition (..., d)` -> per-token codebooks `(..., K, d)`."""
        size = (*condition.shape[:-1], codes.shape[0], codes.shape[-1])
        x = torch.cat((condition.unsqueeze(-2).expand(size), codes.expand(size)), dim=-1)
        x = self.proj_in(x)
        for layer in self.layers:
            x = layer(x) + x
        return F.normalize(x, dim=-1) if self.l2norm_output else x


def _level_books(model, level: int, layer, condition: Tensor) -> Tensor:
    """Level `level`'s per-token codebooks `(..., K, d)` for the running sum `condition (..., d)`."""
    books = model.mlps[level - 1](layer._codebook.codes()[0], condition)
    return l2norm(books) if layer.use_cosine_sim else books


def _implicit_level(model, level: int, layer, residual: Tensor, condition: Tensor, mask: Tensor | None,
                    temperature: float | None, freeze_codebook: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One level `> 0` of the residual loop on `residual (b, n, d)` against its per-token codebooks (the level's
    MLP of its codes, conditioned on the running sum `condition`): what vqp 1.32's VectorQuantize computes with a
    `codebook_transform_fn` (`vq_transformed.per_token_rows`)."""
    b, n, d = residual.shape
    flat = residual.float().reshape(1, b * n, d)
    flat = l2norm(flat) if layer.use_cosine_sim else flat
    flat_mask = None if mask is None else mask.reshape(1, -1)
    cb = layer._codebook
    if not cb.is_initted():
        cb.init_from_kmeans(flat.detach(), flat_mask)
    if layer.affine_param:
        cb.update_affine(flat.detach(), flat_mask, layer.training)
    books = _level_books(model, level, layer, condition).reshape(1, b * n, -1, d)
    temperature = layer.sample_codebook_temp if temperature is None else temperature
    codes, indices, loss, _, _ = per_token_rows(layer, flat, books, flat_mask, temperature, freeze_codebook,
                                                residual.requires_grad, b)
    quantized = codes.reshape(b, n, d).to(residual.dtype)
    indices = indices.reshape(b, n)
    if mask is not None:
        fill = torch.zeros_like(residual) if layer.return_zeros_for_masked_padding else residual
        quantized = torch.where(mask.unsqueeze(-1), quantized, fill)
        indices = indices.masked_fill(~mask, -1)
    return quantized, indices, loss


def implicit_forward_levels(model, x: Tensor, mask: Tensor | None, dropout_cutoff: int | None,
                            level_kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """ResidualVQ's `(quantized, indices, per-level loss)` with implicit neural codebooks: level 0 as usual, each
    later level against its codebook transformed by its MLP, conditioned on the running sum of codes."""
    temperature = level_kwargs.get("sample_codebook_temp")
    freeze_codebook = bool(level_kwargs.get("freeze_codebook", False))
    residual = start = model.project_in(x)
    cutoff = model.num_quantizers - 1
    if model.uses_dropout():
        cutoff = dropout_cutoff if dropout_cutoff is not None else model.dropout_cutoff(x.device)
    quantized_out = torch.zeros_like(residual)
    all_indices, all_losses, inputs = [], [], []
    for level, layer in enumerate(model.layers):
        if level > cutoff:
            all_indices.append(torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device))
            all_losses.append(torch.zeros((), device=x.device))
            continue
        inputs.append(residual)
        if level == 0:
            quantized, indices, loss = model._run_level(level, layer, residual, mask, **level_kwargs)
        else:
            quantized, indices, loss = _implicit_level(model, level, layer, residual, quantized_out, mask,
                                                       temperature, freeze_codebook)
        residual = model._next_residual(residual, quantized)
        quantized_out = quantized_out + quantized
        all_indices.append(indices)
        all_losses.append(loss)
    model._finish_step(inputs, mask)
    quantized = model.project_out(model._output_codes(start, quantized_out))
    if mask is not None:
        fill = torch.zeros_like(quantized) if model.return_zeros_for_masked_padding else x
        quantized = torch.where(mask.unsqueeze(-1), quantized, fill)
    return quantized, torch.stack(all_indices, dim=-1), torch.stack(all_losses)


def implicit_codes_from_indices(model, indices: Tensor) -> Tensor:
    """`(num_quantizers, b, ..., d)` codes of `(b, ..., q)` indices (-1: dropped, zero code), level by level:
    each later level's codebook is transformed for the running sum of the codes before it."""
    codes, running = [], None
    for level, layer in enumerate(model.layers):
        idx = indices[..., level].long()
        safe = idx.clamp(min=0)
        if level == 0:
            code = layer.codebook[safe]
            running = torch.zeros_like(code)
        else:
            books = _level_books(model, level, layer, running)  # (b, ..., K, d)
            code = books.gather(-2, safe[..., None, None].expand(*safe.shape, 1, books.shape[-1])).squeeze(-2)
        running = running + code  # (vqp conditions on the dummy code of a dropped level: only dropped ones follow)
        codes.append(code.masked_fill((idx == -1).unsqueeze(-1), 0.0))
    return torch.stack(codes)


def vqp_implicit_codebook(module) -> dict:
    """The `implicit_neural_codebook` / `mlp_kwargs` config of a vqp 1.32 ResidualVQ."""
    if not getattr(module, "implicit_neural_codebook", False):
        return {}
    mlps = list(module.mlps)
    if not mlps:
        return dict(implicit_neural_codebook=True)
    first = mlps[0]
    return dict(implicit_neural_codebook=True,
                mlp_kwargs=dict(dim_hidden=first.layers[0][0].out_features, depth=len(first.layers)))
