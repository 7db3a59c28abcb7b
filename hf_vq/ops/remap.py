"""Index remapping of the taming / CogVideo sgm quantizers, written once for all of them.

A remap restricts a codebook of `n_e` codes to the `used` subset (loaded from a `.npy` file in sgm):
`remap_to_used` maps full indices to positions in `used` (unknown ones to `unknown_index`: an int, or
random in `[0, re_embed)`), `unmap_to_all` maps back. A lookup table of size `n_e` replaces sgm's
`(b, n, len(used))` match tensor; like sgm's `argmax` over that match, a duplicated entry of `used`
maps to its first position.
"""

from __future__ import annotations

import torch
from torch import Tensor


def resolve_unknown_index(unknown_index, num_used: int) -> tuple[int | str, int]:
    """`(unknown_index, re_embed)`: "extra" becomes index `num_used` and grows the vocabulary by one."""
    if unknown_index == "extra":
        return num_used, num_used + 1
    if unknown_index == "random" or (isinstance(unknown_index, int) and not isinstance(unknown_index, bool)):
        return unknown_index, num_used
    raise ValueError(f"unknown_index must be 'random', 'extra' or an int, got {unknown_index!r}")


def check_used(used: Tensor, num_codes: int) -> None:
    """`used` must be a non-empty 1-D list of codes in `[0, num_codes)`."""
    if used.ndim != 1 or used.numel() == 0:
        raise ValueError(f"remap: used indices must be a non-empty 1-D array, got shape {tuple(used.shape)}")
    if used.is_floating_point():
        raise ValueError(f"remap: used indices must be integers, got dtype {used.dtype}")
    if int(used.min()) < 0 or int(used.max()) >= num_codes:
        raise ValueError(f"remap: used indices must be in [0, {num_codes}), got range "
                         f"[{int(used.min())}, {int(used.max())}]")


def remap_to_used(indices: Tensor, used: Tensor, num_codes: int, unknown_index, re_embed: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """Full-codebook indices to positions in `used`; indices not in `used` become `unknown_index`."""
    used = used.to(indices.device, torch.long)
    positions = torch.arange(used.numel(), device=indices.device)
    # lowest position per code (first match, as sgm's argmax); codes not in `used` keep the sentinel
    table = torch.full((num_codes,), used.numel(), dtype=torch.long, device=indices.device)
    table.scatter_reduce_(0, used, positions, reduce="amin")
    new = table[indices.long()]
    unknown = new == used.numel()
    if unknown_index == "random":
        fill = torch.randint(0, re_embed, (int(unknown.sum()),), generator=generator)
        new[unknown] = fill.to(indices.device)
    else:
        new[unknown] = int(unknown_index)
    return new


def unmap_to_all(indices: Tensor, used: Tensor, re_embed: int) -> Tensor:
    """Positions in `used` back to full-codebook indices; the "extra" index (`len(used)`) maps to `used[0]`,
    as sgm does. Other positions outside `used` raise (sgm's gather fails on them too)."""
    used = used.to(indices.device, torch.long)
    indices = indices.long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= re_embed):
        raise ValueError(f"remapped indices must be in [0, {re_embed}), got range "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    return used[indices.masked_fill(indices >= used.numel(), 0)]
