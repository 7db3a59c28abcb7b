"""Residual quantization (SoundStream, arXiv:2107.03312, Algorithm 1) for VQ, FSQ and LFQ levels, as Hugging
Face models (the grouped forms are in `grouped.py`, the FSQ / LFQ subclasses in `residual_scalar.py`, ResidualVQ's
beam search and other options in `residual_options.py`).

Semantics: vector-quantize-pytorch 1.32 `ResidualVQ`, `ResidualFSQ`, `ResidualLFQ`. One residual loop
(`ResidualQuantizerBase`) serves all three: a subclass only says how a level is built, how it is called and how
its codes are looked up. Each level is the hf_vq quantizer (bounded-memory ops) and
keeps vqp's keys (`layers.{i}...`). Levels run one after another on the whole batch: no Python work scales
with the batch size.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..modeling_utils import (QuantizerConfig, QuantizerModel, QuantizerOutput, TokenLayout, absorb_nested_kwargs,
                              check_features, register_quantizer, validate_quantize_dropout)
from ..ops.estimators import directional_reparam
from ..ops.triton_residual import train_levels_ok
from .codebook import Codebook, deferred_updates
from .qinco import (QincoMLP, check_mlp_kwargs, implicit_codes_from_indices, implicit_forward_levels,
                    vqp_implicit_codebook)
from .qinco import check_level_options as check_implicit_level_options
from .residual_fused import copy_groups, fused_train_levels, lean_eval_levels, stack_groups
from .residual_options import (beam_search_forward, check_beam_options, check_level_codebook_sizes, check_level_indices,
                               check_quant_grad_frac, frac_gradient, level_codebook_sizes, level_overrides,
                               vqp_codebook_size)
from .vector_quantize import VectorQuantize, VectorQuantizeConfig

# (a vq_bridge is a module given to one VectorQuantize: not a level option)
_VQ_FIELDS = frozenset(VectorQuantizeConfig.field_names()) - {"dim", "codebook_size", "codebook_dim", "check_inputs",
                                                               "has_vq_bridge"}


class ResidualVQConfig(QuantizerConfig):
    """Configuration of [`ResidualVQ`].

    Args:
        dim (`int`): input feature dim.
        num_quantizers (`int`, *optional*): number of residual levels (default: one per entry of a
            `codebook_size` list, else 8).
        codebook_size (`int` or `list[int]`): codes per level, or one size per level (vqp 1.32's tuple form).
        codebook_dim (`int`, *optional*): code dim; projections map `dim` in and out when it differs.
        shared_codebook (`bool`): one codebook for all levels (saved once, under `layers.0._codebook`); its EMA
            statistics accumulate over every level and the codebook is updated once per step.
        quantize_dropout (`bool`): in training, drop all levels after a random cutoff (indices -1, no output).
        quantize_dropout_cutoff_index (`int`): the first level that may be the last one kept.
        quantize_dropout_multiple_of (`int`): round the number of kept levels up to a multiple of this.
        accept_image_fmap (`bool`): channel-first `(b, d, h, w)` input.
        return_zeros_for_masked_padding (`bool`): masked positions output zeros.
        vq_kwargs (`dict`): any [`VectorQuantizeConfig`] option for every level (decay, kmeans_init,
            threshold_ema_dead_code, use_cosine_sim, ...). Passing those options as keyword arguments to the
            config or model puts them here.
        quant_grad_frac (`float`, defaults to 0): share of a level's output gradient that reaches the levels before it
            through the residual (vqp 1.32's `frac_gradient`; 0: the residual is detached).
        beam_size (`int`, *optional*), eval_beam_size (`int`, *optional*, defaults to `beam_size`): beam search over
            the levels' nearest codes in training / outside training (`forward(..., beam_size=)` overrides);
            `beam_score_quantizer_weights` (`list[float]`, one per level) weighs each level's loss in the score.
        diveq (`bool`): DiVeQ (openreview KRVnpTbx7R): the levels learn their codebooks by gradient (no EMA, no
            commitment loss, no gradient routed to the input by the levels, `quant_grad_frac` 1) and, in training,
            the output is the input moved along the noised direction to the summed codes (vqp 1.32 also does
            this outside training, which makes its eval output random; hf_vq outputs the codes there).
        implicit_neural_codebook (`bool`), mlp_kwargs (`dict`: `dim_hidden`, `depth`): QINCo (arXiv:2401.14732):
            levels after the first search their codebook transformed per token by an MLP conditioned on the
            codes chosen so far (`qinco.py`); the codebooks are learned by gradient.
    """

    model_type = "hf_vq_residual_vq"
    level_fields: ClassVar[frozenset[str]] = _VQ_FIELDS  # the level options that keyword arguments may name

    def __init__(
        self,
        dim: int = 256,
        num_quantizers: int | None = None,
        codebook_size: int | list[int] = 1024,
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        return_zeros_for_masked_padding: bool = True,
        vq_kwargs: dict[str, Any] | None = None,
        quant_grad_frac: float = 0.0,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_quantizer_weights: list[float] | None = None,
        diveq: bool = False,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ):
        if isinstance(codebook_size, (list, tuple)):
            codebook_size = list(codebook_size)
        if num_quantizers is None:
            num_quantizers = len(codebook_size) if isinstance(codebook_size, list) else 8
        self.dim, self.num_quantizers = dim, num_quantizers
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.quant_grad_frac = quant_grad_frac
        self.beam_size, self.eval_beam_size = beam_size, eval_beam_size
        self.diveq = diveq
        self.implicit_neural_codebook, self.mlp_kwargs = implicit_neural_codebook, dict(mlp_kwargs or {})
        self.beam_score_quantizer_weights = (None if beam_score_quantizer_weights is None
                                             else list(beam_score_quantizer_weights))
        self.shared_codebook = shared_codebook
        self.quantize_dropout = quantize_dropout
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.vq_kwargs = absorb_nested_kwargs(kwargs, vq_kwargs, self.level_fields)
        super().__init__(**kwargs)

    def validate(self):
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        check_level_codebook_sizes(self.codebook_size, self.num_quantizers)
        validate_quantize_dropout(self)
        check_quant_grad_frac(self.quant_grad_frac)
        check_beam_options(self.beam_size, self.eval_beam_size, self.beam_score_quantizer_weights,
                           self.num_quantizers)
        if self.shared_codebook and not self.uniform_codebook_size:
            raise ValueError("shared_codebook=True needs one codebook_size for every level")
        unknown = sorted(set(self.vq_kwargs) - _VQ_FIELDS)
        if unknown:
            raise ValueError(f"vq_kwargs has unknown VectorQuantize option(s) {unknown}")
        if self.vq_kwargs.get("heads", 1) != 1:
            raise ValueError("ResidualVQ does not support heads > 1 (as vector-quantize-pytorch)")
        check_mlp_kwargs(self.mlp_kwargs)
        level = self.level_config()  # validates the per-level options
        if self.implicit_neural_codebook:
            check_implicit_level_options(level)

    @property
    def codebook_sizes(self) -> list[int]:
        """The codebook size of each level."""
        return level_codebook_sizes(self.codebook_size, self.num_quantizers)

    @property
    def uniform_codebook_size(self) -> bool:
        return len(set(self.codebook_sizes)) == 1

    def level_config(self, level: int = 0) -> VectorQuantizeConfig:
        codebook_dim = self.codebook_dim if self.codebook_dim is not None else self.dim
        level_kwargs = {**self.vq_kwargs, **level_overrides(self)}
        return VectorQuantizeConfig(
            dim=codebook_dim, codebook_size=self.codebook_sizes[level], codebook_dim=codebook_dim,
            return_zeros_for_masked_padding=self.return_zeros_for_masked_padding,
            check_inputs=False, **level_kwargs,
        )



@dataclass
class ResidualOutput(QuantizerOutput):
    """Output of the residual quantizers: `quantized`, `indices` `(..., num_quantizers)` (-1 for dropped
    levels), `loss` (per level, `(num_quantizers,)`; `None` for FSQ levels), and `all_codes`
    `(num_quantizers, ..., d)` when requested. Grouped forms add a leading group axis to indices and losses."""

    all_codes: Tensor | None = None

    def to_tuple_output(self) -> tuple:
        base = (self.quantized, self.indices) if self.loss is None else (self.quantized, self.indices, self.loss)
        return base if self.all_codes is None else (*base, self.all_codes)


ResidualVQOutput = ResidualOutput


class ResidualQuantizerBase(QuantizerModel):
    """The residual loop shared by ResidualVQ / ResidualFSQ / ResidualLFQ: each level is called on what the levels
    before it left over.

    Subclasses build `self.layers`, `self.project_in`, `self.project_out`, call `_copy_loop_config` and implement
    `_run_level` (quantize one level's input) and `_level_codes` (codes of one level's indices).
    """

    def _copy_loop_config(self, c, channel_first: bool | None = False) -> None:
        """What the loop reads in `forward`, as plain attributes. `channel_first=None`: channel-first input when
        it has rank 4 or more (images, video), as vqp 1.32's ResidualLFQ levels read it."""
        self.dim, self.num_quantizers, self.check_inputs = c.dim, c.num_quantizers, c.check_inputs
        self.quantize_dropout = c.quantize_dropout
        self.quantize_dropout_cutoff_index = c.quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = c.quantize_dropout_multiple_of
        # ResidualVQ pads masked positions of its output (vqp 1.32's VectorQuantize levels do); the scalar forms pass
        # the mask to their levels only (it restricts their losses) and return every position's codes
        self.pads_masked_output = hasattr(c, "return_zeros_for_masked_padding")
        self.return_zeros_for_masked_padding = getattr(c, "return_zeros_for_masked_padding", True)
        self.channel_first = channel_first

    def _prepare(self, x: Tensor) -> Tensor:
        """Transform of the projected input before the first level (e.g. a soft clamp)."""
        return x

    def _run_level(self, level: int, layer, residual: Tensor, mask, **kwargs) -> tuple[Tensor, Tensor, Tensor | None]:
        raise NotImplementedError

    def _level_codes(self, level: int, layer, indices: Tensor) -> Tensor:
        raise NotImplementedError

    def _fused_levels(self, residual: Tensor, mask, cutoff: int, level_kwargs) -> tuple[Tensor, Tensor, Tensor] | None:
        """`(quantized before project_out, indices, per-level loss)` of levels `0..cutoff` (later ones dropped) when
        a subclass can run them all in one fused pass, else None (each level is called)."""
        return None

    def _lean_eval_codebooks(self, mask, level_kwargs) -> list | None:
        """Per-level codebooks (whatever `lean_eval_rows` reads) when a subclass can run this call by its lean
        eval loop, else None."""
        return None

    def lean_eval_rows(self, rows: Tensor, books: list[list]) -> tuple[Tensor, Tensor]:
        """`(summed codes (G, N, d), indices (G, N, levels))` of the lean eval loop over G groups' rows `(G, N, d)`
        of one shape (`books[g]`: group g's `_lean_eval_codebooks`); the subclasses that have the loop define it."""
        raise NotImplementedError

    def level_rows(self, tokens: Tensor) -> Tensor:
        """What the first level quantizes: `tokens (..., dim)` projected and prepared."""
        return self._prepare(self.project_in(tokens) if self.has_projections else tokens)

    def _forward_lean_eval(self, x: Tensor, books: list) -> tuple[Tensor, Tensor]:
        rows = self.level_rows(x)
        quantized, indices = self.lean_eval_rows(copy_groups([rows]), [books])
        quantized = quantized.view(rows.shape)
        quantized = self.project_out(quantized) if self.has_projections else quantized
        return quantized, indices.view(*rows.shape[:-1], -1)

    def _finish_step(self, level_inputs: list[Tensor], mask: Tensor | None) -> None:
        """Called once after all levels ran and their codebook updates were applied (ResidualVQ's shared codebook
        updates here)."""

    def sync_codebooks(self) -> list[Codebook]:
        """The codebooks whose updates a training step may defer to its end (`deferred_updates`)."""
        return []

    def defers_updates(self) -> bool:
        """Whether this training step's codebook updates wait for the end of the step, so that one all-reduce
        carries all of them."""
        return False

    def dropout_cutoff(self, device, seed: int | None = None) -> int:
        """The last level kept this training step, drawn as vqp 1.32 draws it from `seed`; without a seed, from one
        drawn on rank 0 and broadcast (the same cutoff on every rank)."""
        if seed is None:
            seed = torch.randint(0, 10_000, (), device=device)
            distributed.broadcast_(seed)
        cutoff = random.Random(int(seed)).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        multiple = self.quantize_dropout_multiple_of
        if multiple != 1:  # rounded up past the last level: every level is kept (as vqp 1.32)
            cutoff = min(math.ceil((cutoff + 1) / multiple) * multiple - 1, self.num_quantizers - 1)
        return cutoff

    @property
    def level_codebook_sizes(self) -> list[int]:
        """The number of codes of each level."""
        return [self.codebook_size] * self.num_quantizers

    def _next_residual(self, residual: Tensor, quantized: Tensor) -> Tensor:
        """What the next level quantizes: the residual less this level's (detached) output."""
        return residual - quantized.detach()

    def _output_codes(self, start: Tensor, quantized: Tensor) -> Tensor:
        """The summed codes as output (before `project_out`); `start`: the first level's input."""
        return quantized

    def uses_dropout(self) -> bool:
        return self.training and self.quantize_dropout and self.num_quantizers > 1 and torch.is_grad_enabled()

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """`(b, ..., q)` indices (-1 for dropped levels; fewer than `num_quantizers` levels allowed) to
        `(num_quantizers, b, ..., d)` codes, zero for dropped levels."""
        indices = self._all_level_indices(indices)
        codes = []
        for level, layer in enumerate(self.layers):
            idx = indices[..., level].long()
            code = self._level_codes(level, layer, idx.clamp(min=0))
            codes.append(code.masked_fill((idx == -1).unsqueeze(-1), 0.0))
        return torch.stack(codes).to(self.dtype)  # (scalar levels build float32 codes; a cast model wants its dtype)

    def _all_level_indices(self, indices: Tensor) -> Tensor:
        """`(b, ..., q)` indices checked and padded with -1 (dropped) to `num_quantizers` levels."""
        levels = self.num_quantizers
        if indices.shape[-1] > levels:
            raise ValueError(f"indices have {indices.shape[-1]} levels, the model has {levels}")
        if indices.shape[-1] < levels:
            pad = indices.new_full((*indices.shape[:-1], levels - indices.shape[-1]), -1)
            indices = torch.cat([indices, pad], dim=-1)
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        check_level_indices(indices, self.level_codebook_sizes)
        return indices

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """`(b, ..., q)` indices to the output features, in the layout of the forward's output."""
        out = self.project_out(self.get_codes_from_indices(indices).sum(0))
        channel_first = self.channel_first if self.channel_first is not None else indices.ndim >= 4
        return out.movedim(-1, 1) if channel_first else out

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        return_dict: bool | None = None,
        dropout_cutoff: int | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
        **level_kwargs,
    ) -> ResidualOutput | tuple:
        """Quantize `x` through all levels. `dropout_cutoff` fixes the quantize-dropout cutoff (grouped forms
        pass one cutoff to every group); `rand_quantize_dropout_fixed_seed` draws it from this seed (vqp 1.32)."""
        if self.check_inputs:
            check_features(x, self.dim, name="x")
        if dropout_cutoff is None and rand_quantize_dropout_fixed_seed is not None and self.uses_dropout():
            dropout_cutoff = self.dropout_cutoff(x.device, rand_quantize_dropout_fixed_seed)
        layout = TokenLayout.of(x, channel_first=self.channel_first, strided_tokens=True)
        tokens = layout.to_tokens(x)
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"expected feature dim {self.dim}, got {tokens.shape[-1]}")
        books = self._lean_eval_codebooks(mask, level_kwargs)
        if books is not None:
            quantized, indices = self._forward_lean_eval(tokens, books)
            loss = torch.zeros(self.num_quantizers, device=x.device)  # each level's loss outside training
        else:
            quantized, indices, loss = self._forward_levels(tokens, mask, dropout_cutoff, level_kwargs)
        quantized, indices = layout.from_tokens(quantized), layout.indices_from_tokens(indices)
        all_codes = self.get_codes_from_indices(indices) if return_all_codes else None
        output = ResidualOutput(quantized=quantized, indices=indices, loss=loss, all_codes=all_codes)
        return self._output(output, return_dict)

    def _forward_levels(self, x: Tensor, mask, dropout_cutoff, level_kwargs) -> tuple[Tensor, Tensor, Tensor | None]:
        """`(quantized, indices, per-level loss)` of `(b, n, d)` tokens: the fused pass where a subclass has one,
        else every level called in turn."""
        residual = start = self._prepare(self.project_in(x) if self.has_projections else x)
        cutoff = self.num_quantizers - 1
        if self.uses_dropout():
            cutoff = dropout_cutoff if dropout_cutoff is not None else self.dropout_cutoff(x.device)
        fused = self._fused_levels(residual, mask, cutoff, level_kwargs)
        if fused is not None:
            quantized, indices, loss = fused
            return (self.project_out(quantized) if self.has_projections else quantized), indices, loss
        quantized_out = torch.zeros_like(residual)
        all_indices, all_losses, level_inputs = [], [], []
        with deferred_updates(self.sync_codebooks(), enabled=self.defers_updates()) as updates:
            for level, layer in enumerate(self.layers):
                if level > cutoff:
                    all_indices.append(torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device))
                    all_losses.append(torch.zeros((), device=x.device))
                    continue
                level_inputs.append(residual)
                quantized, indices, loss = self._run_level(level, layer, residual, mask, **level_kwargs)
                residual = self._next_residual(residual, quantized)
                quantized_out = quantized_out + quantized
                all_indices.append(indices)
                all_losses.append(loss)
            updates.after(lambda: self._finish_step(level_inputs, mask))
        quantized = self._output_codes(start, quantized_out)
        if self.has_projections:
            quantized = self.project_out(quantized)
        if mask is not None and self.pads_masked_output:
            fill = torch.zeros_like(quantized) if self.return_zeros_for_masked_padding else x
            quantized = torch.where(mask.unsqueeze(-1), quantized, fill)
        indices = torch.stack(all_indices, dim=-1)
        loss = None if all_losses[0] is None else torch.stack([
            l if l is not None else torch.zeros((), device=x.device) for l in all_losses])
        return quantized, indices, loss


