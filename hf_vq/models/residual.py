"""Residual vector quantization (SoundStream, arXiv:2107.03312, Algorithm 1) as a Hugging Face model.

Semantics: vector-quantize-pytorch 1.32 `ResidualVQ`; each level is an hf_vq `VectorQuantize` (so every level
uses the bounded-memory ops) and keeps vqp's keys (`layers.{i}._codebook.*`). Levels run one after another on
the whole batch: no Python work scales with the batch size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from math import ceil
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..modeling_utils import QuantizerConfig, QuantizerModel, QuantizerOutput, check_features, register_quantizer
from .vector_quantize import VectorQuantize, VectorQuantizeConfig

_VQ_FIELDS = set(VectorQuantizeConfig.field_names()) - {"dim", "codebook_size", "codebook_dim", "check_inputs"}


class ResidualVQConfig(QuantizerConfig):
    """Configuration of [`ResidualVQ`].

    Args:
        dim (`int`): input feature dim.
        num_quantizers (`int`): number of residual levels.
        codebook_size (`int`): codes per level.
        codebook_dim (`int`, *optional*): code dim; projections map `dim` in and out when it differs.
        quantize_dropout (`bool`): in training, drop all levels after a random cutoff (indices -1, no output).
        quantize_dropout_cutoff_index (`int`): the first level that may be the last one kept.
        quantize_dropout_multiple_of (`int`): round the number of kept levels up to a multiple of this.
        accept_image_fmap (`bool`): channel-first `(b, d, h, w)` input.
        return_zeros_for_masked_padding (`bool`): masked positions output zeros.
        vq_kwargs (`dict`): any [`VectorQuantizeConfig`] option for every level (decay, kmeans_init,
            threshold_ema_dead_code, use_cosine_sim, ...). Passing those options as keyword arguments to the
            config or model puts them here.
    """

    model_type = "hf_vq_residual_vq"

    def __init__(
        self,
        dim: int = 256,
        num_quantizers: int = 8,
        codebook_size: int = 1024,
        codebook_dim: int | None = None,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        return_zeros_for_masked_padding: bool = True,
        vq_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ):
        self.dim, self.num_quantizers, self.codebook_size, self.codebook_dim = dim, num_quantizers, codebook_size, codebook_dim
        self.quantize_dropout = quantize_dropout
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.vq_kwargs = dict(vq_kwargs or {})
        for name in [k for k in kwargs if k in _VQ_FIELDS]:
            self.vq_kwargs[name] = kwargs.pop(name)
        super().__init__(**kwargs)

    def validate(self):
        for name in ("dim", "num_quantizers", "codebook_size", "quantize_dropout_multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.quantize_dropout_cutoff_index < self.num_quantizers:
            raise ValueError(f"quantize_dropout_cutoff_index must be in [0, {self.num_quantizers}), "
                             f"got {self.quantize_dropout_cutoff_index!r}")
        unknown = sorted(set(self.vq_kwargs) - _VQ_FIELDS)
        if unknown:
            raise ValueError(f"vq_kwargs has unknown VectorQuantize option(s) {unknown}")
        if self.vq_kwargs.get("heads", 1) != 1:
            raise ValueError("ResidualVQ does not support heads > 1 (as vector-quantize-pytorch)")
        self.level_config()  # validates the per-level options

    def level_config(self) -> VectorQuantizeConfig:
        codebook_dim = self.codebook_dim if self.codebook_dim is not None else self.dim
        return VectorQuantizeConfig(
            dim=codebook_dim, codebook_size=self.codebook_size, codebook_dim=codebook_dim,
            accept_image_fmap=self.accept_image_fmap,
            return_zeros_for_masked_padding=self.return_zeros_for_masked_padding,
            check_inputs=False, **self.vq_kwargs,
        )


@dataclass
class ResidualVQOutput(QuantizerOutput):
    """Output of [`ResidualVQ`]: `quantized`, `indices` `(..., num_quantizers)` (-1 for dropped levels),
    `loss` (per level, `(num_quantizers,)`), and `all_codes` `(num_quantizers, ..., d)` when requested."""

    all_codes: Tensor | None = None

    seed_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices", "loss")

    def to_seed_tuple(self) -> tuple:
        base = (self.quantized, self.indices, self.loss)
        return base if self.all_codes is None else (*base, self.all_codes)


@register_quantizer
class ResidualVQ(QuantizerModel):
    """Residual VQ: level i quantizes what levels < i left over; the output is the sum of all levels.

    Example:
        >>> rvq = ResidualVQ(dim=32, num_quantizers=4, codebook_size=256, decay=0.99)
        >>> out = rvq(torch.randn(2, 50, 32))
        >>> out.indices.shape, out.loss.shape
        (torch.Size([2, 50, 4]), torch.Size([4]))
    """

    config_class = ResidualVQConfig

    def __init__(self, config: ResidualVQConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        inner = c.codebook_dim if c.codebook_dim is not None else c.dim
        self.has_projections = inner != c.dim
        self.project_in = nn.Linear(c.dim, inner) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(inner, c.dim) if self.has_projections else nn.Identity()
        self.layers = nn.ModuleList(VectorQuantize(c.level_config()) for _ in range(c.num_quantizers))
        self.post_init()

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "ResidualVQ":
        """An hf_vq ResidualVQ with a vqp `ResidualVQ`'s config and full state (every level's codebook and EMA)."""
        if getattr(module, "shared_codebook", False) or getattr(module, "implicit_neural_codebook", False):
            raise ValueError("shared_codebook and implicit_neural_codebook ResidualVQs are not supported yet")
        first = VectorQuantize.from_vector_quantize_pytorch(module.layers[0])
        level = {k: v for k, v in first.config.to_kwargs().items() if k in _VQ_FIELDS}
        for name in ("accept_image_fmap", "return_zeros_for_masked_padding"):
            level.pop(name, None)
        config = ResidualVQConfig(
            dim=module.project_in.in_features if module.has_projections else module.codebook_dim,
            num_quantizers=module.num_quantizers, codebook_size=module.codebook_size,
            codebook_dim=module.codebook_dim, quantize_dropout=bool(module.quantize_dropout),
            quantize_dropout_cutoff_index=module.quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=module.quantize_dropout_multiple_of,
            accept_image_fmap=module.accept_image_fmap,
            return_zeros_for_masked_padding=module.return_zeros_for_masked_padding, vq_kwargs=level,
        )
        model = cls(config)
        if module.has_projections:
            model.project_in.load_state_dict(module.project_in.state_dict())
            model.project_out.load_state_dict(module.project_out.state_dict())
        for ours, theirs in zip(model.layers, module.layers):
            ours.load_state_dict(VectorQuantize.from_vector_quantize_pytorch(theirs).state_dict())
        return model

    @property
    def codebooks(self) -> Tensor:
        """`(num_quantizers, codebook_size, codebook_dim)`."""
        return torch.stack([layer.codebook for layer in self.layers])

    def _dropout_cutoff(self, device) -> int:
        """The last level kept this step; the same on every rank (the seed is drawn on rank 0's RNG)."""
        c = self.config
        seed = torch.randint(0, 10_000, (), device=device)
        distributed.broadcast_(seed)
        cutoff = random.Random(int(seed)).randrange(c.quantize_dropout_cutoff_index, c.num_quantizers)
        if c.quantize_dropout_multiple_of != 1:
            cutoff = ceil((cutoff + 1) / c.quantize_dropout_multiple_of) * c.quantize_dropout_multiple_of - 1
        return cutoff

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """`(b, ..., q)` indices (-1 for dropped levels; fewer than `num_quantizers` levels allowed) to
        `(num_quantizers, b, ..., d)` codes, zero for dropped levels."""
        c = self.config
        if indices.shape[-1] > c.num_quantizers:
            raise ValueError(f"indices have {indices.shape[-1]} levels, the model has {c.num_quantizers}")
        if indices.shape[-1] < c.num_quantizers:
            pad = indices.new_full((*indices.shape[:-1], c.num_quantizers - indices.shape[-1]), -1)
            indices = torch.cat([indices, pad], dim=-1)
        if indices.numel() and (indices.min() < -1 or indices.max() >= c.codebook_size):
            raise ValueError(f"indices must be -1 (dropped) or in [0, {c.codebook_size})")
        dropped = indices == -1
        codebooks = self.codebooks  # (q, K, d)
        level = torch.arange(c.num_quantizers, device=indices.device)
        codes = codebooks[level, indices.clamp(min=0)]  # (b, ..., q, d)
        codes = codes.masked_fill(dropped.unsqueeze(-1), 0.0)
        return codes.movedim(-2, 0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        return_dict: bool | None = None,
    ) -> ResidualVQOutput | tuple:
        """Quantize `x` `(b, n, dim)` (or `(b, dim, h, w)` with `accept_image_fmap`) through all levels."""
        c = self.config
        if c.check_inputs:
            check_features(x, c.dim, name="x")
        feature_axis = 1 if c.accept_image_fmap else -1
        if x.shape[feature_axis] != c.dim:
            raise ValueError(f"expected feature dim {c.dim}, got {x.shape[feature_axis]} (shape {tuple(x.shape)})")
        x_in = self.project_in(x) if not c.accept_image_fmap else x
        residual, quantized_out = x_in, torch.zeros_like(x_in)
        cutoff = c.num_quantizers - 1
        if self.training and c.quantize_dropout and c.num_quantizers > 1 and torch.is_grad_enabled():
            cutoff = self._dropout_cutoff(x.device)
        index_shape = x.shape[:1] + (x.shape[2:] if c.accept_image_fmap else x.shape[1:-1])
        all_indices, all_losses = [], []
        for level, vq in enumerate(self.layers):
            if level > cutoff:
                all_indices.append(torch.full(index_shape, -1, dtype=torch.long, device=x.device))
                all_losses.append(torch.zeros((), device=x.device))
                continue
            out = vq(residual, mask=mask, sample_codebook_temp=sample_codebook_temp,
                     freeze_codebook=freeze_codebook, return_dict=True)
            residual = residual - out.quantized.detach()
            quantized_out = quantized_out + out.quantized
            all_indices.append(out.indices)
            all_losses.append(out.loss)
        quantized = self.project_out(quantized_out) if not c.accept_image_fmap else quantized_out
        if mask is not None:
            fill = torch.zeros_like(quantized) if c.return_zeros_for_masked_padding else x
            quantized = torch.where(mask.unsqueeze(-1), quantized, fill)
        indices = torch.stack(all_indices, dim=-1)
        output = ResidualVQOutput(quantized=quantized, indices=indices, loss=torch.stack(all_losses),
                                  all_codes=self.get_codes_from_indices(indices) if return_all_codes else None)
        return self._output(output, return_dict)
