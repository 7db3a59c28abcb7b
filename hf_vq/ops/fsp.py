"""Finite scalar perturbation ops (FSP, https://arxiv.org/abs/2602.17133), following vqp 1.32
`finite_scalar_perturbation.py`: CDF activations onto [0, 1], binning to bin midpoints, in-bin perturbation and the
batch-moment regularizer ("vector norm").

Stateless: `levels` and `basis` are the int32 tables of `hf_vq.ops.fsq.fsq_tables`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

_SQRT2 = math.sqrt(2.0)

# std of a uniform variable on [0, 1]: (q - 0.5) / it has unit variance (vqp's constant, same digits)
UNIFORM_STD = 0.28867513459481287


# -- CDF activations: (-inf, inf) -> (0, 1), and their inverses ---------------------------------------


def tanh_act(z: Tensor) -> Tensor:
    return (torch.tanh(z) + 1.0) / 2.0


def tanh_inv_act(p: Tensor) -> Tensor:
    return torch.arctanh(p * 2.0 - 1.0)


def sigmoid_act(z: Tensor) -> Tensor:
    return torch.sigmoid(z)


def sigmoid_inv_act(p: Tensor) -> Tensor:
    return torch.logit(p)


def normal_act(z: Tensor) -> Tensor:
    return (1.0 + torch.erf(z / _SQRT2)) / 2.0


def normal_inv_act(p: Tensor) -> Tensor:
    return torch.erfinv(2.0 * p - 1.0) * _SQRT2


def laplace_act(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.sign(z) * (1.0 - torch.exp(-torch.abs(z))))


def laplace_inv_act(p: Tensor) -> Tensor:
    return -torch.sign(p - 0.5) * torch.log(1.0 - 2.0 * torch.abs(p - 0.5))


def cauchy_act(z: Tensor) -> Tensor:
    return torch.arctan(z) / torch.pi + 0.5


def cauchy_inv_act(p: Tensor) -> Tensor:
    return torch.tan((p - 0.5) * torch.pi)


CDF_ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "tanh": (tanh_act, tanh_inv_act),
    "sigmoid": (sigmoid_act, sigmoid_inv_act),
    "normal": (normal_act, normal_inv_act),
    "laplace": (laplace_act, laplace_inv_act),
    "cauchy": (cauchy_act, cauchy_inv_act),
}


def build_cdf_act(act_name: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """`(cdf, inverse_cdf)` of a named distribution, as vqp 1.32's `build_cdf_act` (a ValueError for an unknown
    name instead of vqp's assert)."""
    if act_name not in CDF_ACTIVATIONS:
        raise ValueError(f"CDF activation {act_name!r} not available: {list(CDF_ACTIVATIONS)}")
    return CDF_ACTIVATIONS[act_name]


# -- binning ----------------------------------------------------------------------------------------


