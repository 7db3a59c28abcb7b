"""The only code in hf_vq that talks to other processes.

Every function is a no-op in a single process. With a process group up (torch.distributed, as set up by
`accelerate launch` / Accelerate's `PartialState` or torchrun), they sum, broadcast and gather so codebook
state stays identical on every rank. Callers put every collective on a path that all ranks take.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def check_same_shapes(*tensors: Tensor) -> None:
    """Fail fast (instead of hanging in the big collective) when ranks disagree on shapes or dtypes."""
    if not is_distributed():
        return
    signature = [(tuple(t.shape), str(t.dtype)) for t in tensors]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, signature)
    if any(g != signature for g in gathered):
        raise RuntimeError(f"codebook sync: ranks hold different shapes/dtypes: {gathered}")


# Tensor layouts already checked against every rank, per process group. A quantizer's statistics have the same
# shapes on every step, so the check's two all-gathers run on its first step only (and again when a shape changes).
_checked_layouts: set[tuple] = set()


def _layout_key(tensors: tuple[Tensor, ...]) -> tuple:
    return (id(dist.group.WORLD), *((t.dtype, *t.shape) for t in tensors))


def _check_layouts(tensors: tuple[Tensor, ...]) -> None:
    """A tiny all-gather of every tensor's shape before the big collective: a rank whose codebook differs in
    shape fails with a clear error instead of hanging (or silently mixing mismatched buffers). Runs once per
    layout: every rank sees the same sequence of layouts when the configs agree, and a rank whose config differs
    meets a layout it has not checked on its first step, where every rank checks it."""
    key = _layout_key(tensors)
    if key in _checked_layouts:
        return
    dims = [d for t in tensors for d in (t.ndim, *t.shape)]
    local = torch.tensor([len(dims), *dims], dtype=torch.long, device=tensors[0].device)
    size = torch.tensor([local.numel()], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    padded = torch.full((int(max(sizes)),), -1, dtype=torch.long, device=local.device)
    padded[: local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        shapes = [tuple(t.shape) for t in tensors]
        raise RuntimeError(f"codebook sync: rank {rank()} holds tensors of shapes {shapes}, which differ from "
                           "another rank's; every rank must build the quantizer with the same config")
    _checked_layouts.add(key)


def all_reduce_sum_(*tensors: Tensor, shapes_agreed: bool = False) -> None:
    """Sum tensors across ranks in place with one collective (flattened into one buffer).

    The first time a layout (the tensors' shapes and dtypes) is reduced, every rank's shapes are compared first;
    `shapes_agreed=True` skips that for tensors whose shapes come from values the ranks already share (e.g. a
    count that was broadcast)."""
    if not is_distributed() or not tensors:
        return
    if not shapes_agreed:
        _check_layouts(tensors)
    if len(tensors) == 1 and tensors[0].dtype == torch.float32 and tensors[0].is_contiguous():
        dist.all_reduce(tensors[0])
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_mean_(*tensors: Tensor) -> None:
    """Average tensors across ranks in place (e.g. gradients before an optimizer step)."""
    if not is_distributed() or not tensors:
        return
    all_reduce_sum_(*tensors)
    torch._foreach_div_(list(tensors), world_size())


def all_reduce_sum(tensors: list[Tensor] | tuple[Tensor, ...], shapes_agreed: bool = False) -> list[Tensor]:
    """Sums of `tensors` across ranks, out of place, with one collective: float32 views of one flat buffer (the
    inputs keep this rank's values). The shape check runs as in `all_reduce_sum_`."""
    if not is_distributed() or not tensors:
        return [t.float() for t in tensors]
    if not shapes_agreed:
        _check_layouts(tuple(tensors))
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce sum whose backward passes the gradient to the local contribution: each rank then holds the
    gradient of the (identical) global loss with respect to its own data, which DDP averages as usual."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def differentiable_sum(tensor: Tensor) -> Tensor:
    """Sum of `tensor` over ranks, differentiable (identity in one process)."""
    return _SumAcrossRanks.apply(tensor) if is_distributed() else tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s value."""
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


def all_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's `n`, in rank order (`[n]` in one process)."""
    if not is_distributed():
        return [n]
    size = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def gather_variable(tensor: Tensor) -> Tensor:
    """Concatenate every rank's `(n_rank, ...)` tensor along dim 0 (ranks may hold different n, even 0):
    sizes first, then one padded all-gather, trimmed."""
    if not is_distributed():
        return tensor
    sizes = all_sizes(tensor.shape[0], tensor.device)
    padded = tensor.new_zeros(max(sizes), *tensor.shape[1:])
    padded[: tensor.shape[0]] = tensor
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


def assert_same_across_ranks(module: torch.nn.Module) -> None:
    """Debugging helper: raise if any rank's state (codebooks, EMA statistics, ...) differs from rank 0's,
    comparing one float64 checksum per tensor (all-gathered), and name the tensors that differ."""
    if not is_distributed():
        return
    state = module.state_dict()
    names = sorted(state)
    check_same_shapes(*(state[n] for n in names))
    device = next(iter(state.values())).device if state else torch.device("cpu")
    local = torch.stack([state[n].double().sum() + (state[n].double() ** 2).sum() for n in names]).to(device)
    gathered = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    bad = sorted({names[i] for g in gathered for i in torch.nonzero(g != gathered[0]).flatten().tolist()})
    if bad:
        raise RuntimeError(f"rank {rank()}: state differs across ranks for {bad}")
