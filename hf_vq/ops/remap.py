"""Index remapping of the taming / CogVideo sgm quantizers, written once for all of them.

A remap restricts a codebook of `n_e` codes to the `used` subset (loaded from a `.npy` file in sgm):
`remap_to_used` maps full indices to positions in `used` (unknown ones to `unknown_index`: an int, or
random), `unmap_to_all` maps back. A lookup table of size `n_e` replaces sgm's `(b, n, len(used))` match.
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


def remap_to_used(indices: Tensor, used: Tensor, num_codes: int, unknown_index, re_embed: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """Full-codebook indices to positions in `used`; indices not in `used` become `unknown_index`."""
    table = torch.full((num_codes,), -1, dtype=torch.long, device=indices.device)
    table[used.to(indices.device, torch.long)] = torch.arange(used.numel(), device=indices.device)
    new = table[indices.long()]
    unknown = new < 0
    if unknown_index == "random":
        fill = torch.randint(0, re_embed, (int(unknown.sum()),), generator=generator).to(indices.device)
        new[unknown] = fill
    else:
        new[unknown] = int(unknown_index)
    return new


def unmap_to_all(indices: Tensor, used: Tensor) -> Tensor:
    """Positions in `used` back to full-codebook indices (the "extra" index maps to `used[0]`, as sgm)."""
    indices = indices.long().clone()
    indices[indices >= used.numel()] = 0
    return used.to(indices.device, torch.long)[indices]
