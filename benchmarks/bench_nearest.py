"""Nearest-code search: the fused Triton kernel against plain PyTorch, one table per workload.

    python benchmarks/bench_nearest.py               # GPU: d256 K8192 N=2^18 and d256 K65536 N=2^17
    python benchmarks/bench_nearest.py --cpu-smoke   # tiny sizes on the CPU (checks the script, no kernel)
    TRITON_INTERPRET=1 python benchmarks/bench_nearest.py --cpu-smoke   # also the kernel rows, interpreted
    python benchmarks/bench_nearest.py --sweep       # GPU: launch configurations per (D, K), for launch_config

Rows: the Triton kernel's modes (`rerank`: low-precision candidates re-ranked in fp32; `exact`: plus the margin
check and the reference fallback for unproven rows; `fast`: the low-precision argmin), bf16 or tf32 dots, top-4 or
top-8 candidates, hf_vq's chunked PyTorch reference (`HF_VQ_DISABLE_TRITON` path), plain PyTorch fp32
`addmm + argmin` on the materialized N x K matrix, and the bf16 GEMM alone (a floor: no argmin, no exactness).
Times are CUDA-event medians after warmup (compilation happens in the warmup); peak memory is what the call
allocates above the inputs. Agreement: share of the first 4,096 rows whose index equals the float64 argmin
(and, separately, the fp32 reference's). Inputs fp32; `--data randn|clustered|both` (default both).
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
from hf_vq.ops import triton_nearest  # noqa: E402

GPU_CASES = [(256, 8192, 2**18), (256, 65536, 2**17)]
CPU_CASES = [(32, 256, 2048), (48, 1000, 777)]
CHECK_ROWS = 4096


def float64_argmin(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    xd, cd = x.double(), c.double()
    return ((xd * xd).sum(-1, keepdim=True) + (cd * cd).sum(-1) - 2.0 * xd @ cd.T).argmin(-1)


def make_data(d: int, k: int, n: int, device: torch.device, data: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`randn`: x and codes standard normal (many near-ties: the hard case for exactness). `clustered`: each
    row is a code plus noise of 0.3 per coordinate (a trained codebook's regime: clear winners)."""
    g = torch.Generator(device=device).manual_seed(0)
    c = torch.randn(k, d, device=device, generator=g)
    if data == "randn":
        x = torch.randn(n, d, device=device, generator=g)
    else:
        pick = torch.randint(0, k, (n,), device=device, generator=g)
        x = c[pick] + 0.3 * torch.randn(n, d, device=device, generator=g)
    return x, c


