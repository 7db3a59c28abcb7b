"""HierarchicalVQ: multi-scale residual quantization (VAR-style), with vector-quantize-pytorch 1.32's arguments and
results.

Each level average-pools the residual to its scale, quantizes the pooled tokens with a [`VectorQuantize`] (one
shared or one per level), upsamples the codes back to full resolution (linear / bilinear / trilinear), refines them
with a residual convolution `phi` (`x.lerp(conv(x), quant_resi)`) and subtracts them from the residual. The
output is the sum over levels; the loss is the mean of the levels' commitment losses. Optional nested dropout
keeps only the first levels of a step (a cutoff drawn on rank 0 and broadcast). The composed VectorQuantize does
the nearest-code search, EMA, k-means and dead-code work, and syncs them across processes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..modeling_utils import QuantizerConfig, QuantizerModel, QuantizerOutput, check_features, register_quantizer
from .codebook import deferred_updates
from .vector_quantize import VectorQuantize, VectorQuantizeConfig

_INTERPOLATION = ("linear", "bilinear", "trilinear")

# VectorQuantize fields a HierarchicalVQ passes to its level quantizers (vqp's names and HierarchicalVQ defaults)
_VQ_FIELDS = ("sync_codebook", "decay", "commitment_weight", "rotation_trick", "kmeans_init", "kmeans_iters",
              "threshold_ema_dead_code", "stochastic_sample_codes", "sample_codebook_temp", "orthogonal_reg_weight",
              "orthogonal_reg_max_codes", "orthogonal_reg_active_codes_only")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class HierarchicalVQConfig(QuantizerConfig):
    """Configuration of [`HierarchicalVQ`] (names and defaults of vector-quantize-pytorch 1.32).

    Args:
        dim (`int`): feature (channel) dim.
        codebook_size (`int` or `list[int]`): codes per level (one value, or one per level).
        scales (`list`): per level, the pooled size: an int (every spatial axis) or one int per spatial axis;
            non-decreasing along every axis.
        shared_codebook (`bool`, defaults to `True`): one VectorQuantize for all levels (needs one codebook size).
        channel_first (`bool`, defaults to `True`): input `(b, dim, *spatial)`; else `(b, *spatial, dim)`.
        sync_codebook, decay, commitment_weight, rotation_trick, kmeans_init, kmeans_iters,
        threshold_ema_dead_code, stochastic_sample_codes, sample_codebook_temp, orthogonal_reg_weight,
        orthogonal_reg_max_codes, orthogonal_reg_active_codes_only: the level quantizers' [`VectorQuantizeConfig`]
            fields (HierarchicalVQ's own defaults: decay 0.99, k-means init, dead-code threshold 2, ...).
        quant_resi (`float`, defaults to 0.5): weight of the residual convolution after upsampling (`abs` is used).
        share_quant_resi (`int`, defaults to 1): 1 = one convolution for all levels; n > 1 = n convolutions spread
            over the levels; <= 0 = one per level.
        nested_dropout (`float`), nested_dropout_min_levels (`int`): in training, with this probability keep only
            the first levels (at least `nested_dropout_min_levels`).
        accept_image_fmap (`bool`), accept_3d_fmap (`bool`): 2 or 3 spatial axes (default: 1, a sequence).
    """

    model_type = "hf_vq_hierarchical_vq"
    vqp_positional = ()  # keyword-only in vqp 1.32

    def __init__(
        self,
        dim: int = 256,
        codebook_size: int | list[int] = 512,
        scales: list = (1, 2, 4),
        shared_codebook: bool = True,
        channel_first: bool = True,
        sync_codebook: bool | None = None,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        rotation_trick: bool = False,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 0.1,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_max_codes: int | None = 128,
        orthogonal_reg_active_codes_only: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 1,
        nested_dropout: float = 0.0,
        nested_dropout_min_levels: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        **kwargs,
    ):
        self.dim = dim
        self.codebook_size = list(codebook_size) if isinstance(codebook_size, (list, tuple)) else codebook_size
        self.scales = [list(s) if isinstance(s, (list, tuple)) else s for s in scales] \
            if isinstance(scales, (list, tuple)) else scales
        self.shared_codebook = shared_codebook
        self.channel_first = channel_first
        self.sync_codebook = sync_codebook
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.rotation_trick = rotation_trick
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.quant_resi = quant_resi
        self.share_quant_resi = share_quant_resi
        self.nested_dropout = nested_dropout
        self.nested_dropout_min_levels = nested_dropout_min_levels
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        super().__init__(**kwargs)

    @property
    def spatial_dims(self) -> int:
        return 2 if self.accept_image_fmap else 3 if self.accept_3d_fmap else 1

    @property
    def level_shapes(self) -> list[tuple[int, ...]]:
        return [(s,) * self.spatial_dims if _is_int(s) else tuple(s) for s in self.scales]

    @property
    def codebook_sizes(self) -> list[int]:
        size = self.codebook_size
        return [size] * len(self.scales) if _is_int(size) else list(size)

    def validate(self):
        if not _is_int(self.dim) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if self.accept_image_fmap and self.accept_3d_fmap:
            raise ValueError("choose at most one of accept_image_fmap / accept_3d_fmap")
        self._validate_scales()
        self._validate_codebook_sizes()
        if isinstance(self.nested_dropout, bool) or not 0.0 <= self.nested_dropout <= 1.0:
            raise ValueError(f"nested_dropout must be in [0, 1], got {self.nested_dropout!r}")
        if not _is_int(self.nested_dropout_min_levels) or self.nested_dropout_min_levels < 1:
            raise ValueError(f"nested_dropout_min_levels must be an int >= 1, got {self.nested_dropout_min_levels!r}")
        if not _is_int(self.share_quant_resi):
            raise ValueError(f"share_quant_resi must be an int, got {self.share_quant_resi!r}")
        if isinstance(self.quant_resi, bool) or not isinstance(self.quant_resi, (int, float)):
            raise ValueError(f"quant_resi must be a number, got {self.quant_resi!r}")
        self.level_vq_config(0)  # validates the level quantizers' fields

    def _validate_scales(self) -> None:
        if not isinstance(self.scales, list) or not self.scales:
            raise ValueError(f"scales must be a non-empty list, got {self.scales!r}")
        for scale in self.scales:
            entries = [scale] if _is_int(scale) else scale if isinstance(scale, list) else None
            if entries is None or not all(_is_int(s) and s > 0 for s in entries):
                raise ValueError(f"scales entries must be positive ints or lists of them, got {scale!r}")
            if isinstance(scale, list) and len(scale) != self.spatial_dims:
                raise ValueError(f"scale {scale!r} must have {self.spatial_dims} entries (one per spatial axis)")
        shapes = self.level_shapes
        for prev, curr in zip(shapes, shapes[1:]):
            if any(a > b for a, b in zip(prev, curr)):
                raise ValueError(f"scales must be non-decreasing along every axis, got {self.scales!r}")

    def _validate_codebook_sizes(self) -> None:
        sizes = self.codebook_sizes
        if not all(_is_int(s) and s > 0 for s in sizes):
            raise ValueError(f"codebook_size must be a positive int or a list of them, got {self.codebook_size!r}")
        if len(sizes) != len(self.scales):
            raise ValueError(f"codebook_size has {len(sizes)} entries, scales has {len(self.scales)} levels")
        if self.shared_codebook and len(set(sizes)) != 1:
            raise ValueError(f"shared_codebook=True requires one codebook size, got {self.codebook_size!r}")

    def level_vq_config(self, level: int) -> VectorQuantizeConfig:
        return VectorQuantizeConfig(dim=self.dim, codebook_size=self.codebook_sizes[level], channel_last=True,
                                    check_inputs=False, **{name: getattr(self, name) for name in _VQ_FIELDS})

    @property
    def num_phi_levels(self) -> int:
        """How many residual convolutions (1 = `phi_shared`)."""
        share, levels = self.share_quant_resi, len(self.scales)
        if share == 1:
            return 1
        return levels if share <= 0 else min(levels, share)


class ResidualConv(nn.Module):
    """`phi`: after upsampling, `x.lerp(conv(x), ratio)` with a 3-wide same-padded convolution (identity when the
    ratio is 0)."""

    def __init__(self, dim: int, spatial_dims: int, ratio: float):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.conv = conv(dim, dim, 3, padding=1)
        self.resi_ratio = float(abs(ratio))

    def forward(self, x: Tensor) -> Tensor:
        if self.resi_ratio <= 1e-8:
            return x
        refined = self.conv(x.to(self.conv.weight.dtype)).to(x.dtype)  # bf16/fp16 input with float32 weights
        return x.lerp(refined, self.resi_ratio)


@dataclass
class HierarchicalVQOutput(QuantizerOutput):
    """Output of [`HierarchicalVQ`]: `quantized` in the input layout, `indices` (a tuple, one `(b, *scale)` tensor
    per level, -1 at masked positions), `loss` (mean commitment loss of the kept levels), and `cutoff` (the last
    level kept by nested dropout, None when all were kept)."""

    cutoff: int | None = None

    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices", "loss")


@register_quantizer
class HierarchicalVQ(QuantizerModel):
    """Multi-scale residual vector quantizer, as vqp 1.32's `HierarchicalVQ`.

    Example:
        >>> hq = HierarchicalVQ(dim=8, codebook_size=32, scales=[1, 2, 4], accept_image_fmap=True)
        >>> out = hq(torch.randn(2, 8, 4, 4))
        >>> out.quantized.shape, [i.shape for i in out.indices]
        (torch.Size([2, 8, 4, 4]), [torch.Size([2, 1, 1]), torch.Size([2, 2, 2]), torch.Size([2, 4, 4])])
    """

    config_class = HierarchicalVQConfig

    def __init__(self, config: HierarchicalVQConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self.dim, self.channel_first, self.check_inputs = c.dim, c.channel_first, c.check_inputs
        self.spatial_dims, self.level_shapes = c.spatial_dims, c.level_shapes
        self.num_levels = len(self.level_shapes)
        self.nested_dropout, self.nested_dropout_min_levels = c.nested_dropout, c.nested_dropout_min_levels
        self.shared_codebook = bool(c.shared_codebook)
        if self.shared_codebook:
            self.vq = VectorQuantize(c.level_vq_config(0))
        else:
            self.vqs = nn.ModuleList(VectorQuantize(c.level_vq_config(i)) for i in range(self.num_levels))
        self.shared_phi = c.share_quant_resi == 1
        if self.shared_phi:
            self.phi_shared = ResidualConv(c.dim, self.spatial_dims, c.quant_resi)
        else:
            self.phi_levels = nn.ModuleList(ResidualConv(c.dim, self.spatial_dims, c.quant_resi)
                                            for _ in range(c.num_phi_levels))
        self.post_init()

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "HierarchicalVQ":
        """An hf_vq HierarchicalVQ with a vqp module's config and full state (codebooks, EMA, convolutions)."""
        inner = [module.vq] if module.vq is not None else list(module.vqs)
        converted = [VectorQuantize.from_vector_quantize_pytorch(vq) for vq in inner]
        level = converted[0].config
        phis = [module.phi_shared] if module.phi_shared is not None else list(module.phi_levels)
        sizes = list(module.codebook_sizes)
        config = HierarchicalVQConfig(
            dim=module.dim, codebook_size=sizes[0] if len(set(sizes)) == 1 else sizes,
            scales=[s if _is_int(s) else list(s) for s in module.scales], shared_codebook=module.vq is not None,
            channel_first=module.channel_first, quant_resi=phis[0].resi_ratio,
            share_quant_resi=1 if module.phi_shared is not None else (0 if len(phis) == module.num_levels
                                                                      else len(phis)),
            nested_dropout=module.nested_dropout, nested_dropout_min_levels=module.nested_dropout_min_levels,
            accept_image_fmap=module.spatial_dims == 2, accept_3d_fmap=module.spatial_dims == 3,
            **{name: getattr(level, name) for name in _VQ_FIELDS if name != "sync_codebook"})
        model = cls(config)
        for ours, theirs in zip(model._level_quantizers(), converted):
            ours.load_state_dict(theirs.state_dict())
        for ours, theirs in zip(model._phis(), phis):
            ours.load_state_dict(theirs.state_dict())
        return model

    # -- parts ------------------------------------------------------------------------------------

    def _level_quantizers(self) -> list[VectorQuantize]:
        return [self.vq] if self.shared_codebook else list(self.vqs)

    def _phis(self) -> list[ResidualConv]:
        return [self.phi_shared] if self.shared_phi else list(self.phi_levels)

    def get_vq(self, level: int) -> VectorQuantize:
        return self.vq if self.shared_codebook else self.vqs[level]

    def choose_phi(self, level: int) -> ResidualConv:
        """The level's residual convolution: the shared one, or the one nearest its relative depth."""
        phis = self._phis()
        if len(phis) == 1:
            return phis[0]
        position = level / max(self.num_levels - 1, 1)
        return phis[round(position * (len(phis) - 1))]

    def upsample_to_full(self, codes: Tensor, full_shape: tuple[int, ...], level: int) -> Tensor:
        """`(b, dim, *scale)` codes to `(b, dim, *full_shape)`, through the level's residual convolution."""
        if tuple(codes.shape[2:]) != tuple(full_shape):
            codes = F.interpolate(codes, size=full_shape, mode=_INTERPOLATION[self.spatial_dims - 1],
                                  align_corners=False)
        return self.choose_phi(level)(codes)

    def pool_residual(self, residual: Tensor, level_shape: tuple[int, ...],
                      mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Average-pool `(b, dim, *spatial)` to `level_shape`; with a mask, the mean of valid positions only, and
        the pooled positions that saw any valid one."""
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[self.spatial_dims - 1]
        if mask is None:
            return pool(residual, level_shape), None
        weight = mask.unsqueeze(1).to(residual.dtype)
        pooled_mask = pool(weight, level_shape)
        if all(s == 1 for s in level_shape):  # the coarsest level: the masked mean over all positions
            dims = tuple(range(2, residual.ndim))
            total = (residual * weight).sum(dim=dims, keepdim=True)
            pooled = total / weight.expand_as(residual).sum(dim=dims, keepdim=True).clamp(min=1e-5)
        else:
            pooled = pool(residual * weight, level_shape) / pooled_mask.clamp(min=1e-6)
        return pooled, pooled_mask.squeeze(1) > 0

    def sample_nested_cutoff(self, device) -> int | None:
        """The last level kept in this training step (None: all), from a dropout seed drawn on rank 0 and broadcast
        (vqp 1.32 draws it as `randint(0, 10_000)` too)."""
        if not self.training or self.nested_dropout <= 0 or self.num_levels <= 1:
            return None
        if self.nested_dropout_min_levels >= self.num_levels:
            return None
        seed = int(distributed.broadcast_(torch.randint(0, 10_000, (), device=device)))
        rand = random.Random(seed)
        if rand.random() >= self.nested_dropout:
            return None
        return rand.randrange(self.nested_dropout_min_levels - 1, self.num_levels - 1)

    def defers_updates(self) -> bool:
        """Whether the levels' codebook updates wait for the end of the step (one all-reduce for all levels):
        with one codebook per level, when statistics are summed across processes and every codebook is
        initialized (k-means samples level by level on its step). A shared codebook is updated after each level,
        as vqp: the next level searches the updated codes, so each level reduces its own statistics."""
        if self.shared_codebook or not self.training:
            return False
        books = [vq._codebook for vq in self.vqs]
        return books[0].syncs() and all(cb.is_initted() for cb in books)

    # -- forward ----------------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> tuple[int, ...]:
        """The spatial shape of `x`, after checking its layout against the config."""
        if self.check_inputs:
            check_features(x, self.dim, name="x")
        channels = x.shape[1] if self.channel_first else x.shape[-1]
        spatial = tuple(x.shape[2:]) if self.channel_first else tuple(x.shape[1:-1])
        if x.ndim < 2 or channels != self.dim or len(spatial) != self.spatial_dims:
            layout = "(b, dim, *spatial)" if self.channel_first else "(b, *spatial, dim)"
            raise ValueError(f"x must be {layout} with dim={self.dim} and {self.spatial_dims} spatial axes, got "
                             f"shape {tuple(x.shape)}")
        return spatial

    def _resolve_mask(self, x: Tensor, full_shape, mask: Tensor | None, lens: Tensor | None) -> Tensor | None:
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        if lens is not None:
            if self.spatial_dims != 1:
                raise ValueError("lens is only supported for 1d sequences (use mask)")
            mask = torch.arange(full_shape[0], device=x.device) < lens.to(x.device).unsqueeze(-1)
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], *full_shape)):
            raise ValueError(f"mask must be a bool tensor of shape {(x.shape[0], *full_shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        return None if mask is None else mask.to(x.device)

    def forward(self, x: Tensor, indices: Tensor | None = None, mask: Tensor | None = None, lens: Tensor | None = None,
                sample_codebook_temp: float | None = None, return_cutoff: bool = False,
                return_dict: bool | None = None) -> HierarchicalVQOutput | tuple:
        """Quantize `x` over all scales. `mask (b, *spatial)` / `lens (b,)` mark valid positions (masked outputs are
        zero). Returns [`HierarchicalVQOutput`], or `(quantized, indices, loss[, cutoff])` with `return_dict=False`
        (`return_cutoff=True` adds the nested-dropout cutoff, as vqp)."""
        if indices is not None:
            raise ValueError("HierarchicalVQ.forward does not reconstruct from indices: use get_output_from_indices")
        full_shape = self._check_input(x)
        mask = self._resolve_mask(x, full_shape, mask, lens)
        vq_kwargs = {} if sample_codebook_temp is None else {"sample_codebook_temp": sample_codebook_temp}
        residual = x if self.channel_first else x.movedim(-1, 1)
        reconstruction = torch.zeros_like(residual)
        cumulative, all_indices, losses = [], [], []
        codebooks = [vq._codebook for vq in self._level_quantizers()]
        with deferred_updates(codebooks, enabled=self.defers_updates()):
            for level, level_shape in enumerate(self.level_shapes):
                pooled, level_mask = self.pool_residual(residual, level_shape, mask)
                tokens = pooled.flatten(2).transpose(1, 2)
                quantized, level_indices, loss = self.get_vq(level)(
                    tokens, mask=None if level_mask is None else level_mask.flatten(1), return_dict=False,
                    **vq_kwargs)
                codes = quantized.transpose(1, 2).reshape(pooled.shape)
                codes = self.upsample_to_full(codes, full_shape, level)
                reconstruction = reconstruction + codes
                residual = residual - codes
                cumulative.append(reconstruction)
                all_indices.append(level_indices.reshape(x.shape[0], *level_shape))
                losses.append(loss)
        cutoff = self.sample_nested_cutoff(x.device)
        losses = torch.stack(losses)
        if cutoff is None:
            loss = losses.mean()
        else:
            reconstruction = cumulative[cutoff]
            kept = (torch.arange(self.num_levels, device=x.device) <= cutoff).to(losses.dtype)
            loss = (losses * kept).sum() / kept.sum().clamp(min=1e-5)
        if mask is not None:
            reconstruction = torch.where(mask.unsqueeze(1), reconstruction, 0.0)
        if not self.channel_first:
            reconstruction = reconstruction.movedim(1, -1)
        out = HierarchicalVQOutput(quantized=reconstruction, indices=tuple(all_indices), loss=loss, cutoff=cutoff)
        result = self._output(out, return_dict)
        return (*result, cutoff) if return_cutoff and isinstance(result, tuple) else result

    def get_output_from_indices(self, indices: Sequence[Tensor],
                                full_shape: int | Sequence[int] | None = None) -> Tensor:
        """The output for per-level `indices` (as the forward returns them; -1 entries give zeros), at `full_shape`
        (default: the finest scale), in the input layout."""
        if not isinstance(indices, (tuple, list)) or len(indices) != self.num_levels:
            raise ValueError(f"indices must be a tuple of {self.num_levels} tensors (one per level)")
        if full_shape is None:
            full_shape = self.level_shapes[-1]
        full_shape = (full_shape,) * self.spatial_dims if _is_int(full_shape) else tuple(full_shape)
        if len(full_shape) != self.spatial_dims:
            raise ValueError(f"full_shape must have {self.spatial_dims} entries, got {full_shape!r}")
        total = None
        for level, level_indices in enumerate(indices):
            if level_indices.ndim != 1 + self.spatial_dims:
                raise ValueError(f"level {level} indices must be (b, *spatial) with {self.spatial_dims} spatial axes, "
                                 f"got shape {tuple(level_indices.shape)}")
            flat = level_indices.flatten(1)
            codes = self.get_vq(level).get_output_from_indices(flat.clamp(min=0))
            codes = torch.where((flat != -1).unsqueeze(-1), codes, 0.0)
            codes = codes.transpose(1, 2).reshape(flat.shape[0], self.dim, *level_indices.shape[1:])
            codes = self.upsample_to_full(codes, full_shape, level)
            total = codes if total is None else total + codes
        return total if self.channel_first else total.movedim(1, -1)
