"""hf_vq vs vector-quantize-pytorch 1.32, side by side in one run: time, tokens/s, peak memory.

    python benchmarks/bench_vs_vqp.py [--quick] [--out RESULTS_TABLE.md]

Every row builds both modules with the same config, copies vqp's state into hf_vq where both hold state,
runs the same input, and reports the median time (CUDA events) and the peak memory above the inputs. On
CPU `--quick` shrinks every workload so the script can be smoke-tested. Rows where vqp runs out of memory
show "out of memory" in its columns; the `floor` column is the bf16 distance GEMM (2*N*K*D flops).
"""

from __future__ import annotations

import argparse
import datetime
import platform
from dataclasses import dataclass
from typing import Callable

import torch

import hf_vq
from harness import Measurement, fmt, measure

try:
    import vector_quantize_pytorch as vqp
except ImportError as e:  # the comparison is the point of this script
    raise SystemExit("pip install vector-quantize-pytorch==1.32.0 to run the comparison") from e


@dataclass
class Row:
    name: str
    tokens: int
    ours: Measurement
    theirs: Measurement
    floor_ms: float | None = None


def _step(module, x: torch.Tensor, train: bool, ours: bool) -> Callable[[], None]:
    """One eval forward, or one training step (forward + backward of quantized.sum() + aux loss)."""

    def run():
        if train:
            xi = x.detach().requires_grad_()
            out = module(xi)
            q, loss = (out.quantized, out.loss) if ours else (out[0], out[-1])
            total = q.float().sum()
            if loss is not None and loss.requires_grad:  # (ResidualVQ: one loss per level)
                total = total + loss.float().sum()
            total.backward()
        else:
            with torch.no_grad():
                module(x)

    return run


def _gemm_floor(n: int, k: int, d: int, device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    b = torch.randn(d, k, device=device, dtype=torch.bfloat16)
    ms = measure(lambda: a @ b, device).ms
    del a, b
    return ms


def vq_pair(device, **kwargs):
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(**kwargs).to(device)
    ours = hf_vq.VectorQuantize.from_vector_quantize_pytorch(theirs.cpu()).to(device)
    theirs.to(device)
    ours.config.check_inputs = False
    return ours, theirs


def run_rows(device, quick: bool) -> list[Row]:
    s = 16 if quick else 1  # shrink factor for CPU smoke runs
    rows: list[Row] = []

    def add(name, ours, theirs, x, train, floor_dims=None):
        ours.train(train), theirs.train(train)
        m_ours = measure(_step(ours, x, train, True), device)
        m_theirs = measure(_step(theirs, x, train, False), device)
        floor = _gemm_floor(*floor_dims, device) if floor_dims else None
        rows.append(Row(name, x.shape[0] * x.shape[1], m_ours, m_theirs, floor))
        print(f"{name:48s} hf_vq {fmt(m_ours.ms)} ms  vqp {fmt(m_theirs.ms)} ms {m_theirs.note}", flush=True)

    n = 2**18 // s**2
    x = torch.randn(n // 4096 if n >= 4096 else 1, min(n, 4096), 256 // s, device=device)
    k = 8192 // s
    for train in (False, True):
        kw = dict(dim=256 // s, codebook_size=k, decay=0.99)
        if train:
            kw.update(threshold_ema_dead_code=2)
        ours, theirs = vq_pair(device, **kw)
        add(f"VQ d{256 // s} K{k} N={n} {'train (EMA, dead codes)' if train else 'eval'}", ours, theirs, x, train,
            (n, k, 256 // s))
        del ours, theirs
    for train in (False, True):
        ours, theirs = vq_pair(device, dim=256 // s, codebook_size=k, use_cosine_sim=True, codebook_dim=32 // s)
        add(f"VQ cosine cdim{32 // s} K{k} N={n} {'train' if train else 'eval'}", ours, theirs, x, train)
        del ours, theirs
    n2, k2 = 2**17 // s**2, 65536 // s
    x2 = x.reshape(-1, 256 // s)[:n2].reshape(max(1, n2 // 4096), -1, 256 // s)
    for train in (False, True):
        ours, theirs = vq_pair(device, dim=256 // s, codebook_size=k2, decay=0.99)
        add(f"VQ d{256 // s} K{k2} N={n2} {'train' if train else 'eval'}", ours, theirs, x2, train, (n2, k2, 256 // s))
        del ours, theirs
    del x, x2

    for bits, n_lfq in ((14, 2**16), (18, 2**16)):
        bits_q = bits if not quick else 10
        n_lfq //= s**2
        xl = torch.randn(max(1, n_lfq // 1024), min(n_lfq, 1024), bits_q, device=device)
        torch.manual_seed(0)
        theirs = vqp.LFQ(codebook_size=2**bits_q, dim=bits_q, entropy_loss_weight=0.1).to(device)
        ours = hf_vq.LFQ(codebook_size=2**bits_q, dim=bits_q, entropy_loss_weight=0.1, check_inputs=False).to(device)
        add(f"LFQ 2^{bits_q} codes N={n_lfq} train (entropy loss)", ours, theirs, xl, True)
        del ours, theirs, xl

    n_rvq = 2**17 // s**2
    xr = torch.randn(max(1, n_rvq // 4096), min(n_rvq, 4096), 128 // s, device=device)
    for train in (False, True):
        torch.manual_seed(0)
        theirs = vqp.ResidualVQ(dim=128 // s, num_quantizers=8, codebook_size=1024 // s, decay=0.99).to(device)
        ours = hf_vq.ResidualVQ.from_vector_quantize_pytorch(theirs.cpu()).to(device)
        theirs.to(device)
        ours.config.check_inputs = False
        add(f"ResidualVQ 8x{1024 // s} d{128 // s} N={n_rvq} {'train' if train else 'eval'}", ours, theirs, xr, train)
        del ours, theirs
    del xr

    levels = [8, 8, 8, 5, 5, 5]
    n_fsq = 2**20 // s**2
    xf = torch.randn(n_fsq // 4096, 4096, 6, device=device)
    for train in (False, True):
        theirs = vqp.FSQ(levels=levels).to(device)
        ours = hf_vq.FSQ(levels=levels, check_inputs=False).to(device)
        add(f"FSQ {levels} N={n_fsq} {'train' if train else 'eval'}", ours, theirs, xf, train)
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| workload | hf_vq ms | vqp ms | speedup | hf_vq tokens/s | hf_vq peak GiB | vqp peak GiB | bf16 GEMM floor ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r.theirs.ms / r.ours.ms:.1f}x" if r.ours.ms and r.theirs.ms else "—"
        tps = f"{r.tokens / (r.ours.ms / 1e3):.3g}" if r.ours.ms else "—"
        vqp_ms = fmt(r.theirs.ms) if r.theirs.ms is not None else r.theirs.note
        lines.append(
            f"| {r.name} | {fmt(r.ours.ms)} | {vqp_ms} | {speed} | {tps} | {fmt(r.ours.peak_gib)} | "
            f"{fmt(r.theirs.peak_gib)} | {fmt(r.floor_ms)} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--out", default=None, help="also write the table (with a header) to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_rows(device, args.quick or device.type == "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"{datetime.date.today()} — {name}, torch {torch.__version__}, vector-quantize-pytorch "
        f"{getattr(vqp, '__version__', '1.32.0')}, hf_vq {hf_vq.__version__}; fp32 inputs"
    )
    text = header + "\n\n" + table(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
