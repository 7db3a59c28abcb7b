"""Where a quantizer's step spends its time: torch.profiler CUDA-time table per workload (GPU).

    python benchmarks/profile_steps.py [--rows 25]

Profiles the hf_vq side of bench_vs_vqp's VQ d256/K8192, cosine VQ, ResidualVQ and FSQ rows (eval and train) and
of the grid's slow rows (VQ d2048 K1024, d4 K256, 8 separate heads; ResidualFSQ, LatentQuantize, FSQ and LFQ
with projections),
after warm-up, and prints the top kernels/ops by self CUDA time, the top ops by self CPU time (host cost: what
a host-bound step spends its time on), plus the wall time per call and the summed GPU kernel time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import hf_vq
from harness import step


def _profile(name, fn, rows):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5 * 1e3
    host = []
    for _ in range(5):  # time until the call returns (launch queue empty at the start): the host's share
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"\n## {name}: wall {wall:.2f} ms/call, host {sorted(host)[2]:.2f} ms, "
          f"{sum(e.count for e in events if e.key.startswith('aten::'))} aten ops\n")
    print(events.table(sort_by="self_cuda_time_total", row_limit=rows))
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))  # footer: self CUDA total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--only", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cases = []
    x = torch.randn(64, 4096, 256, device=dev)
    for train in (False, True):
        kw = dict(dim=256, codebook_size=8192, decay=0.99, check_inputs=False)
        if train:
            kw.update(threshold_ema_dead_code=2)
        cases.append((f"VQ d256 K8192 {'train' if train else 'eval'}", hf_vq.VectorQuantize(**kw).to(dev), x, train))
    for train in (False, True):
        m = hf_vq.VectorQuantize(dim=256, codebook_size=8192, use_cosine_sim=True, codebook_dim=32,
                                 check_inputs=False)
        cases.append((f"VQ cosine cdim32 K8192 {'train' if train else 'eval'}", m.to(dev), x, train))
    xr = torch.randn(32, 4096, 128, device=dev)
    for train in (False, True):
        m = hf_vq.ResidualVQ(dim=128, num_quantizers=8, codebook_size=1024, decay=0.99, check_inputs=False).to(dev)
        cases.append((f"ResidualVQ 8x1024 {'train' if train else 'eval'}", m, xr, train))
    xf = torch.randn(256, 4096, 6, device=dev)
    for train in (False, True):
        m = hf_vq.FSQ(levels=[8, 8, 8, 5, 5, 5], check_inputs=False).to(dev)
        cases.append((f"FSQ {'train' if train else 'eval'}", m, xf, train))
    grid_rows = [  # rows of `bench_vs_vqp.py --matrix` that are far from their floor
        ("VQ d2048 K1024", hf_vq.VectorQuantize(dim=2048, codebook_size=1024), (16, 4096, 2048), (False,)),
        ("VQ d4 K256", hf_vq.VectorQuantize(dim=4, codebook_size=256), (16, 4096, 4), (False,)),
        ("VQ heads=8 d512 K1024 separate", hf_vq.VectorQuantize(dim=512, codebook_size=1024, heads=8,
                                                                separate_codebook_per_head=True), (16, 4096, 512),
         (False,)),
        ("ResidualFSQ 4x[8,5,5,5] d256", hf_vq.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=256),
         (64, 4096, 256), (False, True)),
        ("LatentQuantize [5,5,5,5] d64", hf_vq.LatentQuantize(levels=[5, 5, 5, 5], dim=64), (64, 4096, 64),
         (False, True)),
        ("FSQ [8,8,8,5,5,5] d256 projections", hf_vq.FSQ(levels=[8, 8, 8, 5, 5, 5], dim=256), (64, 4096, 256),
         (False, True)),
        ("LFQ 2^10 d256 projections", hf_vq.LFQ(codebook_size=2**10, dim=256), (16, 4096, 256), (False, True)),
    ]
    for name, m, shape, modes in grid_rows:
        for train in modes:
            cases.append((f"{name} {'train' if train else 'eval'}", m.to(dev), torch.randn(shape, device=dev), train))
    for name, m, xx, train in cases:
        if args.only and args.only not in name:
            continue
        m.train(train)
        _profile(name, step(m, xx, train, ours=True), args.rows)


if __name__ == "__main__":
    main()
