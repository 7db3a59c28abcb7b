"""Latent Quantization (disentanglement via latent quantization) as a Hugging Face model.

Semantics: vector-quantize-pytorch 1.32 `latent_quantization.py`. https://arxiv.org/abs/2305.18378

Where this module deliberately differs from vqp 1.32 (each difference is tested):
- Learnable values learn. vqp returns `z + (values - z).detach()`, so `values_per_latent` never receive a
  gradient and `optimize_values` is a no-op there. Here the commitment term (vqp's `mse(input.detach(), out)`)
  is computed on an output built from the values themselves, so its gradient reaches the values (and
  `project_out`); loss values are identical to vqp's.
- The in-place codebook optimizer works. vqp 1.32 raises `AttributeError` (`self.optimize_values` is never set).
  It is a config string naming a `torch.optim` class plus a kwargs dict (JSON), not a callable, so it
  round-trips through `save_pretrained`; the optimizer is built lazily over the current value parameters.
- Indices come from the per-latent argmin (exact mixed radix), not from `int32(float code * basis)`, which vqp
  truncates: for levels of 6 or 7 some of vqp's indices are one too low even with the initial values. Ours stay
  correct once the values are learned.
- `indices_to_codes` decodes with the current (possibly learned) values.
- Rank-3 input is `(b, n, d)` as in the other hf_vq quantizers; vqp 1.32 reads it as `(b, d, n)` (use
  `channel_first=True`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling_utils import (
    QuantizerConfig,
    QuantizerModel,
    QuantizerOutput,
    autocast_off,
    check_features,
    check_indices,
    register_quantizer,
)
from ..ops import fsq as fsq_ops
from ..ops.latent import LatentTrainSpec, LatentTrainStep
from .fsq import channel_linear, check_levels, keeps_codebook_axis

# up to this many distances (z elements x values per latent), `_nearest_levels` takes them all at once on CPU
# (about where the running-minimum loop starts to win on one core)
_SMALL_DISTANCES = 2**14


class LatentQuantizeConfig(QuantizerConfig):
    """Configuration of [`LatentQuantize`].

    Args:
        levels (`int` or `list[int]`): number of values per latent; an int is used for each of `codebook_dim`
            latents. The implicit codebook has `prod(levels)` codes.
        dim (`int`, *optional*): input feature dim; defaults to `codebook_dim * num_codebooks`. When it differs,
            linear projections map in and out of the code space.
        commitment_loss_weight (`float`, defaults to 0.1): weight of `mse(input.detach(), output)` (trains the
            values and the output projection).
        quantization_loss_weight (`float`, defaults to 0.1): weight of `mse(output.detach(), input)` (pulls the
            input towards its code).
        num_codebooks (`int`, defaults to 1): independent codebooks over equal slices of the projected features.
        codebook_dim (`int`, defaults to -1): number of latents per codebook; -1 means `len(levels)`. Required
            when `levels` is an int.
        keep_num_codebooks_dim (`bool`, *optional*): keep a trailing codebook axis on `indices`; defaults to
            `num_codebooks > 1` and must be true when `num_codebooks > 1`.
        optimize_values (`bool`, defaults to `True`): the per-latent values are parameters (state-dict keys
            `values_per_latent.{i}`, as in vqp); otherwise fixed buffers rebuilt from `levels`.
        in_place_codebook_optimizer (`str`, *optional*): name of a `torch.optim` optimizer class (e.g. `"SGD"`,
            `"Adam"`) that updates the values inside `forward` in training, before quantizing; needs
            `optimize_values`. The main loss then gives the values no gradient.
        in_place_codebook_optimizer_kwargs (`dict`, *optional*): keyword arguments of that optimizer (e.g.
            `{"lr": 0.01}`).
        channel_first (`bool`, defaults to `False`): treat rank-3 input as `(b, d, n)`. Rank 4/5 inputs are always
            channel-first.
    """

    model_type = "hf_vq_latent_quantize"
    vqp_positional = ("levels", "dim", "commitment_loss_weight", "quantization_loss_weight", "num_codebooks",
                      "codebook_dim", "keep_num_codebooks_dim", "optimize_values", "in_place_codebook_optimizer")

    def __init__(
        self,
        levels: int | list[int] = (5, 5, 5),
        dim: int | None = None,
        commitment_loss_weight: float = 0.1,
        quantization_loss_weight: float = 0.1,
        num_codebooks: int = 1,
        codebook_dim: int = -1,
        keep_num_codebooks_dim: bool | None = None,
        optimize_values: bool = True,
        in_place_codebook_optimizer: str | None = None,
        in_place_codebook_optimizer_kwargs: dict | None = None,
        channel_first: bool = False,
        **kwargs,
    ):
        self.levels = list(levels) if isinstance(levels, (list, tuple)) else levels
        self.dim = dim
        self.commitment_loss_weight = commitment_loss_weight
        self.quantization_loss_weight = quantization_loss_weight
        self.num_codebooks = num_codebooks
        self.codebook_dim = codebook_dim
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.optimize_values = optimize_values
        self.in_place_codebook_optimizer = in_place_codebook_optimizer
        self.in_place_codebook_optimizer_kwargs = dict(in_place_codebook_optimizer_kwargs or {})
        self.channel_first = channel_first
        super().__init__(**kwargs)

    def validate(self):
        if isinstance(self.levels, int) and not isinstance(self.levels, bool):
            if not isinstance(self.codebook_dim, int) or self.codebook_dim < 1:
                raise ValueError(f"codebook_dim must be a positive int when levels is an int, got {self.codebook_dim!r}")
            check_levels([self.levels])
        else:
            check_levels(self.levels)
            if self.codebook_dim not in (-1, len(self.levels)):
                raise ValueError(f"codebook_dim must be -1 or len(levels) = {len(self.levels)}, got {self.codebook_dim!r}")
        for field in ("dim", "num_codebooks"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.num_codebooks > 1 and self.keep_num_codebooks_dim is False:
            raise ValueError("keep_num_codebooks_dim=False is only allowed with num_codebooks=1")
        for field in ("commitment_loss_weight", "quantization_loss_weight"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
        name = self.in_place_codebook_optimizer
        if name is not None:
            optim_cls = getattr(torch.optim, str(name), None)
            if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
                raise ValueError(f"in_place_codebook_optimizer must name a torch.optim optimizer class "
                                 f"(e.g. 'SGD', 'Adam'), got {name!r}")
            if not self.optimize_values:
                raise ValueError("in_place_codebook_optimizer needs optimize_values=True (fixed values cannot be optimized)")

    @property
    def levels_list(self) -> list[int]:
        return [self.levels] * self.codebook_dim if isinstance(self.levels, int) else list(self.levels)

    @property
    def latent_dim(self) -> int:
        return len(self.levels_list)

    @property
    def effective_dim(self) -> int:
        return self.dim if self.dim is not None else self.latent_dim * self.num_codebooks

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels_list)


def initial_values(level: int, device=None) -> Tensor:
    """The values of one latent: `level` points in [-0.5, 0.5] with 0 in the middle (vqp's init)."""
    # explicit device: transformers' meta-device init patches linspace to default to CPU; keep every value
    # parameter on the device of the surrounding context
    device = torch.get_default_device() if device is None else device
    if level % 2 == 1:
        return torch.linspace(-0.5, 0.5, level, device=device)
    return torch.arange(level, device=device) / level - 0.5


@dataclass
class LatentQuantizeOutput(QuantizerOutput):
    """Output of [`LatentQuantize`]: `quantized`, int32 `indices` and `loss` (0 in eval), vqp 1.32's tuple order."""

    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices", "loss")


@register_quantizer
class LatentQuantize(QuantizerModel):
    """Latent quantizer: each latent is snapped to the nearest of its own (learnable) values.

    Example:
        >>> lq = LatentQuantize(levels=[5, 5, 4], dim=16)
        >>> out = lq(torch.randn(2, 16, 4, 4))
        >>> out.quantized.shape, out.indices.shape
        (torch.Size([2, 16, 4, 4]), torch.Size([2, 4, 4]))
    """

    config_class = LatentQuantizeConfig

    def __init__(self, config: LatentQuantizeConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        levels = c.levels_list
        self.levels = levels
        self.latent_dim = c.latent_dim
        self.num_codebooks = c.num_codebooks
        self.dim = c.effective_dim
        self.keep_num_codebooks_dim = keeps_codebook_axis(c)
        self.optimize_values = c.optimize_values
        self.in_place_codebook_optimizer = c.in_place_codebook_optimizer
        self.commitment_loss_weight = c.commitment_loss_weight
        self.quantization_loss_weight = c.quantization_loss_weight
        self.channel_first = c.channel_first
        self.check_inputs = c.check_inputs
        inner = c.latent_dim * c.num_codebooks
        self.has_projections = c.effective_dim != inner
        if self.has_projections:
            self.project_in = nn.Linear(c.effective_dim, inner)
            self.project_out = nn.Linear(inner, c.effective_dim)
        else:
            self.project_in = self.project_out = nn.Identity()
        if c.optimize_values:
            self.values_per_latent = nn.ParameterList([nn.Parameter(initial_values(level)) for level in levels])
        else:
            for i, level in enumerate(levels):
                self.register_buffer(f"_fixed_values_{i}", initial_values(level), persistent=False)
        self.register_buffer("_levels", torch.empty(0, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.empty(0, dtype=torch.int32), persistent=False)
        self.register_buffer("_value_offsets", torch.empty(0, dtype=torch.long), persistent=False)
        self._in_place_optimizer = None
        # a training step is one autograd node (`ops.latent`) unless the values are optimized in place, which
        # happens between the projection and the quantization (the module path)
        self.train_path = "modules" if c.in_place_codebook_optimizer is not None else "one_node"
        self.reset_derived_buffers()
        self.post_init()

    def reset_derived_buffers(self):
        c = self.config
        device = self._levels.device if self._levels.device.type != "meta" else torch.device("cpu")
        self._levels, self._basis = fsq_ops.fsq_tables(c.levels_list, device=device)
        # where each latent's values start in the flattened `(latents, max level)` value table
        width = max(c.levels_list)
        self._value_offsets = torch.arange(0, width * len(c.levels_list), width, device=device)
        if not c.optimize_values:
            for i, level in enumerate(c.levels_list):
                setattr(self, f"_fixed_values_{i}", initial_values(level, device))

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def latent_values(self) -> list[Tensor]:
        """The current values of each latent."""
        if self.optimize_values:
            return list(self.values_per_latent)
        return [getattr(self, f"_fixed_values_{i}") for i in range(self.latent_dim)]

    def _value_table(self) -> Tensor:
        """`(latents, max_level)` values, padded with +inf (never the nearest) where levels are unequal."""
        values = [v if v.dtype == torch.float32 else v.float() for v in self.latent_values()]
        width = max(v.numel() for v in values)
        return torch.stack([v if v.numel() == width else F.pad(v, (0, width - v.numel()), value=math.inf)
                            for v in values])

    @property
    def implicit_codebook(self) -> Tensor:
        """`(codebook_size, latents)`: the code of every index, with the current values."""
        return self.level_indices_to_codes(fsq_ops.indices_to_level_indices(
            torch.arange(self.codebook_size, device=self._levels.device), self._levels, self._basis))

    # -- quantize / index <-> code ----------------------------------------------------------------

    def nearest_levels(self, z: Tensor, table: Tensor | None = None) -> Tensor:
        """`(..., latents)` features to the `(..., latents)` int64 level index of the nearest value of each latent
        (the first on ties, as `argmin(|z - values|)`)."""
        return self._nearest_levels(z, self._value_table() if table is None else table).long()

    @staticmethod
    @torch.no_grad()
    def _nearest_levels(z: Tensor, table: Tensor) -> Tensor:
        """`nearest_levels` as level numbers: int64 where they come from `argmin`, exact float32 from the running
        minimum (every consumer takes either). On CPU by a running minimum over the few values of a
        latent: no `(..., latents, levels)` intermediate and no reduction over a short trailing axis (slow there),
        each step a vectorized elementwise pass in `z`'s memory layout. On other devices, where each pass is a
        kernel launch, under torch.compile, which fuses the passes, and for inputs with at most `_SMALL_DISTANCES`
        distances to all values (64 KiB, in cache: there the per-op cost of the loop dominates), by `argmin` over
        the distances to all values at once (the same distances, the first on ties either way)."""
        z = z.float()
        if z.device.type != "cpu" or torch.compiler.is_compiling() or z.numel() * table.shape[1] <= _SMALL_DISTANCES:
            return (z.unsqueeze(-1) - table).abs_().argmin(dim=-1)
        best = (z - table[:, 0]).abs_()
        level = torch.zeros_like(best)
        closer = torch.empty_like(best)  # a float 0/1 mask: CPU kernels with bool masks are several times slower
        for j in range(1, table.shape[1]):
            distance = (z - table[:, j]).abs_()
            torch.lt(distance, best, out=closer)  # strictly closer: the first value keeps a tie
            level.addcmul_(closer, level, value=-1.0).add_(closer, alpha=j)  # j where closer (small integers: exact)
            best = torch.minimum(best, distance, out=best)
        return level

    def level_indices_to_codes(self, level_indices: Tensor, table: Tensor | None = None) -> Tensor:
        """`(..., latents)` level indices to the values (differentiable in the values)."""
        table = self._value_table() if table is None else table
        flat = (level_indices.long() + self._value_offsets).reshape(-1)
        # (index_select: its gradient is an index_add, where indexing's is a sorting accumulate on CUDA)
        return table.flatten().index_select(0, flat).view(level_indices.shape)

    def quantize(self, z: Tensor) -> Tensor:
        """Quantize `(..., latents)` features to their nearest values, straight-through (as vqp)."""
        codes = self.level_indices_to_codes(self.nearest_levels(z)).to(z.dtype)
        return z + (codes - z).detach()

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """`(..., latents)` codes (values of the latents) to `(...)` int32 indices."""
        if codes.shape[-1] != self.latent_dim:
            raise ValueError(f"codes must have last dim {self.latent_dim}, got {codes.shape[-1]}")
        return self._indices_from_levels(self.nearest_levels(codes))

    def _indices_from_levels(self, level_indices: Tensor) -> Tensor:
        return fsq_ops.level_digits_to_indices(level_indices, self._basis, self.codebook_size)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Inverse of the forward's indices: `(b, ...)` or `(b, ..., c)` indices to features (channel-first for
        image/video-shaped indices)."""
        self._check_indices(indices)
        spatial = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        levels = fsq_ops.indices_to_level_indices(indices.long(), self._levels, self._basis)
        codes = self.level_indices_to_codes(levels).flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        if spatial or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def _check_indices(self, indices: Tensor) -> None:
        axis = self.num_codebooks if self.keep_num_codebooks_dim else None
        check_indices(indices, self.codebook_size, codebook_axis=axis)

    # -- in-place codebook optimizer --------------------------------------------------------------

    @property
    def in_place_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the values, built on first use over the current parameters (which a meta-device
        load replaces, so it is never built in `__init__`)."""
        name = self.config.in_place_codebook_optimizer
        if name is None:
            return None
        params = list(self.values_per_latent)
        opt = self._in_place_optimizer
        if opt is None or any(p is not q for p, q in zip(opt.param_groups[0]["params"], params)):
            opt = getattr(torch.optim, name)(params, **self.config.in_place_codebook_optimizer_kwargs)
            self._in_place_optimizer = opt
        return opt

    def _optimize_values_in_place(self, z: Tensor) -> None:
        """One optimizer step pulling each latent's nearest value towards the (detached) features."""
        opt = self.in_place_optimizer
        z = z.detach().float()
        with torch.enable_grad():
            codes = self.level_indices_to_codes(self.nearest_levels(z))
            loss = F.mse_loss(codes, z)
            opt.zero_grad()
            loss.backward(inputs=list(self.values_per_latent))
            opt.step()
            opt.zero_grad()

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, z: Tensor, return_dict: bool | None = None) -> LatentQuantizeOutput | tuple:
        """Quantize `z` of shape `(b, n, d)`, `(b, d, h, w)` or `(b, d, t, h, w)` (or `(b, d, n)` with
        `channel_first`; `(b, d)` is one token per row). Returns [`LatentQuantizeOutput`], or
        `(quantized, indices, loss)` with `return_dict=False`.

        A channel-first input goes through the projections as batched products over its `(b, d, n)` view and its
        latents are quantized as a transposed view: no transposed copy of the features. A training step on float32
        features is one autograd node (`ops.latent.LatentTrainStep`: the same values and gradients in fewer ops)
        unless the values are optimized in place."""
        if self.check_inputs:
            check_features(z, self.dim, name="z")
        channel_first = z.ndim >= 4 or (z.ndim == 3 and self.channel_first)
        feature_axis = 1 if channel_first else -1
        if z.shape[feature_axis] != self.dim:
            raise ValueError(f"expected feature dim {self.dim}, got {z.shape[feature_axis]} (input shape {tuple(z.shape)})")
        features = z.flatten(2) if channel_first else z
        if self._takes_train_step(features):
            out, loss, levels = self._train_step(features, channel_first)
            return self._finish(z, out, self._indices_from_levels(levels), loss, channel_first, return_dict)
        if channel_first:
            projected = channel_linear(self.project_in, features) if self.has_projections else features
            latents = projected.transpose(1, 2)
        else:
            latents = self.project_in(features) if self.has_projections else features
        latents = latents.unflatten(-1, (self.num_codebooks, self.latent_dim))
        in_place = self.training and self.in_place_codebook_optimizer is not None
        if in_place:
            self._optimize_values_in_place(latents)

        with autocast_off(latents.device.type):
            table = self._value_table()
            levels = self._nearest_levels(latents, table)
            values = self.level_indices_to_codes(levels, table)  # differentiable in the values
        codes = latents + (values.to(latents.dtype) - latents).detach()  # straight-through to the input
        indices = self._indices_from_levels(levels)

        out = self._project_out(codes, channel_first)
        loss = self._loss(features, out, values, in_place, channel_first) if self.training else \
            features.new_zeros((), dtype=torch.float32)
        return self._finish(z, out, indices, loss, channel_first, return_dict)

    def _finish(self, z: Tensor, out: Tensor, indices: Tensor, loss: Tensor, channel_first: bool,
                return_dict: bool | None) -> LatentQuantizeOutput | tuple:
        """The output in the input's layout."""
        if channel_first:
            quantized = out.reshape(z.shape[0], out.shape[1], *z.shape[2:])
            indices = indices.reshape(z.shape[0], *z.shape[2:], indices.shape[-1])
        else:
            quantized = out
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return self._output(LatentQuantizeOutput(quantized=quantized, indices=indices, loss=loss), return_dict)

    def _takes_train_step(self, features: Tensor) -> bool:
        """Whether this call is a training step the one-node path (`ops.latent.LatentTrainStep`) computes: training
        with gradients, float32 features and values without autocast, no in-place optimizer (decided at build:
        `train_path`). torch.compile traces the node as it is."""
        return (self.train_path == "one_node" and self.training and torch.is_grad_enabled()
                and features.dtype == torch.float32 and self._values_dtype() == torch.float32
                and not torch.is_autocast_enabled(features.device.type))

    def _values_dtype(self) -> torch.dtype:
        return self.values_per_latent[0].dtype if self.optimize_values else self._fixed_values_0.dtype

    def _train_step(self, features: Tensor, channel_first: bool) -> tuple[Tensor, Tensor, Tensor]:
        spec = LatentTrainSpec(channel_first, self.num_codebooks, self.commitment_loss_weight,
                               self.quantization_loss_weight, self.optimize_values, self._nearest_levels)
        project_in, project_out = (self.project_in, self.project_out) if self.has_projections else (None, None)
        return LatentTrainStep.apply(
            features, getattr(project_in, "weight", None), getattr(project_in, "bias", None),
            getattr(project_out, "weight", None), getattr(project_out, "bias", None), self._value_table(),
            self._value_offsets, spec)

    def _project_out(self, codes: Tensor, channel_first: bool) -> Tensor:
        """`(..., C, latents)` codes (rows; a transposed view for channel-first input) to output features."""
        codes = codes.flatten(-2)
        if channel_first:
            codes = codes.transpose(1, 2)
            return channel_linear(self.project_out, codes) if self.has_projections else codes
        return self.project_out(codes) if self.has_projections else codes

    def _loss(self, features: Tensor, out: Tensor, values: Tensor, in_place: bool, channel_first: bool) -> Tensor:
        """vqp's `cw * mse(input.detach(), out) + qw * mse(out.detach(), input)`, with the commitment term's
        gradient routed to the values (unless they are optimized in place). `features` and `out` in one layout."""
        terms = []
        if self.commitment_loss_weight != 0:
            target = out if in_place or not self.optimize_values else \
                self._project_out(values.to(out.dtype), channel_first)
            terms.append(self.commitment_loss_weight * F.mse_loss(features.detach(), target))
        if self.quantization_loss_weight != 0:
            terms.append(self.quantization_loss_weight * F.mse_loss(out.detach(), features))
        if not terms:
            return features.new_zeros((), dtype=torch.float32)
        loss = terms[0].to(torch.promote_types(terms[0].dtype, torch.float32))  # at least float32 (no-op there)
        return loss + terms[1] if len(terms) == 2 else loss
