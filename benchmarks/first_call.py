"""First-call time of a quantizer in a fresh process: compilation (Triton) and first-use costs, not steady state.

    python benchmarks/first_call.py [--workload NAME ...]

For each workload two fresh Python processes run one eval call on the GPU: the first with an empty
`TRITON_CACHE_DIR` (cold: every kernel is compiled), the second with the cache the first one left (warm: kernels
load from disk). The time is the first call alone (model built and input on the device before the clock starts;
synchronized after), in seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (constructor expression over `hf_vq`, input shape)
WORKLOADS = {
    "VectorQuantize d256 K8192": ("hf_vq.VectorQuantize(dim=256, codebook_size=8192)", (1, 65536, 256)),
    "VectorQuantize d1024 K4096": ("hf_vq.VectorQuantize(dim=1024, codebook_size=4096)", (1, 65536, 1024)),
    "ResidualVQ 8x1024 d128": ("hf_vq.ResidualVQ(dim=128, num_quantizers=8, codebook_size=1024)", (1, 65536, 128)),
    "GroupedResidualVQ groups 2, 4x1024 d256": (
        "hf_vq.GroupedResidualVQ(dim=256, groups=2, num_quantizers=4, codebook_size=1024)", (1, 65536, 256)),
    "VectorQuantize heads=8 d512 K1024 (projections folded)": (
        "hf_vq.VectorQuantize(dim=512, codebook_size=1024, heads=8, separate_codebook_per_head=True)",
        (1, 65536, 512)),
    "FSQ [8,8,8,5,5,5]": ("hf_vq.FSQ(levels=[8, 8, 8, 5, 5, 5])", (1, 65536, 6)),
    "FSQ [8,5,5,5] image with projections (one kernel)": ("hf_vq.FSQ(levels=[8, 5, 5, 5], dim=256)",
                                                           (16, 256, 64, 64)),
}

CHILD = textwrap.dedent(
    """
    import sys, time, torch, hf_vq
    model = {ctor}.cuda().eval()
    x = torch.randn({shape}, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize()
    print("FIRST_CALL_S", time.perf_counter() - t0)
    """
)


def first_call_seconds(name: str, cache_dir: str) -> float:
    """Seconds of the first call of workload `name` in a fresh process using `cache_dir` as Triton's cache."""
    ctor, shape = WORKLOADS[name]
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(ctor=ctor, shape=shape)], capture_output=True,
                          text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: first-call process failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.split("FIRST_CALL_S", 1)[1].split()[0])


def cold_and_warm(name: str) -> tuple[float, float]:
    """(cold, warm) first-call seconds: an empty Triton cache, then a second process on the cache it left."""
    cache_dir = tempfile.mkdtemp(prefix="hf_vq_triton_cache_")
    try:
        return first_call_seconds(name, cache_dir), first_call_seconds(name, cache_dir)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    print("| first call (fresh process) | empty Triton cache s | warm on-disk cache s |")
    print("|---|---|---|")
    for name in args.workload:
        cold, warm = cold_and_warm(name)
        print(f"| {name} | {cold:.2f} | {warm:.2f} |", flush=True)


if __name__ == "__main__":
    main()
