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


# -- the model's hot path: per-dimension constants built once, one pass per elementwise step ------------------


def bound_table(levels: list[int], *, hard_clamp: bool, symmetric: bool, repeat: int = 1, eps: float = 1e-3,
                device=None) -> Tensor:
    """`(4, repeat * len(levels))` float32 constants of `fsq_quantize` / `fsq_quantize_symmetric` per feature
    (the levels tiled `repeat` times, one copy per codebook), by those ops' own formulas so that
    `bound_and_round` rounds the same values:

    - `fsq_quantize`: the shift inside the bound, `half_l`, `offset`, `L // 2`;
    - `fsq_quantize_symmetric`: `L - 1`, `2 / (L - 1)`, and two unused rows."""
    lv = torch.tensor(list(levels) * repeat, dtype=torch.int32, device=device)
    if symmetric:
        lm1 = lv - 1
        rows = (lm1, 2.0 / lm1, torch.zeros_like(lm1), torch.zeros_like(lm1))
    else:
        half_l = (lv - 1) * (1 + eps) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0).to(lv.device)
        shift = offset / half_l if hard_clamp else torch.atanh(offset / half_l)
        rows = (shift, half_l, offset, lv // 2)
    return torch.stack([row.float() for row in rows])


def bound_and_round(z: Tensor, table: Tensor, *, hard_clamp: bool, symmetric: bool) -> tuple[Tensor, Tensor]:
    """`(codes, level)` of float32 `z (..., W)` with `table` from `bound_table` (W columns): the normalized codes
    of `fsq_quantize` (or `fsq_quantize_symmetric`), straight-through when `z` requires grad, and each feature's
    level in `[0, L)` as an exact float (the digit of the index in the mixed radix).

    The same arithmetic in the same order as those ops. Without autograd the steps run in place on one buffer."""
    if symmetric:
        return _symmetric(z, table[0], table[1], hard_clamp)
    return _asymmetric(z, table[0], table[1], table[2], table[3], hard_clamp)


def _asymmetric(z: Tensor, shift: Tensor, half_l: Tensor, offset: Tensor, half_width: Tensor,
                hard_clamp: bool) -> tuple[Tensor, Tensor]:
    # tanh(z + shift) * half_l - offset (or the clamp), rounded half to even, over L // 2
    if not (z.requires_grad and torch.is_grad_enabled()):
        bounded = z + shift
        bounded = bounded.clamp_(-1.0, 1.0) if hard_clamp else bounded.tanh_()
        rounded = bounded.mul_(half_l).sub_(offset).round_()
        return rounded / half_width, rounded.add_(half_width)
    bounded = z + shift
    bounded = (clamp_unit(bounded) if hard_clamp else bounded.tanh()) * half_l - offset
    rounded = bounded.detach().round()
    # (x + (round(x) - x) is round(x) exactly: the difference is exact for |x| >= 0.5 and trivially below)
    return round_ste_from(bounded, rounded) / half_width, rounded.add_(half_width)


def _symmetric(z: Tensor, lm1: Tensor, step: Tensor, hard_clamp: bool) -> tuple[Tensor, Tensor]:
    # 2 / (L - 1) * floor((L - 1) * (squash(z) + 1) / 2 + 1/2) - 1
    if not (z.requires_grad and torch.is_grad_enabled()):
        level = z.clamp(-1.0, 1.0) if hard_clamp else z.tanh()
        level = level.add_(1.0).mul_(lm1).div_(2.0).add_(0.5).floor_()
        return torch.mul(step, level).sub_(1.0), level
    squashed = clamp_unit(z) if hard_clamp else z.tanh()
    scaled = lm1.to(z.dtype) * (squashed + 1) / 2.0 + 0.5  # in z's dtype, as the in-place steps above (and vqp)
    level = scaled.detach().floor()
    return step * round_ste_from(scaled, level) - 1.0, level


class _UnitClamp(torch.autograd.Function):
    """`z.clamp(-1, 1)` with clamp's gradient (1 on [-1, 1], both ends included, else 0) taken through a float
    mask: clamp's own backward selects through bool masks, several times slower than elementwise ops on CPU."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return z.clamp(-1.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad * torch.le(z.abs(), 1.0, out=torch.empty_like(z, dtype=grad.dtype))


def clamp_unit(z: Tensor) -> Tensor:
    """`z.clamp(-1, 1)`, differentiable as clamp (`_UnitClamp`)."""
    return _UnitClamp.apply(z)


def round_ste_from(x: Tensor, rounded: Tensor) -> Tensor:
    """`rounded` (a rounding of `x`, computed without autograd) with the straight-through gradient of `x`."""
    return x + (rounded - x).detach()


def level_digits_to_indices(level: Tensor, basis: Tensor, codebook_size: int) -> Tensor:
    """`(..., C, d)` per-feature levels (exact floats, or integers) to `(..., C)` int32 mixed-radix indices.

    On CPU, for float32 levels, a float32 matrix-vector product with the basis when every partial sum is an integer
    below 2**24 (exact in any order) and matmuls run in full float32 (bf16, under autocast or a lower matmul
    precision, would round the products): one pass, where a sum over a trailing axis of a few elements is a slow
    reduction there. (On CUDA, where TF32 is a separate switch, and under torch.compile, which fuses it, the
    integer sum, cast to int32 inside the reduction.)"""
    if (not torch.compiler.is_compiling() and level.device.type == "cpu" and level.dtype == torch.float32
            and codebook_size <= 2**24 and not torch.is_autocast_enabled("cpu")
            and torch.get_float32_matmul_precision() == "highest"):
        return torch.matmul(level, basis.to(level.dtype)).to(torch.int32)
    return (level.long() * basis).sum(-1, dtype=torch.int32)


def residual_fsq(x: Tensor, scales: Tensor, table: Tensor, basis: Tensor, codebook_size: int, *,
                 hard_clamp: bool) -> tuple[Tensor, Tensor]:
    """ResidualFSQ's levels (vqp 1.32 semantics) in one call: `(quantized, int32 indices (..., Q))` of
    `x (..., d)` (the projected, soft-clamped input) through Q symmetric FSQ levels, level `i` quantizing
    `residual / scales[i]` and contributing its codes times `scales[i]`; `quantized` is the sum of the levels'
    contributions, straight-through to `x` when `x` requires grad (each level's input is `x` minus the detached
    earlier contributions, as the per-level loop).

    `scales (Q, d)` float32 (`levels ** -i`), `table` from `bound_table(levels, symmetric=True, ...)`, `basis`
    from `fsq_tables`. This is the PyTorch reference of `triton_fsq.residual_fsq_fused`, the same arithmetic as
    calling each level's `FSQ` forward in turn."""
    residual, quantized, indices = x, None, []
    for scale in scales:
        codes, level = bound_and_round(residual / scale, table, hard_clamp=hard_clamp, symmetric=True)
        contribution = codes * scale
        indices.append(level_digits_to_indices(level, basis, codebook_size))
        residual = residual - contribution.detach()
        quantized = contribution if quantized is None else quantized + contribution
    return quantized, torch.stack(indices, dim=-1)
