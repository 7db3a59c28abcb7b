"""Launch helpers shared by hf_vq's Triton kernels: whether a kernel may run, block sizes, warp counts.

Triton is optional: CPU installs and `HF_VQ_DISABLE_TRITON=1` use each op's PyTorch path. `TRITON_INTERPRET=1`
runs the kernels on the CPU through Triton's interpreter (how the tests check them without a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

try:
    import triton

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    HAS_TRITON = False

DISABLE_ENV = "HF_VQ_DISABLE_TRITON"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_NO_CONTEXT = contextlib.nullcontext()


def autocast_off(device_type: str, enabled: bool = True):
    """A context that turns autocast off on `device_type` for float32 arithmetic (when `enabled`): an autocast
    context only where autocast is on, else a shared no-op context (entering an autocast context costs more
    than most of a small call's ops)."""
    if enabled and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return _NO_CONTEXT


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_ok(x: Tensor, max_dim: int | None = None, *, as_custom_op: bool = False) -> bool:
    """Whether one of hf_vq's Triton kernels may serve `x`: triton installed, `HF_VQ_DISABLE_TRITON` unset, a float
    dtype, last dim at most `max_dim` (None: any), and CUDA (or the CPU interpreter). Under torch.compile only a
    kernel wrapped as a custom op (`as_custom_op`: dynamo sees one opaque op) serves; the others' PyTorch paths
    are what gets compiled."""
    if not HAS_TRITON or os.environ.get(DISABLE_ENV, "0") == "1":
        return False
    if torch.compiler.is_compiling() and not as_custom_op:
        return False
    if (max_dim is not None and x.shape[-1] > max_dim) or x.dtype not in KERNEL_DTYPES:
        return False
    return x.is_cuda or interpreting()


def padded_dim(dim: int, minimum: int = 16) -> int:
    """The power-of-two width of a tile that holds `dim` features (`tl.arange` needs a power of two; `tl.dot`
    needs at least 16)."""
    return max(minimum, triton.next_power_of_2(dim))


def row_blocks(n_rows: int, dim: int, elements: int = 4096) -> tuple[int, int, int]:
    """`(programs, rows per program, padded dim)` for a row-block kernel that keeps `elements` values of a block
    of whole rows on chip (at most 64 rows)."""
    block_d = padded_dim(dim)
    rows = max(1, min(64, elements // block_d))
    return triton.cdiv(n_rows, rows), rows, block_d


def row_warps(block_d: int) -> int:
    """Warps of a row-block program over padded dim `block_d` (`row_blocks`): 4, or 8 for rows wider than 256
    (more threads to share a wide row's reductions)."""
    return 4 if block_d <= 256 else 8


@functools.lru_cache(maxsize=None)
def shared_memory_bytes(device: torch.device | None = None) -> int:
    """Shared memory one program may use: the device's opt-in limit (227 KiB on Hopper), 100 KiB where it cannot
    be read (CPU interpreter). Read once per device."""
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        limit = getattr(props, "shared_memory_per_block_optin", 0)
        if limit:
            return int(limit)
    return 100 * 1024