def quantize_to_bins(act_z: Tensor, levels: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`[0, 1]` values to the midpoint of their bin (straight-through) and the (float, detached) bin index."""
    level_indices = (act_z.clamp_max(1.0 - eps) * levels).floor()
    midpoints = (level_indices + 0.5) / levels
    return act_z + (midpoints - act_z).detach(), level_indices.detach()


def level_indices_to_indices(level_indices: Tensor, basis: Tensor) -> Tensor:
    """Per-dimension bin indices `(..., d)` to mixed-radix int32 code indices `(...)`."""
    return (level_indices * basis).sum(dim=-1).to(torch.int32)


def indices_to_level_indices(indices: Tensor, levels: Tensor, basis: Tensor) -> Tensor:
    """Code indices `(...)` to per-dimension bin indices `(..., d)`."""
    return (indices.unsqueeze(-1) // basis) % levels


def indices_to_bin_midpoints(indices: Tensor, levels: Tensor, basis: Tensor) -> Tensor:
    """Code indices to their float32 bin midpoints in [0, 1], `(..., d)`."""
    return (indices_to_level_indices(indices, levels, basis).float() + 0.5) / levels


def perturb_within_bins(act_z: Tensor, q_act_z: Tensor, levels: Tensor, quantize_rate: float) -> tuple[Tensor, Tensor]:
    """Training-time perturbation: each value moves by up to half a bin (a proposal leaving (0, 1) is rejected),
    and replaces its quantized value with probability `1 - quantize_rate`. Returns `(values, acceptance rate)`.
    The two `rand_like` draws are in vqp's order, so a shared seed gives vqp's result. The result keeps the
    input's dtype (the float32 bin widths would otherwise promote a bf16 input, which vqp then fails on)."""
    half_bin = 1.0 / (levels * 2)
    proposal = act_z + half_bin * (torch.rand_like(act_z) * 2.0 - 1.0)
    accept = (proposal > 0.0) & (proposal < 1.0)
    perturbed = torch.where(accept, proposal, act_z)
    keep_perturbed = torch.rand_like(q_act_z) > quantize_rate
    return torch.where(keep_perturbed, perturbed, q_act_z).to(q_act_z.dtype), accept.float().mean()


# -- vector norm: a penalty on the batch moments of the projected features ------------------------

VECTOR_NORM_FIELDS = ("l1_target", "l1_weight", "l2_target", "l2_weight", "l3_target", "l3_weight",
                      "l4_target", "l4_weight", "eps")

# vqp 1.32 VectorNorm's defaults and presets
VECTOR_NORM_DEFAULTS = dict(l1_target=0.0, l1_weight=0.1, l2_target=1.0, l2_weight=0.07, l3_target=0.0,
                            l3_weight=0.06, l4_target=0.0, l4_weight=0.05, eps=1e-8)
_NO_HIGHER_MOMENTS = dict(l3_weight=0.0, l4_weight=0.0)
VECTOR_NORM_PRESETS = {
    "none": dict(l1_weight=0.0, l2_weight=0.0, l3_weight=0.0, l4_weight=0.0),
    "var": dict(l1_target=0.0, l1_weight=0.1, l2_target=1.0, l2_weight=0.07, **_NO_HIGHER_MOMENTS),
    "kurt": dict(l1_target=0.0, l1_weight=0.1, l2_target=1.0, l2_weight=0.07, l3_target=0.0, l3_weight=0.06,
                 l4_target=0.0, l4_weight=0.05),
    "var_tanh": dict(l1_target=0.0, l1_weight=0.1, l2_target=0.8225, l2_weight=0.07, **_NO_HIGHER_MOMENTS),
    "var_sigmoid": dict(l1_target=0.0, l1_weight=0.1, l2_target=3.29, l2_weight=0.07, **_NO_HIGHER_MOMENTS),
    "var_laplace": dict(l1_target=0.0, l1_weight=0.1, l2_target=2.0, l2_weight=0.07, **_NO_HIGHER_MOMENTS),
}


def vector_norm_params(spec: str | dict) -> dict[str, float]:
    """All nine VectorNorm parameters of a preset name or of a dict overriding the defaults."""
    if isinstance(spec, str):
        if spec not in VECTOR_NORM_PRESETS:
            raise ValueError(f"vector_norm preset {spec!r} unknown; available: {list(VECTOR_NORM_PRESETS)}")
        return {**VECTOR_NORM_DEFAULTS, **VECTOR_NORM_PRESETS[spec]}
    if not isinstance(spec, dict):
        raise ValueError(f"vector_norm must be a preset name or a dict of {list(VECTOR_NORM_FIELDS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(VECTOR_NORM_FIELDS))
    if unknown:
        raise ValueError(f"vector_norm got unknown field(s) {unknown}; known: {list(VECTOR_NORM_FIELDS)}")
    bad = {k: v for k, v in spec.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
    if bad:
        raise ValueError(f"vector_norm values must be numbers, got {bad}")
    return {**VECTOR_NORM_DEFAULTS, **{k: float(v) for k, v in spec.items()}}


def batch_moments(batch: Tensor, eps: float = 1e-8) -> dict[str, Tensor]:
    """Per-feature mean, unbiased variance, skewness and excess kurtosis of `(N, d)` rows."""
    variance, mean = torch.var_mean(batch, dim=0, unbiased=True)
    z_scores = (batch - mean) / variance.sqrt().clamp_min(eps)
    return {
        "mean": mean,
        "variance": variance,
        "skewness": z_scores.pow(3).mean(dim=0),
        "kurtosis": z_scores.pow(4).mean(dim=0) - 3.0,
    }


def vector_norm_loss(batch: Tensor, params: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """`(loss, moments)`: the weighted squared distances of the batch moments to their targets. Terms with weight 0
    are left out (so the "none" preset gives exactly 0, also for a one-row batch whose variance is NaN)."""
    moments = batch_moments(batch, params["eps"])
    loss = batch.new_zeros(())
    for order, name in enumerate(("mean", "variance", "skewness", "kurtosis"), start=1):
        weight = params[f"l{order}_weight"]
        if weight != 0:
            loss = loss + ((moments[name] - params[f"l{order}_target"]) ** 2).mean() * weight
    return loss, moments
