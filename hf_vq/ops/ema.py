"""Codebook statistics for EMA updates and k-means (`hf_vq.ops.kmeans`): counts via `bincount`, sums via
`index_add_`; the EMA steps (those of a training step's plain codebook update and of the affine statistics as fixed
functions, `plain_ema_steps` / `affine_steps`, replayed as CUDA graphs on a GPU: `ops.graphs`); and the guard that
keeps non-finite statistics out of any state: `finite_flag` (on the device), `require_all_finite` (read now, raise
before a write) or `report_finite` (the update guarded on the device by the flag, the host told without waiting for
the GPU).

Never an N x K one-hot: memory is O(N + K*D).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import graphs


def code_counts(flat: Tensor, num_bins: int, weights: Tensor | None = None) -> Tensor:
    """float32 `bincount(flat, weights, minlength=num_bins)` for indices in `[0, num_bins)`. On CUDA by
    `index_add_`: `bincount` reads `max(flat)` back to the host (a sync per call); the sums are exact integers
    (or sums of 0/1 weights) below 2^24 either way, so the values are the same."""
    if flat.is_cuda:
        ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device) if weights is None else weights.float()
        return torch.zeros(num_bins, dtype=torch.float32, device=flat.device).index_add_(0, flat, ones)
    return torch.bincount(flat, weights=weights, minlength=num_bins).to(torch.float32)


def head_code_ids(indices: Tensor, num_codes: int) -> Tensor:
    """`(H, N)` codes to `(H * N,)` ids in one flat space (`head * K + code`), so a single bincount/index_add_
    serves every head."""
    if indices.shape[0] == 1:
        return indices.reshape(-1)
    return (indices + torch.arange(indices.shape[0], device=indices.device).unsqueeze(1) * num_codes).reshape(-1)


def cluster_stats(x: Tensor, indices: Tensor, num_codes: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-code counts and feature sums.

    Args:
        x: `(H, N, D)` or `(N, D)` features.
        indices: `(H, N)` or `(N,)` code index of each row.
        num_codes: K.
        mask: `(H, N)` / `(N,)` bool, rows to count (default all).

    Returns:
        counts `(H, K)` / `(K,)` and sums `(H, K, D)` / `(K, D)`, float32.
    """
    single = x.ndim == 2
    if single:
        x, indices = x.unsqueeze(0), indices.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    heads, _, dim = x.shape
    x = x.float()
    flat = head_code_ids(indices, num_codes)
    rows = x.reshape(-1, dim)
    weights = None
    if mask is not None:
        weights = mask.reshape(-1).to(x.dtype)
        rows = rows * weights.unsqueeze(1)
    counts = code_counts(flat, heads * num_codes, weights)
    sums = torch.zeros(heads * num_codes, dim, dtype=torch.float32, device=x.device).index_add_(0, flat, rows)
    counts, sums = counts.view(heads, num_codes), sums.view(heads, num_codes, dim)
    return (counts[0], sums[0]) if single else (counts, sums)


def ema_update_(moving: Tensor | tuple[Tensor, ...], new: Tensor | tuple[Tensor, ...], decay: float,
                weight: Tensor | None = None, finite: Tensor | None = None) -> None:
    """`moving <- decay * moving + (1 - decay) * new`, in place (lerp, as vector-quantize-pytorch); tuples update
    several buffers at once (one multi-tensor kernel on CUDA, the same lerp arithmetic).

    `weight` (`(K,)` or `(H, K)`) scales the step per code, as vqp's `ema_update_weight`. `finite` (a 0-dim bool
    tensor, `finite_flag` of the statistics): where it is False every buffer keeps its value exactly (the step
    moves each buffer towards itself), decided on the device."""
    moving = (moving,) if isinstance(moving, Tensor) else tuple(moving)
    new = tuple(n.to(m) for n, m in zip((new,) if isinstance(new, Tensor) else new, moving))
    if finite is not None:
        new = where_each(finite, new, moving)
    if weight is None:
        torch._foreach_lerp_(moving, new, 1.0 - decay)
        return
    for m, n in zip(moving, new):
        w = weight.to(m).expand(m.shape[:2])
        m.lerp_(n, (1.0 - decay) * w.reshape(*w.shape, *([1] * (m.ndim - 2))))


def write_if_(buffer: Tensor, value: Tensor, finite: Tensor | None) -> None:
    """`buffer <- value`, only where the 0-dim bool `finite` is True (decided on the device; always when None)."""
    buffer.copy_(value if finite is None else torch.where(finite, value, buffer))


def decay_into_(buffer: Tensor, new: Tensor, decay: float, finite: Tensor | None = None) -> None:
    """`buffer <- buffer * decay + new * (1 - decay)` in CogVideo sgm's arithmetic (`mul_(decay).add_(new, alpha)`),
    written only where `finite` is True (`write_if_`)."""
    write_if_(buffer, torch.add(buffer * decay, new, alpha=1 - decay), finite)


