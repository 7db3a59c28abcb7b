"""Timing and memory measurement shared by the benchmark scripts (CUDA events; CPU fallback)."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Measurement:
    ms: float | None  # median wall time per call; None when it did not run (out of memory, error)
    peak_gib: float | None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, iters: int = 10) -> Measurement:
    """Median time of `fn()` and the peak memory it allocates above what was live before it ran."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    except torch.OutOfMemoryError:
        return Measurement(None, None, "out of memory")
    finally:
        gc.collect()
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Measurement(statistics.median(times), peak)


def step(module: torch.nn.Module, x: torch.Tensor, train: bool, ours: bool, grad: str = "sum") -> Callable[[], None]:
    """One eval forward (no gradient), or one training step: forward, then backward of `quantized.float().sum()`
    plus the aux loss where it has a gradient. hf_vq's output gives `quantized` and `loss`; a vqp tuple gives its
    first element and its last, which is the loss when it is a tensor with a gradient (FSQ's last is its
    indices).

    `grad="random"` backpropagates a fixed random gradient of the output's shape instead of the sum's (whose
    gradient is one value broadcast to every element: `nn.Linear`'s backward copies such a gradient before its
    products, which a dense gradient from a real loss does not need)."""
    if grad not in ("sum", "random"):
        raise ValueError(f"grad must be 'sum' or 'random', got {grad!r}")
    dense = {}

    def run():
        if not train:
            with torch.no_grad():
                module(x)
            return
        out = module(x.detach().requires_grad_())
        q, loss = (out.quantized, out.loss) if ours else (out[0], out[-1])
        outputs, grads = [q.float().sum() if grad == "sum" else q.float()], [None]
        if grad == "random":
            if "g" not in dense:
                dense["g"] = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(q.device)
            grads = [dense["g"]]
        if isinstance(loss, torch.Tensor) and loss.requires_grad:  # (ResidualVQ: one loss per level)
            outputs.append(loss.float().sum())
            grads.append(None)
        torch.autograd.backward(outputs, grads)

    return run


def fmt(value: float | None, spec: str = ".2f", missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def import_vqp():
    """vector-quantize-pytorch, which these comparisons need (a clear exit where it is missing)."""
    try:
        import vector_quantize_pytorch
    except ImportError as e:
        raise SystemExit(f"pip install vector-quantize-pytorch==1.32.0 to run the comparison ({e!r})") from e
    return vector_quantize_pytorch