def _projections(model, dim: int, inner: int, bias: bool = True) -> None:
    model.has_projections = inner != dim
    model.project_in = nn.Linear(dim, inner, bias=bias) if model.has_projections else nn.Identity()
    model.project_out = nn.Linear(inner, dim, bias=bias) if model.has_projections else nn.Identity()


@register_quantizer
class ResidualVQ(ResidualQuantizerBase):
    """Residual VQ (vqp 1.32 semantics): level i quantizes what levels < i left over; the output is the sum of all
    levels. Each level is a [`VectorQuantize`] called as a module, except where every level's plan
    ([`VQPlan`]) allows a fast path: the lean eval loop (`lean_eval`) and the fused training levels
    (`fused_levels`, `ops.triton_residual`), which compute the same values without the levels' forwards.

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
        self._copy_loop_config(c, channel_first=c.accept_image_fmap)
        self.shared_codebook = c.shared_codebook
        self.codebook_sizes, self.uniform_codebook_size = c.codebook_sizes, c.uniform_codebook_size
        self.quant_grad_frac = 1.0 if c.diveq else c.quant_grad_frac
        self.diveq = c.diveq
        self.implicit_neural_codebook = c.implicit_neural_codebook
        self.beam_size = c.beam_size
        self.eval_beam_size = c.eval_beam_size if c.eval_beam_size is not None else c.beam_size
        self.beam_score_weights = tuple(map(float, c.beam_score_quantizer_weights or [1.0] * c.num_quantizers))
        _projections(self, c.dim, c.codebook_dim if c.codebook_dim is not None else c.dim)
        self.layers = nn.ModuleList(VectorQuantize(c.level_config(level)) for level in range(c.num_quantizers))
        if c.implicit_neural_codebook:  # one code MLP per level after the first (vqp's `mlps` keys)
            cosine = self.layers[0].use_cosine_sim
            self.mlps = nn.ModuleList(QincoMLP(self.layers[0].dim, **c.mlp_kwargs, l2norm_output=cosine)
                                      for _ in range(c.num_quantizers - 1))
        if c.shared_codebook:
            self._share_first_codebook()
        self.post_init()

    def _share_first_codebook(self) -> None:
        """Point every level at level 0's codebook module without registering it again, so its state is
        saved once (a module registered under several names would be saved as tied tensors)."""
        shared = self.layers[0]._codebook
        for layer in self.layers[1:]:
            del layer._modules["_codebook"]
            object.__setattr__(layer, "_codebook", shared)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.shared_codebook:  # vqp 1.32 saves the shared codebook under every level: level 0's is loaded
            later = [k for k in state_dict if k.startswith(f"{prefix}layers.") and "._codebook." in k
                     and not k.startswith(f"{prefix}layers.0.")]
            for key in later:
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def codebook_size(self) -> int:
        """The first level's codebook size (as vqp 1.32; `codebook_sizes` lists every level's)."""
        return self.codebook_sizes[0]

    @property
    def level_codebook_sizes(self) -> list[int]:
        return self.codebook_sizes

    def _next_residual(self, residual: Tensor, quantized: Tensor) -> Tensor:
        return residual - frac_gradient(quantized, self.quant_grad_frac)

    def _output_codes(self, start: Tensor, quantized: Tensor) -> Tensor:
        if self.diveq and self.training:
            return directional_reparam(start, quantized)
        return quantized

    def _call_beam_size(self, level_kwargs: dict) -> int:
        """This call's beam (`beam_size=` of `forward`, else the config's for the mode); 1: no beam search."""
        beam = level_kwargs.get("beam_size")
        if beam is None:
            beam = self.beam_size if self.training else self.eval_beam_size
        if beam is not None and not (isinstance(beam, int) and not isinstance(beam, bool) and beam >= 1):
            raise ValueError(f"beam_size must be a positive int, got {beam!r}")
        return 1 if beam is None else beam

    def _forward_levels(self, x, mask, dropout_cutoff, level_kwargs):
        """The residual loop, or (beam size > 1) the beam search of `residual_options.beam_search_levels` followed
        by each kept level's codebook update along the winning beam (in training, unless the codebook is frozen)."""
        level_kwargs = dict(level_kwargs)
        beam = self._call_beam_size(level_kwargs)
        level_kwargs.pop("beam_size", None)
        if self.implicit_neural_codebook:
            if beam > 1:
                raise ValueError("beam search is not supported with implicit_neural_codebook=True in hf_vq")
            return implicit_forward_levels(self, x, mask, dropout_cutoff, level_kwargs)
        if beam <= 1:
            return super()._forward_levels(x, mask, dropout_cutoff, level_kwargs)
        return beam_search_forward(self, x, mask, dropout_cutoff, beam, level_kwargs)

    def sync_codebooks(self) -> list[Codebook]:
        return [self.layers[0]._codebook] if self.shared_codebook else [layer._codebook for layer in self.layers]

    def defers_updates(self) -> bool:
        """Deferred when statistics are summed across processes, every codebook is initialized (k-means draws its
        samples level by level on its step) and no shared codebook expires dead codes (that changes the codes
        the next level reads). No level reads another level's codebook, so the result is the same."""
        books = self.sync_codebooks()
        return (self.training and books[0].syncs() and all(cb.is_initted() for cb in books)
                and not (self.shared_codebook and books[0].threshold_ema_dead_code > 0))

    def _finish_step(self, residuals: list[Tensor], mask: Tensor | None) -> None:
        """Shared codebook: one codebook update from the statistics of every level, then dead-code expiry
        over all levels' inputs (as vector-quantize-pytorch 1.32)."""
        if not (self.training and self.shared_codebook):
            return
        first = self.layers[0]
        codebook = first._codebook
        if codebook.ema_update:
            codebook.update_embed_from_ema()
        first.update_in_place_optimizer()
        if codebook.threshold_ema_dead_code > 0:
            stacked = torch.stack(residuals, dim=-2).detach().float()  # (b, n, levels, d)
            flat = stacked.reshape(1, -1, stacked.shape[-1])
            flat_mask = None if mask is None else mask.unsqueeze(-1).expand(stacked.shape[:-1]).reshape(1, -1)
            first.expire_codes(flat, flat_mask)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        if not self.implicit_neural_codebook:
            return super().get_codes_from_indices(indices)
        return implicit_codes_from_indices(self, self._all_level_indices(indices))

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """`(num_quantizers, codebook_size, codebook_dim)`; a tuple of `(size_i, codebook_dim)` when the levels'
        codebook sizes differ (as vqp 1.32)."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    def _run_level(self, level, layer, residual, mask, sample_codebook_temp=None, freeze_codebook=False):
        out = layer(residual, mask=mask, sample_codebook_temp=sample_codebook_temp,
                    freeze_codebook=freeze_codebook, return_dict=True, return_perplexity=False)
        return out.quantized, out.indices, out.loss

    def _level_codes(self, level, layer, indices):
        return layer.codebook[indices]

    def fusable_levels(self, mask, cutoff: int, level_kwargs) -> list[VectorQuantize] | None:
        """The kept levels `0..cutoff` when this call's mode and options allow the fused training levels
        (`fused_train_levels`): training, no mask, no per-call level options, no shared codebook, one codebook
        size, `quant_grad_frac` 0, and every kept level's plan has `fused_levels`; else None (`fused_rows_ok` checks
        the input). Deferring the updates to the end changes nothing: each level's codes come from its codebook
        before its own update, and no level reads another's codebook."""
        if (not self.training or mask is not None or level_kwargs or self.shared_codebook
                or not self.uniform_codebook_size or self.quant_grad_frac > 0 or self.implicit_neural_codebook
                or self._call_beam_size(level_kwargs) > 1):
            return None
        levels = list(self.layers)[: cutoff + 1]
        return levels if all(layer.plan.fused_levels for layer in levels) else None

    @staticmethod
    def fused_rows_ok(residual: Tensor) -> bool:
        """Whether the fused training levels serve these rows: differentiable float32 rows the kernels take."""
        return residual.requires_grad and torch.is_grad_enabled() and train_levels_ok(residual)

    def _fused_levels(self, residual, mask, cutoff, level_kwargs):
        levels = self.fusable_levels(mask, cutoff, level_kwargs)
        if levels is None or not self.fused_rows_ok(residual):
            return None
        quantized, indices, loss = fused_train_levels(stack_groups([residual]), [levels], self.num_quantizers)
        return quantized.view(residual.shape), indices.view(*residual.shape[:-1], -1), loss[0]

    def _lean_eval_codebooks(self, mask, level_kwargs) -> list[Tensor] | None:
        """Every level's codebook when this call may take the lean eval loop (`lean_eval_levels`): not training,
        no mask, no per-call level options, and every level's plan has `lean_eval`."""
        if (self.training or mask is not None or level_kwargs or self.quant_grad_frac > 0 or self.eval_beam_size
                or self.implicit_neural_codebook):
            return None
        if not all(layer.plan.lean_eval for layer in self.layers):
            return None
        return [layer._codebook.codes()[0] for layer in self.layers]

    def lean_eval_rows(self, rows: Tensor, books: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
        return lean_eval_levels(rows, books)

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "ResidualVQ":
        """An hf_vq ResidualVQ with a vqp `ResidualVQ`'s config and full state (every level's codebook and EMA)."""
        if any(getattr(layer._codebook, "vq_bridge", None) is not None for layer in module.layers):
            raise ValueError("ResidualVQ levels with a vq_bridge are not supported by hf_vq's ResidualVQ")
        first = VectorQuantize.from_vector_quantize_pytorch(module.layers[0])
        level = {k: v for k, v in first.config.to_kwargs().items() if k in _VQ_FIELDS}
        # set by the ResidualVQ for its levels (vqp 1.32 sets manual_ema_update on the levels of a shared codebook)
        for name in ("accept_image_fmap", "return_zeros_for_masked_padding",
                     *(("manual_ema_update",) if module.shared_codebook else ())):
            level.pop(name, None)
        config = ResidualVQConfig(
            dim=module.project_in.in_features if module.has_projections else module.codebook_dim,
            num_quantizers=module.num_quantizers, codebook_size=vqp_codebook_size(module),
            codebook_dim=module.codebook_dim, shared_codebook=bool(module.shared_codebook),
            quantize_dropout=bool(module.quantize_dropout),
            quantize_dropout_cutoff_index=module.quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=module.quantize_dropout_multiple_of,
            accept_image_fmap=module.accept_image_fmap,
            return_zeros_for_masked_padding=module.return_zeros_for_masked_padding, vq_kwargs=level,
            quant_grad_frac=float(module.quant_grad_frac) if not module.diveq else 0.0, beam_size=module.beam_size,
            diveq=bool(module.diveq), **vqp_implicit_codebook(module),
            eval_beam_size=module.eval_beam_size if module.eval_beam_size != module.beam_size else None,
            beam_score_quantizer_weights=module.beam_score_weights.tolist(),
        )
        model = cls(config)
        if config.implicit_neural_codebook:
            model.mlps.load_state_dict(module.mlps.state_dict())
        if module.has_projections:
            model.project_in.load_state_dict(module.project_in.state_dict())
            model.project_out.load_state_dict(module.project_out.state_dict())
        for ours, theirs in zip(model.layers, module.layers):
            state = VectorQuantize.from_vector_quantize_pytorch(theirs).state_dict()
            if "_codebook" not in ours._modules:  # a shared codebook is loaded once, through level 0
                state = {k: v for k, v in state.items() if not k.startswith("_codebook.")}
            ours.load_state_dict(state)
        return model


# ResidualFSQ and ResidualLFQ (scalar-quantizer levels) live in residual_scalar.py; importable from here too.
from .residual_scalar import ResidualFSQ, ResidualFSQConfig, ResidualLFQ, ResidualLFQConfig  # noqa: E402, F401
