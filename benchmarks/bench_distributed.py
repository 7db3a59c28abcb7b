"""Multi-GPU codebook sync: weak scaling of a training step, collectives per step, and state equality across ranks.

    for n in 1 2 4 8; do torchrun --nproc_per_node $n benchmarks/bench_distributed.py; done
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --device cpu --tiny   # gloo smoke check

Every rank trains the same quantizer on its own batch (the same number of tokens per rank: weak scaling) and
reports the slowest rank's time per step, total tokens/s over all ranks, and the collectives one step issues
(counted by wrapping torch.distributed's functions during one extra step). Workloads: VectorQuantize d256 K8192
with and without dead-code expiry, its first step with k-means init, ResidualVQ 8 x 1024 d128,
GroupedResidualVQ 2 groups x 4 x 1024 d256, HierarchicalVQ d256 K1024 (one codebook per scale). After each run the
ranks' states are compared (`hf_vq.distributed.assert_same_across_ranks`). A first check trains a small
VectorQuantize and a ResidualVQ (k-means init, EMA, dead codes, uneven batches) and compares rank 0 with one
process trained on the concatenation of every rank's batches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import hf_vq
from hf_vq import distributed

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier")


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_matches_single_process(device: torch.device) -> None:
    """Ranks train on uneven batches; rank 0 compares with one process on the concatenated batches."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    steps = [[torch.randn(3 + r, 64, 16, generator=g) for r in range(world)] for _ in range(4)]
    level = dict(codebook_size=64, decay=0.8, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=0.5)
    builders = {"VectorQuantize": lambda **kw: hf_vq.VectorQuantize(dim=16, **level, **kw),
                "ResidualVQ": lambda **kw: hf_vq.ResidualVQ(dim=16, num_quantizers=3, **level, **kw)}
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build().to(device).train()
        for step in steps:
            model(step[rank].to(device))
        distributed.assert_same_across_ranks(model)
        if rank == 0:  # one process on the concatenated batches, with the group hidden from the model
            torch.manual_seed(0)
            single = build(sync_codebook=False).to(device).train()
            for step in steps:
                single(torch.cat(step).to(device))
            worst = max((a.float() - b.float()).abs().max().item()
                        for a, b in zip(model.state_dict().values(), single.state_dict().values()))
            print(f"[check] {name} world={world}: ranks identical; max |distributed - single process| = "
                  f"{worst:.2e}", flush=True)
            if worst > 1e-4:
                raise RuntimeError(f"{name}: distributed state differs from one process by {worst:.2e}")