def run_case(d: int, k: int, n: int, device: torch.device, iters: int, warmup: int, data: str = "randn") -> None:
    x, c = make_data(d, k, n, device, data)
    rows = min(CHECK_ROWS, n)
    d64 = torch.cdist(x[:rows].double(), c.double())
    ref_idx, _ = nearest_ops._nearest_torch(x[None, :rows], c[None], None, "euclidean")
    ref_idx = ref_idx[0]
    has_kernel = triton_nearest.available(x)  # CUDA, or the CPU interpreter (TRITON_INTERPRET=1, --cpu-smoke)
    x3, c3 = x[None], c[None]
    c2 = nearest_ops.sq_norm(c3)
    xb, cb = x.bfloat16(), c.bfloat16()

    def triton(mode: str, precision: str, stats: dict | None = None, topk: int = triton_nearest.CANDIDATES):
        return lambda: triton_nearest.nearest_code_triton(x3, c3, c2, mode=mode, precision=precision, stats=stats,
                                                          topk=topk)

    def torch_chunked():
        return nearest_ops._nearest_torch(x3, c3, None, "euclidean")

    def addmm_argmin():
        dist = torch.addmm(c2[0][None, :], x, c.T, beta=1.0, alpha=-2.0)
        return dist.argmin(-1)

    def bf16_gemm():
        return xb @ cb.T

    methods = []
    if has_kernel:
        methods += [
            ("triton rerank bf16 (default mode, top-8)", triton("rerank", "bf16"), ("rerank", "bf16", 8)),
            ("triton rerank bf16 top-4", triton("rerank", "bf16", topk=4), ("rerank", "bf16", 4)),
            ("triton exact bf16 top-8", triton("exact", "bf16"), ("exact", "bf16", 8)),
            ("triton exact bf16 top-4", triton("exact", "bf16", topk=4), ("exact", "bf16", 4)),
            ("triton exact tf32 top-8", triton("exact", "tf32"), ("exact", "tf32", 8)),
            ("triton fast bf16", triton("fast", "bf16"), ("fast", "bf16", 8)),
            ("triton fast tf32", triton("fast", "tf32"), ("fast", "tf32", 8)),
        ]
    methods += [
        ("torch chunked fp32 (reference)", torch_chunked, "ref"),
        ("torch fp32 addmm + argmin", addmm_argmin, "idx"),
        ("bf16 GEMM only (floor)", bf16_gemm, None),
    ]
    print(f"\n### d{d} K{k} N={n}, {data} data  ({device}, fp32 inputs)\n")
    print("| method | median ms | peak GiB | agree vs float64 | agree vs fp32 ref | fallback rows |")
    print("|---|---|---|---|---|---|")
    for name, fn, kind in methods:
        m = measure(fn, device, warmup=warmup, iters=iters)
        agree64 = agree32 = fallback = None
        if kind is not None and m.ms is not None:
            with torch.no_grad():
                if isinstance(kind, tuple):  # triton: (mode, precision, topk)
                    mode, precision, topk = kind
                    idx = triton_nearest.nearest_code_triton(x3[:, :rows], c3, c2, mode=mode,
                                                             precision=precision, topk=topk)[0][0]
                    if mode == "exact":
                        full: dict = {}
                        triton(mode, precision, full, topk)()
                        fallback = f"{full['fallback_rows']} / {full['rows']}"
                elif kind == "ref":
                    idx = ref_idx
                else:
                    idx = fn()[:rows]
            agree64 = (d64.gather(1, idx[:, None])[:, 0] == d64.amin(1)).float().mean().item()  # ties count
            agree32 = (idx == ref_idx).float().mean().item()
        print(f"| {name} | {fmt(m.ms)} | {fmt(m.peak_gib, '.3f')} | {fmt(agree64, '.4f')} | "
              f"{fmt(agree32, '.4f')} | {fallback or '—'} |{'  ' + m.note if m.note else ''}")
    if not has_kernel:
        print("\n(no Triton kernel rows: needs CUDA and triton, and HF_VQ_DISABLE_TRITON unset)")


# (D, K, N, precision, mode) of the sweep, and the configurations it tries: (BLOCK_N, BLOCK_K, BLOCK_D or None for
# resident rows, pack, warps, stages)
SWEEP_CASES = [
    (32, 8192, 2**18, "bf16", "rerank"), (128, 1024, 2**17, "bf16", "rerank"), (256, 8192, 2**18, "bf16", "rerank"),
    (256, 65536, 2**17, "bf16", "rerank"), (256, 8192, 2**18, "tf32", "rerank"), (512, 16384, 2**16, "bf16", "rerank"),
    (768, 2048, 2**17, "bf16", "rerank"), (1024, 1024, 2**16, "bf16", "exact"), (2048, 4096, 2**16, "bf16", "rerank"),
]
RESIDENT_CONFIGS = [(128, 64, None, False, 8, 3), (128, 64, None, True, 8, 3), (64, 64, None, False, 4, 3),
                    (128, 32, None, False, 8, 3), (64, 32, None, False, 4, 4), (64, 64, None, True, 4, 3)]
SLICED_CONFIGS = [(128, 64, 64, False, 8, 4), (128, 128, 64, False, 8, 3), (128, 128, 64, True, 8, 3),
                  (64, 128, 64, False, 4, 3), (128, 64, 128, False, 8, 3), (64, 64, 64, False, 4, 4),
                  (128, 64, 32, False, 8, 5), (256, 64, 64, True, 8, 3), (64, 256, 64, True, 8, 3)]
# the GEMM route (bf16 rows wider than RESIDENT_DIM): selection tiles over cuBLAS dots (BLOCK_D: row-norm slices)
GEMM_CONFIGS = [(32, 128, 64, True, 4, 3, True), (64, 128, 64, True, 4, 3, True), (16, 256, 64, True, 4, 3, True),
                (32, 128, 64, False, 4, 3, True)]


