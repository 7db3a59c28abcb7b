"""Lookup-Free Quantization (LFQ) and its spherical variant (BSQ) as a Hugging Face model.

Semantics: CogVideo sgm `lookup_free_quantization.py` and vector-quantize-pytorch 1.32 `LFQ` (a superset of
CogVideo sgm's options). https://arxiv.org/abs/2310.05737, https://arxiv.org/abs/2406.07548
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..modeling_utils import (
    QuantizerConfig,
    QuantizerModel,
    QuantizerOutput,
    autocast_off,
    check_features,
    check_indices,
    register_quantizer,
)
from ..ops import lfq as lfq_ops
from .fsq import channel_linear

# CogVideo sgm's breakdown of the aux loss, same field order
LFQLossBreakdown = namedtuple("LFQLossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])

ACTIVATIONS = {
    "identity": nn.Identity,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softsign": nn.Softsign,
}

ENTROPY_LOSS_METHODS = ("exact", "factorized")


class LFQConfig(QuantizerConfig):
    """Configuration of [`LFQ`].

    Args:
        dim (`int`, *optional*): input feature dim; defaults to `log2(codebook_size) * num_codebooks`. When it
            differs, linear projections map in and out of the code space.
        codebook_size (`int`, *optional*): a power of two; defaults to `2 ** dim`.
        entropy_loss_weight (`float`, defaults to 0.1): weight of the entropy aux loss.
        commitment_loss_weight (`float`, defaults to 0.25): weight of the commitment loss (CogVideo sgm's default;
            vector-quantize-pytorch defaults to 0).
        diversity_gamma (`float`, defaults to 1.0): weight of the codebook entropy inside the entropy loss.
        straight_through_activation (`str`, defaults to `"identity"`): activation applied before the
            straight-through estimator, one of `ACTIVATIONS` (CogVideo sgm takes a module; a name keeps the config JSON).
        num_codebooks (`int`, defaults to 1): independent codebooks over equal slices of the projected features.
        keep_num_codebooks_dim (`bool`, *optional*): keep a trailing codebook axis on `indices`; defaults to
            `num_codebooks > 1` and must be true when `num_codebooks > 1`.
        codebook_scale (`float`, defaults to 1.0): codes are `{-scale, scale}` per bit (residual LFQ halves it).
        sync_codebook_entropy (`bool`, *optional*): codebook entropy over the global batch of all processes
            (default: when a process group is up).
        frac_per_sample_entropy (`float`, defaults to 1.0): in (0, 1]; use a random fraction of the tokens for
            the entropy loss.
        inv_temperature (`float`, defaults to 100.0): default inverse temperature of the code softmax (the
            forward's `inv_temperature` argument overrides it, as in CogVideo sgm).
        entropy_loss_method (`str`, defaults to `"exact"`): `"exact"` computes CogVideo sgm's codebook entropy of the
            batch-mean code distribution over all `2**C` codes (without an `N x 2**C` matrix); `"factorized"` uses
            the BSQ / Open-MAGVIT2 approximation (sum of per-bit entropies of the batch-mean bit probability).
        has_projections (`bool`, *optional*): force projections on or off; defaults to `dim != C * num_codebooks`.
        projection_has_bias (`bool`, defaults to `True`): bias in the in/out projections.
        soft_clamp_input_value (`float`, *optional*): `tanh` soft clamp of the projected input to this value
            (must be >= `codebook_scale`).
        cosine_sim_project_in (`bool`, defaults to `False`): project in with a cosine-similarity linear layer.
        cosine_sim_project_in_scale (`float`, *optional*): its output scale; defaults to `codebook_scale`.
        channel_first (`bool`, defaults to `False`): treat rank-3 input as `(b, d, n)`. Rank 4/5 inputs are always
            channel-first `(b, d, h, w)` / `(b, d, t, h, w)`.
        experimental_softplus_entropy_loss (`bool`, defaults to `False`): make the entropy loss positive with
            `softplus(loss + entropy_loss_offset)`.
        entropy_loss_offset (`float`, defaults to 5.0): the shift used by the softplus entropy loss.
        spherical (`bool`, defaults to `False`): binary spherical quantization: inputs and codes l2-normalized.
        force_quantization_f32 (`bool`, defaults to `True`): quantize in float32 with autocast off.
        orthogonal_rotation (`bool`, defaults to `False`): a fixed random orthogonal rotation of the codes.
    """

    model_type = "hf_vq_lfq"
    vqp_positional = ()  # keyword-only in vqp 1.32

    def __init__(
        self,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        straight_through_activation: str = "identity",
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        inv_temperature: float = 100.0,
        entropy_loss_method: str = "exact",
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        channel_first: bool = False,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
        sync_codebook_entropy: bool | None = None,
        **kwargs,
    ):
        self.sync_codebook_entropy = sync_codebook_entropy
        self.dim = dim
        self.codebook_size = codebook_size
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.diversity_gamma = diversity_gamma
        self.straight_through_activation = straight_through_activation
        self.num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.codebook_scale = codebook_scale
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.inv_temperature = inv_temperature
        self.entropy_loss_method = entropy_loss_method
        self.has_projections = has_projections
        self.projection_has_bias = projection_has_bias
        self.soft_clamp_input_value = soft_clamp_input_value
        self.cosine_sim_project_in = cosine_sim_project_in
        self.cosine_sim_project_in_scale = cosine_sim_project_in_scale
        self.channel_first = channel_first
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset
        self.spherical = spherical
        self.force_quantization_f32 = force_quantization_f32
        self.orthogonal_rotation = orthogonal_rotation
        super().__init__(**kwargs)

    def validate(self):
        if self.dim is None and self.codebook_size is None:
            raise ValueError("LFQ needs dim or codebook_size (either may be None, not both)")
        for field in ("dim", "codebook_size", "num_codebooks"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        size = self.codebook_size
        if size is not None and (size < 2 or size & (size - 1)):
            suggested = 2 ** max(1, math.ceil(math.log2(size)))
            raise ValueError(f"codebook_size must be a power of 2 >= 2 for lookup-free quantization, got {size} "
                             f"(suggested {suggested})")
        if self.num_codebooks > 1 and self.keep_num_codebooks_dim is False:
            raise ValueError("keep_num_codebooks_dim=False is only allowed with num_codebooks=1")
        if not 0.0 < self.frac_per_sample_entropy <= 1.0:
            raise ValueError(f"frac_per_sample_entropy must be in (0, 1], got {self.frac_per_sample_entropy!r}")
        if self.straight_through_activation not in ACTIVATIONS:
            raise ValueError(f"straight_through_activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.straight_through_activation!r}")
        if self.entropy_loss_method not in ENTROPY_LOSS_METHODS:
            raise ValueError(f"entropy_loss_method must be one of {list(ENTROPY_LOSS_METHODS)}, "
                             f"got {self.entropy_loss_method!r}")
        if not self.codebook_scale > 0:
            raise ValueError(f"codebook_scale must be > 0, got {self.codebook_scale!r}")
        if not self.inv_temperature > 0:
            raise ValueError(f"inv_temperature must be > 0, got {self.inv_temperature!r}")
        clamp = self.soft_clamp_input_value
        if clamp is not None and clamp < self.codebook_scale:
            raise ValueError(f"soft_clamp_input_value must be >= codebook_scale ({self.codebook_scale}), got {clamp!r}")

    @property
    def effective_codebook_size(self) -> int:
        return self.codebook_size if self.codebook_size is not None else 2**self.dim

    @property
    def codebook_dim(self) -> int:
        return int(math.log2(self.effective_codebook_size))

    @property
    def effective_dim(self) -> int:
        return self.dim if self.dim is not None else self.codebook_dim * self.num_codebooks


@dataclass
class LFQOutput(QuantizerOutput):
    """Output of [`LFQ`].

    Args:
        quantized (`torch.Tensor`): the quantized features, in the input's layout and dtype.
        indices (`torch.Tensor`): int64 code indices, `(b, *spatial)` or `(b, *spatial, num_codebooks)`.
        loss (`torch.Tensor`): CogVideo sgm's `entropy_aux_loss`: weighted entropy plus commitment loss (0 in eval).
        loss_breakdown (`LFQLossBreakdown`, *optional*): `(per_sample_entropy, batch_entropy, commitment)` when
            `return_loss_breakdown=True`.
    """

    loss_breakdown: LFQLossBreakdown | None = None

    # CogVideo sgm's `Return(quantized, indices, entropy_aux_loss)`
    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices", "loss")


class CosineSimLinear(nn.Module):
    """Linear layer on l2-normalized inputs and columns, times `scale` (weight is `(dim_in, dim_out)` as in vqp)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


@register_quantizer
class LFQ(QuantizerModel):
    """Lookup-free quantizer: each code dimension is quantized to its sign; an entropy loss spreads code usage.

    Example:
        >>> lfq = LFQ(codebook_size=2**8, dim=16)
        >>> out = lfq(torch.randn(2, 16, 4, 4))
        >>> out.quantized.shape, out.indices.shape
        (torch.Size([2, 16, 4, 4]), torch.Size([2, 4, 4]))
    """

    config_class = LFQConfig

    def __init__(self, config: LFQConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self.dim = c.effective_dim
        self.codebook_dim = c.codebook_dim
        self.num_codebooks = c.num_codebooks
        self.keep_num_codebooks_dim = c.num_codebooks > 1 if c.keep_num_codebooks_dim is None else c.keep_num_codebooks_dim
        self.codebook_scale = c.codebook_scale
        self.spherical = c.spherical
        self.soft_clamp_input_value = c.soft_clamp_input_value
        self.orthogonal_rotation = c.orthogonal_rotation
        self.force_quantization_f32 = c.force_quantization_f32
        self.channel_first = c.channel_first
        self.check_inputs = c.check_inputs
        self.inv_temperature = c.inv_temperature
        self.frac_per_sample_entropy = c.frac_per_sample_entropy
        self.entropy_loss_method = c.entropy_loss_method
        self.sync_codebook_entropy = c.sync_codebook_entropy
        self.diversity_gamma = c.diversity_gamma
        self.entropy_loss_weight = c.entropy_loss_weight
        self.commitment_loss_weight = c.commitment_loss_weight
        self.experimental_softplus_entropy_loss = c.experimental_softplus_entropy_loss
        self.entropy_loss_offset = c.entropy_loss_offset
        # place value of each bit, most significant first (the index of a code is the sum over its set bits)
        # (an explicit device: models are also built under a meta-device context, which would leave no values)
        self._bit_values = 2 ** torch.arange(self.codebook_dim - 1, -1, -1, device="cpu")
        inner = c.codebook_dim * c.num_codebooks
        self.has_projections = c.has_projections if c.has_projections is not None else c.effective_dim != inner
        if not self.has_projections:
            if c.effective_dim != inner:
                raise ValueError(f"has_projections=False needs dim == log2(codebook_size) * num_codebooks = {inner}")
            self.project_in = self.project_out = nn.Identity()
        else:
            if c.cosine_sim_project_in:
                scale = c.cosine_sim_project_in_scale if c.cosine_sim_project_in_scale is not None else c.codebook_scale
                self.project_in = CosineSimLinear(c.effective_dim, inner, scale=scale)
            else:
                self.project_in = nn.Linear(c.effective_dim, inner, bias=c.projection_has_bias)
            self.project_out = nn.Linear(inner, c.effective_dim, bias=c.projection_has_bias)
        self.activation = ACTIVATIONS[c.straight_through_activation]()
        if c.orthogonal_rotation:
            rot = torch.empty(c.codebook_dim, c.codebook_dim)
            nn.init.orthogonal_(rot)  # not its return value: loaders may patch init functions to return None
            self.register_buffer("orthogonal_rot", rot)
        # the exact entropy's code-selection tables (derived from codebook_dim; see `ops.lfq.code_selections`)
        self.register_buffer("_select_hi", torch.empty(0), persistent=False)
        self.register_buffer("_select_lo", torch.empty(0), persistent=False)
        self.reset_derived_buffers()
        self.post_init()

    def reset_derived_buffers(self):
        device = self._select_hi.device if self._select_hi.device.type != "meta" else torch.device("cpu")
        self._select_hi, self._select_lo = lfq_ops.code_selections(self.codebook_dim, device)

    @property
    def codebook_size(self) -> int:
        return self.config.effective_codebook_size

    @property
    def code_magnitude(self) -> float:
        """Per-bit magnitude of every code (after the spherical normalization, if any)."""
        return self.codebook_scale / math.sqrt(self.codebook_dim) if self.spherical else self.codebook_scale

    @property
    def codebook(self) -> Tensor:
        """The implicit `(codebook_size, C)` codebook (built on demand: it is `2**C` rows)."""
        return self._codes_from_indices(torch.arange(self.codebook_size, device=self.device))

    def bit_values(self, device: torch.device) -> Tensor:
        """The place value of each bit on `device` (moved there once: a plain attribute, not a buffer)."""
        if self._bit_values.device != device:
            self._bit_values = self._bit_values.to(device)
        return self._bit_values

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """vqp 1.32's `LFQ.bits_to_codes`: bits in {0, 1} to codes in {-scale, scale}."""
        return lfq_ops.bits_to_codes(bits, self.codebook_scale)

    def _codes_from_indices(self, indices: Tensor) -> Tensor:
        bits = lfq_ops.bits_of(indices, self.codebook_dim)
        codes = lfq_ops.bits_to_codes(bits, self.codebook_scale)
        return lfq_ops.l2norm(codes, self.codebook_scale) if self.spherical else codes

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # CogVideo sgm (and vqp 1.32) save their derived bit `mask` as a buffer: accept and drop it
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- index <-> code ---------------------------------------------------------------------------

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Inverse of the forward's indices: `(b, ...)` or `(b, ..., c)` indices to features (channel-first for
        image/video-shaped indices, as CogVideo sgm)."""
        self._check_indices(indices)
        spatial = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = self._codes_from_indices(indices).to(self.dtype)  # float32 bits to the model's dtype
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes.to(self.project_out.weight.dtype) if self.has_projections else codes)
        if spatial or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def _check_indices(self, indices: Tensor) -> None:
        axis = self.num_codebooks if self.keep_num_codebooks_dim else None
        check_indices(indices, self.codebook_size, codebook_axis=axis)

    # -- losses -----------------------------------------------------------------------------------

    def entropy_terms(self, x: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor]:
        """`(per_sample_entropy, codebook_entropy)` of `(N, c, C)` pre-quantization features."""
        x = lfq_ops.sample_fraction(x, self.frac_per_sample_entropy)
        if x.dtype == torch.float16:  # the bit logits (x times 4 inv_temperature) would overflow float16
            x = x.float()
        logits = lfq_ops.bit_logits(x, inv_temperature, self.code_magnitude)
        if self.entropy_loss_method == "factorized":
            return lfq_ops.per_sample_entropy(logits), lfq_ops.factorized_codebook_entropy(logits)
        sync = self.sync_codebook_entropy
        if (distributed.is_distributed() if sync is None else sync) and distributed.is_distributed():
            per_sample = lfq_ops.per_sample_entropy(logits)
            # the code distribution of the global batch: token-weighted mean over ranks (differentiable)
            count = torch.tensor(float(logits.shape[0]), device=logits.device)
            total = count.clone()
            distributed.all_reduce_sum_(total)
            probs = lfq_ops.mean_code_probs(logits, self._selections())
            probs = distributed.differentiable_sum(probs * count) / total
            return per_sample, lfq_ops.entropy(probs).mean()
        return lfq_ops.entropies(logits, selections=self._selections())

    def _selections(self) -> tuple[Tensor, Tensor]:
        """The selection tables, float32 as the log probabilities they multiply (also in a half-precision model)."""
        return self._select_hi.float(), self._select_lo.float()

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        inv_temperature: float | None = None,
        return_loss_breakdown: bool = False,
        mask: Tensor | None = None,
        return_dict: bool | None = None,
    ) -> LFQOutput | tuple:
        """Quantize `x` of shape `(b, n, d)`, `(b, d, h, w)` or `(b, d, t, h, w)` (or `(b, d, n)` with
        `channel_first`; `(b, d)` is one token per row). `mask` (`(b, n)` or `(b, *spatial)` bool) restricts the
        losses to some tokens, a `(b,)` mask to whole samples (vqp 1.32). Returns [`LFQOutput`], or CogVideo sgm's `(quantized, indices, entropy_aux_loss)`
        with `return_dict=False` (and `(that tuple, LFQLossBreakdown)` with `return_loss_breakdown`, as CogVideo
        sgm).

        A channel-first input goes through the projections as batched products over its `(b, d, n)` view and is
        quantized as a transposed view: no transposed copy of the features."""
        inv_temperature = self.inv_temperature if inv_temperature is None else inv_temperature
        if self.check_inputs:
            check_features(x, self.dim, name="x")
        channel_first = x.ndim >= 4 or (x.ndim == 3 and self.channel_first)
        feature_axis = 1 if channel_first else -1
        if x.shape[feature_axis] != self.dim:
            raise ValueError(f"expected feature dim {self.dim}, got {x.shape[feature_axis]} (input shape {tuple(x.shape)})")
        if channel_first:
            features = x.flatten(2)
            if self.has_projections:
                features = self._project_in_channels(features)
            rows = features.transpose(1, 2)  # (b, n, C * c) view
        else:
            rows = x.unsqueeze(1) if x.ndim == 2 else x
            if self.has_projections:
                rows = self.project_in(rows)
        mask = self._token_mask(mask, rows)

        codes, indices, breakdown = self._quantize_rows(rows, inv_temperature, mask)

        if channel_first:
            out = codes.transpose(1, 2)
            if self.has_projections:
                out = channel_linear(self.project_out, out)
            quantized = out.reshape(x.shape[0], out.shape[1], *x.shape[2:])
            indices = indices.reshape(x.shape[0], *x.shape[2:], indices.shape[-1])
        else:
            quantized = self.project_out(codes) if self.has_projections else codes
            if x.ndim == 2:
                quantized, indices = quantized.squeeze(1), indices.squeeze(1)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)

        loss = self._aux_loss(*breakdown) if self.training else breakdown[0]
        out = LFQOutput(quantized=quantized, indices=indices, loss=loss,
                        loss_breakdown=LFQLossBreakdown(*breakdown) if return_loss_breakdown else None)
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            plain = out.to_tuple_output()
            return (plain, out.loss_breakdown) if return_loss_breakdown else plain
        return out

    def _project_in_channels(self, features: Tensor) -> Tensor:
        if isinstance(self.project_in, nn.Linear):
            return channel_linear(self.project_in, features)
        return self.project_in(features.transpose(1, 2)).transpose(1, 2)  # (cosine-similarity projection)

    def _aux_loss(self, per_sample: Tensor, batch: Tensor, commit: Tensor) -> Tensor:
        entropy_loss = per_sample - self.diversity_gamma * batch
        if self.experimental_softplus_entropy_loss:
            entropy_loss = F.softplus(entropy_loss + self.entropy_loss_offset)
        return entropy_loss * self.entropy_loss_weight + commit * self.commitment_loss_weight

    def _quantize_rows(self, rows: Tensor, inv_temperature: float, mask: Tensor | None):
        """`(b, n, C * c)` features (any layout) -> (codes `(b, n, C * c)` in the features' dtype, `(b, n, c)`
        int64 indices, (per-sample entropy, codebook entropy, commitment))."""
        if self.soft_clamp_input_value is not None:
            rows = lfq_ops.soft_clamp(rows, self.soft_clamp_input_value)
        tokens = rows.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            tokens = tokens @ self.orthogonal_rot
        if self.spherical:
            tokens = lfq_ops.l2norm(tokens, self.codebook_scale)
        orig_dtype = tokens.dtype
        with autocast_off(tokens.device.type, self.force_quantization_f32):
            if self.force_quantization_f32:
                tokens = tokens.float()
            codes, indices, breakdown = self._quantize_tokens(tokens, inv_temperature, mask)
            codes = codes.to(orig_dtype)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        return codes.flatten(-2), indices, breakdown

    def _token_mask(self, mask: Tensor | None, rows: Tensor) -> Tensor | None:
        """A `(b, *spatial)` or `(b, n)` bool mask as `(b, n)` over the token rows; vqp 1.32's per-sample `(b,)`
        mask keeps or drops whole samples."""
        if mask is not None and mask.ndim == 1 and mask.shape[0] == rows.shape[0]:
            mask = mask[:, None].expand(rows.shape[:2])
        if mask is None:
            return None
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape != rows.shape[:2]:
            raise ValueError(f"mask must have shape (b, *spatial) = {tuple(rows.shape[:2])} in tokens, "
                             f"got {tuple(mask.shape)}")
        if not bool(mask.any()):
            raise ValueError("mask selects no tokens")
        return mask

    def _quantize_tokens(self, x: Tensor, inv_temperature: float, mask: Tensor | None):
        """`(b, n, c, C)` features -> (straight-through codes, `(b, n, c)` indices, (per-sample entropy,
        codebook entropy, commitment))."""
        positive = x > 0
        quantized = lfq_ops.sign_codes(positive, self.codebook_scale, x.dtype)
        indices = lfq_ops.bits_to_indices(positive, self.bit_values(x.device))
        if self.spherical:
            quantized = lfq_ops.l2norm(quantized, self.codebook_scale)
        if not self.training:  # no aux loss, no straight-through estimator
            zero = x.new_zeros((), dtype=torch.float32)
            return quantized, indices, (zero, zero, zero)

        activated = self.activation(x)
        codes = activated + (quantized - activated).detach()
        selected = x[mask] if mask is not None else x.flatten(0, 1)
        per_sample, batch = self.entropy_terms(selected, inv_temperature)
        commit = F.mse_loss(x, quantized.detach(), reduction="none")
        commit = (commit[mask] if mask is not None else commit).mean()
        return codes, indices, (per_sample, batch, commit)
