"""VectorQuantize: euclidean / cosine codebooks with EMA, k-means init, dead-code expiry, heads, affine
statistics and the usual gradient estimators, as a Hugging Face model.

Semantics: vector-quantize-pytorch 1.32 `VectorQuantize`. State-dict keys follow it (`_codebook.embed`,
`_codebook.cluster_size`, `_codebook.embed_avg`, `_codebook.initted`, ...), so
`VectorQuantize.from_vector_quantize_pytorch(module)` is a config mapping plus `load_state_dict`.

This module handles the input layout, heads, projections, code choice, gradient estimators and losses; the
codebook's state and its updates live in [`Codebook`] (`codebook.py`), the config in `vq_config.py`, and which
fast path a model may take in its [`VQPlan`] (`vq_plan.py`). Memory: nearest-code search, EMA statistics and code
lookup are the bounded-memory ops of `hf_vq.ops` (no N x K one-hot, no codebook repeated per batch element).
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import distributed
from ..modeling_utils import (QuantizerModel, QuantizerOutput, TokenLayout, autocast_off, check_features,
                              check_indices, register_quantizer)
from ..ops import ema as ema_ops
from ..ops.estimators import (directional_reparam, gumbel_select, rotate_to, rotate_to_with_commitment,
                              straight_through)
from ..ops.nearest import gather_codes, nearest_code, scores
from .codebook import Codebook, l2norm
from .vq_config import VectorQuantizeConfig
from .vq_losses import (cross_entropy_to_codes, masked_mse, mean_position_entropy, orthogonal_loss, perplexity,
                        row_slices)
from .vq_plan import VQPlan, mixes_soft_codes, plan_for, with_state
from .vq_direct_eval import direct_eval
from .vq_migration import from_vqp
from .vq_topk import topk_forward, update_from_indices
from . import vq_transformed

__all__ = ["Codebook", "LossBreakdown", "VQPlan", "VectorQuantize", "VectorQuantizeConfig", "VectorQuantizeOutput",
           "orthogonal_loss"]

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])


@dataclass
class VectorQuantizeOutput(QuantizerOutput):
    """Output of [`VectorQuantize`]: `quantized`, `indices` (-1 where masked), `loss`, the loss terms
    (`commitment_loss`, `codebook_diversity_loss`, `orthogonal_reg_loss`, `inplace_optimize_loss`; also as
    vqp's `LossBreakdown` in `loss_breakdown` with `return_loss_breakdown=True`) and `perplexity`:
    `exp(entropy)` of this batch's code usage (valid positions of this process), averaged over heads."""

    commitment_loss: Tensor | None = None
    codebook_diversity_loss: Tensor | None = None
    orthogonal_reg_loss: Tensor | None = None
    inplace_optimize_loss: Tensor | None = None
    perplexity: Tensor | None = None
    loss_breakdown: LossBreakdown | None = None

    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices", "loss")


@register_quantizer
class VectorQuantize(QuantizerModel):
    """Vector quantizer with a learned codebook (EMA or gradient), as in vector-quantize-pytorch 1.32.

    Args:
        config ([`VectorQuantizeConfig`]): or its fields as keyword arguments.
        in_place_codebook_optimizer (`Callable[[iterable of parameters], torch.optim.Optimizer]`, *optional*):
            optimizer factory for a learnable codebook, stepped inside `forward` in training. A callable is not
            JSON-serializable, so it is a constructor argument, not a config field.
        vq_bridge (`nn.Module`, *optional*): maps the `(heads, K, d)` codebook to the codes searched and returned
            (vqp 1.32's `vq_bridge`); a constructor argument, recorded as `has_vq_bridge` in the config.

    Example:
        >>> vq = VectorQuantize(dim=64, codebook_size=512, decay=0.99)
        >>> out = vq(torch.randn(2, 100, 64))
        >>> out.quantized.shape, out.indices.shape
        (torch.Size([2, 100, 64]), torch.Size([2, 100]))
    """

    config_class = VectorQuantizeConfig

    def __init__(
        self,
        config: VectorQuantizeConfig | None = None,
        in_place_codebook_optimizer: Callable | None = None,
        vq_bridge: nn.Module | None = None,
        **kwargs,
    ):
        if vq_bridge is not None and config is None:
            kwargs.setdefault("has_vq_bridge", True)
        super().__init__(config, **kwargs)
        c = self.config
        self._copy_config(c)
        inner = self.codebook_dim * self.heads
        self.has_projections = inner != self.dim
        if self.has_projections:
            linear = nn.Linear(c.dim, inner)
            self.project_in = nn.Sequential(linear, nn.LayerNorm(inner)) if c.layernorm_after_project_in else linear
            self.project_out = nn.Linear(inner, c.dim)
        else:
            self.project_in = self.project_out = nn.Identity()
        self._codebook = Codebook(c)
        if c.has_vq_bridge != (vq_bridge is not None):
            raise ValueError("has_vq_bridge=True needs a vq_bridge module (pass vq_bridge=..., also to "
                             "from_pretrained: a module is not part of a config)" if c.has_vq_bridge else
                             "a vq_bridge module needs a config with has_vq_bridge=True")
        if vq_bridge is not None:
            self._codebook.vq_bridge = vq_bridge  # its state is saved under `_codebook.vq_bridge.` (vqp's keys)
        if in_place_codebook_optimizer is not None and not isinstance(self._codebook.embed, nn.Parameter):
            raise ValueError("in_place_codebook_optimizer needs learnable_codebook=True (and ema_update=False)")
        self.in_place_codebook_optimizer = (
            in_place_codebook_optimizer(self._codebook.parameters()) if in_place_codebook_optimizer else None
        )
        self.config_plan = plan_for(c, in_place_optimizer=self.in_place_codebook_optimizer is not None)
        # the direct eval folds plain linear projections into the codebook (`ops.projected`), the input projection
        # into the search when that costs no more than searching in code space (a head's codebook dim at least
        # the input dim), else it projects and searches in code space
        self.can_fold = self.has_projections and isinstance(self.project_in, nn.Linear)
        self.fold_search = self.codebook_dim >= self.dim
        self._plan_cache: tuple[tuple, VQPlan] | None = None
        self.post_init()

    def _copy_config(self, c: VectorQuantizeConfig) -> None:
        """What `forward` reads, as plain attributes (a config attribute read costs microseconds)."""
        self.dim, self.heads, self.codebook_size = c.dim, c.heads, c.codebook_size
        self.codebook_dim = c.resolved_codebook_dim
        self.separate_codebook_per_head = c.separate_codebook_per_head
        self.check_inputs = c.check_inputs
        self.layout_flags = dict(channel_last=c.channel_last, accept_image_fmap=c.accept_image_fmap,
                                 accept_3d_fmap=c.accept_3d_fmap)
        self.channel_first_codes = not c.channel_last or c.accept_image_fmap or c.accept_3d_fmap
        self.use_cosine_sim = c.use_cosine_sim
        self.metric = "cosine" if c.use_cosine_sim else "euclidean"
        self.freeze_codebook, self.sample_codebook_temp = c.freeze_codebook, c.sample_codebook_temp
        self.learnable_codebook = c.resolved_learnable_codebook
        self.affine_param = c.affine_param
        self.stochastic_sample_codes, self.straight_through, self.reinmax = (c.stochastic_sample_codes,
                                                                             c.straight_through, c.reinmax)
        self.rotation_trick, self.directional_reparam = c.resolved_rotation_trick, c.directional_reparam
        self.directional_reparam_variance = c.directional_reparam_variance
        self.route_gradients_to_input, self.sync_update_v = c.route_gradients_to_input, c.sync_update_v
        self.has_commitment_loss, self.commitment_weight = c.has_commitment_loss, c.commitment_weight
        self.commitment_use_cross_entropy_loss = c.commitment_use_cross_entropy_loss
        self.codebook_diversity_loss_weight = c.codebook_diversity_loss_weight
        self.codebook_diversity_temperature = c.codebook_diversity_temperature
        self.orthogonal_reg_weight = c.orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = c.orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = c.orthogonal_reg_max_codes
        self.return_zeros_for_masked_padding = c.return_zeros_for_masked_padding
        self.manual_in_place_optimizer_update = c.manual_in_place_optimizer_update

    @property
    def plan(self) -> VQPlan:
        """The fast paths this model may take now: `config_plan` restricted by the codebook's state, decided again
        only when that state changes (k-means init, a loaded checkpoint, a dtype change, accumulated statistics)."""
        cb = self._codebook
        initted = cb.is_initted()
        if torch.compiler.is_compiling():
            return with_state(self.config_plan, initted=initted, float32_codebook=cb.embed.dtype == torch.float32,
                              pending_stats=cb.pending_stats is not None)
        key = (initted, cb.embed.dtype, cb.pending_stats is None)
        if self._plan_cache is None or self._plan_cache[0] != key:
            plan = with_state(self.config_plan, initted=initted, float32_codebook=key[1] == torch.float32,
                              pending_stats=not key[2])
            self._plan_cache = (key, plan)
        return self._plan_cache[1]

    graph_kwargs = frozenset({"return_dict", "return_loss_breakdown", "return_perplexity", "freeze_codebook",
                              "ema_update", "sample_codebook_temp"})

    def graphable(self) -> bool:
        """The plan's `graphed_call`, for a call of its own: not inside an owner's `deferred_updates` block (residual
        levels), not with statistics summed over processes."""
        return self.plan.graphed_call and self._codebook.deferred is None and not self._codebook.syncs()

    # -- conversions ------------------------------------------------------------------------------

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "VectorQuantize":
        """Build an hf_vq VectorQuantize with a vector-quantize-pytorch module's config and full state (a
        `vq_bridge` module is copied along; see `vq_migration.from_vqp`)."""
        return from_vqp(cls, module)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict` with an error that names every missing, unexpected or mis-shaped key."""
        own = self.state_dict()
        problems = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state_dict.items()
            if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
        ]
        if strict:
            problems += [f"missing key {k}" for k in own if k not in state_dict]
            problems += [f"unexpected key {k}" for k in state_dict if k not in own]
        if problems:
            raise ValueError("VectorQuantize state dict does not match the model:\n  " + "\n  ".join(problems))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- codebook access --------------------------------------------------------------------------

    @property
    def codebook(self) -> Tensor:
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes `(b, ..., heads * codebook_dim)` (channel-first for image/3d layouts) for `indices` (through the
        `vq_bridge`, if any, as `forward` returns them; vqp 1.32 looks up the raw codebook there)."""
        check_indices(indices, self.codebook_size)
        embed = self._codebook.embed
        if "vq_bridge" in self._codebook._modules:
            embed = self._codebook.vq_bridge(embed)
        if self.heads == 1:
            codes = embed[0][indices]
        else:
            if indices.shape[-1] != self.heads:
                raise ValueError(f"multi-head indices must end with a heads axis of size {self.heads}")
            head_ids = torch.arange(self.heads, device=indices.device)
            table = embed if self.separate_codebook_per_head else embed.expand(self.heads, -1, -1)
            codes = table[head_ids, indices].flatten(-2)  # (..., heads, d) -> (..., heads * d)
        return codes.movedim(-1, 1) if self.channel_first_codes else codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        codes = self.get_codes_from_indices(indices)
        if self.channel_first_codes:
            return self.project_out(codes.movedim(1, -1)).movedim(-1, 1)
        return self.project_out(codes)

    # -- heads ------------------------------------------------------------------------------------

    def _split_heads(self, x: Tensor) -> Tensor:
        """`(b, n, h*d)` -> `(h, b, n, d)` (separate codebooks) or `(1, b*h, n, d)` (shared)."""
        if self.heads == 1:
            return x.unsqueeze(0)
        b, n, _ = x.shape
        x = x.view(b, n, self.heads, -1)
        if self.separate_codebook_per_head:
            return x.permute(2, 0, 1, 3)
        return x.permute(0, 2, 1, 3).reshape(1, b * self.heads, n, -1)

    def _merge_heads(self, t: Tensor, b: int) -> Tensor:
        """Inverse of `_split_heads` for `(H, B, n, ...)` tensors -> `(b, n, heads, ...)`."""
        if self.separate_codebook_per_head:
            return t.movedim(0, 2)
        return t.reshape(b, self.heads, *t.shape[2:]).movedim(1, 2)

    # -- codebook state (owned by `self._codebook`) -----------------------------------------------

    def update_embed_from_ema(self) -> None:
        """The codebook from its EMA state (with `manual_ema_update` the caller does this once per step)."""
        self._codebook.update_embed_from_ema()

    def expire_codes(self, flat: Tensor, mask: Tensor | None) -> None:
        """Dead-code expiry from the code-space rows `flat (H, N, d)` (see `Codebook.expire_codes`)."""
        self._codebook.expire_codes(flat, mask)

    def update_ema_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
        """The codebook update of a training step for `x` with the given codes `indices` (shaped like `forward`'s
        output indices; -1 ignored), as vqp 1.32's `update_ema_indices` (see `vq_topk.update_from_indices`)."""
        update_from_indices(self, x, indices, mask)

    update_indices = update_ema_indices

    def update_in_place_optimizer(self) -> None:
        """Step the in-place codebook optimizer; gradients are averaged across ranks first."""
        if self.in_place_codebook_optimizer is None:
            return
        if self._codebook.syncs():
            distributed.all_reduce_mean_(*(p.grad for p in self._codebook.parameters() if p.grad is not None))
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    # -- forward ----------------------------------------------------------------------------------

    def _quantize(self, flat: Tensor, embed: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """Codes and indices for `flat (H, N, d)`: nearest code, or a Gumbel sample in training."""
        sample = self.training and temperature > 0 and (self.stochastic_sample_codes or self.mixes_soft_codes)
        if not sample:
            differentiable = embed.requires_grad and torch.is_grad_enabled()  # a learnable codebook's lookup
            found = nearest_code(flat, embed.expand(flat.shape[0], -1, -1), metric=self.metric,
                                 return_codes=not differentiable)
            return (gather_codes(embed, found[0]) if differentiable else found[2]), found[0]
        embed = embed.expand(flat.shape[0], -1, -1)
        indices, soft = [], []
        for sl in row_slices(flat, embed):  # row chunks: never a full (N, K) matrix of logits
            if self.straight_through:  # recomputed in backward (same Gumbel noise: the RNG state is replayed)
                idx, mix = checkpoint(self._sample_rows, flat[:, sl], embed, temperature, use_reentrant=False)
                soft.append(mix)
            else:
                with torch.no_grad():
                    idx, _ = self._sample_rows(flat[:, sl], embed, temperature)
            indices.append(idx)
        indices = torch.cat(indices, dim=1)
        codes = gather_codes(embed, indices)
        if soft:  # straight-through: value of the hard code, gradient of the soft mixture
            mix = torch.cat(soft, dim=1)
            codes = codes + mix - mix.detach()
        return codes, indices

    @property
    def mixes_soft_codes(self) -> bool:
        """`vq_plan.mixes_soft_codes` of this model's settings."""
        return mixes_soft_codes(self.straight_through, self.stochastic_sample_codes, self.route_gradients_to_input)

    def _sample_rows(self, x: Tensor, embed: Tensor, temperature: float) -> tuple[Tensor, Tensor | None]:
        """Gumbel-sampled indices for rows `x`, and (straight-through) the soft mixture of codes."""
        logits = scores(x, embed, self.metric)
        indices, weights = gumbel_select(logits, temperature, straight_through=self.straight_through,
                                         reinmax=self.reinmax, stochastic=self.stochastic_sample_codes)
        mix = torch.einsum("hnk,hkd->hnd", weights, embed) if weights is not None else None
        return indices, mix

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_dict: bool | None = None,
        *,
        indices: Tensor | None = None,
        ema_update: bool | None = None,
        ema_update_weight: Tensor | Callable | None = None,
        accum_ema_update: bool = False,
        return_loss_breakdown: bool = False,
        return_perplexity: bool = True,
        topk: int | None = None,
        codebook_transform_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> VectorQuantizeOutput | tuple:
        """Quantize `x` (`(b, n, d)`; `(b, d, n)` with `channel_last=False`; `(b, d, h, w)` / `(b, d, t, h, w)`
        with `accept_image_fmap` / `accept_3d_fmap`; `(b, d)` as one token). `mask`/`lens` mark valid
        positions of `(b, n)` input. Returns [`VectorQuantizeOutput`] or `(quantized, indices, loss)`
        (`(..., loss_breakdown)` with `return_loss_breakdown`).

        As vqp 1.32: `indices` (shaped like the output indices, -1 ignored) makes `loss` the cross-entropy of the
        code scores against those codes (NaturalSpeech 2) and the tuple form `(quantized, loss)`;
        `ema_update` overrides the config for this call; `ema_update_weight` scales each code's EMA step (a
        tensor `(K,)`/`(heads, K)`, or a function of the batch's `(sums, counts)`); `accum_ema_update` only
        accumulates this batch's statistics, which the next update adds to its own. `return_perplexity=False`
        leaves `perplexity` None (a caller that does not read it, e.g. a residual level, saves its bincount).
        `topk=k` returns the `k` best codes of every token (a `k` axis after the token axes; see `vq_topk`).
        `codebook_transform_fn` maps the codebook `(h, K, d)` to per-token codebooks `(h, b, n, K, d)` that the
        tokens are quantized against (see `vq_transformed`)."""
        if self.check_inputs:
            check_features(x, self.dim, name="x")
        if codebook_transform_fn is not None:
            self._check_transform_call(topk, indices)
        if topk is not None:
            return self._topk_forward(x, topk, mask, lens, sample_codebook_temp, freeze_codebook, return_dict,
                                      indices, return_loss_breakdown)
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        dtype, input_requires_grad = x.dtype, x.requires_grad

        layout = TokenLayout.of_fmap(x, **self.layout_flags)
        tokens = layout.to_tokens(x)
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"expected feature dim {self.dim}, got {tokens.shape[-1]} (input shape {tuple(x.shape)})")
        if lens is not None:  # (the token axis: dim 2 of channel-first (b, d, n) input)
            mask = torch.arange(tokens.shape[1], device=x.device) < lens[:, None]
        if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape[:2]):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(tokens.shape[:2])}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        b, n = tokens.shape[:2]
        if (not self.training and mask is None and indices is None and codebook_transform_fn is None
                and self.plan.direct_eval):
            quantized, indices, usage = direct_eval(self, tokens, return_perplexity)
            zero = torch.zeros((), device=x.device)
            terms = dict(commitment_loss=zero, codebook_diversity_loss=zero, orthogonal_reg_loss=zero)
            return self._finish(layout, quantized, indices, zero, zero, usage, terms, return_dict,
                                return_loss_breakdown)
        heads_x = self._split_heads(self.project_in(tokens) if self.has_projections else tokens)  # (H, B, n, d)
        if self.use_cosine_sim:
            heads_x = l2norm(heads_x)
        H, B = heads_x.shape[:2]
        flat_mask = None
        if mask is not None:
            per_row = mask if B == b else mask.repeat_interleave(self.heads, dim=0)
            flat_mask = per_row.reshape(1, -1).expand(H, -1)

        target = self._indices_to_rows(indices, b, n) if indices is not None else None
        with autocast_off(x.device.type):
            flat = heads_x.float().reshape(H, B * n, -1)
            rows = self._quantize_rows(flat, flat_mask, temperature, freeze_codebook, input_requires_grad, B,
                                       target=target, ema_update=ema_update, ema_update_weight=ema_update_weight,
                                       accum_ema_update=accum_ema_update, transform=codebook_transform_fn)
            usage = perplexity(rows.indices, self.codebook_size, flat_mask, rows.counts) if return_perplexity else None

        if self.heads == 1:
            codes = rows.codes.reshape(b, n, -1)
        else:
            codes = self._merge_heads(rows.codes.reshape(H, B, n, -1), b).flatten(-2)
        quantized = self.project_out(codes.to(dtype)) if self.has_projections else codes.to(dtype)
        if indices is not None:  # vqp returns here, its codes not yet merged/projected; ours in the output layout
            output = VectorQuantizeOutput(quantized=layout.from_tokens(quantized), loss=rows.loss, perplexity=usage)
            return output if (self.config.return_dict if return_dict is None else return_dict) \
                else (output.quantized, rows.loss)
        indices = self._merge_heads(rows.indices.reshape(H, B, n), b)
        if self.heads == 1:
            indices = indices.squeeze(-1)
        if mask is not None:
            fill = torch.zeros_like(tokens) if self.return_zeros_for_masked_padding else tokens
            quantized = torch.where(mask.unsqueeze(-1), quantized, fill)
            indices = indices.masked_fill(~(mask if self.heads == 1 else mask.unsqueeze(-1)), -1)
        inplace_loss = rows.inplace_loss
        if inplace_loss is None:  # outside training the loss is already a zero (shared by the loss terms)
            inplace_loss = rows.loss if not self.training else torch.zeros((), device=x.device)
        return self._finish(layout, quantized, indices, rows.loss, inplace_loss, usage, rows.loss_terms, return_dict,
                            return_loss_breakdown)

    def _finish(self, layout: TokenLayout, quantized: Tensor, indices: Tensor, loss: Tensor, inplace_loss: Tensor,
                usage: Tensor | None, loss_terms: dict[str, Tensor], return_dict: bool | None,
                return_loss_breakdown: bool) -> VectorQuantizeOutput | tuple:
        """The output of `forward` from token-layout `quantized (b, n, dim)` and `indices (b, n[, heads])`."""
        output = VectorQuantizeOutput(
            quantized=layout.from_tokens(quantized),
            indices=layout.indices_from_tokens(indices),
            loss=loss,
            inplace_optimize_loss=inplace_loss,
            perplexity=usage,
            **loss_terms,
        )
        if return_loss_breakdown:
            output.loss_breakdown = LossBreakdown(output.commitment_loss, output.codebook_diversity_loss,
                                                  output.orthogonal_reg_loss, inplace_loss)
        result = self._output(output, return_dict)
        return (*result, output.loss_breakdown) if return_loss_breakdown and isinstance(result, tuple) else result

    def _topk_forward(self, x, topk, mask, lens, temperature, freeze_codebook, return_dict, indices,
                      return_loss_breakdown):
        if indices is not None:
            raise ValueError("pass either indices (cross-entropy loss) or topk, not both")
        temperature = self.sample_codebook_temp if temperature is None else temperature
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        output = VectorQuantizeOutput(**topk_forward(self, x, topk, mask, lens, temperature, freeze_codebook),
                                      inplace_optimize_loss=torch.zeros((), device=x.device))
        if return_loss_breakdown:
            output.loss_breakdown = LossBreakdown(output.commitment_loss, output.codebook_diversity_loss,
                                                  output.orthogonal_reg_loss, output.inplace_optimize_loss)
        result = self._output(output, return_dict)
        return (*result, output.loss_breakdown) if return_loss_breakdown and isinstance(result, tuple) else result

    def _quantize_rows(self, flat: Tensor, flat_mask: Tensor | None, temperature: float, freeze_codebook: bool,
                       input_requires_grad: bool, batch: int, *, target: Tensor | None = None,
                       ema_update: bool | None = None, ema_update_weight: Tensor | Callable | None = None,
                       accum_ema_update: bool = False, transform: Callable[[Tensor], Tensor] | None = None) -> "_Rows":
        """The row-level step of `forward` on `flat (H, N, d)` float32 (cosine: already normalized): initialization,
        in-place optimizer, code choice, codebook update, losses and the gradient estimator. `target (H, N)`:
        the `indices=` argument's codes (the loss is then their cross-entropy); `transform`: the forward's
        `codebook_transform_fn` (per-token codebooks, `vq_transformed`)."""
        cb = self._codebook
        if not cb.is_initted():
            cb.init_from_kmeans(flat.detach(), flat_mask)
        if self.affine_param:
            cb.update_affine(flat.detach(), flat_mask, self.training)
        embed = cb.codes()
        if transform is not None:
            books = vq_transformed.transformed_books(transform, embed, batch, flat.shape[1] // batch)
            update = dict(ema_update=ema_update, weight=ema_update_weight, accum=accum_ema_update)
            codes, code_ids, loss, terms, counts = vq_transformed.per_token_rows(
                self, flat, books, flat_mask, temperature, freeze_codebook, input_requires_grad, batch, update)
            return _Rows(codes, code_ids, loss, terms, None, counts)

        inplace_loss, counts = None, None
        update = self.training and not freeze_codebook
        if self.in_place_codebook_optimizer is not None and update:
            # vqp 1.32's order: the codebook update from a first search, a step on its MSE, a second search
            codes, first_ids = self._quantize(flat, embed, temperature)
            cb.update(flat.detach(), first_ids, flat_mask, ema_update, ema_update_weight, accum_ema_update)
            inplace_loss = masked_mse(codes, flat.detach(), flat_mask)
            ema_ops.require_finite(inplace_loss.detach(), "in-place optimizer loss")  # before any gradient exists
            inplace_loss.backward()
            if not self.manual_in_place_optimizer_update:
                self.update_in_place_optimizer()
            if self.affine_param:  # (vqp's second search updates the affine statistics again)
                cb.update_affine(flat.detach(), flat_mask, self.training)
            embed, update = cb.codes(), False  # the stepped codebook, through the affine map and bridge
        codes, code_ids = self._quantize(flat, embed, temperature)
        if self.commitment_use_cross_entropy_loss or self.codebook_diversity_loss_weight > 0 or target is not None:
            embed = embed.clone()  # these losses score against the codebook as it was before the update
        if update:
            counts = cb.update(flat.detach(), code_ids, flat_mask, ema_update, ema_update_weight, accum_ema_update)

        if target is not None:
            H = flat.shape[0]
            valid = target >= 0 if flat_mask is None else (target >= 0) & flat_mask
            loss = cross_entropy_to_codes(flat, embed.expand(H, -1, -1), self.metric, target.clamp(min=0), valid)
            return _Rows(self._estimator(flat, codes, input_requires_grad), code_ids, loss, {}, inplace_loss, counts)
        if (self.config_plan.fused_estimator and self.training and flat_mask is None and input_requires_grad):
            # the rotation trick on detached codes and the MSE commitment loss to them: one op each way on CUDA
            rotated, commit = rotate_to_with_commitment(flat, codes.detach())
            loss, terms = self._losses(flat, codes, code_ids, embed, flat_mask, freeze_codebook, batch, commit)
            return _Rows(rotated, code_ids, loss, terms, inplace_loss, counts)
        loss, terms = self._losses(flat, codes, code_ids, embed, flat_mask, freeze_codebook, batch)
        return _Rows(self._estimator(flat, codes, input_requires_grad), code_ids, loss, terms, inplace_loss, counts)

    def _check_transform_call(self, topk: int | None, indices: Tensor | None) -> None:
        """ValueError for what a call with `codebook_transform_fn` does not combine with."""
        if topk is not None or indices is not None:
            raise ValueError("codebook_transform_fn does not combine with topk or indices")
        if self.in_place_codebook_optimizer is not None:
            raise ValueError("codebook_transform_fn does not support an in-place codebook optimizer")
        vq_transformed.check_options(self.config, "codebook_transform_fn")

    def _indices_to_rows(self, indices: Tensor, b: int, n: int) -> Tensor:
        """Indices in the output layout (`(b, ...)`, heads last) to the internal `(H, B * n)` row layout."""
        heads = self.heads
        if indices.is_floating_point() or indices.numel() != b * n * heads:
            raise ValueError(f"indices must be an integer tensor with {b * n * heads} entries (the output "
                             f"indices' shape), got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (indices.min() < -1 or indices.max() >= self.codebook_size):
            raise ValueError(f"indices must be in [-1, {self.codebook_size}) (-1 = ignored)")
        rows = indices.reshape(b, n, heads)
        if self.separate_codebook_per_head:
            return rows.permute(2, 0, 1).reshape(heads, b * n)
        return rows.permute(0, 2, 1).reshape(1, -1)

    def _estimator(self, flat: Tensor, codes: Tensor, input_requires_grad: bool) -> Tensor:
        if not self.training:
            return codes
        if not self.learnable_codebook:
            codes = codes if self.mixes_soft_codes else codes.detach()
        if input_requires_grad and self.route_gradients_to_input:
            if self.rotation_trick:
                codes = rotate_to(flat, codes)
            elif self.directional_reparam:
                codes = directional_reparam(flat, codes, self.directional_reparam_variance)
            else:
                codes = straight_through(flat, codes)
        if self.sync_update_v > 0:
            # synchronous update (vqtorch draft eq. 21): the codebook also receives the output's gradient
            codes = codes + self.sync_update_v * (codes - codes.detach())
        return codes

    def _losses(self, flat, codes, indices, embed, mask, freeze_codebook, batch,
                commit: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """`(loss, terms)`: the weighted training loss and its unweighted terms (0-dim tensors, zero when off or
        outside training); `commit`: the commitment term when the caller computed it. As vqp, the training loss
        is differentiable even when no term is."""
        zero = torch.zeros((), device=flat.device)
        terms = dict(commitment_loss=zero, codebook_diversity_loss=zero, orthogonal_reg_loss=zero)
        if not self.training:
            return zero, terms
        weighted = []
        if self.codebook_diversity_loss_weight > 0:
            diversity = -mean_position_entropy(flat, embed.expand(flat.shape[0], -1, -1), self.metric,
                                               self.codebook_diversity_temperature, batch)
            terms["codebook_diversity_loss"] = diversity
            weighted.append(diversity * self.codebook_diversity_loss_weight)
        if self.has_commitment_loss:
            if commit is None and self.commitment_use_cross_entropy_loss:
                commit = cross_entropy_to_codes(flat, embed.expand(flat.shape[0], -1, -1), self.metric, indices, mask)
            elif commit is None:
                learn = self.learnable_codebook and not freeze_codebook
                commit = masked_mse(codes if learn else codes.detach(), flat, mask)
            terms["commitment_loss"] = commit
            weighted.append(commit if self.commitment_weight == 1 else commit * self.commitment_weight)
        if self.orthogonal_reg_weight > 0:
            ortho = orthogonal_loss(self._orthogonal_reg_codes(indices))
            terms["orthogonal_reg_loss"] = ortho
            weighted.append(ortho * self.orthogonal_reg_weight)
        loss = sum(weighted[1:], weighted[0]) if weighted else zero
        if torch.is_grad_enabled() and not loss.requires_grad and not torch.compiler.is_compiling():
            loss = loss.detach().requires_grad_()  # (a graph cannot make a leaf: compiled, such a loss stays constant)
        return loss, terms

    def _orthogonal_reg_codes(self, indices: Tensor) -> Tensor:
        """The codes the orthogonal regularization reads: the used ones (`orthogonal_reg_active_codes_only`), at
        most `orthogonal_reg_max_codes` of them, drawn at random."""
        codebook = self._codebook.embed
        if self.orthogonal_reg_active_codes_only:
            if self.heads > 1 and self.separate_codebook_per_head:
                raise ValueError("orthogonal_reg_active_codes_only is not supported with separate codebooks per head")
            codebook = codebook[:, torch.unique(indices)]
        limit = self.orthogonal_reg_max_codes
        if limit is not None and codebook.shape[-2] > limit:
            keep = torch.randperm(codebook.shape[-2], device=codebook.device)[:limit]
            codebook = codebook[:, keep]
        return codebook


class _Rows(NamedTuple):
    """What `VectorQuantize._quantize_rows` returns: codes `(H, N, d)` (through the estimator), indices `(H, N)`,
    the loss, its unweighted terms, and the in-place optimizer's loss (None when it did not run)."""

    codes: Tensor
    indices: Tensor
    loss: Tensor
    loss_terms: dict[str, Tensor]
    inplace_loss: Tensor | None
    counts: Tensor | None = None  # this batch's code counts `(H, K)` when the codebook update computed them