def sweep(device: torch.device) -> None:
    """Time each candidate configuration of `_nearest_kernel` per case (the data behind `launch_config`'s rule):
    median ms (`triton.testing.do_bench`), agreement with float64 on 4,096 rows, and which one the rule picks."""
    import time

    import triton

    from hf_vq.ops.utils import padded_dim

    chosen_fn = triton_nearest.launch_config
    print("| D | K | N | prec | mode | BLOCK_N x BLOCK_K x BLOCK_D | pack | warps | stages | first call s | ms | "
          "agree f64 | rule |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d, k, n, prec, mode in SWEEP_CASES:
        x, c = make_data(d, k, n, device, "randn")
        x3, c3, c2 = x[None], c[None], (c * c).sum(-1)[None]
        rows = min(CHECK_ROWS, n)
        d64 = torch.cdist(x[:rows].double(), c.double())
        rule = chosen_fn(d, k, bf16=prec == "bf16", mode=mode, device=device)
        resident = padded_dim(d) <= triton_nearest.RESIDENT_DIM
        candidates = RESIDENT_CONFIGS if resident else SLICED_CONFIGS + (GEMM_CONFIGS if prec == "bf16" else [])
        for bn, bk, bd, pack, warps, stages, *gemm in candidates:
            if pack and (triton.cdiv(k, bk) - 1).bit_length() > triton_nearest.PACK_MAX_BITS:
                continue
            cfg = triton_nearest.LaunchConfig(bn, bk, bd or padded_dim(d), pack, warps, stages, bool(gemm))
            triton_nearest.launch_config = lambda *a, _cfg=cfg, **kw: _cfg
            try:
                fn = lambda: triton_nearest.nearest_code_triton(x3, c3, c2, mode=mode, precision=prec)
                t0 = time.perf_counter()
                idx = fn()[0][0, :rows]
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                agree = (d64.gather(1, idx[:, None])[:, 0] == d64.amin(1)).float().mean().item()
                note = "**rule**" if cfg == rule else ""
                shape = f"{bn} x {bk} x {cfg.block_d}{' GEMM route' if cfg.gemm else ''}"
                print(f"| {d} | {k} | {n} | {prec} | {mode} | {shape} | {pack} | {warps} | "
                      f"{stages} | {first:.2f} | {ms:.3f} | {agree:.4f} | {note} |", flush=True)
            except Exception as e:  # out of shared memory or registers: report and go on
                print(f"| {d} | {k} | {n} | {prec} | {mode} | {bn} x {bk} x {cfg.block_d} | {pack} | {warps} | "
                      f"{stages} | — | failed: {type(e).__name__} {str(e)[:60]} | | |", flush=True)
            finally:
                triton_nearest.launch_config = chosen_fn
        print(f"| {d} | {k} | {n} | {prec} | {mode} | rule: {rule} | | | | | | | |", flush=True)
        del x, c, x3, c3, d64
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--data", choices=["randn", "clustered", "both"], default="both")
    p.add_argument("--sweep", action="store_true", help="time launch configurations per (D, K) (GPU)")
    args = p.parse_args()
    if args.sweep:
        sweep(torch.device("cuda"))
        return
    if args.cpu_smoke:
        device, cases = torch.device("cpu"), CPU_CASES
        if os.environ.get("TRITON_INTERPRET") == "1":
            cases = [(16, 40, 96)]  # the kernel rows run in the (slow) interpreter: tiny
    else:
        if not torch.cuda.is_available():
            sys.exit("CUDA is not available: run on a GPU, or pass --cpu-smoke for a tiny CPU check")
        device, cases = torch.device("cuda"), GPU_CASES
    iters = args.iters or (3 if args.cpu_smoke else 20)
    warmup = args.warmup or (1 if args.cpu_smoke else 5)
    print(f"torch {torch.__version__}, triton {getattr(__import__('triton'), '__version__', '?') if triton_nearest.HAS_TRITON else 'absent'}, "
          f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch fp32 rows are true fp32
    for data in (["randn", "clustered"] if args.data == "both" else [args.data]):
        for d, k, n in cases:
            run_case(d, k, n, device, iters, warmup, data)


if __name__ == "__main__":
    main()
