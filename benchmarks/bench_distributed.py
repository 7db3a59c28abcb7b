"""Multi-GPU codebook sync: correctness with NCCL and training-step throughput, 1 vs N GPUs.

    torchrun --nproc_per_node 1 benchmarks/bench_distributed.py
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py

Correctness: every rank trains a small VectorQuantize (k-means init, EMA, dead-code expiry) on its own uneven
batch; rank states must be identical and equal (allclose 1e-5) to one process trained on the concatenation.
Throughput: VQ d256/K8192 training steps with 2^17 tokens per GPU (weak scaling); prints total tokens/s.
"""

import os
import time

import torch
import torch.distributed as dist

import hf_vq
from hf_vq import distributed


def check_matches_single_process(device):
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    steps = [[torch.randn(3 + r, 64, 16, generator=g) for r in range(world)] for _ in range(4)]
    cfg = dict(dim=16, codebook_size=64, decay=0.8, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=0.5)
    torch.manual_seed(0)
    model = hf_vq.VectorQuantize(**cfg).to(device).train()
    for step in steps:
        model(step[rank].to(device))
    distributed.assert_same_across_ranks(model)
    if rank == 0:
        # one process on the concatenated batch, with the group hidden from the model
        torch.manual_seed(0)
        single = hf_vq.VectorQuantize(**cfg, sync_codebook=False).to(device).train()
        for step in steps:
            single(torch.cat(step).to(device))
        worst = max((a.float() - b.float()).abs().max().item()
                    for a, b in zip(model.state_dict().values(), single.state_dict().values()))
        print(f"[check] world={world}: ranks identical; max |distributed - single process| = {worst:.2e}")
        assert worst < 1e-4 or world == 1


def throughput(device, tokens_per_gpu=2**17, iters=10):
    torch.manual_seed(0)
    model = hf_vq.VectorQuantize(dim=256, codebook_size=8192, decay=0.99, threshold_ema_dead_code=2,
                                 check_inputs=False).to(device).train()
    x = torch.randn(tokens_per_gpu // 4096, 4096, 256, device=device)

    def step():
        xi = x.detach().requires_grad_()
        out = model(xi)
        (out.quantized.sum() + out.loss).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    dt = (time.perf_counter() - t0) / iters
    total = tokens_per_gpu * dist.get_world_size() / dt
    if dist.get_rank() == 0:
        print(f"[throughput] world={dist.get_world_size()}: {dt * 1e3:.1f} ms/step, {total:.3g} tokens/s total")


def main():
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    device = torch.device("cuda", local_rank)
    try:
        check_matches_single_process(device)
        throughput(device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