def decay_from_first_(buffer: Tensor, needs_init: Tensor, new: Tensor, decay: float, finite: Tensor) -> None:
    """vqp's `update_with_decay`: `buffer <- new` while the bool `needs_init` is True (then cleared), else `buffer *
    decay + new * (1 - decay)`; nothing written where the 0-dim bool `finite` is False. Decided on the device."""
    write_if_(buffer, torch.where(needs_init, new, buffer * decay + new * (1 - decay)), finite)
    needs_init.logical_and_(finite.logical_not())


def codebooks_from_ema_(cluster_sizes: list[Tensor], embed_avgs: list[Tensor], embeds: list[Tensor],
                        eps: float, *, normalize: bool = False, finite: Tensor | None = None) -> None:
    """`embed <- embed_avg / smoothed cluster size` for several codebooks at once (each `(H, K)` sizes, `(H, K, d)`
    averages and codebooks, all of one shape), with vqp's Laplace smoothing `(c + eps) / (sum c + K eps) * sum c`
    of the sizes; `normalize`: each code then l2-normalized (the cosine codebook). Where the 0-dim bool `finite`
    is False the codebooks keep their values (see `ema_update_`)."""
    sizes = torch.stack(cluster_sizes) if len(cluster_sizes) > 1 else cluster_sizes[0].unsqueeze(0)
    total = sizes.sum(dim=-1, keepdim=True)
    smoothed = (laplace_smoothing(sizes, sizes.shape[-1], eps, total) * total).unsqueeze(-1)
    new = torch._foreach_div(embed_avgs, list(smoothed.unbind(0)))
    if normalize:
        new = [F.normalize(n, p=2, dim=-1, eps=1e-6) for n in new]
    if finite is not None:
        new = where_each(finite, new, embeds)
    torch._foreach_copy_(embeds, new)


