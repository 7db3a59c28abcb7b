"""Calls replayed as CUDA graphs (`HF_VQ_CUDA_GRAPHS=1`, the default: whole calls of VectorQuantize, FSQ, LFQ and
LatentQuantize, forward and backward, and the codebook updates inside other quantizers' calls) and eager (`=0`),
beside vector-quantize-pytorch 1.32, in one process on the GPU. The rows are the grid's and the option rows'
(`vqp_matrix`), the host-bound ones by default.

    python benchmarks/bench_graphed_update.py [SUBSTRING ...]   # grid or option rows whose name contains one

Each row, in eval (no grad) and training (forward + backward of `quantized.sum()` plus the aux loss,
`harness.step`): the median of 25 calls after warm-up (`harness.measure`, CUDA events), three rounds alternating
graphed, eager and vqp; the table gives each side's lowest median in ms.
"""

import os
import sys

import torch
from harness import measure, step
from vqp_matrix import build, option_specs, specs

import hf_vq

DEFAULT_ROWS = ("VQ d4 K256", "VQ d32 K1024", "VQ d256 K1024 (baseline)", "VQ cosine d256 K1024", "VQ affine",
                "VQ learnable codebook", "VQ d64 K4096", "VQ d512 K16384", "VQ heads=8 d512 K1024",
                "VQ d256 codebook_dim 32 K8192", "ResidualVQ 8x1024", "GroupedResidualVQ", "FSQ [8,8,8,5,5,5] N=2^20",
                "FSQ [8,5,5,5] 2 codebooks", "LFQ 2^10 codes dim 256", "LFQ spherical", "LFQ 2 codebooks",
                "LatentQuantize")


def median_ms(fn, env: str | None) -> float | None:
    if env is not None:
        os.environ["HF_VQ_CUDA_GRAPHS"] = env
    return measure(fn, torch.device("cuda"), warmup=5, iters=25).ms


def main() -> None:
    only = sys.argv[1:] or DEFAULT_ROWS
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, hf_vq {hf_vq.__version__}")
    print("| row | mode | graphed ms | eager ms | vqp ms | graphed vs vqp | eager vs vqp |")
    print("|---|---|---|---|---|---|---|")
    for spec in specs() + option_specs():
        if not any(o in spec.name for o in only):
            continue
        ours, theirs = build(spec, torch.device("cuda"))
        x = torch.randn(spec.shape, device="cuda", dtype=torch.bfloat16 if spec.bf16 else torch.float32)
        for train in (False, True):
            ours.train(train), theirs.train(train)
            f_ours, f_theirs = step(ours, x, train, True), step(theirs, x, train, False)
            runs = [[], [], []]
            for _ in range(3):
                for times, fn, env in zip(runs, (f_ours, f_ours, f_theirs), ("1", "0", None)):
                    times.append(median_ms(fn, env))
            mode = "train" if train else "eval"
            if any(t is None for times in runs for t in times):
                print(f"| {spec.name} | {mode} | did not run (out of memory) | | | | |")
                continue
            g, e, v = (min(times) for times in runs)
            print(f"| {spec.name} | {mode} | {g:.3f} | {e:.3f} | {v:.3f} | {v / g:.2f}x | {v / e:.2f}x |",
                  flush=True)
    os.environ.pop("HF_VQ_CUDA_GRAPHS", None)


if __name__ == "__main__":
    main()
