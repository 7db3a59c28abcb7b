"""Residual FSQ and residual LFQ (vector-quantize-pytorch 1.32 `ResidualFSQ`, `ResidualLFQ`): the residual loop of
`residual.py` (`ResidualQuantizerBase`) over FSQ / LFQ levels at shrinking scales."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..modeling_utils import QuantizerConfig, absorb_nested_kwargs, register_quantizer, validate_quantize_dropout
from .fsq import FSQ, FSQConfig, check_levels
from .lfq import LFQ, LFQConfig
from .residual import ResidualQuantizerBase, _projections


# --------------------------------------------------------------------------------------------------
# ResidualFSQ


class ResidualFSQConfig(QuantizerConfig):
    """Configuration of [`ResidualFSQ`] (vqp 1.32 names).

    Args:
        levels (`list[int]`), num_quantizers (`int`), dim (`int`, *optional*, defaults to `len(levels)`).
        is_channel_first (`bool`): `(b, d, ...)` input.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of: as [`ResidualVQConfig`].
        soft_clamp_input_value (`float` or `list[float]`, *optional*): tanh soft clamp of the projected input;
            with `bound_hard_clamp` (default) it is `1 + 1 / (levels - 1)` per dimension.
        bound_hard_clamp (`bool`, defaults to `True`): levels clamp instead of tanh (input is pre-clamped).
        fsq_kwargs (`dict`): further [`FSQConfig`] options for every level.
    Level i quantizes `residual / levels**-i` and its codes are scaled back by `levels**-i`.
    """

    model_type = "hf_vq_residual_fsq"
    level_fields: ClassVar[frozenset[str]] = frozenset(FSQConfig.field_names()) - {
        "levels", "dim", "preserve_symmetry", "bound_hard_clamp", "check_inputs"}

    def __init__(self, levels: list[int] = (8, 5, 5, 5), num_quantizers: int = 4, dim: int | None = None,
                 is_channel_first: bool = False, quantize_dropout: bool = False, quantize_dropout_cutoff_index: int = 0,
                 quantize_dropout_multiple_of: int = 1, soft_clamp_input_value: float | list[float] | None = None,
                 bound_hard_clamp: bool = True, fsq_kwargs: dict[str, Any] | None = None, **kwargs):
        self.levels = list(levels)
        self.num_quantizers, self.dim, self.is_channel_first = num_quantizers, dim, is_channel_first
        self.quantize_dropout = quantize_dropout
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.soft_clamp_input_value, self.bound_hard_clamp = soft_clamp_input_value, bound_hard_clamp
        self.fsq_kwargs = absorb_nested_kwargs(kwargs, fsq_kwargs, self.level_fields)
        super().__init__(**kwargs)
        if self.dim is None:
            self.dim = len(self.levels)

    def validate(self):
        check_levels(self.levels)
        validate_quantize_dropout(self)
        if self.bound_hard_clamp and self.soft_clamp_input_value is not None:
            raise ValueError("soft_clamp_input_value is implied by bound_hard_clamp=True; set one of them")

    def level_config(self) -> FSQConfig:
        return FSQConfig(levels=self.levels, dim=len(self.levels), preserve_symmetry=True,
                         bound_hard_clamp=self.bound_hard_clamp, check_inputs=False, **self.fsq_kwargs)


@register_quantizer
class ResidualFSQ(ResidualQuantizerBase):
    """Residual FSQ (vqp 1.32 semantics): symmetric FSQ levels at geometrically shrinking scales."""

    config_class = ResidualFSQConfig

    def __init__(self, config: ResidualFSQConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self._copy_loop_config(c, channel_first=c.is_channel_first)
        self.levels = list(c.levels)
        self.soft_clamp_input_value, self.bound_hard_clamp = c.soft_clamp_input_value, c.bound_hard_clamp
        _projections(self, c.dim, len(c.levels))
        self.layers = nn.ModuleList(FSQ(c.level_config()) for _ in range(c.num_quantizers))
        self.post_init()

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _scale(self, level: int, device) -> Tensor:
        return torch.tensor(self.levels, dtype=torch.float32, device=device) ** -level

    def _prepare(self, x: Tensor) -> Tensor:
        clamp = self.soft_clamp_input_value
        if self.bound_hard_clamp:
            clamp = 1 + 1 / (torch.tensor(self.levels, dtype=torch.float32, device=x.device) - 1)
        elif clamp is None:
            return x
        clamp = torch.as_tensor(clamp, dtype=torch.float32, device=x.device)
        return (x / clamp).tanh() * clamp

    def _run_level(self, level, layer, residual, mask):
        scale = self._scale(level, residual.device)
        with torch.autocast(device_type=residual.device.type, enabled=False):
            out = layer(residual / scale, return_dict=True)
        return out.quantized * scale, out.indices, None

    def _level_codes(self, level, layer, indices):
        return layer._codes_from_indices(indices) * self._scale(level, indices.device)


# --------------------------------------------------------------------------------------------------
# ResidualLFQ


class ResidualLFQConfig(QuantizerConfig):
    """Configuration of [`ResidualLFQ`] (vqp 1.32 names): `dim`, `num_quantizers`, `codebook_size`, the dropout
    options, `soft_clamp_input_value` (halved at every level) and `lfq_kwargs` for every [`LFQ`] level.
    Level i has `codebook_scale = 2**-i`."""

    model_type = "hf_vq_residual_lfq"
    level_fields: ClassVar[frozenset[str]] = frozenset(LFQConfig.field_names()) - {
        "dim", "codebook_size", "codebook_scale", "soft_clamp_input_value", "check_inputs"}

    def __init__(self, dim: int = 16, num_quantizers: int = 4, codebook_size: int = 2**10,
                 quantize_dropout: bool = False, quantize_dropout_cutoff_index: int = 0,
                 quantize_dropout_multiple_of: int = 1, soft_clamp_input_value: float | None = None,
                 lfq_kwargs: dict[str, Any] | None = None, **kwargs):
        self.dim, self.num_quantizers, self.codebook_size = dim, num_quantizers, codebook_size
        self.quantize_dropout = quantize_dropout
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.soft_clamp_input_value = soft_clamp_input_value
        self.lfq_kwargs = absorb_nested_kwargs(kwargs, lfq_kwargs, self.level_fields)
        super().__init__(**kwargs)

    def validate(self):
        validate_quantize_dropout(self)
        if not isinstance(self.codebook_size, int) or self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of two >= 2, got {self.codebook_size!r}")

    def level_config(self, level: int) -> LFQConfig:
        clamp = self.soft_clamp_input_value
        return LFQConfig(dim=int(math.log2(self.codebook_size)), codebook_scale=2.0**-level,
                         soft_clamp_input_value=None if clamp is None else clamp * 0.5**level,
                         check_inputs=False, **self.lfq_kwargs)


@register_quantizer
class ResidualLFQ(ResidualQuantizerBase):
    """Residual LFQ (vqp 1.32 semantics): LFQ levels with codebook scales 1, 1/2, 1/4, ..."""

    config_class = ResidualLFQConfig

    def __init__(self, config: ResidualLFQConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self._copy_loop_config(c)
        _projections(self, c.dim, int(math.log2(c.codebook_size)))
        self.layers = nn.ModuleList(LFQ(c.level_config(i)) for i in range(c.num_quantizers))
        self.post_init()

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _run_level(self, level, layer, residual, mask):
        with torch.autocast(device_type=residual.device.type, enabled=False):
            out = layer(residual, mask=mask, return_dict=True)
        return out.quantized, out.indices, out.loss

    def _level_codes(self, level, layer, indices):
        return layer._codes_from_indices(indices)