def workloads(tiny: bool) -> dict[str, tuple]:
    """name -> (model builder, input shape builder for a token count). Tiny: the same structure, CPU-sized."""
    d, k, dr, kr = (16, 64, 16, 32) if tiny else (256, 8192, 128, 1024)
    levels = 2 if tiny else 8
    tokens_seq = lambda n, dim: (max(n // 1024, 1), min(n, 1024), dim)
    image = lambda n, dim: (max(n // 256, 1), dim, 16, 16)
    return {
        "vq": (lambda: hf_vq.VectorQuantize(dim=d, codebook_size=k, decay=0.99), tokens_seq, d),
        "vq_dead_codes": (lambda: hf_vq.VectorQuantize(dim=d, codebook_size=k, decay=0.99,
                                                       threshold_ema_dead_code=2), tokens_seq, d),
        "rvq": (lambda: hf_vq.ResidualVQ(dim=dr, num_quantizers=levels, codebook_size=kr, decay=0.99),
                tokens_seq, dr),
        "grouped_rvq": (lambda: hf_vq.GroupedResidualVQ(dim=2 * dr, groups=2, num_quantizers=levels // 2,
                                                        codebook_size=kr, decay=0.99), tokens_seq, 2 * dr),
        "hierarchical": (lambda: hf_vq.HierarchicalVQ(dim=d, codebook_size=kr, scales=[1, 2, 4, 8, 16],
                                                      shared_codebook=False, accept_image_fmap=True,
                                                      kmeans_init=False, decay=0.99), image, d),
    }


def count_collectives(fn) -> dict[str, int]:
    """The torch.distributed collectives `fn()` issues, by name."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    originals = {name: getattr(dist, name) for name in COLLECTIVES}
    for name, original in originals.items():
        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        setattr(dist, name, counted)
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return {k: v for k, v in counts.items() if v}


def slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run_workload(name: str, build, shape, dim: int, device: torch.device, tokens: int, iters: int,
                 repeats: int) -> None:
    torch.manual_seed(0)  # the same codebook on every rank
    model = build().to(device).train()
    g = torch.Generator(device=device).manual_seed(1000 + dist.get_rank())  # each rank its own data
    inputs = [torch.randn(shape(tokens, dim), device=device, generator=g) for _ in range(2)]

    def step(i: int = 0) -> None:
        x = inputs[i % len(inputs)].detach().requires_grad_()
        out = model(x)
        (out.quantized.float().square().mean() + out.loss.float().sum()).backward()

    for i in range(3):
        step(i)
    collectives = count_collectives(step)
    times = []
    for _ in range(repeats):
        sync(device)
        dist.barrier()
        start = time.perf_counter()
        for i in range(iters):
            step(i)
        sync(device)
        times.append(slowest((time.perf_counter() - start) / iters, device))
    distributed.assert_same_across_ranks(model)
    ms = statistics.median(times) * 1e3
    total = tokens * dist.get_world_size() / (ms / 1e3)
    log(f"| {name} | {dist.get_world_size()} | {ms:.2f} | {total:.3g} | {collectives} | yes |")


def run_kmeans_first_step(build, shape, dim: int, device: torch.device, tokens: int, repeats: int) -> None:
    """The first training step of a VectorQuantize with k-means init (10 iterations), timed on fresh models."""
    g = torch.Generator(device=device).manual_seed(2000 + dist.get_rank())
    x = torch.randn(shape(tokens, dim), device=device, generator=g)
    times, collectives = [], {}
    for r in range(repeats + 1):  # the first one warms up
        torch.manual_seed(0)
        model = build().to(device).train()
        sync(device)
        dist.barrier()
        start = time.perf_counter()
        if r == 0:
            collectives = count_collectives(lambda: model(x.detach().requires_grad_()))
        else:
            model(x.detach().requires_grad_())
        sync(device)
        if r:
            times.append(slowest(time.perf_counter() - start, device))
        distributed.assert_same_across_ranks(model)
    ms = statistics.median(times) * 1e3
    log(f"| vq_kmeans_first_step | {dist.get_world_size()} | {ms:.2f} | "
        f"{tokens * dist.get_world_size() / (ms / 1e3):.3g} | {collectives} | yes |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized workloads (smoke check)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 2^17; tiny: 2^10)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="workload names to run")
    args = parser.parse_args()
    tokens = args.tokens or (2**10 if args.tiny else 2**17)
    iters = args.iters or (2 if args.tiny else 10)
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    try:
        check_matches_single_process(device)
        log(f"\ntokens per rank {tokens}, {iters} steps x {args.repeats} repeats, {args.device}")
        log("| workload | ranks | ms/step | tokens/s (all ranks) | collectives per step | ranks identical |")
        log("|---|---|---|---|---|---|")
        for name, (build, shape, dim) in workloads(args.tiny).items():
            if args.only is None or name in args.only:
                run_workload(name, build, shape, dim, device, tokens, iters, args.repeats)
        if args.only is None or "vq_kmeans_first_step" in args.only:
            d, k = (16, 64) if args.tiny else (256, 8192)
            run_kmeans_first_step(lambda: hf_vq.VectorQuantize(dim=d, codebook_size=k, decay=0.99, kmeans_init=True),
                                  workloads(args.tiny)["vq"][1], d, device, tokens, args.repeats)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