def where_each(condition: Tensor, a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """`[torch.where(condition, x, y) for x, y in zip(a, b)]` for a 0-dim bool `condition`, with one `where` per
    shape among the tensors (same-shaped ones stacked), not one per tensor: the launches of a guarded update of
    many codebooks (residual levels, groups) stay few."""
    out: list[Tensor | None] = [None] * len(a)
    by_shape: dict[tuple, list[int]] = {}
    for i, x in enumerate(a):
        by_shape.setdefault((tuple(x.shape), x.dtype), []).append(i)
    for ids in by_shape.values():
        if len(ids) == 1:
            out[ids[0]] = torch.where(condition, a[ids[0]], b[ids[0]])
            continue
        chosen = torch.where(condition, torch.stack([a[i] for i in ids]), torch.stack([b[i] for i in ids]))
        for i, x in zip(ids, chosen.unbind(0)):
            out[i] = x
    return out


def laplace_smoothing(counts: Tensor, num_codes: int, eps: float, total: Tensor | None = None) -> Tensor:
    """Additive smoothing of code counts along the last dim: `(c + eps) / (sum c + K eps)` (`total`: the sum, when
    the caller has it)."""
    total = counts.sum(dim=-1, keepdim=True) if total is None else total
    return (counts + eps) / (total + num_codes * eps)


def refusal(what: str) -> str:
    """The message of the `ValueError` for non-finite statistics `what`, raised before they reach any state."""
    return f"the batch had NaN or Inf values ({what}); the codebook state was not updated"


def require_finite(stats: Tensor, what: str) -> None:
    """`require_all_finite([stats], what)`."""
    require_all_finite([stats], what)


def require_all_finite(stats: list[Tensor], what: str) -> None:
    """Raise `ValueError` when a tensor of `stats` (a state update's batch statistics: per-code sums, a k-means
    sample, affine moments) holds NaN or Inf, so the caller can stop before writing them into any buffer: one host
    read of `finite_flag`; inside a compiled graph an assert op instead (it raises when it runs)."""
    finite = finite_flag(stats)
    if torch.compiler.is_compiling():
        torch._assert_async(finite, refusal(what))
    elif not bool(finite):
        raise ValueError(refusal(what))


def finite_flag(stats: list[Tensor]) -> Tensor:
    """0-dim bool tensor, on the statistics' device: whether every entry of every tensor in `stats` is finite (the
    largest absolute entry is: NaN propagates through the max, and a max cannot overflow). No host read."""
    filled = [t for t in stats if t.numel()]  # (an empty tensor has no max; it has no bad entry either)
    if not filled:
        return torch.ones((), dtype=torch.bool, device=stats[0].device)
    stats = filled
    if len(stats) == 1:
        return torch.isfinite(torch.linalg.vector_norm(stats[0], float("inf")))
    return torch.isfinite(torch.stack(torch._foreach_norm(stats, float("inf")))).all()


class PendingCheck:
    """A `finite_flag` on its way to the host: from a GPU copied to pinned memory without waiting for it, read by
    `raise_if_failed` (which waits only if the copy has not landed yet, then raises once for a False flag).

    One error per bad batch: a batch's NaN reaches every codebook after the first (residual levels, affine and EMA
    statistics), so once a check raises, every check made before that moment is settled unread."""

    _made = itertools.count()
    _settled_below = 0  # checks numbered below this are not read any more

    def __init__(self, finite: Tensor, what: str):
        self.number = next(PendingCheck._made)
        self.landed = None
        if finite.is_cuda:
            self.flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.flag.copy_(finite, non_blocking=True)
            self.landed = torch.cuda.Event()
            self.landed.record()
        else:
            self.flag = finite.clone()
        self.what, self.read = what, False

    def __getstate__(self) -> dict:
        """A copy (`copy.deepcopy` or pickling of a model) holds the flag itself, read once it has landed (a CUDA
        event cannot be copied)."""
        if self.landed is not None:
            self.landed.synchronize()
        return {**self.__dict__, "flag": self.flag.detach().cpu().clone(), "landed": None}

    def raise_if_failed(self) -> None:
        if self.read or self.number < PendingCheck._settled_below:
            return
        if self.landed is not None:
            self.landed.synchronize()
        self.read = True
        if not bool(self.flag):
            PendingCheck._settled_below = next(PendingCheck._made)
            raise ValueError(f"an earlier call's batch had NaN or Inf values ({self.what}); the codebook state was "
                             "not updated by it")


def report_finite(finite: Tensor, what: str) -> PendingCheck | None:
    """Tell the host about `finite` (`finite_flag` of statistics whose update the device guarded with it): on the
    CPU a `ValueError` now when it is False; on a GPU a `PendingCheck` for the next update of the same kind to read,
    so the call does not wait for the GPU; inside a compiled graph an assert op."""
    if torch.compiler.is_compiling():
        torch._assert_async(finite, refusal(what))
        return None
    if finite.is_cuda:
        return PendingCheck(finite, what)
    if not bool(finite):
        raise ValueError(refusal(what))
    return None


def plain_ema_steps(inputs: list[Tensor], state: list[Tensor], groups: tuple, guard: bool) -> list[Tensor]:
    """The plain EMA updates of several codebooks (`models.codebook.apply_updates`): `inputs` are every codebook's
    counts, then every codebook's sums; `state` each codebook's `cluster_size`, `embed_avg`, `embed`; `groups` a
    `(codebook ids, decay, eps, normalize)` per kind of codebook. With `guard` written only where the sums are
    finite, and `[finite_flag]` returned (else `[]`). Replayed as one CUDA graph on a GPU (`PLAIN_EMA_STEPS`)."""
    n = len(inputs) // 2
    finite = finite_flag(inputs[n:]) if guard else None
    for ids, decay, eps, normalize in groups:
        sizes, avgs, embeds = ([state[3 * i + j] for i in ids] for j in range(3))
        ema_update_((*sizes, *avgs), (*(inputs[i] for i in ids), *(inputs[n + i] for i in ids)), decay,
                    finite=finite)
        codebooks_from_ema_(sizes, avgs, embeds, eps, normalize=normalize, finite=finite)
    return [finite] if guard else []


PLAIN_EMA_STEPS = graphs.GraphedUpdate(plain_ema_steps)


def affine_steps(inputs: list[Tensor], state: list[Tensor], training: bool, batch_decay: float,
                 codebook_decay: float) -> list[Tensor]:
    """A codebook's affine statistics (`models.codebook.Codebook.update_affine`) from the batch moments `inputs`
    (mean, variance): `state` holds `batch_mean`, `batch_variance`, `codebook_mean`, `codebook_variance`, each
    followed by its `_needs_init` flag, then the codebook, whose moments are taken too in `training`. Each with
    vqp's first-value rule (`decay_from_first_`), only where the batch moments are finite; returns
    `[finite_flag]`. Replayed as one CUDA graph on a GPU (`AFFINE_STEPS`)."""
    mean, var = inputs
    batch_mean, batch_mean_new, batch_var, batch_var_new, code_mean, code_mean_new, code_var, code_var_new = state[:8]
    embed = state[8]
    finite = finite_flag([mean, var])
    if training:
        decay_from_first_(code_mean, code_mean_new, embed.mean(dim=1, keepdim=True), codebook_decay, finite)
        decay_from_first_(code_var, code_var_new, embed.var(dim=1, unbiased=False, keepdim=True), codebook_decay,
                          finite)
    decay_from_first_(batch_mean, batch_mean_new, mean, batch_decay, finite)
    decay_from_first_(batch_var, batch_var_new, var, batch_decay, finite)
    return [finite]


AFFINE_STEPS = graphs.GraphedUpdate(affine_steps)
