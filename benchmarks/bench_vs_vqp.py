"""hf_vq vs vector-quantize-pytorch 1.32, side by side in one run: time, tokens/s, peak memory.

    python benchmarks/bench_vs_vqp.py [--quick] [--only SUBSTRING ...] [--repeat N] [--grad sum|random]
                                      [--out RESULTS_TABLE.md]
    python benchmarks/bench_vs_vqp.py --matrix [...the same options]   # the configuration grid
    python benchmarks/bench_vs_vqp.py --options [...the same options]  # one option at a time, scalar variants

Training steps backpropagate `quantized.sum()` (plus the aux loss) by default; `--grad random` a fixed random
gradient of the output's shape instead, as a real loss gives (the sum's gradient is one value broadcast to every
element, which `nn.Linear`'s backward copies before its products in both libraries).

`--matrix` runs the grid of `vqp_matrix.py` (feature dims 4..2048, codebook sizes 256..2^17, heads, projections,
cosine, channel-first image/video, bf16 input, residual and grouped classes, every scalar quantizer; eval and
train) and the first-call times of `first_call.py` (fresh processes, empty then warm Triton cache), and prints one
table with the speedups and the worst one. `--options` runs `vqp_matrix.option_specs()` the same way: the options
a user turns on (k-means init, dead-code expiry, learnable codebook, orthogonal regularization, stochastic sampling,
affine codebook, cosine, straight-through, cross-entropy commitment, diversity loss, `(b, d, n)` input, ...) one at
a time on a VQ d256 K1024 baseline, more feature dims, SimVQ, and scalar and residual variants the grid leaves out.

Every row builds both modules with the same config, copies vqp's state into hf_vq where both hold state,
runs the same input, and reports the median time (CUDA events) and the peak memory above the inputs. On
CPU `--quick` shrinks every workload so the script can be smoke-tested. Rows where vqp runs out of memory
show "out of memory" in its columns; the `floor` column is the bf16 distance GEMM (2*N*K*D flops).

VQ rows: both codebooks are set to the same standard-normal codes (the scale of a trained codebook on unit-variance
features; vqp's default init is ~1e-2 wide, which makes every distance a near-tie in fp32), and the `agree`
columns give the share of the first 65,536 rows whose index is a float64 nearest code (`argmin` of the exact
distance to the codebook the call used; a row counts as agreeing when its code's float64 distance equals the
minimum, i.e. exact ties are not misses). hf_vq's nearest-code mode is `HF_VQ_NEAREST_MODE` (default `rerank`);
rows marked `exact` set it to `exact` for that row.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
from dataclasses import dataclass

import torch

import hf_vq
from harness import Measurement, fmt, import_vqp, measure, step

vqp = import_vqp()


@dataclass
class Row:
    name: str
    tokens: int
    ours: Measurement
    theirs: Measurement
    floor_ms: float | None = None
    agree_ours: float | None = None
    agree_theirs: float | None = None


def _gemm_floor(n: int, k: int, d: int, device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    b = torch.randn(d, k, device=device, dtype=torch.bfloat16)
    ms = measure(lambda: a @ b, device).ms
    del a, b
    return ms


CHECK_ROWS = 65536


@torch.no_grad()
def _agreement(indices: torch.Tensor, x: torch.Tensor, codebook: torch.Tensor) -> float:
    """Share of the first CHECK_ROWS rows of `x (b, n, d)` whose `indices` is a float64 nearest code."""
    xs = x.reshape(-1, x.shape[-1])[:CHECK_ROWS].double()
    idx = indices.reshape(-1)[:CHECK_ROWS]
    cb = codebook.double()
    hits = 0
    for start in range(0, xs.shape[0], 4096):  # float64 distances in row chunks
        d = torch.cdist(xs[start:start + 4096], cb)
        hits += (d.gather(1, idx[start:start + 4096, None])[:, 0] == d.amin(1)).sum().item()
    return hits / xs.shape[0]


def vq_agreement(ours, theirs, x, train: bool) -> tuple[float, float]:
    """Agreement of one call of each module (training mode: the codebook before the call's update)."""
    out = []
    for module, is_ours in ((ours, True), (theirs, False)):
        module.train(train)
        embed = module._codebook.embed.detach()[0].clone()
        try:
            with torch.no_grad():
                res = module(x)
            out.append(_agreement(res.indices if is_ours else res[1], x, embed))
        except torch.OutOfMemoryError:
            out.append(None)
        res = None
        torch.cuda.empty_cache() if x.is_cuda else None
    return out[0], out[1]


def vq_pair(device, randn_codebook: bool = False, **kwargs):
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(**kwargs)
    if randn_codebook:
        with torch.no_grad():
            theirs._codebook.embed.copy_(torch.randn_like(theirs._codebook.embed))
            theirs._codebook.embed_avg.copy_(theirs._codebook.embed)
    theirs = theirs.to(device)
    ours = hf_vq.VectorQuantize.from_vector_quantize_pytorch(theirs.cpu()).to(device)
    theirs.to(device)
    ours.config.check_inputs = False
    return ours, theirs


GRAD = "sum"  # the training steps' output gradient (`harness.step`; `--grad`)


def _measure_pair(ours, theirs, x, train: bool, device, repeat: int) -> tuple[Measurement, Measurement]:
    """Both sides measured `repeat` times, alternating (host-bound rows drift between consecutive measurements
    on a busy host); each side's median over the repeats, and its largest peak."""
    runs = []
    for _ in range(repeat):
        m_ours = measure(step(ours, x, train, True, GRAD), device)
        m_theirs = measure(step(theirs, x, train, False, GRAD), device) if theirs is not None else \
            Measurement(None, None, "not run")
        runs.append((m_ours, m_theirs))

    def combine(side: list[Measurement]) -> Measurement:
        done = [m for m in side if m.ms is not None]
        if len(done) < len(side):
            return side[0] if not done else Measurement(None, None, "out of memory in some repeats")
        return Measurement(statistics.median(m.ms for m in done), max((m.peak_gib or 0.0) for m in done)
                           if done[0].peak_gib is not None else None)

    return combine([r[0] for r in runs]), combine([r[1] for r in runs])


def run_rows(device, quick: bool, only: list[str] | None = None, repeat: int = 1) -> list[Row]:
    s = 16 if quick else 1  # shrink factor for CPU smoke runs
    rows: list[Row] = []

    def add(name, ours, theirs, x, train, floor_dims=None, agree=False, mode=None):
        if only and not any(part in name for part in only):
            return
        if mode:
            os.environ["HF_VQ_NEAREST_MODE"] = mode
        try:
            agreement = (None, None)
            if agree:
                state = {k: v.clone() for k, v in ours.state_dict().items()}  # agreement runs before timing
                agreement = vq_agreement(ours, theirs, x, train)
                ours.load_state_dict(state)
            ours.train(train)
            theirs.train(train) if theirs is not None else None
            m_ours, m_theirs = _measure_pair(ours, theirs, x, train, device, repeat)
        finally:
            os.environ.pop("HF_VQ_NEAREST_MODE", None)
        floor = _gemm_floor(*floor_dims, device) if floor_dims else None
        rows.append(Row(name, x.shape[0] * x.shape[1], m_ours, m_theirs, floor, *agreement))
        print(f"{name:48s} hf_vq {fmt(m_ours.ms)} ms  vqp {fmt(m_theirs.ms)} ms {m_theirs.note} "
              f"agree {fmt(agreement[0], '.5f')} / {fmt(agreement[1], '.5f')}", flush=True)

    n = 2**18 // s**2
    x = torch.randn(n // 4096 if n >= 4096 else 1, min(n, 4096), 256 // s, device=device)
    k = 8192 // s
    for mode in ("rerank", "exact"):
        for train in (False, True):
            kw = dict(dim=256 // s, codebook_size=k, decay=0.99)
            if train:
                kw.update(threshold_ema_dead_code=2)
            ours, theirs = vq_pair(device, randn_codebook=True, **kw)
            add(f"VQ d{256 // s} K{k} N={n} {'train (EMA, dead codes)' if train else 'eval'}, {mode}", ours, theirs,
                x, train, (n, k, 256 // s), agree=True, mode=mode)
            del ours, theirs
    for train in (False, True):
        ours, theirs = vq_pair(device, dim=256 // s, codebook_size=k, use_cosine_sim=True, codebook_dim=32 // s)
        add(f"VQ cosine cdim{32 // s} K{k} N={n} {'train' if train else 'eval'}", ours, theirs, x, train)
        del ours, theirs
    n2, k2 = 2**17 // s**2, 65536 // s
    x2 = x.reshape(-1, 256 // s)[:n2].reshape(max(1, n2 // 4096), -1, 256 // s)
    for train in (False, True):
        ours, theirs = vq_pair(device, randn_codebook=True, dim=256 // s, codebook_size=k2, decay=0.99)
        add(f"VQ d{256 // s} K{k2} N={n2} {'train' if train else 'eval'}", ours, theirs, x2, train, (n2, k2, 256 // s),
            agree=True)
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
    add(f"FSQ-sized step floor: x * 1, sum, backward, N={n_fsq}", _TimesOne(), None, xf, True)
    del xf
    _sim_projection_hierarchical_rows(add, device, s)
    _fsp_binary_mapper_rows(add, device, s)
    return rows


def _sim_projection_hierarchical_rows(add, device, s: int) -> None:
    """SimVQ, ResidualSimVQ, RandomProjectionQuantizer (eval only: vqp returns indices) and HierarchicalVQ, each
    side on the same weights (hf_vq migrated from the vqp module)."""
    n = 2**17 // s**2
    x = torch.randn(max(1, n // 4096), min(n, 4096), 128 // s, device=device)
    d, k = 128 // s, 4096 // s
    cases = [
        (f"SimVQ d{d} K{k} N={n}", vqp.SimVQ, hf_vq.SimVQ, dict(dim=d, codebook_size=k), (False, True)),
        (f"ResidualSimVQ 4x{k} d{d} N={n}", vqp.ResidualSimVQ, hf_vq.ResidualSimVQ,
         dict(dim=d, num_quantizers=4, codebook_size=k), (False, True)),
        (f"RandomProjectionQuantizer 4x{1024 // s} cdim16 d{d} N={n}", vqp.RandomProjectionQuantizer,
         hf_vq.RandomProjectionQuantizer, dict(dim=d, num_codebooks=4, codebook_dim=16, codebook_size=1024 // s),
         (False,)),
        (f"HierarchicalVQ scales 1..{x.shape[1]} K{k} d{d} N={n}", vqp.HierarchicalVQ, hf_vq.HierarchicalVQ,
         dict(dim=d, codebook_size=k, scales=(1, 16, 256, x.shape[1]), channel_first=False), (False, True)),
    ]
    for name, theirs_cls, ours_cls, kwargs, modes in cases:
        for train in modes:
            torch.manual_seed(0)
            theirs = theirs_cls(**kwargs)
            ours = ours_cls.from_vector_quantize_pytorch(theirs).to(device)
            ours.check_inputs = False
            theirs.to(device)
            add(f"{name} {'train' if train else 'eval'}", ours, theirs, x, train)
            del ours, theirs


def _fsp_binary_mapper_rows(add, device, s: int) -> None:
    """FSP (hf_vq migrated from the vqp module) and BinaryMapper, eval and train. (EvoLFQ with identity encoder
    and decoder is the LFQ rows.)"""
    n = 2**18 // s**2
    x = torch.randn(max(1, n // 4096), min(n, 4096), 64, device=device)
    logits = torch.randn(max(1, n // 4096 // 4), min(n, 4096), 10, device=device)
    for train in (False, True):
        torch.manual_seed(0)
        theirs = vqp.FSP(levels=[8, 5, 5, 5], dim=64, quantize_rate=0.5)
        ours = hf_vq.FSP.from_vector_quantize_pytorch(theirs).to(device)
        add(f"FSP [8,5,5,5] d64 N={x.shape[0] * x.shape[1]} {'train' if train else 'eval'}", ours,
            _LossAt(theirs.to(device), 2), x, train)
        theirs = vqp.binary_mapper.BinaryMapper(bits=10).to(device)
        ours = hf_vq.BinaryMapper(bits=10).to(device)
        add(f"BinaryMapper bits 10 N={logits.shape[0] * logits.shape[1]} {'train' if train else 'eval'}", ours,
            theirs, logits, train)


class _LossAt(torch.nn.Module):
    """A vqp module whose tuple holds its loss at `index` (not last, where `harness.step` reads it): `(output,
    loss)`."""

    def __init__(self, module: torch.nn.Module, index: int):
        super().__init__()
        self.module, self.index = module, index

    def forward(self, x):
        out = self.module(x)
        return out[0], out[self.index]


class _TimesOne(torch.nn.Module):
    """The least a training step over `x` can do (one elementwise op; the harness adds the sum and backward):
    the launch and autograd-engine floor that host-bound rows (FSQ) cannot go under."""

    def forward(self, x):
        return hf_vq.modeling_utils.QuantizerOutput(quantized=x * 1.0)


def table(rows: list[Row]) -> str:
    lines = [
        "| workload | hf_vq ms | vqp ms | speedup | hf_vq tokens/s | hf_vq peak GiB | vqp peak GiB | memory ratio | "
        "bf16 GEMM floor ms | x floor | agree hf_vq | agree vqp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r.theirs.ms / r.ours.ms:.1f}x" if r.ours.ms and r.theirs.ms else "—"
        tps = f"{r.tokens / (r.ours.ms / 1e3):.3g}" if r.ours.ms else "—"
        vqp_ms = fmt(r.theirs.ms) if r.theirs.ms is not None else r.theirs.note
        mem = f"1/{r.theirs.peak_gib / r.ours.peak_gib:.0f}" if r.ours.peak_gib and r.theirs.peak_gib else "—"
        of_floor = f"{r.ours.ms / r.floor_ms:.1f}" if r.ours.ms and r.floor_ms else "—"
        lines.append(
            f"| {r.name} | {fmt(r.ours.ms)} | {vqp_ms} | {speed} | {tps} | {fmt(r.ours.peak_gib)} | "
            f"{fmt(r.theirs.peak_gib)} | {mem} | {fmt(r.floor_ms)} | {of_floor} | {fmt(r.agree_ours, '.5f')} | "
            f"{fmt(r.agree_theirs, '.5f')} |"
        )
    return "\n".join(lines)


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


def _run_matrix(device, quick: bool, only: list[str] | None, out: str | None, repeat: int,
                options: bool = False) -> None:
    import first_call
    import vqp_matrix

    rows = vqp_matrix.option_specs() if options else None
    results = vqp_matrix.run_matrix(device, quick, _measure_pair, only, repeat, rows)
    first_calls = []
    if device.type == "cuda" and not only and not options:
        for name in ("VectorQuantize d256 K8192", "VectorQuantize d1024 K4096", "ResidualVQ 8x1024 d128",
                     "FSQ [8,8,8,5,5,5]"):
            first_calls.append((name, *first_call.cold_and_warm(name)))
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    header = (f"{datetime.date.today()} — {name}, torch {torch.__version__}, vector-quantize-pytorch "
              f"{getattr(vqp, '__version__', '1.32.0')}, triton {_triton_version()}, hf_vq {hf_vq.__version__}")
    text = header + "\n\n" + vqp_matrix.matrix_table(results, first_calls) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--only", nargs="*", default=None, help="run the rows whose name contains one of these")
    parser.add_argument("--out", default=None, help="also write the table (with a header) to this file")
    parser.add_argument("--matrix", action="store_true", help="the configuration grid (vqp_matrix.py) and first calls")
    parser.add_argument("--options", action="store_true",
                        help="the option rows (vqp_matrix.option_specs: one option at a time on a VQ baseline, and "
                             "scalar and residual variants), as a grid")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure each row this many times, hf_vq and vqp alternating, and report the medians")
    parser.add_argument("--grad", choices=("sum", "random"), default="sum",
                        help="training steps backpropagate quantized.sum() (a broadcast gradient, the default) or a "
                             "fixed random gradient of the output's shape (as a real loss gives)")
    args = parser.parse_args()
    global GRAD
    GRAD = args.grad
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.matrix or args.options:
        _run_matrix(device, args.quick or device.type == "cpu", args.only, args.out, args.repeat, args.options)
        return
    rows = run_rows(device, args.quick or device.type == "cpu", args.only, args.repeat)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"{datetime.date.today()} — {name}, torch {torch.__version__}, vector-quantize-pytorch "
        f"{getattr(vqp, '__version__', '1.32.0')}, triton {_triton_version()}, hf_vq {hf_vq.__version__}; fp32 inputs"
    )
    text = header + "\n\n" + table(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
