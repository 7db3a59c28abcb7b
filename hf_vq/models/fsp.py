"""Finite Scalar Perturbation (FSP) as a Hugging Face model.

Semantics: vector-quantize-pytorch 1.32 `FSP` (https://arxiv.org/abs/2602.17133). Each projected feature is mapped
to [0, 1] by a CDF activation and quantized to the midpoint of one of `levels[i]` equal bins; in training a
fraction `1 - quantize_rate` of the values is instead perturbed within its bin. A penalty on the batch moments of
the projected features ("vector norm") is the auxiliary loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..modeling_utils import (
    QuantizerConfig,
    QuantizerModel,
    QuantizerOutput,
    check_features,
    check_indices,
    register_quantizer,
)
from ..ops import fsp as fsp_ops
from ..ops import fsq as fsq_ops
from ..ops.fsp import build_cdf_act  # noqa: F401  (re-exported: vqp's `build_cdf_act`)
from .fsq import check_levels


class FSPConfig(QuantizerConfig):
    """Configuration of [`FSP`] (vqp 1.32's arguments, names, defaults and order).

    Args:
        levels (`list[int]`): number of bins per code dimension; the implicit codebook has `prod(levels)` codes.
        dim (`int`, *optional*): input feature dim; defaults to `len(levels)`. When it differs, linear
            projections map in and out of the code space.
        channel_first (`bool`, defaults to `False`): the input is `(b, d, ...)` instead of `(b, ..., d)` (vqp's FSP
            moves the channel only when this is set, for any rank).
        projection_has_bias (`bool`, defaults to `True`): bias in the in/out projections.
        act_name (`str`, defaults to `"tanh"`): the CDF activation, one of `"tanh"`, `"sigmoid"`, `"normal"`,
            `"laplace"`, `"cauchy"` (see `build_cdf_act`).
        quantize_rate (`float`, defaults to 0.0): in [0, 1]; in training, the chance that a value is quantized
            rather than perturbed within its bin (eval always quantizes).
        need_inv_act (`bool`, defaults to `False`): decode bin midpoints through the inverse CDF (with a
            straight-through gradient to the input); otherwise standardize them, `(q - 0.5) / std(U[0, 1])`.
        vector_norm (`str` or `dict`, defaults to `"var_tanh"`): the batch-moment regularizer: a vqp preset name
            (`"none"`, `"var"`, `"kurt"`, `"var_tanh"`, `"var_sigmoid"`, `"var_laplace"`) or a dict of vqp
            `VectorNorm` arguments (`l1_target`, `l1_weight`, ... `l4_weight`, `eps`) overriding its defaults.
    """

    model_type = "hf_vq_fsp"

    vqp_positional = ("levels", "dim", "channel_first", "projection_has_bias", "act_name",
                                                 "quantize_rate", "need_inv_act", "vector_norm")

    def __init__(
        self,
        levels: list[int] = (8, 5, 5, 5),
        dim: int | None = None,
        channel_first: bool = False,
        projection_has_bias: bool = True,
        act_name: str = "tanh",
        quantize_rate: float = 0.0,
        need_inv_act: bool = False,
        vector_norm: str | dict = "var_tanh",
        **kwargs,
    ):
        self.levels = list(levels) if isinstance(levels, (list, tuple)) else levels
        self.dim = dim
        self.channel_first = channel_first
        self.projection_has_bias = projection_has_bias
        self.act_name = act_name
        self.quantize_rate = quantize_rate
        self.need_inv_act = need_inv_act
        self.vector_norm = dict(vector_norm) if isinstance(vector_norm, dict) else vector_norm
        super().__init__(**kwargs)

    def validate(self):
        check_levels(self.levels)
        if self.dim is not None and (not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1):
            raise ValueError(f"dim must be a positive int or None, got {self.dim!r}")
        for name in ("channel_first", "projection_has_bias", "need_inv_act"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.act_name not in fsp_ops.CDF_ACTIVATIONS:
            raise ValueError(f"act_name must be one of {list(fsp_ops.CDF_ACTIVATIONS)}, got {self.act_name!r}")
        rate = self.quantize_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"quantize_rate must be in [0.0, 1.0], got {rate!r}")
        fsp_ops.vector_norm_params(self.vector_norm)  # raises a ValueError naming the problem

    @property
    def codebook_dim(self) -> int:
        return len(self.levels)

    @property
    def effective_dim(self) -> int:
        return self.dim if self.dim is not None else self.codebook_dim

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)


@dataclass
class FSPOutput(QuantizerOutput):
    """Output of [`FSP`].

    Args:
        quantized (`torch.Tensor`): the quantized features, in the input's layout.
        indices (`torch.Tensor`): int32 code indices, the input's shape without the feature axis.
        loss (`torch.Tensor`): the vector-norm loss (batch-moment penalty), also computed in eval, as vqp.
        level_indices (`torch.Tensor`): per-dimension bin indices (float, as vqp), `(b, ..., len(levels))`.
        norm_info (`dict`): the batch moments `mean`, `variance`, `skewness`, `kurtosis` of the projected features.
        p_accept_prob (`torch.Tensor`, *optional*): share of accepted in-bin perturbations (training with
            `quantize_rate < 1` only).
    """

    level_indices: Tensor | None = None
    norm_info: dict | None = None
    p_accept_prob: Tensor | None = None

    # vqp's `(q_z, indices, norm_loss, other_info)`
    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices", "loss", "other_info")

    @property
    def other_info(self) -> dict:
        """vqp's fourth return value: `level_indices`, `norm_info` and (when perturbing) `p_accept_prob`."""
        info = {"level_indices": self.level_indices, "norm_info": self.norm_info}
        if self.p_accept_prob is not None:
            info["p_accept_prob"] = self.p_accept_prob
        return info


@register_quantizer
class FSP(QuantizerModel):
    """Finite scalar perturbation: CDF-binned scalar quantization with in-bin perturbation during training.

    Takes vqp's positional arguments too: `FSP([8, 5, 5, 5], 16)` is `FSP(levels=[8, 5, 5, 5], dim=16)`.

    Example:
        >>> fsp = FSP(levels=[8, 5, 5, 5], dim=16, quantize_rate=0.5)
        >>> out = fsp(torch.randn(2, 10, 16))
        >>> out.quantized.shape, out.indices.shape, out.loss.shape
        (torch.Size([2, 10, 16]), torch.Size([2, 10]), torch.Size([]))
    """

    config_class = FSPConfig

    def __init__(self, config: FSPConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self.levels = list(c.levels)
        self.codebook_dim = c.codebook_dim
        self.dim = c.effective_dim
        self.codebook_size = c.codebook_size
        self.channel_first = c.channel_first
        self.act_name = c.act_name
        self.act_func, self.inv_act_func = build_cdf_act(c.act_name)
        self.need_inv_act = c.need_inv_act
        self.quantize_rate = float(c.quantize_rate)
        self.vector_norm_params = fsp_ops.vector_norm_params(c.vector_norm)
        self.check_inputs = c.check_inputs

        self.has_projections = self.dim != self.codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.codebook_dim, bias=c.projection_has_bias)
            self.project_out = nn.Linear(self.codebook_dim, self.dim, bias=c.projection_has_bias)
        else:
            self.project_in = self.project_out = nn.Identity()
        levels, basis = fsq_ops.fsq_tables(self.levels)
        self.register_buffer("_levels", levels, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.post_init()

    def reset_derived_buffers(self):
        device = self._levels.device if self._levels.device.type != "meta" else torch.device("cpu")
        self._levels, self._basis = fsq_ops.fsq_tables(self.levels, device=device)

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "FSP":
        """An `FSP` with the config and full state (projections) of a vqp 1.32 `FSP` module."""
        vn = module.vector_norm
        params = {name: float(getattr(vn, name)) for name in fsp_ops.VECTOR_NORM_FIELDS}
        preset = next((name for name in fsp_ops.VECTOR_NORM_PRESETS
                       if fsp_ops.vector_norm_params(name) == params), None)
        model = cls(
            levels=[int(v) for v in module._levels.tolist()],
            dim=module.dim,
            channel_first=bool(module.channel_first),
            projection_has_bias=not module.has_projections or module.project_in.bias is not None,
            act_name=module.act_name,
            quantize_rate=float(module.quantize_rate),
            need_inv_act=bool(module.need_inv_act),
            vector_norm=preset if preset is not None else params,
        )
        model.load_state_dict(module.state_dict())
        return model.to(next(module.parameters(), module._levels).device)

    # -- index <-> code (vqp's method names) ------------------------------------------------------

    def quantize_act_value(self, act_z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """[0, 1] values to bin midpoints (straight-through) and their per-dimension bin indices."""
        return fsp_ops.quantize_to_bins(act_z, self._levels, eps)

    def level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        return fsp_ops.level_indices_to_indices(level_indices, self._basis)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        return fsp_ops.indices_to_level_indices(indices, self._levels, self._basis)

    def indices_to_act_value(self, indices: Tensor) -> Tensor:
        return fsp_ops.indices_to_bin_midpoints(indices, self._levels, self._basis)

    def indices_to_codes(self, indices: Tensor, eps: float = 1e-6) -> Tensor:
        """Code indices `(b, ...)` to output features (channel-first with `channel_first`), as the forward's
        eval output."""
        check_indices(indices, self.codebook_size)
        q_z = self._decode_midpoints(self.indices_to_act_value(indices), eps)
        if self.has_projections:
            q_z = self.project_out(q_z.to(self.project_out.weight.dtype))
        return q_z.movedim(-1, 1) if self.channel_first else q_z

    def _decode_midpoints(self, q_act_z: Tensor, eps: float) -> Tensor:
        if self.need_inv_act:
            return self.inv_act_func(q_act_z.clamp(eps, 1.0 - eps))
        return (q_act_z - 0.5) / fsp_ops.UNIFORM_STD

    # -- forward ----------------------------------------------------------------------------------

    def _check_input(self, z: Tensor) -> None:
        check_features(z, self.dim, name="z")
        got = z.shape[1] if self.channel_first else z.shape[-1]
        if got != self.dim:
            axis = "dim 1 (channel_first)" if self.channel_first else "the last dim"
            raise ValueError(f"expected feature dim {self.dim} on {axis}, got {got} (input shape {tuple(z.shape)})")

    def forward(self, z: Tensor, eps: float | None = None, return_dict: bool | None = None) -> FSPOutput | tuple:
        """Quantize `z` of shape `(b, ..., dim)` (or `(b, dim, ...)` with `channel_first`). `eps` keeps values
        below 1 before binning (default: the input dtype's machine epsilon, as vqp). Returns [`FSPOutput`], or
        vqp's `(quantized, indices, norm_loss, other_info)` with `return_dict=False`."""
        if self.check_inputs:
            self._check_input(z)
        eps = eps or torch.finfo(z.dtype).eps
        if self.channel_first:
            z = z.movedim(1, -1)
        lead_shape = z.shape[:-1]
        z = self.project_in(z.reshape(-1, self.dim))
        norm_loss, norm_info = fsp_ops.vector_norm_loss(z, self.vector_norm_params)

        act_z = self.act_func(z)
        q_act_z, level_indices = fsp_ops.quantize_to_bins(act_z, self._levels, eps)
        quantize_rate = self.quantize_rate if self.training else 1.0
        p_accept = None
        if quantize_rate < 1.0:
            q_act_z, p_accept = fsp_ops.perturb_within_bins(act_z, q_act_z, self._levels, quantize_rate)

        q_z = self._decode_midpoints(q_act_z, eps)
        if self.need_inv_act:
            q_z = z + (q_z - z).detach()
        indices = fsp_ops.level_indices_to_indices(level_indices, self._basis)
        q_z = self.project_out(q_z).reshape(*lead_shape, self.dim)
        if self.channel_first:
            q_z = q_z.movedim(-1, 1)
        out = FSPOutput(quantized=q_z, indices=indices.reshape(lead_shape), loss=norm_loss,
                        level_indices=level_indices.reshape(*lead_shape, -1), norm_info=norm_info,
                        p_accept_prob=p_accept)
        return self._output(out, return_dict)
