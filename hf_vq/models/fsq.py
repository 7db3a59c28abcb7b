"""Finite Scalar Quantization (FSQ) as a Hugging Face model.

Semantics: CogVideo sgm `finite_scalar_quantization.py` and vector-quantize-pytorch 1.32 `FSQ` (a superset of
CogVideo sgm's options). https://arxiv.org/abs/2309.15505
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
    autocast_off,
    check_features,
    check_indices,
    register_quantizer,
)
from ..ops import fsq as fsq_ops
from ..ops import linear as linear_ops
from ..ops import triton_fsq, triton_fsq_projected


class FSQConfig(QuantizerConfig):
    """Configuration of [`FSQ`].

    Args:
        levels (`list[int]`): number of levels per code dimension; the implicit codebook has `prod(levels)` codes.
        dim (`int`, *optional*): input feature dim; defaults to `len(levels) * num_codebooks`. When it differs,
            linear projections map in and out of the code space.
        num_codebooks (`int`, defaults to 1): independent FSQ codebooks over equal slices of the projected features.
        keep_num_codebooks_dim (`bool`, *optional*): keep a trailing codebook axis on `indices`; defaults to
            `num_codebooks > 1` and must be true when `num_codebooks > 1`.
        scale (`float`, *optional*): kept for signature compatibility with CogVideo sgm; unused by the forward pass.
        allowed_dtypes (`list[str]`, defaults to `["float32", "float64"]`): with `force_quantization_f32`, inputs
            of these dtypes are quantized in their own dtype and any other is cast to float32 first (vqp 1.32).
            `torch.dtype` values are accepted and stored by name.
        channel_first (`bool`, defaults to `False`): treat rank-3 input as `(b, d, n)`. Rank 4/5 inputs are always
            channel-first `(b, d, h, w)` / `(b, d, t, h, w)`.
        projection_has_bias (`bool`, defaults to `True`): bias in the in/out projections.
        return_indices (`bool`, defaults to `True`): compute indices (and the implicit codebook).
        force_quantization_f32 (`bool`, defaults to `True`): quantize in float32 with autocast off.
        preserve_symmetry (`bool`, defaults to `False`): symmetry-preserving quantizer (needed for levels of 2).
        noise_dropout (`float`, defaults to 0): training-time chance of replacing a code by a uniform offset.
        bound_hard_clamp (`bool`, defaults to `False`): clamp instead of tanh (input already soft-clamped).
        orthogonal_rotation (`bool`, defaults to `False`): a fixed random orthogonal rotation of the codes.
    """

    model_type = "hf_vq_fsq"
    vqp_positional = ("levels", "dim", "num_codebooks", "keep_num_codebooks_dim", "scale", "allowed_dtypes",
                      "channel_first", "projection_has_bias", "return_indices", "force_quantization_f32",
                      "preserve_symmetry", "noise_dropout", "bound_hard_clamp", "orthogonal_rotation")

    def __init__(
        self,
        levels: list[int] = (8, 5, 5, 5),
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: list[str] = ("float32", "float64"),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
        **kwargs,
    ):
        self.levels = list(levels) if isinstance(levels, (list, tuple)) else levels
        self.num_codebooks = num_codebooks
        self.dim = dim
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.scale = scale
        self.allowed_dtypes = dtype_names(allowed_dtypes)
        self.channel_first = channel_first
        self.projection_has_bias = projection_has_bias
        self.return_indices = return_indices
        self.force_quantization_f32 = force_quantization_f32
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.bound_hard_clamp = bound_hard_clamp
        self.orthogonal_rotation = orthogonal_rotation
        super().__init__(**kwargs)

    def validate(self):
        check_levels(self.levels, allow_two=self.preserve_symmetry)
        if not isinstance(self.num_codebooks, int) or self.num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {self.num_codebooks!r}")
        if self.num_codebooks > 1 and self.keep_num_codebooks_dim is False:
            raise ValueError("keep_num_codebooks_dim=False is only allowed with num_codebooks=1")
        if self.dim is not None and (not isinstance(self.dim, int) or self.dim < 1):
            raise ValueError(f"dim must be a positive int or None, got {self.dim!r}")
        if not 0.0 <= self.noise_dropout < 1.0:
            raise ValueError(f"noise_dropout must be in [0, 1), got {self.noise_dropout!r}")
        if self.noise_dropout > 0 and not self.preserve_symmetry:
            raise ValueError("noise_dropout > 0 requires preserve_symmetry=True")
        for name in self.allowed_dtypes:
            if not isinstance(getattr(torch, name, None), torch.dtype) or not getattr(torch, name).is_floating_point:
                raise ValueError(f"allowed_dtypes must name floating point torch dtypes, got {name!r}")

    @property
    def codebook_dim(self) -> int:
        return len(self.levels)

    @property
    def effective_dim(self) -> int:
        return self.dim if self.dim is not None else self.codebook_dim * self.num_codebooks

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)


def dtype_names(dtypes) -> list:
    """`torch.float32` or `"float32"` entries as names (JSON-serializable); other values are left for `validate`."""
    if isinstance(dtypes, (str, torch.dtype)) or not isinstance(dtypes, (list, tuple)):
        raise ValueError(f"allowed_dtypes must be a list of dtypes, got {dtypes!r}")
    return [str(d).removeprefix("torch.") if isinstance(d, torch.dtype) else d for d in dtypes]


def check_levels(levels, *, allow_two: bool = True, field: str = "levels") -> None:
    """Levels must be a non-empty list of ints >= 2 (>= 3 unless the quantizer handles 2 symmetrically)."""
    if not isinstance(levels, (list, tuple)) or not levels:
        raise ValueError(f"{field} must be a non-empty list of ints, got {levels!r}")
    if not all(isinstance(level, int) and not isinstance(level, bool) for level in levels):
        raise ValueError(f"{field} must contain only ints, got {levels!r}")
    if any(level < 2 for level in levels):
        raise ValueError(f"{field} must all be >= 2, got {levels!r}")
    if not allow_two and 2 in levels:
        raise ValueError(f"{field} contains 2, which needs preserve_symmetry=True (or use levels >= 3): {levels!r}")


def keeps_codebook_axis(config) -> bool:
    """`keep_num_codebooks_dim`, resolved (defaults to `num_codebooks > 1`)."""
    keep = config.keep_num_codebooks_dim
    return config.num_codebooks > 1 if keep is None else keep


@dataclass
class FSQOutput(QuantizerOutput):
    """Output of [`FSQ`]: `quantized` and `indices` (FSQ has no auxiliary loss, so `loss` is `None`)."""

    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices")


@register_quantizer
class FSQ(QuantizerModel):
    """Finite scalar quantizer: each code dimension is bounded and rounded to a fixed number of levels.

    Inputs are quantized where they lie: a channel-first `(b, d, ...)` input goes through the projections as a
    batched matrix product over its `(b, d, n)` view (no transposed copy of the features), and the few code
    features per token are bounded and rounded in whatever layout that leaves. On CUDA the plain configuration
    (no symmetry-preserving levels, no rotation, no noise dropout in training) is one Triton kernel
    (`hf_vq.ops.triton_fsq`); elsewhere the PyTorch ops of `hf_vq.ops.fsq` with per-feature constants built once.

    Example:
        >>> fsq = FSQ(levels=[8, 5, 5, 5], dim=16)
        >>> out = fsq(torch.randn(2, 16, 4, 4))
        >>> out.quantized.shape, out.indices.shape
        (torch.Size([2, 16, 4, 4]), torch.Size([2, 4, 4]))
    """

    config_class = FSQConfig

    def __init__(self, config: FSQConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self.levels = list(c.levels)
        self.num_codebooks = c.num_codebooks
        self.codebook_dim = c.codebook_dim
        self.dim = c.effective_dim
        self.keep_num_codebooks_dim = keeps_codebook_axis(c)
        self.channel_first = c.channel_first
        self.return_indices = c.return_indices
        self.force_quantization_f32 = c.force_quantization_f32
        self.allowed_dtypes = tuple(getattr(torch, name) for name in c.allowed_dtypes)
        self.preserve_symmetry = c.preserve_symmetry
        self.noise_dropout = c.noise_dropout
        self.bound_hard_clamp = c.bound_hard_clamp
        self.orthogonal_rotation = c.orthogonal_rotation
        self.check_inputs = c.check_inputs
        # the single-kernel path serves the plain configuration (noise dropout is checked per call: eval has none)
        self.kernel_capable = not (c.preserve_symmetry or c.orthogonal_rotation) and \
            len(self.levels) <= triton_fsq.MAX_LEVELS

        inner = self.codebook_dim * self.num_codebooks
        self.has_projections = self.dim != inner
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, inner, bias=c.projection_has_bias)
            self.project_out = nn.Linear(inner, self.dim, bias=c.projection_has_bias)
        else:
            self.project_in = self.project_out = nn.Identity()
        # whether a call may run both projections inside the FSQ kernel (`ops.triton_fsq_projected`; per call:
        # `projects_in_kernel`)
        self.projections_in_kernel = (self.kernel_capable and self.has_projections
                                      and inner <= triton_fsq_projected.MAX_CODE_FEATURES)
        if c.orthogonal_rotation:
            rot = torch.empty(c.codebook_dim, c.codebook_dim)
            nn.init.orthogonal_(rot)  # not its return value: loaders may patch init functions to return None
            self.register_buffer("orthogonal_rot", rot)
        self.register_buffer("_levels", torch.empty(0, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.empty(0, dtype=torch.int32), persistent=False)
        self.register_buffer("implicit_codebook", torch.empty(0), persistent=False)
        self.reset_derived_buffers()
        self.post_init()

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def reset_derived_buffers(self):
        device = self._levels.device if self._levels.device.type != "meta" else torch.device("cpu")
        self._levels, self._basis = fsq_ops.fsq_tables(self.levels, device=device)
        if self.return_indices:
            self.implicit_codebook = self._codes_from_indices(torch.arange(self.codebook_size, device=device))
        # float32 constants of the hot path; plain attributes rather than buffers, so that casting the model to
        # a half dtype leaves them exact (they follow the input's device in `_tables`)
        self._bound_table = fsq_ops.bound_table(self.levels, hard_clamp=self.bound_hard_clamp,
                                                symmetric=self.preserve_symmetry, repeat=self.num_codebooks,
                                                device=device)
        self._kernel_table = triton_fsq.fsq_table(self._levels, self._basis, self.bound_hard_clamp)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """`(bound table, basis)` on `device` (moved there once)."""
        if self._bound_table.device != device:
            self._bound_table = self._bound_table.to(device)
        basis = self._basis if self._basis.device == device else self._basis.to(device)
        return self._bound_table, basis

    # -- index <-> code ---------------------------------------------------------------------------

    def _codes_from_indices(self, indices: Tensor) -> Tensor:
        return fsq_ops.indices_to_codes(indices, self._levels, self._basis, self.preserve_symmetry)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """`(..., len(levels))` normalized codes to `(...)` int32 indices."""
        if codes.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes must have last dim {self.codebook_dim} (len(levels)), got {codes.shape[-1]}")
        return fsq_ops.codes_to_indices(codes, self._levels, self._basis, self.preserve_symmetry)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """Per-dimension level of each index, e.g. for factorized embeddings."""
        return fsq_ops.indices_to_level_indices(indices, self._levels, self._basis)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Inverse of the forward's indices: `(b, ...)` or `(b, ..., c)` indices to features (channel-first for
        image/video-shaped indices, as vqp 1.32 and CogVideo sgm)."""
        self._check_indices(indices)
        spatial = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        codes = self._codes_from_indices(indices.long())
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes.to(self._projection_dtype(codes)))
        if spatial or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def _check_indices(self, indices: Tensor) -> None:
        axis = self.num_codebooks if self.keep_num_codebooks_dim else None
        check_indices(indices, self.codebook_size, codebook_axis=axis)

    def _projection_dtype(self, fallback: Tensor) -> torch.dtype:
        return self.project_out.weight.dtype if self.has_projections else fallback.dtype

    # -- forward ----------------------------------------------------------------------------------

    def quantize(self, z: Tensor) -> Tensor:
        """Quantize `(..., len(levels))` features to normalized codes (straight-through)."""
        fn = fsq_ops.fsq_quantize_symmetric if self.preserve_symmetry else fsq_ops.fsq_quantize
        return fn(z, self._levels, hard_clamp=self.bound_hard_clamp)

    def bound(self, z: Tensor, eps: float = 1e-3, hard_clamp: bool = False) -> Tensor:
        """vqp 1.32's `FSQ.bound`: bound, round (straight-through) and renormalize `(..., len(levels))` features."""
        return fsq_ops.fsq_quantize(z, self._levels, hard_clamp=hard_clamp, eps=eps)

    def symmetry_preserving_bound(self, z: Tensor, hard_clamp: bool = False) -> Tensor:
        """vqp 1.32's `FSQ.symmetry_preserving_bound` (the quantizer of `preserve_symmetry=True`)."""
        return fsq_ops.fsq_quantize_symmetric(z, self._levels, hard_clamp=hard_clamp)

    def maybe_apply_noise(self, bounded_z: Tensor) -> Tensor:
        """vqp 1.32's `FSQ.maybe_apply_noise`: in training, noise dropout of the codes (the identity otherwise)."""
        return self._noise_dropout(bounded_z) if self.training and self.noise_dropout > 0 else bounded_z

    def _noise_dropout(self, codes: Tensor) -> Tensor:
        replace = torch.rand_like(codes) < self.noise_dropout
        return torch.where(replace, codes + torch.rand_like(codes) - 0.5, codes).clamp(-1.0, 1.0)

    def uses_kernel(self, rows: Tensor) -> bool:
        """Whether `rows` are quantized by the Triton kernel (CUDA, plain configuration, float32 math)."""
        return (self.kernel_capable and triton_fsq.available(rows)
                and not (self.training and self.noise_dropout > 0)
                and self.quantization_dtype(rows.dtype) == torch.float32)

    def projects_in_kernel(self, z: Tensor, feature_axis: int = -1) -> bool:
        """Whether this call runs its projections and the quantization as one kernel pass (`projected_fsq`): CUDA,
        features strided along `feature_axis` (channel-first images and video, where the kernel reads the
        features in place; contiguous rows are cuBLAS's best case, and its products run as fast as the kernel's),
        float32 input and projections (no autocast, so that the products are float32 as `nn.Linear`'s), the plain
        configuration (`kernel_capable`: noise dropout needs symmetric levels, which it excludes), both projections
        still `nn.Linear` (not replaced by an adapter)."""
        return (self.projections_in_kernel and z.stride(feature_axis) != 1 and triton_fsq_projected.available(z)
                and type(self.project_in) is nn.Linear and type(self.project_out) is nn.Linear
                and self.project_in.weight.dtype == torch.float32 and self.project_out.weight.dtype == torch.float32
                and not torch.is_autocast_enabled(z.device.type))

    def quantization_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the quantization runs in (vqp 1.32): the input's, except that `force_quantization_f32` casts a
        dtype outside `allowed_dtypes` to float32."""
        if self.force_quantization_f32 and dtype not in self.allowed_dtypes:
            return torch.float32
        return dtype

    def quantize_rows(self, rows: Tensor, use_kernel: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """`(codes, indices | None)` of features `rows (..., num_codebooks * len(levels))` in any layout: the
        codes in `rows`' dtype (straight-through when `rows` requires grad), int32 indices `(..., num_codebooks)`.
        `use_kernel` (default: `uses_kernel(rows)`) picks the Triton kernel or the PyTorch ops."""
        if use_kernel if use_kernel is not None else self.uses_kernel(rows):
            return self._quantize_kernel(rows)
        return self._quantize_ops(rows)

    def _kernel_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The kernels' `(table, basis)` on `device` (moved there once)."""
        if self._kernel_table[0].device != device:
            self._kernel_table = tuple(t.to(device) for t in self._kernel_table)
        return self._kernel_table

    def _quantize_kernel(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        codes, indices = triton_fsq.fsq_quantize_fused(
            rows, *self._kernel_tables(rows.device), self.bound_hard_clamp,
            straight_through=rows.requires_grad and torch.is_grad_enabled())
        return codes, indices if self.return_indices else None

    def _quantize_ops(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        orig_dtype = rows.dtype
        x = rows.to(self.quantization_dtype(orig_dtype))
        code_shape = (self.num_codebooks, self.codebook_dim)
        if self.orthogonal_rotation:
            x = (x.unflatten(-1, code_shape) @ self.orthogonal_rot).flatten(-2)
        table, basis = self._tables(x.device)
        codes, level = fsq_ops.bound_and_round(x, table, hard_clamp=self.bound_hard_clamp,
                                               symmetric=self.preserve_symmetry)
        indices = None
        if self.return_indices:
            indices = fsq_ops.level_digits_to_indices(level.unflatten(-1, code_shape), basis, self.codebook_size)
        if self.training and self.noise_dropout > 0:
            codes = self._noise_dropout(codes)
        if self.orthogonal_rotation:
            with autocast_off(codes.device.type, self.force_quantization_f32):
                codes = (codes.unflatten(-1, code_shape) @ self.orthogonal_rot.t()).flatten(-2)
        return codes.to(orig_dtype), indices

    def forward(self, z: Tensor, return_dict: bool | None = None) -> FSQOutput | tuple:
        """Quantize `z` of shape `(b, n, d)`, `(b, d, h, w)` or `(b, d, t, h, w)` (or `(b, d, n)` with
        `channel_first`; `(b, d)` is one token per row). Returns [`FSQOutput`], or `(quantized, indices)` with
        `return_dict=False`."""
        if self.check_inputs:
            check_features(z, self.dim, name="z")
        channel_first = z.ndim >= 4 or (z.ndim == 3 and self.channel_first)
        feature_axis = 1 if channel_first else -1
        if z.shape[feature_axis] != self.dim:
            raise ValueError(f"expected feature dim {self.dim}, got {z.shape[feature_axis]} "
                             f"(input shape {tuple(z.shape)})")
        if self.projects_in_kernel(z, feature_axis):
            quantized, indices = self._forward_projected_kernel(z, channel_first)
        elif channel_first:
            quantized, indices = self._forward_channel_first(z)
        else:
            rows = self.project_in(z) if self.has_projections else z
            codes, indices = self.quantize_rows(rows)
            quantized = self.project_out(codes) if self.has_projections else codes
        if indices is not None and not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return self._output(FSQOutput(quantized=quantized, indices=indices), return_dict)

    def _forward_projected_kernel(self, z: Tensor, channel_first: bool) -> tuple[Tensor, Tensor | None]:
        """Projections and quantization in one pass (`projects_in_kernel`), in `z`'s layout."""
        features = z.flatten(2) if channel_first else z
        out, indices = triton_fsq_projected.projected_fsq(
            features, self.project_in.weight, self.project_in.bias, self.project_out.weight, self.project_out.bias,
            *self._kernel_tables(z.device), codebooks=self.num_codebooks, hard_clamp=self.bound_hard_clamp,
            channel_first=channel_first)
        if not self.return_indices:
            return out.view(z.shape), None
        if channel_first:
            indices = indices.view(z.shape[0], *z.shape[2:], self.num_codebooks)
        return out.view(z.shape), indices

    def _forward_channel_first(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """`(b, d, *spatial)` input: projections as matrix products over the `(b, d, n)` view, the code features
        quantized as a transposed `(b, n, C * len(levels))` view of the projected ones."""
        features = z.flatten(2)
        if self.has_projections:
            features = channel_linear(self.project_in, features)
        codes, indices = self.quantize_rows(features.transpose(1, 2))
        out = codes.transpose(1, 2)
        if self.has_projections:
            out = channel_linear(self.project_out, out)
        quantized = out.reshape(z.shape[0], out.shape[1], *z.shape[2:])
        if indices is not None:
            indices = indices.reshape(z.shape[0], *z.shape[2:], indices.shape[-1])
        return quantized, indices


def channel_linear(linear: nn.Linear, x: Tensor) -> Tensor:
    """`linear` applied along axis 1 of `x (b, d_in, n)`: `(b, d_out, n)`, without transposing `x`."""
    return linear_ops.linear(x, linear.weight, linear.bias, channel_first=True)
