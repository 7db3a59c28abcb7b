"""Host time per call: hf_vq vs vector-quantize-pytorch 1.32 on tiny inputs (Python + dispatcher cost).

    python benchmarks/host_time.py [--iters 200] [--rounds 5] [--clock thread|wall] [--threads 1]
                                   [--only SUBSTRING ...] [--modes eval train]

On a tiny input (2 x 8 tokens) the arithmetic is negligible, so the time of a call is what the host spends on it:
Python, module calls, argument checks and one dispatcher round trip per aten op. That is the time that bounds a
step on a fast GPU when the kernels are short. Both modules of a row are built from the same arguments (hf_vq
with its defaults, metadata input checks on) in one process, on one thread; the table gives the median over
`--iters` calls after warm-up (the lowest such median over `--rounds` rounds that alternate hf_vq and vqp;
by default the thread's CPU time, which a busy machine inflates less than wall time) of

- "eval": one forward under `torch.no_grad()` in eval mode;
- "train": forward + backward of `quantized.sum()` plus the aux loss, in train mode;

and the number of aten ops one call dispatches (forward and backward; counted by a `TorchDispatchMode`, so
composite ops count as the ops they decompose into, as the dispatcher runs them).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))

import hf_vq  # noqa: E402
from harness import import_vqp, step  # noqa: E402

vqp = import_vqp()


@dataclass
class Case:
    name: str
    build: Callable[[], tuple[torch.nn.Module, torch.nn.Module]]  # (hf_vq module, vqp module)
    shape: tuple[int, ...]


def _vq(**kw):
    return lambda: (hf_vq.VectorQuantize(**kw), vqp.VectorQuantize(**kw))


def _pair(ours: type, theirs: type, **kw):
    return lambda: (ours(**kw), theirs(**kw))


def cases() -> list[Case]:
    fsq6 = [8, 8, 8, 5, 5, 5]
    return [
        Case("VQ d4 K256", _vq(dim=4, codebook_size=256), (2, 8, 4)),
        Case("VQ d32 K1024", _vq(dim=32, codebook_size=1024), (2, 8, 32)),
        Case("VQ heads=8 separate d64 K256",
             _vq(dim=64, codebook_size=256, heads=8, separate_codebook_per_head=True), (2, 8, 64)),
        Case("VQ cosine d64 codebook_dim 32 K1024",
             _vq(dim=64, codebook_size=1024, use_cosine_sim=True, codebook_dim=32), (2, 8, 64)),
        Case("VQ image (b, d, h, w) d16 K256",
             _vq(dim=16, codebook_size=256, accept_image_fmap=True), (2, 16, 2, 4)),
        Case("ResidualVQ 4 x K256 d16",
             _pair(hf_vq.ResidualVQ, vqp.ResidualVQ, dim=16, num_quantizers=4, codebook_size=256), (2, 8, 16)),
        Case("GroupedResidualVQ groups 2, 4 x K256 d32",
             _pair(hf_vq.GroupedResidualVQ, vqp.GroupedResidualVQ, dim=32, groups=2, num_quantizers=4,
                   codebook_size=256), (2, 8, 32)),
        Case("FSQ [8,8,8,5,5,5] dim 64 (projections)", _pair(hf_vq.FSQ, vqp.FSQ, levels=fsq6, dim=64), (2, 8, 64)),
        Case("FSQ [8,8,8,5,5,5] no projections", _pair(hf_vq.FSQ, vqp.FSQ, levels=fsq6), (2, 8, 6)),
        Case("LFQ 2^10 dim 64 (projections)", _pair(hf_vq.LFQ, vqp.LFQ, codebook_size=2**10, dim=64), (2, 8, 64)),
        Case("LFQ 2^10 no projections", _pair(hf_vq.LFQ, vqp.LFQ, codebook_size=2**10, dim=10), (2, 8, 10)),
        # vqp 1.32 reads a rank-3 LatentQuantize input as (b, d, n): hf_vq gets channel_first=True for the same input
        Case("LatentQuantize [5,5,5,5] dim 64 (b, d, n)",
             lambda: (hf_vq.LatentQuantize(levels=[5, 5, 5, 5], dim=64, channel_first=True),
                      vqp.LatentQuantize(levels=[5, 5, 5, 5], dim=64)), (2, 64, 8)),
        Case("ResidualFSQ 4 x [8,5,5,5] dim 64",
             _pair(hf_vq.ResidualFSQ, vqp.ResidualFSQ, levels=[8, 5, 5, 5], num_quantizers=4, dim=64), (2, 8, 64)),
        Case("ResidualLFQ 4 x 2^10 dim 64",
             _pair(hf_vq.ResidualLFQ, vqp.ResidualLFQ, codebook_size=2**10, num_quantizers=4, dim=64), (2, 8, 64)),
        Case("GroupedResidualLFQ groups 2, 4 x 2^10 dim 64",
             _pair(hf_vq.GroupedResidualLFQ, vqp.GroupedResidualLFQ, codebook_size=2**10, groups=2,
                   num_quantizers=4, dim=64), (2, 8, 64)),
    ]


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], None]) -> int:
    """Aten ops one call dispatches (forward and the backward the autograd engine runs on this thread)."""
    with _OpCounter() as counter:
        fn()
    return counter.count


def _median_us(fn: Callable[[], None], iters: int, clock: Callable[[], float]) -> float:
    times = []
    for _ in range(iters):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) * 1e6


def host_us(fn_ours: Callable[[], None], fn_theirs: Callable[[], None], iters: int, rounds: int,
            clock: Callable[[], float]) -> tuple[float, float]:
    """Per side, the lowest over `rounds` alternating rounds of the median of `iters` calls: on a machine shared
    with other jobs a round can be slowed as a whole, and alternating keeps both sides under the same load."""
    for _ in range(10):
        fn_ours()
        fn_theirs()
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(_median_us(fn_ours, iters, clock))
        theirs.append(_median_us(fn_theirs, iters, clock))
    return min(ours), min(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="rows whose name contains one of these")
    parser.add_argument("--modes", nargs="*", default=["eval", "train"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread",
                        help="thread: this thread's CPU time (excludes waits for a core on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    print(f"# host time per call: hf_vq {hf_vq.__version__} vs vector-quantize-pytorch 1.32 | torch "
          f"{torch.__version__} | {platform.processor() or platform.machine()} | threads {torch.get_num_threads()}"
          f" | {args.clock} clock, lowest of {args.rounds} alternating rounds of the median of {args.iters} calls")
    print("| workload | mode | hf_vq us | vqp us | vqp / hf_vq | hf_vq aten ops | vqp aten ops |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for case in cases():
        if args.only and not any(s in case.name for s in args.only):
            continue
        for mode in args.modes:
            train = mode == "train"
            torch.manual_seed(0)
            ours, theirs = case.build()
            ours.train(train)
            theirs.train(train)
            x = torch.randn(case.shape)
            fn_ours, fn_theirs = step(ours, x, train, True), step(theirs, x, train, False)
            us_ours, us_theirs = host_us(fn_ours, fn_theirs, args.iters, args.rounds, clock)
            ops_ours, ops_theirs = count_ops(fn_ours), count_ops(fn_theirs)
            ratios.append(us_theirs / us_ours)
            print(f"| {case.name} | {mode} | {us_ours:.0f} | {us_theirs:.0f} | {us_theirs / us_ours:.2f}x | "
                  f"{ops_ours} | {ops_theirs} |", flush=True)
    if ratios:
        print(f"# worst vqp / hf_vq {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
