"""ResidualVQ's options beyond the plain residual loop (vector-quantize-pytorch 1.32 semantics): per-level codebook
sizes and the fraction of gradient a level passes back through the residual (`quant_grad_frac`).

Kept apart from `residual.py` so the loop there stays the one place for the residual algorithm; these are the
small, separately tested pieces it calls.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def _vqp_codebook_size(module) -> int | list[int]:
    """A vqp ResidualVQ's codebook size in config form: one int, or one per level when they differ."""
    sizes = [int(size) for size in module.codebook_sizes]
    return sizes[0] if len(set(sizes)) == 1 else sizes
