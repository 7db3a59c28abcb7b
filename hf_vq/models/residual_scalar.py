"""Residual FSQ and residual LFQ (vector-quantize-pytorch 1.32 `ResidualFSQ`, `ResidualLFQ`): the residual loop of
`residual.py` (`ResidualQuantizerBase`) over FSQ / LFQ levels at shrinking scales."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..modeling_utils import (QuantizerConfig, absorb_nested_kwargs, autocast_off, register_quantizer,
                             validate_quantize_dropout)
from ..ops import fsq as fsq_ops
from ..ops import lfq as lfq_ops
from ..ops import triton_fsq
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
    """Residual FSQ (vqp 1.32 semantics): symmetric FSQ levels at geometrically shrinking scales.

    `levels_path` is decided once, from the config: `"one_pass"` runs every level in one call
    (`ops.fsq.residual_fsq`, one Triton kernel on CUDA: each element read and written once) when the levels are
    plain symmetric FSQ (every level option at its default); any other level option takes `"per_level"`, which
    calls each FSQ level in turn. A call with a mask, per-call level options or a non-float32 residual also
    takes the per-level loop."""

    config_class = ResidualFSQConfig

    def __init__(self, config: ResidualFSQConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self._copy_loop_config(c, channel_first=c.is_channel_first)
        self.levels = list(c.levels)
        self.soft_clamp_input_value, self.bound_hard_clamp = c.soft_clamp_input_value, c.bound_hard_clamp
        _projections(self, c.dim, len(c.levels))
        self.layers = nn.ModuleList(FSQ(c.level_config()) for _ in range(c.num_quantizers))
        self.levels_path = "one_pass" if _plain_symmetric_fsq(c) else "per_level"
        width = len(self.levels)
        self.register_buffer("level_scales", torch.empty(c.num_quantizers, width), persistent=False)
        self.register_buffer("input_clamp", torch.empty(width), persistent=False)
        self.register_buffer("bound_table", torch.empty(4, width), persistent=False)
        self.register_buffer("level_basis", torch.empty(width, dtype=torch.int32), persistent=False)
        self.post_init()

    def reset_derived_buffers(self):
        levels = torch.tensor(self.levels, dtype=torch.float32, device=self.level_scales.device)
        self.level_scales.copy_(torch.stack([levels**-i for i in range(self.num_quantizers)]))
        self.input_clamp.copy_(1 + 1 / (levels - 1))
        self.bound_table.copy_(fsq_ops.bound_table(self.levels, hard_clamp=self.bound_hard_clamp, symmetric=True))
        self.level_basis.copy_(fsq_ops.fsq_tables(self.levels)[1])

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _prepare(self, x: Tensor) -> Tensor:
        clamp = self.soft_clamp_input_value
        if self.bound_hard_clamp:
            clamp = self.input_clamp
        elif clamp is None:
            return x
        else:
            clamp = torch.as_tensor(clamp, dtype=torch.float32, device=x.device)
        return (x / clamp).tanh() * clamp

    def _fused_levels(self, residual, mask, cutoff, level_kwargs):
        if self.levels_path != "one_pass" or mask is not None or level_kwargs or residual.dtype != torch.float32:
            return None
        scales = self.level_scales[: cutoff + 1]
        if triton_fsq.available(residual):
            straight_through = residual.requires_grad and torch.is_grad_enabled()
            quantized, indices = triton_fsq.residual_fsq_fused(residual, scales, self.bound_table, self.level_basis,
                                                               self.bound_hard_clamp, straight_through=straight_through)
        else:
            quantized, indices = fsq_ops.residual_fsq(residual, scales, self.bound_table, self.level_basis,
                                                      self.codebook_size, hard_clamp=self.bound_hard_clamp)
        dropped = self.num_quantizers - 1 - cutoff
        if dropped:
            indices = torch.cat([indices, indices.new_full((*indices.shape[:-1], dropped), -1)], dim=-1)
        return quantized, indices, None

    def _run_level(self, level, layer, residual, mask):
        scale = self.level_scales[level]
        with autocast_off(residual.device.type):
            out = layer(residual / scale, return_dict=True)
        return out.quantized * scale, out.indices, None

    def _level_codes(self, level, layer, indices):
        return layer._codes_from_indices(indices) * self.level_scales[level].to(indices.device)


def _plain_symmetric_fsq(config: ResidualFSQConfig) -> bool:
    """Whether every level is a plain symmetric FSQ (each level option at its default): what the one-pass op
    computes. Reads the level config, so a new FSQ option is honoured by sending the model to the per-level loop."""
    level = config.level_config().to_kwargs()
    plain = FSQConfig(levels=config.levels, dim=len(config.levels), preserve_symmetry=True,
                      bound_hard_clamp=config.bound_hard_clamp, check_inputs=False).to_kwargs()
    return level == plain


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
    """Residual LFQ (vqp 1.32 semantics): LFQ levels with codebook scales 1, 1/2, 1/4, ...

    Outside training, `eval_path` (decided once, from the config) is `"one_pass"` when the levels quantize plain
    signs (no soft clamp, spherical codes, rotation, several codebooks or level projections; the loss options do
    not act outside training): the residual loop then runs as a few elementwise ops per level
    (`ops.lfq.residual_lfq`) instead of every level's forward, with the same values. Any other level option takes
    `"per_level"`, as do training, masked calls and per-call level options."""

    config_class = ResidualLFQConfig

    def __init__(self, config: ResidualLFQConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self._copy_loop_config(c, channel_first=None)  # images and video channel-first, as vqp 1.32's levels
        _projections(self, c.dim, int(math.log2(c.codebook_size)))
        self.layers = nn.ModuleList(LFQ(c.level_config(i)) for i in range(c.num_quantizers))
        self.eval_path = "one_pass" if _plain_sign_levels(c) else "per_level"
        self.post_init()

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _lean_eval_codebooks(self, mask, level_kwargs) -> list[float] | None:
        """The levels' codebook scales when this call may take the one-pass eval loop, else None."""
        if self.training or mask is not None or level_kwargs or self.eval_path != "one_pass":
            return None
        return [layer.codebook_scale for layer in self.layers]

    def lean_eval_rows(self, rows: Tensor, books: list[list[float]]) -> tuple[Tensor, Tensor]:
        # (every group has the same level scales)
        return lfq_ops.residual_lfq(rows, books[0], self.layers[0].bit_values(rows.device))

    def _run_level(self, level, layer, residual, mask):
        with autocast_off(residual.device.type):
            out = layer(residual, mask=mask, return_dict=True)
        return out.quantized, out.indices, out.loss

    def _level_codes(self, level, layer, indices):
        return layer._codes_from_indices(indices)


# the LFQ options that act only in training (its losses and their estimator); every other one changes eval values
_LFQ_TRAINING_ONLY = frozenset({
    "entropy_loss_weight", "commitment_loss_weight", "diversity_gamma", "straight_through_activation",
    "frac_per_sample_entropy", "inv_temperature", "entropy_loss_method", "sync_codebook_entropy",
    "experimental_softplus_entropy_loss", "entropy_loss_offset"})


def _plain_sign_levels(config: ResidualLFQConfig) -> bool:
    """Whether every level, outside training, is `sign_codes` of its input at its codebook scale with one codebook
    and no projection: what `ops.lfq.residual_lfq` computes. Reads the level configs, so an LFQ option not listed in
    `_LFQ_TRAINING_ONLY` is honoured by sending the model to the per-level loop."""
    for level in range(config.num_quantizers):
        ours = config.level_config(level).to_kwargs()
        plain = LFQConfig(dim=ours["dim"], codebook_scale=ours["codebook_scale"], check_inputs=False).to_kwargs()
        if any(ours[k] != plain[k] for k in plain if k not in _LFQ_TRAINING_ONLY):
            return False
    return True

