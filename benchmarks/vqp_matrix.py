"""The configuration grid of `bench_vs_vqp.py --matrix`: hf_vq and vector-quantize-pytorch 1.32 side by side on
many configurations rather than a few benchmark rows.

Every row builds vqp's module from keyword arguments and hf_vq's from the same ones (VectorQuantize and ResidualVQ
through `from_vector_quantize_pytorch`, so both hold the same codebooks; the others with their own init, which
does not change their cost), runs one input of at least 2^16 tokens, and times an eval forward and a training
step (forward, backward of the output's sum plus the loss) on each side. Both modules keep their defaults
(hf_vq's input checks included). `--quick` shrinks every row for a CPU smoke run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import hf_vq

import vector_quantize_pytorch as vqp
from harness import Measurement, fmt

N16 = 2**16


@dataclass
class Spec:
    name: str
    family: str  # hf_vq / vqp class name
    kwargs: dict
    shape: tuple  # input shape
    bf16: bool = False
    channel_first: bool = False  # features in dim 1 (images, video; vqp's LatentQuantize always)
    ours_extra: dict | None = None  # hf_vq-only arguments that give vqp's behaviour


def _vq(name, shape=(16, 4096, 256), bf16=False, **kw) -> Spec:
    channel_first = "accept_image_fmap" in kw or "accept_3d_fmap" in kw or kw.get("channel_last") is False
    return Spec(name, "VectorQuantize", dict(decay=0.99, **kw), shape, bf16, channel_first)


def specs() -> list[Spec]:
    """The grid: VQ feature dims 4..2048 and codebook sizes 256..2^17, heads, projections, cosine, channel-first
    image and video input, bf16 input, residual and grouped VQ, every scalar quantizer with and without
    projections."""
    rows = []
    for d, k, n in ((4, 256, N16), (32, 1024, N16), (256, 8192, 2**18), (512, 16384, N16), (768, 2048, 2**17),
                    (1024, 4096, N16), (2048, 1024, N16), (256, 2**17, N16)):
        rows.append(_vq(f"VQ d{d} K{k} N={n}", (n // 4096, 4096, d), dim=d, codebook_size=k))
    rows += [
        _vq("VQ heads=8 d512 K1024 separate codebooks", (16, 4096, 512), dim=512, codebook_size=1024, heads=8,
            separate_codebook_per_head=True),
        _vq("VQ heads=4 d256 K1024 shared codebook", (16, 4096, 256), dim=256, codebook_size=1024, heads=4),
        _vq("VQ d256 codebook_dim 32 K8192", (16, 4096, 256), dim=256, codebook_size=8192, codebook_dim=32),
        _vq("VQ cosine d256 cdim32 K8192", (16, 4096, 256), dim=256, codebook_size=8192, codebook_dim=32,
            use_cosine_sim=True),
        _vq("VQ image (16, 256, 64, 64) K4096", (16, 256, 64, 64), dim=256, codebook_size=4096, accept_image_fmap=True),
        _vq("VQ video (4, 128, 4, 64, 64) K4096", (4, 128, 4, 64, 64), dim=128, codebook_size=4096,
            accept_3d_fmap=True),
        _vq("VQ bf16 input d256 K8192", (16, 4096, 256), bf16=True, dim=256, codebook_size=8192),
        Spec("ResidualVQ 8x1024 d128 N=2^17", "ResidualVQ", dict(dim=128, num_quantizers=8, codebook_size=1024,
                                                                    decay=0.99), (32, 4096, 128)),
        Spec("ResidualVQ 4x1024 d1024", "ResidualVQ", dict(dim=1024, num_quantizers=4, codebook_size=1024),
             (16, 4096, 1024)),
        Spec("GroupedResidualVQ groups 2, 4x1024, d256", "GroupedResidualVQ",
             dict(dim=256, groups=2, num_quantizers=4, codebook_size=1024), (16, 4096, 256)),
        Spec("FSQ [8,8,8,5,5,5] N=2^20", "FSQ", dict(levels=[8, 8, 8, 5, 5, 5]), (256, 4096, 6)),
        Spec("FSQ [8,8,8,5,5,5] dim 256 (projections) N=2^18", "FSQ", dict(levels=[8, 8, 8, 5, 5, 5], dim=256),
             (64, 4096, 256)),
        Spec("FSQ [8,5,5,5] image (16, 256, 64, 64) (projections)", "FSQ", dict(levels=[8, 5, 5, 5], dim=256),
             (16, 256, 64, 64), channel_first=True),
        Spec("FSQ [8,8,8,5,5,5] video (4, 128, 16, 64, 64) (projections) N=2^18", "FSQ",
             dict(levels=[8, 8, 8, 5, 5, 5], dim=128), (4, 128, 16, 64, 64), channel_first=True),
        Spec("LFQ 2^14 codes N=2^16", "LFQ", dict(codebook_size=2**14, dim=14, entropy_loss_weight=0.1),
             (16, 4096, 14)),
        Spec("LFQ 2^10 codes dim 256 (projections)", "LFQ", dict(codebook_size=2**10, dim=256), (16, 4096, 256)),
        Spec("LatentQuantize [5,5,5,5] dim 64 N=2^18", "LatentQuantize", dict(levels=[5, 5, 5, 5], dim=64),
             (64, 64, 4096), channel_first=True, ours_extra=dict(channel_first=True)),
        Spec("ResidualFSQ 4 x [8,5,5,5] dim 256 N=2^18", "ResidualFSQ",
             dict(levels=[8, 5, 5, 5], num_quantizers=4, dim=256), (64, 4096, 256)),
        Spec("ResidualLFQ 4 x 2^10 dim 256", "ResidualLFQ", dict(codebook_size=2**10, num_quantizers=4, dim=256),
             (16, 4096, 256)),
        Spec("GroupedResidualFSQ groups 2, 4 x [8,5,5,5], dim 256", "GroupedResidualFSQ",
             dict(levels=[8, 5, 5, 5], num_quantizers=4, dim=256, groups=2), (16, 4096, 256)),
        Spec("GroupedResidualLFQ groups 2, 4 x 2^10, dim 256", "GroupedResidualLFQ",
             dict(codebook_size=2**10, num_quantizers=4, dim=256, groups=2), (16, 4096, 256)),
    ]
    return rows


def option_specs() -> list[Spec]:
    """`--options`: the options a user turns on, one at a time, on a VQ d256 K1024 baseline (2^16 tokens), and
    scalar and residual variants at 2^18 tokens that the grid leaves out."""
    base, n18 = (16, 4096, 256), (64, 4096)

    def vq(name, shape=base, **kw):
        return _vq(name, shape, **{"dim": 256, "codebook_size": 1024, **kw})

    return [
        vq("VQ d256 K1024 (baseline)"),
        vq("VQ k-means init", kmeans_init=True),
        vq("VQ dead-code expiry 2", threshold_ema_dead_code=2),
        vq("VQ learnable codebook, no EMA", learnable_codebook=True, ema_update=False),
        vq("VQ orthogonal regularization", orthogonal_reg_weight=1.0),
        vq("VQ stochastic sampling", stochastic_sample_codes=True, sample_codebook_temp=1.0),
        vq("VQ affine codebook", affine_param=True),
        vq("VQ cosine d256 K1024", use_cosine_sim=True),
        vq("VQ straight-through (no rotation trick)", rotation_trick=False),
        vq("VQ cross-entropy commitment", commitment_use_cross_entropy_loss=True),
        vq("VQ codebook diversity loss", codebook_diversity_loss_weight=1.0),
        vq("VQ (b, d, n) input", (16, 256, 4096), channel_last=False),
        vq("VQ heads=2 separate codebook_dim 64", heads=2, separate_codebook_per_head=True, codebook_dim=64),
        vq("VQ frozen codebook", freeze_codebook=True),
        vq("VQ bf16 input cosine", bf16=True, use_cosine_sim=True),
        vq("VQ d16 K65536", (16, 4096, 16), dim=16, codebook_size=65536),
        vq("VQ d64 K4096", (16, 4096, 64), dim=64, codebook_size=4096),
        vq("VQ d128 K2048 N=2^17", (32, 4096, 128), dim=128, codebook_size=2048),
        vq("VQ d384 K8192", (16, 4096, 384), dim=384, codebook_size=8192),
        vq("VQ d1536 K512", (16, 4096, 1536), dim=1536, codebook_size=512),
        Spec("ResidualVQ shared codebook 4x1024 d256, quantize dropout", "ResidualVQ",
             dict(dim=256, num_quantizers=4, codebook_size=1024, shared_codebook=True, quantize_dropout=True), base),
        Spec("ResidualVQ 4x1024 d256 codebook_dim 64", "ResidualVQ",
             dict(dim=256, num_quantizers=4, codebook_size=1024, codebook_dim=64), base),
        Spec("SimVQ d256 K1024", "SimVQ", dict(dim=256, codebook_size=1024), base),
        Spec("ResidualSimVQ 4 x K1024 d256", "ResidualSimVQ", dict(dim=256, num_quantizers=4, codebook_size=1024),
             base),
        Spec("LFQ 2^16 codes N=2^16", "LFQ", dict(codebook_size=2**16, dim=16, entropy_loss_weight=0.1),
             (16, 4096, 16)),
        Spec("LFQ spherical 2^10 N=2^18", "LFQ", dict(codebook_size=2**10, dim=10, spherical=True), (*n18, 10)),
        Spec("LFQ 2 codebooks of 2^8 N=2^18", "LFQ", dict(codebook_size=2**8, dim=16, num_codebooks=2), (*n18, 16)),
        Spec("LFQ frac_per_sample_entropy 0.25 N=2^18", "LFQ",
             dict(codebook_size=2**12, dim=12, frac_per_sample_entropy=0.25), (*n18, 12)),
        Spec("FSQ [8,5,5,5] 2 codebooks dim 128 N=2^18", "FSQ", dict(levels=[8, 5, 5, 5], dim=128, num_codebooks=2),
             (*n18, 128)),
        Spec("LatentQuantize [5,5,5,5] no projections N=2^18", "LatentQuantize", dict(levels=[5, 5, 5, 5], dim=4),
             (64, 4, 4096), channel_first=True, ours_extra=dict(channel_first=True)),
        Spec("ResidualFSQ 4 x [8,5,5,5] no projections N=2^18", "ResidualFSQ",
             dict(levels=[8, 5, 5, 5], num_quantizers=4, dim=4), (*n18, 4)),
        Spec("ResidualLFQ 4 x 2^10 no projections N=2^18", "ResidualLFQ",
             dict(codebook_size=2**10, num_quantizers=4, dim=10), (*n18, 10)),
    ]


def _shrink(spec: Spec) -> Spec:
    """A CPU-sized version of a row: 256 tokens, dims and codebooks divided down."""
    kw = dict(spec.kwargs)
    for key, floor in (("codebook_size", 16), ("dim", 4)):
        if key in kw and spec.family not in ("LFQ", "ResidualLFQ", "GroupedResidualLFQ"):
            kw[key] = max(floor, kw[key] // 16)
    if spec.family in ("LFQ", "ResidualLFQ", "GroupedResidualLFQ"):
        kw["codebook_size"] = 2**6
        kw["dim"] = 6 if kw.get("dim", 14) < 64 else 32
    if "codebook_dim" in kw:
        kw["codebook_dim"] = 4
    if kw.get("heads", 1) > 1:
        kw["dim"] = max(kw["dim"], 8 * kw["heads"])
    dim = kw.get("dim", spec.shape[1] if spec.channel_first else spec.shape[-1])
    if not spec.channel_first:
        shape = (1, 256, dim)
    elif len(spec.shape) == 3:
        shape = (1, dim, 256)
    else:
        shape = (1, dim, *(2, 8, 16)[5 - len(spec.shape):])
    return Spec(spec.name, spec.family, kw, shape, spec.bf16, spec.channel_first, spec.ours_extra)


def build(spec: Spec, device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """`(ours, theirs)` for a row, on `device`."""
    torch.manual_seed(0)
    theirs = getattr(vqp, spec.family)(**spec.kwargs)
    cls = getattr(hf_vq, spec.family)
    if hasattr(cls, "from_vector_quantize_pytorch"):
        if spec.family == "VectorQuantize":
            with torch.no_grad():  # standard-normal codes (a trained codebook's scale; see bench_vs_vqp)
                theirs._codebook.embed.copy_(torch.randn_like(theirs._codebook.embed))
                theirs._codebook.embed_avg.copy_(theirs._codebook.embed)
        ours = cls.from_vector_quantize_pytorch(theirs)
    else:
        ours = cls(**spec.kwargs, **(spec.ours_extra or {}))
    return ours.to(device), theirs.to(device)


def run_matrix(device, quick: bool, measure_pair: Callable, only: list[str] | None = None,
               repeat: int = 1, rows: list[Spec] | None = None) -> list[dict]:
    """Measure every row of `rows` (default: the grid, `specs()`) in eval and train (`repeat` times each, as
    `measure_pair` combines them); print each as it finishes; return the rows as dicts."""
    results = []
    for spec in specs() if rows is None else rows:
        if only and not any(part in spec.name for part in only):
            continue
        spec = _shrink(spec) if quick else spec
        try:
            ours, theirs = build(spec, device)
        except Exception as e:  # a configuration one side does not accept: shown, not hidden
            print(f"{spec.name}: not built ({type(e).__name__}: {str(e)[:100]})", flush=True)
            results.append(dict(name=spec.name, tokens=None, note=f"not built: {type(e).__name__}"))
            continue
        x = torch.randn(spec.shape, device=device, dtype=torch.bfloat16 if spec.bf16 else torch.float32)
        tokens = x.numel() // (x.shape[1] if spec.channel_first else x.shape[-1])
        row = dict(name=spec.name, tokens=tokens, note="")
        for train in (False, True):
            ours.train(train)  # eval rows run both modules in eval mode (training mode updates codebooks)
            theirs.train(train)
            try:
                m_ours, m_theirs = measure_pair(ours, theirs, x, train, device, repeat)
            except Exception as e:
                m_ours = m_theirs = Measurement(None, None, f"{type(e).__name__}: {str(e)[:60]}")
            row["train" if train else "eval"] = (m_ours, m_theirs)
        results.append(row)
        print(_line(row), flush=True)
        del ours, theirs, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _ratio(pair) -> float | None:
    ours, theirs = pair
    return theirs.ms / ours.ms if ours.ms and theirs.ms else None


def _cell(pair) -> str:
    ours, theirs = pair
    ratio = _ratio(pair)
    return (f"{fmt(ours.ms)} | {fmt(theirs.ms) if theirs.ms is not None else theirs.note or '—'} | "
            f"{fmt(ratio, '.2f')}x" if ratio else f"{fmt(ours.ms)} {ours.note} | {theirs.note or fmt(theirs.ms)} | —")


def _line(row: dict) -> str:
    if "eval" not in row:
        return f"| {row['name']} | — | {row['note']} | | | | | | | |"
    peak = f"{fmt(row['train'][0].peak_gib)} / {fmt(row['train'][1].peak_gib)}"
    return f"| {row['name']} | {row['tokens']} | {_cell(row['eval'])} | {_cell(row['train'])} | {peak} |"


def matrix_table(results: list[dict], first_calls: list[tuple[str, float, float]]) -> str:
    lines = ["| configuration | tokens | eval hf_vq ms | eval vqp ms | eval speedup | train hf_vq ms | train vqp ms | "
             "train speedup | train peak GiB hf_vq / vqp |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [_line(r) for r in results]
    ratios = [(_ratio(r[mode]), r["name"], mode) for r in results if "eval" in r for mode in ("eval", "train")]
    ratios = [t for t in ratios if t[0] is not None]
    if ratios:
        worst = min(ratios)
        lines.append(f"\nWorst speedup: {worst[0]:.2f}x ({worst[1]}, {worst[2]}); rows: {len(results)}.")
    if first_calls:
        lines += ["", "| first call (fresh process, eval) | empty Triton cache s | warm on-disk cache s |", "|---|---|---|"]
        lines += [f"| {name} | {cold:.2f} | {warm:.2f} |" for name, cold, warm in first_calls]
    return "\n".join(lines)
