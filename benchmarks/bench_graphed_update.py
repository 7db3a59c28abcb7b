"""Training steps with the codebook update replayed as a CUDA graph (`HF_VQ_CUDA_GRAPHS=1`, the default) and eager
(`=0`), beside vector-quantize-pytorch 1.32, in one process on the GPU.

    python benchmarks/bench_graphed_update.py [SUBSTRING ...]   # rows whose name contains one of these

Each row: forward + backward of `quantized.sum()` plus the aux loss (`harness.step`), the median of 25 calls after
warm-up (`harness.measure`, CUDA events), three rounds alternating graphed, eager and vqp; the table gives each
side's lowest median in ms.
"""

import os
import sys

import torch
from harness import import_vqp, measure, step

import hf_vq

vqp = import_vqp()


def _vq(**kw):
    return lambda lib: lib.VectorQuantize(decay=0.99, **kw)


def _residual(cls: str, **kw):
    return lambda lib: getattr(lib, cls)(decay=0.99, codebook_size=1024, **kw)


ROWS = [  # (name, build(library module) -> quantizer, input shape)
    ("VQ d4 K256", _vq(dim=4, codebook_size=256), (16, 4096, 4)),
    ("VQ d32 K1024", _vq(dim=32, codebook_size=1024), (16, 4096, 32)),
    ("VQ d64 K4096", _vq(dim=64, codebook_size=4096), (16, 4096, 64)),
    ("VQ d128 K2048", _vq(dim=128, codebook_size=2048), (32, 4096, 128)),
    ("VQ d256 K1024", _vq(dim=256, codebook_size=1024), (16, 4096, 256)),
    ("VQ cosine d256 K1024", _vq(dim=256, codebook_size=1024, use_cosine_sim=True), (16, 4096, 256)),
    ("VQ affine d256 K1024", _vq(dim=256, codebook_size=1024, affine_param=True), (16, 4096, 256)),
    ("VQ heads=8 d512 K1024 separate", _vq(dim=512, codebook_size=1024, heads=8, separate_codebook_per_head=True),
     (16, 4096, 512)),
    ("ResidualVQ 8x1024 d128", _residual("ResidualVQ", dim=128, num_quantizers=8), (32, 4096, 128)),
    ("GroupedResidualVQ groups 2, 4x1024 d256", _residual("GroupedResidualVQ", dim=256, groups=2, num_quantizers=4),
     (16, 4096, 256)),
]


def median_ms(fn, env: str | None) -> float | None:
    if env is not None:
        os.environ["HF_VQ_CUDA_GRAPHS"] = env
    return measure(fn, torch.device("cuda"), warmup=5, iters=25).ms


def main() -> None:
    only = sys.argv[1:]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, hf_vq {hf_vq.__version__}")
    print("| row | graphed ms | eager ms | vqp ms | graphed vs vqp | eager vs vqp |")
    print("|---|---|---|---|---|---|")
    for name, build, shape in ROWS:
        if only and not any(o in name for o in only):
            continue
        torch.manual_seed(0)
        ours, theirs = build(hf_vq).cuda().train(), build(vqp).cuda().train()
        x = torch.randn(shape, device="cuda")
        f_ours, f_theirs = step(ours, x, True, True), step(theirs, x, True, False)
        runs = [[], [], []]
        for _ in range(3):
            for times, fn, env in zip(runs, (f_ours, f_ours, f_theirs), ("1", "0", None)):
                times.append(median_ms(fn, env))
        if any(t is None for times in runs for t in times):
            print(f"| {name} | did not run (out of memory) | | | | |")
            continue
        g, e, v = (min(times) for times in runs)
        print(f"| {name} | {g:.3f} | {e:.3f} | {v:.3f} | {v / g:.2f}x | {v / e:.2f}x |", flush=True)
    os.environ.pop("HF_VQ_CUDA_GRAPHS", None)


if __name__ == "__main__":
    main()
