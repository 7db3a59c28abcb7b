"""Scalar quantizers (FSQ, LFQ, LatentQuantize, ResidualFSQ, ResidualLFQ) vs vector-quantize-pytorch 1.32 on CPU.

    python benchmarks/bench_scalar_cpu.py [--threads 2] [--repeat 7] [--rounds 3] [--tokens 65536]
                                          [--only SUBSTRING ...] [--no-check] [--device cpu|cuda] [--grad sum|random]

Both modules of a row are built with the same config in one process and run on the same input; the table gives each
side's lowest median wall time of `--repeat` calls after warm-up over `--rounds` rounds alternating the two sides
(CUDA events on a GPU), the ratio vqp / hf_vq (above 1: hf_vq is faster) and, on a GPU, the peak memory above the
input. "eval" is one forward under `torch.no_grad()` in eval mode; "train" is forward + backward of
`quantized.sum()` (plus the aux loss) in train mode, or with `--grad random` of a fixed random gradient of the
output's shape (as a real loss gives).
hf_vq runs with its default `check_inputs=True` unless `--no-check` is given. `--clock process` times CPU rows
by the process's CPU time instead of wall time: on a machine shared with other jobs, wall-time medians pick up
waits for a core, while the CPU time of each call (summed over its threads) stays the work it did.

LatentQuantize: vqp 1.32 reads a rank-3 input as `(b, d, n)`, so both get `(b, d, n)` (hf_vq with
`channel_first=True`).
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

sys.path.insert(0, os.path.dirname(__file__))

import hf_vq  # noqa: E402
from harness import Measurement, import_vqp, measure, step  # noqa: E402

vqp = import_vqp()


@dataclass
class Case:
    name: str
    build: Callable[[bool], tuple[torch.nn.Module, torch.nn.Module]]  # check_inputs -> (hf_vq module, vqp module)
    shape: tuple[int, ...]


def _tokens(n: int, d: int) -> tuple[int, ...]:
    """`(b, n, d)` with rows of at most 4096 tokens."""
    per = min(n, 4096)
    return (max(1, n // per), per, d)


def _channel_first(n: int, d: int) -> tuple[int, ...]:
    per = min(n, 4096)
    return (max(1, n // per), d, per)


def cases(n: int) -> list[Case]:
    fsq6 = [8, 8, 8, 5, 5, 5]
    rows = [
        Case("FSQ [8,8,8,5,5,5] dim 256 (projections)",
             lambda ck: (hf_vq.FSQ(levels=fsq6, dim=256, check_inputs=ck), vqp.FSQ(levels=fsq6, dim=256)),
             _tokens(n, 256)),
        Case("FSQ [8,8,8,5,5,5] no projections",
             lambda ck: (hf_vq.FSQ(levels=fsq6, check_inputs=ck), vqp.FSQ(levels=fsq6)), _tokens(n, 6)),
        Case("FSQ [8,5,5,5] dim 64 image (b, d, h, w)",
             lambda ck: (hf_vq.FSQ(levels=[8, 5, 5, 5], dim=64, check_inputs=ck), vqp.FSQ(levels=[8, 5, 5, 5], dim=64)),
             (max(1, n // 4096), 64, 64, 64)),
        Case("ResidualFSQ 4 x [8,5,5,5] dim 256",
             lambda ck: (hf_vq.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=256, check_inputs=ck),
                         vqp.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=256)), _tokens(n, 256)),
        Case("ResidualFSQ 4 x [8,5,5,5] no projections",
             lambda ck: (hf_vq.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=4, check_inputs=ck),
                         vqp.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=4)), _tokens(n, 4)),
        Case("ResidualLFQ 4 x 2^10 dim 256",
             lambda ck: (hf_vq.ResidualLFQ(dim=256, num_quantizers=4, codebook_size=2**10, check_inputs=ck),
                         vqp.ResidualLFQ(dim=256, num_quantizers=4, codebook_size=2**10)), _tokens(n, 256)),
        Case("ResidualLFQ 4 x 2^10 no projections",
             lambda ck: (hf_vq.ResidualLFQ(dim=10, num_quantizers=4, codebook_size=2**10, check_inputs=ck),
                         vqp.ResidualLFQ(dim=10, num_quantizers=4, codebook_size=2**10)), _tokens(n, 10)),
        Case("LatentQuantize [5,5,5,5] dim 64",
             lambda ck: (hf_vq.LatentQuantize(levels=[5, 5, 5, 5], dim=64, channel_first=True, check_inputs=ck),
                         vqp.LatentQuantize(levels=[5, 5, 5, 5], dim=64)), _channel_first(n, 64)),
        Case("LatentQuantize [5,5,5,5] no projections",
             lambda ck: (hf_vq.LatentQuantize(levels=[5, 5, 5, 5], channel_first=True, check_inputs=ck),
                         vqp.LatentQuantize(levels=[5, 5, 5, 5], dim=4)), _channel_first(n, 4)),
        Case("LFQ 2^16 codes (no projections)",
             lambda ck: (hf_vq.LFQ(codebook_size=2**16, dim=16, check_inputs=ck),
                         vqp.LFQ(codebook_size=2**16, dim=16)), _tokens(n, 16)),
        Case("LFQ 2^10 codes dim 256 (projections)",
             lambda ck: (hf_vq.LFQ(codebook_size=2**10, dim=256, check_inputs=ck),
                         vqp.LFQ(codebook_size=2**10, dim=256)), _tokens(n, 256)),
        Case("LFQ 2^18 video (b, 18, 5, h, w)",
             lambda ck: (hf_vq.LFQ(codebook_size=2**18, dim=18, check_inputs=ck),
                         vqp.LFQ(codebook_size=2**18, dim=18)), (1, 18, 5, 32, max(1, n // 5120 * 32))),
    ]
    return rows


# training steps too large for vqp's N x 2^C entropy matrices (every device), and LFQ-family training steps that
# take vqp seconds per call on CPU (run them with --lfq-train)
_EVAL_ONLY = ("LFQ 2^16", "LFQ 2^18")
_SLOW_VQP_TRAIN_ON_CPU = ("LFQ", "ResidualLFQ")


def _measure_cpu_time(fn: Callable[[], None], iters: int) -> Measurement:
    """Median CPU time of `fn()` in this process (all threads), after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return Measurement(statistics.median(times), None)


