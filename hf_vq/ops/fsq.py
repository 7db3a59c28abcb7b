"""Finite scalar quantization ops (FSQ, https://arxiv.org/abs/2309.15505): bounding, rounding, index packing.

Stateless: `levels` and `basis` are int tensors built by `fsq_tables`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_ste(z: Tensor) -> Tensor:
    """Round with a straight-through gradient."""
    return z + (z.round() - z).detach()


def floor_ste(z: Tensor) -> Tensor:
    """Floor with a straight-through gradient."""
    return z + (z.floor() - z).detach()


def fsq_tables(levels: list[int], device=None) -> tuple[Tensor, Tensor]:
    """`(levels, basis)` int32 tensors; `basis` is the mixed-radix place value of each dimension."""
    lv = torch.tensor(levels, dtype=torch.int32, device=device)
    basis = torch.cumprod(torch.tensor([1] + list(levels[:-1]), device=device), dim=0).to(torch.int32)
    return lv, basis


def fsq_quantize(z: Tensor, levels: Tensor, *, hard_clamp: bool = False, eps: float = 1e-3) -> Tensor:
    """Bound each dim to `levels` values, round (straight-through) and renormalize to [-1, 1]."""
    half_l = (levels - 1) * (1 + eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(z.device)
    if hard_clamp:
        # same shift as the tanh branch (linear here, tanh is the identity near 0), as vqp 1.32
        bounded = (z + offset / half_l).clamp(-1.0, 1.0) * half_l - offset
    else:
        bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    return round_ste(bounded) / (levels // 2)


def fsq_quantize_symmetric(z: Tensor, levels: Tensor, *, hard_clamp: bool = False) -> Tensor:
    """Symmetry-preserving quantization (arXiv:2411.19842 sec. 3.2): `2/(L-1) * floor((L-1)(tanh z + 1)/2 + 1/2) - 1`."""
    squashed = z.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(z)
    lm1 = levels - 1
    return (2.0 / lm1) * floor_ste(lm1 * (squashed + 1) / 2.0 + 0.5) - 1.0


def codes_to_level_indices(codes: Tensor, levels: Tensor, symmetric: bool = False) -> Tensor:
    """Normalized codes in [-1, 1] to per-dimension integer levels in [0, L)."""
    if symmetric:
        return (codes + 1.0) / (2.0 / (levels - 1))
    half_width = levels // 2
    return codes * half_width + half_width


def level_indices_to_codes(level_indices: Tensor, levels: Tensor, symmetric: bool = False) -> Tensor:
    """Inverse of `codes_to_level_indices`."""
    if symmetric:
        return level_indices * (2.0 / (levels - 1)) - 1.0
    half_width = levels // 2
    return (level_indices - half_width) / half_width


def codes_to_indices(codes: Tensor, levels: Tensor, basis: Tensor, symmetric: bool = False) -> Tensor:
    """`(..., d)` codes to `(...)` int32 indices into the implicit codebook (mixed radix)."""
    return (codes_to_level_indices(codes, levels, symmetric) * basis).sum(dim=-1).round().to(torch.int32)


def indices_to_level_indices(indices: Tensor, levels: Tensor, basis: Tensor) -> Tensor:
    """`(...)` indices to `(..., d)` per-dimension levels."""
    return (indices.unsqueeze(-1) // basis) % levels


def indices_to_codes(indices: Tensor, levels: Tensor, basis: Tensor, symmetric: bool = False) -> Tensor:
    """`(...)` indices to `(..., d)` normalized codes."""
    return level_indices_to_codes(indices_to_level_indices(indices, levels, basis), levels, symmetric)
