"""CUDA time by kernel for a few quantizer calls (torch.profiler), to see where a row's time goes.

    python benchmarks/profile_rows.py [--only SUBSTRING ...]

Each workload: built, warmed up (3 calls), then 5 profiled calls; prints the top kernels by CUDA time and the
wall time per call (CUDA-synchronized).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import hf_vq

WORKLOADS = {
    "VQ d2048 K1024 eval": (lambda: hf_vq.VectorQuantize(dim=2048, codebook_size=1024), (16, 4096, 2048), False),
    "VQ d4 K256 eval": (lambda: hf_vq.VectorQuantize(dim=4, codebook_size=256), (16, 4096, 4), False),
    "VQ heads=8 d512 K1024 separate eval": (lambda: hf_vq.VectorQuantize(
        dim=512, codebook_size=1024, heads=8, separate_codebook_per_head=True), (16, 4096, 512), False),
    "VQ cosine cdim32 K8192 train": (lambda: hf_vq.VectorQuantize(
        dim=256, codebook_size=8192, codebook_dim=32, use_cosine_sim=True, decay=0.99), (16, 4096, 256), True),
    "ResidualVQ 8x1024 d128 eval": (lambda: hf_vq.ResidualVQ(dim=128, num_quantizers=8, codebook_size=1024),
                                    (32, 4096, 128), False),
    "ResidualFSQ 4x[8,5,5,5] d256 eval": (lambda: hf_vq.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=256),
                                          (64, 4096, 256), False),
    "LatentQuantize [5,5,5,5] d64 train": (lambda: hf_vq.LatentQuantize(levels=[5, 5, 5, 5], dim=64),
                                           (64, 4096, 64), True),
}


def run(name, build, shape, train):
    model = build().cuda().train(train)
    x = torch.randn(*shape, device="cuda", requires_grad=train)

    def call():
        if train:
            out = model(x)
            loss = out.quantized.sum() + (out.loss.sum() if out.loss is not None else 0)
            loss.backward()
        else:
            with torch.no_grad():
                model(x)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5 * 1e3
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    print(f"\n=== {name}: {wall:.2f} ms per call (wall, synchronized)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    for name, (build, shape, train) in WORKLOADS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        run(name, build, shape, train)


if __name__ == "__main__":
    main()