def _alternating(timer: Callable, ours: Callable[[], None], theirs: Callable[[], None],
                 rounds: int) -> tuple[Measurement, Measurement]:
    """Each side's lowest median over `rounds` rounds that alternate the two sides, so neither pays alone for what
    the first calls of a process cost (first-touch page faults of new buffers, thread-pool start)."""
    runs = [[timer(ours), timer(theirs)] for _ in range(rounds)]
    return tuple(min((r[i] for r in runs), key=lambda m: float("inf") if m.ms is None else m.ms) for i in (0, 1))


def _copy_projections(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    for name in ("project_in", "project_out"):
        a, b = getattr(ours, name, None), getattr(theirs, name, None)
        if isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear):
            a.load_state_dict(b.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the two sides; lowest median")
    parser.add_argument("--tokens", type=int, default=2**16)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--no-check", action="store_true", help="hf_vq with check_inputs=False")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="*", default=["eval", "train"])
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    parser.add_argument("--lfq-train", action="store_true", help="also time LFQ-family training steps on CPU")
    parser.add_argument("--grad", choices=("sum", "random"), default="sum",
                        help="training steps backpropagate quantized.sum() or a fixed random gradient (harness.step)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# hf_vq {hf_vq.__version__} vs vector-quantize-pytorch 1.32 | torch {torch.__version__} | "
          f"{platform.processor() or platform.machine()} | {device} | threads {torch.get_num_threads()} | "
          f"lowest of {args.rounds} medians of {args.repeat} | {args.clock} clock | "
          f"check_inputs={not args.no_check} | grad {args.grad}")
    print("| workload | mode | tokens | hf_vq ms | vqp ms | vqp / hf_vq | hf_vq peak GiB | vqp peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for case in cases(args.tokens):
        if args.only and not any(s in case.name for s in args.only):
            continue
        for mode in args.modes:
            train = mode == "train"
            if train and (case.name.startswith(_EVAL_ONLY) or (
                    device.type == "cpu" and not args.lfq_train and case.name.startswith(_SLOW_VQP_TRAIN_ON_CPU))):
                continue
            torch.manual_seed(0)
            ours, theirs = case.build(not args.no_check)
            _copy_projections(ours, theirs)
            ours.to(device).train(train)
            theirs.to(device).train(train)
            x = torch.randn(case.shape, device=device)
            tokens = x.numel() // (x.shape[1] if x.ndim != 3 or "LatentQuantize" in case.name else x.shape[-1])
            timer = (lambda fn: _measure_cpu_time(fn, args.repeat)) if args.clock == "process" and \
                device.type == "cpu" else (lambda fn: measure(fn, device, iters=args.repeat))
            m_ours, m_theirs = _alternating(timer, step(ours, x, train, True, args.grad),
                                            step(theirs, x, train, False, args.grad), args.rounds)
            ratio = m_theirs.ms / m_ours.ms if m_ours.ms and m_theirs.ms else None
            ratios.append(ratio)
            gib = lambda m: "—" if m.peak_gib is None else f"{m.peak_gib:.3f}"  # noqa: E731
            print(f"| {case.name} | {mode} | {tokens} | {m_ours.ms:.2f} | {m_theirs.ms:.2f} | "
                  f"{ratio:.2f}x | {gib(m_ours)} | {gib(m_theirs)} |", flush=True)
    known = [r for r in ratios if r is not None]
    if known:
        print(f"# worst ratio {min(known):.2f}x, median {statistics.median(known):.2f}x")


if __name__ == "__main__":
    main()
