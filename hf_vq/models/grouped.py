"""Grouped residual quantization (vector-quantize-pytorch 1.32 `GroupedResidualVQ`, `GroupedResidualFSQ`,
`GroupedResidualLFQ`): the feature dim split into equal groups, one residual quantizer per group, one quantize
dropout cutoff for all groups. Indices and losses get a leading group axis."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..modeling_utils import (QuantizerConfig, QuantizerModel, TokenLayout, absorb_nested_kwargs, check_features,
                              register_quantizer)
from .codebook import deferred_updates
from .residual import (ResidualFSQ, ResidualFSQConfig, ResidualLFQ, ResidualLFQConfig, ResidualOutput,
                       ResidualQuantizerBase, ResidualVQ, ResidualVQConfig)
from .residual_fused import copy_groups, fused_train_levels, stack_groups


class GroupedResidualConfig(QuantizerConfig):
    """Base of the grouped configs: `dim`, `groups`, `accept_image_fmap` and the per-group residual options
    (`residual_kwargs`; keyword arguments that are residual or level options go there)."""

    residual_config_class: ClassVar[type] = QuantizerConfig
    # the residual option that `accept_image_fmap` sets; None: the groups read rank >= 4 input as channel-first
    channel_first_field: ClassVar[str | None] = None

    def __init__(self, dim: int = 256, groups: int = 1, accept_image_fmap: bool = False,
                 residual_kwargs: dict[str, Any] | None = None, **kwargs):
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        residual = self.residual_config_class
        known = (set(residual.field_names()) | getattr(residual, "level_fields", set())) - {"check_inputs"}
        self.residual_kwargs = absorb_nested_kwargs(kwargs, residual_kwargs, known)
        super().__init__(**kwargs)

    def validate(self):
        if not isinstance(self.groups, int) or self.groups < 1 or self.dim % self.groups:
            raise ValueError(f"groups must be a positive int dividing dim={self.dim}, got {self.groups!r}")
        self.group_config()

    def group_config(self):
        return self.residual_config_class(dim=self.dim // self.groups, check_inputs=False,
                                          **{**self.residual_kwargs, **self._group_layout()})

    def _group_layout(self) -> dict[str, bool]:
        """The groups' layout option that follows `accept_image_fmap` (image input is split along dim 1); the same
        option given for the groups must agree with it."""
        field = self.channel_first_field
        if field is None:
            return {}
        given = self.residual_kwargs.get(field)
        if given is not None and bool(given) != bool(self.accept_image_fmap):
            raise ValueError(f"{field}={given!r} contradicts accept_image_fmap={self.accept_image_fmap!r}: "
                             "accept_image_fmap=True splits channel-first input along dim 1 and sets it for the groups")
        return {field: self.accept_image_fmap}


class GroupedResidualBase(QuantizerModel):
    """`groups` residual quantizers over equal slices of the features; one dropout cutoff for all groups."""

    residual_class: ClassVar[type] = ResidualQuantizerBase

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self.dim, self.groups, self.check_inputs = c.dim, c.groups, c.check_inputs
        self.split_dim = 1 if c.accept_image_fmap else -1
        self.rvqs = nn.ModuleList(self.residual_class(c.group_config()) for _ in range(c.groups))
        self.post_init()

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        outs = [rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)]
        return torch.cat(outs, dim=self.split_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_all_codes: bool = False,
                return_dict: bool | None = None, **kwargs):
        if self.check_inputs:
            check_features(x, self.dim, name="x")
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"expected feature dim {self.dim}, got {x.shape[self.split_dim]}")
        first = self.rvqs[0]
        cutoff = first.dropout_cutoff(x.device) if first.uses_dropout() else None
        # every group's codebook updates applied together at the end: one all-reduce for all groups and levels
        codebooks = [cb for rvq in self.rvqs for cb in rvq.sync_codebooks()]
        chunks = x.chunk(self.groups, dim=self.split_dim)
        with deferred_updates(codebooks, enabled=all(rvq.defers_updates() for rvq in self.rvqs)):
            outs = self._forward_groups_at_once(chunks, mask, cutoff, kwargs) if self.groups > 1 else None
            if outs is None:
                outs = [rvq(chunk, mask=mask, return_dict=True, dropout_cutoff=cutoff, **kwargs)
                        for rvq, chunk in zip(self.rvqs, chunks)]
        indices = torch.stack([o.indices for o in outs])
        output = ResidualOutput(
            quantized=torch.cat([o.quantized for o in outs], dim=self.split_dim),
            indices=indices,
            loss=None if outs[0].loss is None else torch.stack([o.loss for o in outs]),
            all_codes=self.get_codes_from_indices(indices) if return_all_codes else None,
        )
        return self._output(output, return_dict)

    def _forward_groups_at_once(self, chunks, mask, cutoff, kwargs) -> list[ResidualOutput] | None:
        """Every group's output from one pass over all groups, their rows stacked (`residual_fused`), where every
        group may take its residual class's lean eval loop or (`_fusable_train_groups`) its fused training levels;
        else None: each group is called in turn. The mode and options decide before any row is computed."""
        rvqs = list(self.rvqs)
        books = [rvq._lean_eval_codebooks(mask, kwargs) for rvq in rvqs]
        lean = all(b is not None for b in books)
        levels = None if lean else self._fusable_train_groups(rvqs, mask, cutoff, kwargs)
        if not lean and levels is None:
            return None
        layouts = [TokenLayout.of(c, channel_first=rvq.channel_first, strided_tokens=True)
                   for rvq, c in zip(rvqs, chunks)]
        rows = [rvq.level_rows(layout.to_tokens(c)) for rvq, layout, c in zip(rvqs, layouts, chunks)]
        if lean:
            quantized, indices = rvqs[0].lean_eval_rows(copy_groups(rows), books)
            losses = [torch.zeros(rvqs[0].num_quantizers, device=quantized.device)] * len(rvqs)
        else:
            fused = self._fused_train_groups(rvqs, rows, levels)
            if fused is None:  # (rows the kernels do not take, e.g. under autocast: the groups in turn)
                return None
            quantized, indices, losses = fused
        outs = []
        for rvq, layout, r, q, idx, loss in zip(rvqs, layouts, rows, quantized, indices, losses):
            q = q.view(r.shape)
            q = rvq.project_out(q) if rvq.has_projections else q
            outs.append(ResidualOutput(quantized=layout.from_tokens(q),
                                       indices=layout.indices_from_tokens(idx.view(*r.shape[:-1], -1)), loss=loss))
        return outs

    def _fusable_train_groups(self, rvqs, mask, cutoff, kwargs) -> list[list] | None:
        """Every group's kept levels when this training call's mode and options allow one fused pass, else None."""
        return None

    def _fused_train_groups(self, rvqs, rows, levels):
        """`(quantized (G, N, d), indices (G, N, levels), per-group losses)` of the fused pass over the groups'
        `rows`, or None where the rows do not allow it."""
        return None


class GroupedResidualVQConfig(GroupedResidualConfig):
    """Configuration of [`GroupedResidualVQ`]: `dim`, `groups`, `accept_image_fmap`, and any [`ResidualVQConfig`]
    option (and any [`VectorQuantizeConfig`] level option) for every group."""

    model_type = "hf_vq_grouped_residual_vq"
    residual_config_class = ResidualVQConfig
    channel_first_field = "accept_image_fmap"

    def __init__(self, dim: int = 256, groups: int = 1, accept_image_fmap: bool = False,
                 residual_kwargs: dict[str, Any] | None = None, **kwargs):
        super().__init__(dim=dim, groups=groups, accept_image_fmap=accept_image_fmap,
                         residual_kwargs=residual_kwargs, **kwargs)


class GroupedResidualFSQConfig(GroupedResidualConfig):
    """Configuration of [`GroupedResidualFSQ`]: `dim`, `groups`, `accept_image_fmap`, and any
    [`ResidualFSQConfig`] option (and any [`FSQConfig`] level option) for every group."""

    model_type = "hf_vq_grouped_residual_fsq"
    residual_config_class = ResidualFSQConfig
    channel_first_field = "is_channel_first"

    def __init__(self, dim: int = 256, groups: int = 1, accept_image_fmap: bool = False,
                 residual_kwargs: dict[str, Any] | None = None, **kwargs):
        super().__init__(dim=dim, groups=groups, accept_image_fmap=accept_image_fmap,
                         residual_kwargs=residual_kwargs, **kwargs)


class GroupedResidualLFQConfig(GroupedResidualConfig):
    """Configuration of [`GroupedResidualLFQ`]: `dim`, `groups`, `accept_image_fmap` (image and video input split
    along dim 1; the groups read rank >= 4 input as channel-first), and any [`ResidualLFQConfig`] option (and any
    [`LFQConfig`] level option) for every group."""

    model_type = "hf_vq_grouped_residual_lfq"
    residual_config_class = ResidualLFQConfig

    def __init__(self, dim: int = 256, groups: int = 1, accept_image_fmap: bool = False,
                 residual_kwargs: dict[str, Any] | None = None, **kwargs):
        super().__init__(dim=dim, groups=groups, accept_image_fmap=accept_image_fmap,
                         residual_kwargs=residual_kwargs, **kwargs)


@register_quantizer
class GroupedResidualVQ(GroupedResidualBase):
    """Grouped ResidualVQ: the feature dim split into `groups`, each quantized by a [`ResidualVQ`]. Where every
    group may take one of ResidualVQ's fast paths (`residual_fused`), all groups run in one pass, the group being
    a launch axis."""

    config_class = GroupedResidualVQConfig
    residual_class = ResidualVQ

    def _fusable_train_groups(self, rvqs, mask, cutoff, kwargs):
        cutoff = rvqs[0].num_quantizers - 1 if cutoff is None else cutoff
        levels = [rvq.fusable_levels(mask, cutoff, kwargs) for rvq in rvqs]
        return None if any(group is None for group in levels) else levels

    def _fused_train_groups(self, rvqs, rows, levels):
        if not all(ResidualVQ.fused_rows_ok(r) for r in rows):
            return None
        quantized, indices, loss = fused_train_levels(stack_groups(rows), levels, rvqs[0].num_quantizers)
        return quantized, indices, loss.unbind(0)


@register_quantizer
class GroupedResidualFSQ(GroupedResidualBase):
    """Grouped ResidualFSQ: the feature dim split into `groups`, each quantized by a [`ResidualFSQ`]."""

    config_class = GroupedResidualFSQConfig
    residual_class = ResidualFSQ


@register_quantizer
class GroupedResidualLFQ(GroupedResidualBase):
    """Grouped ResidualLFQ: the feature dim split into `groups`, each quantized by a [`ResidualLFQ`]; outside
    training, where every group takes ResidualLFQ's one-pass eval loop, all groups run in one pass."""

    config_class = GroupedResidualLFQConfig
    residual_class = ResidualLFQ
