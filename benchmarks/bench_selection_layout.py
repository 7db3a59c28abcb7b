"""The nearest-code kernel's selection state: lane arrays vs packed score/code keys, per workload and mode.

    python benchmarks/bench_selection_layout.py                # GPU: the three workloads below
    TRITON_INTERPRET=1 python benchmarks/bench_selection_layout.py --cpu-smoke   # tiny shapes, interpreted

For each workload and mode (`rerank`, `exact`), the kernel with the lane arrays only (`pack=False`), with packed
keys only (`pack=True`), and with `launch_config`'s choice (the default): the median time (CUDA events,
compilation in the warmup), the launch configuration, the share of the first 16,384 rows
whose index is a float64 nearest code (exact ties count as agreeing), and exact mode's fallback rows.
Workloads: cosine cdim 32 K8192 (the cosine VQ row of bench_vs_vqp; unit vectors), euclidean d256 K8192 and
d128 K1024 (a ResidualVQ level), randn data.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import fmt, measure  # noqa: E402

from hf_vq.ops import nearest as nearest_ops  # noqa: E402
from hf_vq.ops import triton_nearest as tn  # noqa: E402

GPU_CASES = [("cosine", 32, 8192, 2**18), ("euclidean", 256, 8192, 2**18), ("euclidean", 128, 1024, 2**17)]
CPU_CASES = [("cosine", 16, 40, 64), ("euclidean", 24, 70, 50)]
CHECK_ROWS = 16384


def agreement(idx: torch.Tensor, x: torch.Tensor, c: torch.Tensor, metric: str) -> float:
    xs, cb = x[0, :CHECK_ROWS].double(), c[0].double()
    s = -(xs @ cb.T) if metric == "cosine" else torch.cdist(xs, cb)  # lower is better
    got = s.gather(1, idx[0, : xs.shape[0], None])[:, 0]
    return (got == s.amin(1)).double().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes (the kernel runs under TRITON_INTERPRET=1)")
    args = p.parse_args()
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not tn.interpreting():
        raise SystemExit("the kernel needs a GPU, or TRITON_INTERPRET=1 with --cpu-smoke")
    print("| workload | mode | layout | ms | autotuned config | agree | fallback rows |")
    print("|---|---|---|---|---|---|---|")
    for metric, d, k, n in CPU_CASES if device.type == "cpu" else GPU_CASES:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, n, d, device=device, generator=g)
        c = torch.randn(1, k, d, device=device, generator=g)
        if metric == "cosine":
            x, c = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(c, dim=-1)
        c2 = nearest_ops.sq_norm(c)
        for mode in ("rerank", "exact"):
            for label, pack in (("lanes", False), ("packed keys", True), ("launch_config", None)):
                stats: dict = {}
                call = lambda: tn.nearest_code_triton(x, c, c2, metric=metric, mode=mode, pack=pack,  # noqa: E731
                                                      stats=stats)
                idx = call()[0]
                ms = measure(call, device, iters=20).ms
                cfg = tn.launch_config(d, k, bf16=True, mode=mode, device=device, pack=pack)
                print(f"| {metric} d{d} K{k} N={n} | {mode} | {label} | {fmt(ms, '.3f')} | {cfg} | "
                      f"{agreement(idx, x, c, metric):.5f} | {stats.get('fallback_rows', 0)} |", flush=True)


if __name__ == "__main__":
    main()
