"""Finite Scalar Quantization (FSQ) as a Hugging Face model.

Semantics: CogVideo sgm `finite_scalar_quantization.py` (the seed) and vector-quantize-pytorch 1.32 `FSQ`
(its superset of options). https://arxiv.org/abs/2309.15505
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
    TokenLayout,
    check_features,
    check_indices,
    register_quantizer,
)
from ..ops import fsq as fsq_ops
from ..ops import triton_fsq
from ._config_view import fast_view


class FSQConfig(QuantizerConfig):
    """Configuration of [`FSQ`].

    Args:
        levels (`list[int]`): number of levels per code dimension; the implicit codebook has `prod(levels)` codes.
        dim (`int`, *optional*): input feature dim; defaults to `len(levels) * num_codebooks`. When it differs,
            linear projections map in and out of the code space.
        num_codebooks (`int`, defaults to 1): independent FSQ codebooks over equal slices of the projected features.
        keep_num_codebooks_dim (`bool`, *optional*): keep a trailing codebook axis on `indices`; defaults to
            `num_codebooks > 1` and must be true when `num_codebooks > 1`.
        scale (`float`, *optional*): kept for signature compatibility with vqp 1.32; unused by the forward pass.
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
        inner = c.codebook_dim * c.num_codebooks
        self.has_projections = c.effective_dim != inner
        if self.has_projections:
            self.project_in = nn.Linear(c.effective_dim, inner, bias=c.projection_has_bias)
            self.project_out = nn.Linear(inner, c.effective_dim, bias=c.projection_has_bias)
        else:
            self.project_in = self.project_out = nn.Identity()
        if c.orthogonal_rotation:
            rot = torch.empty(c.codebook_dim, c.codebook_dim)
            nn.init.orthogonal_(rot)  # not its return value: loaders may patch init functions to return None
            self.register_buffer("orthogonal_rot", rot)
        levels, basis = fsq_ops.fsq_tables(c.levels)
        self.register_buffer("_levels", levels, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("implicit_codebook", torch.empty(0), persistent=False)
        self.reset_derived_buffers()
        # the shapes the parameters were built for (the forward reads these instead of the config's properties)
        self._in_dim, self._code_shape = c.effective_dim, (c.num_codebooks, c.codebook_dim)
        self._allowed_dtypes = tuple(getattr(torch, name) for name in c.allowed_dtypes)
        self.post_init()

    @property
    def keep_num_codebooks_dim(self) -> bool:
        return keeps_codebook_axis(self.config)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def reset_derived_buffers(self):
        device = self._levels.device if self._levels.device.type != "meta" else torch.device("cpu")
        self._levels, self._basis = fsq_ops.fsq_tables(self.config.levels, device=device)
        if self.config.return_indices:
            self.implicit_codebook = self._codes_from_indices(torch.arange(self.codebook_size, device=device))

    # -- index <-> code ---------------------------------------------------------------------------

    def _codes_from_indices(self, indices: Tensor) -> Tensor:
        return fsq_ops.indices_to_codes(indices, self._levels, self._basis, self.config.preserve_symmetry)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """`(..., len(levels))` normalized codes to `(...)` int32 indices."""
        if codes.shape[-1] != self.config.codebook_dim:
            raise ValueError(f"codes must have last dim {self.config.codebook_dim} (len(levels)), got {codes.shape[-1]}")
        return fsq_ops.codes_to_indices(codes, self._levels, self._basis, self.config.preserve_symmetry)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """Per-dimension level of each index, e.g. for factorized embeddings."""
        return fsq_ops.indices_to_level_indices(indices, self._levels, self._basis)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Inverse of the forward's indices: `(b, ...)` or `(b, ..., c)` indices to features (channel-first for
        image/video-shaped indices, like the seed)."""
        self._check_indices(indices)
        spatial = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        codes = self._codes_from_indices(indices.long())
        if self.config.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes.to(self._projection_dtype(codes)))
        if spatial or self.config.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def _check_indices(self, indices: Tensor) -> None:
        axis = self.config.num_codebooks if self.keep_num_codebooks_dim else None
        check_indices(indices, self.codebook_size, codebook_axis=axis)

    def _projection_dtype(self, fallback: Tensor) -> torch.dtype:
        return self.project_out.weight.dtype if self.has_projections else fallback.dtype

    # -- forward ----------------------------------------------------------------------------------

    def quantize(self, z: Tensor) -> Tensor:
        """Quantize `(..., len(levels))` features to normalized codes (straight-through)."""
        fn = fsq_ops.fsq_quantize_symmetric if self.config.preserve_symmetry else fsq_ops.fsq_quantize
        return fn(z, self._levels, hard_clamp=self.config.bound_hard_clamp)

    def _noise_dropout(self, codes: Tensor) -> Tensor:
        p = self.config.noise_dropout
        if not self.training or p == 0:
            return codes
        replace = torch.rand_like(codes) < p
        return torch.where(replace, codes + torch.rand_like(codes) - 0.5, codes).clamp(-1.0, 1.0)

    def _fused_ok(self, tokens: Tensor, c) -> bool:
        """The one-kernel path (CUDA + Triton) serves the plain configuration: float32 math, no symmetry-preserving
        levels, no rotation, no noise dropout in training."""
        return (triton_fsq.available(tokens) and not c.preserve_symmetry and not c.orthogonal_rotation
                and not (self.training and c.noise_dropout > 0)
                and (c.force_quantization_f32 and self._quantization_dtype(tokens.dtype) in (torch.float32, torch.float64)
                     or tokens.dtype == torch.float32))

    def _quantization_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the quantization runs in (vqp 1.32): the input's, except that `force_quantization_f32` casts a
        dtype outside `allowed_dtypes` to float32."""
        if self.config.force_quantization_f32 and dtype not in self._allowed_dtypes:
            return torch.float32
        return dtype

    def _fused_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        cached = self.__dict__.get("_fused_cache")
        if cached is None or cached[0].device != device:
            cached = triton_fsq.fsq_table(self._levels.to(device), self._basis.to(device), self.config.bound_hard_clamp)
            self.__dict__["_fused_cache"] = cached
        return cached

    def _quantize_torch(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """`(codes (..., C * d) in the input dtype, indices | None)` by the PyTorch ops."""
        c = self.config
        orig_dtype = tokens.dtype
        with torch.autocast(device_type=tokens.device.type, enabled=not c.force_quantization_f32):
            tokens = tokens.to(self._quantization_dtype(orig_dtype))
            codes = self.quantize(tokens)
            indices = self.codes_to_indices(codes) if c.return_indices else None
            codes = self._noise_dropout(codes)
            if c.orthogonal_rotation:
                codes = codes @ self.orthogonal_rot.t()
            return codes.flatten(-2).to(orig_dtype), indices

    def _quantize_fused(self, tokens: Tensor, c) -> tuple[Tensor, Tensor | None]:
        """`(codes, indices | None)` of the token rows by the kernel, with the straight-through gradient in
        training."""
        codes, indices = triton_fsq.fsq_quantize_fused(
            tokens, *self._fused_tables(tokens.device), c.bound_hard_clamp,
            straight_through=tokens.requires_grad and torch.is_grad_enabled())
        return codes, indices if c.return_indices else None

    def forward(self, z: Tensor, return_dict: bool | None = None) -> FSQOutput | tuple:
        """Quantize `z` of shape `(b, n, d)`, `(b, d, h, w)` or `(b, d, t, h, w)` (or `(b, d, n)` with
        `channel_first`). Returns [`FSQOutput`], or `(quantized, indices)` with `return_dict=False`."""
        c = fast_view(self.config)
        if c.check_inputs:
            check_features(z, self._in_dim, name="z")
        layout = TokenLayout.of(z, channel_first=True if c.channel_first else None)
        tokens = layout.to_tokens(z)
        if tokens.shape[-1] != self._in_dim:
            raise ValueError(f"expected feature dim {self._in_dim}, got {tokens.shape[-1]} "
                             f"(input shape {tuple(z.shape)})")

        if self.has_projections:  # (not calling the Identity modules: host time is most of a small FSQ step)
            tokens = self.project_in(tokens)
        if self._fused_ok(tokens, c):
            codes, indices = self._quantize_fused(tokens, c)
        else:
            tokens = tokens.unflatten(-1, self._code_shape)
            if c.orthogonal_rotation:
                tokens = tokens @ self.orthogonal_rot
            codes, indices = self._quantize_torch(tokens)
        quantized = layout.from_tokens(self.project_out(codes) if self.has_projections else codes)

        if indices is not None:
            indices = layout.indices_from_tokens(indices)
            if not keeps_codebook_axis(c):
                indices = indices.squeeze(-1)
        return self._output(FSQOutput(quantized=quantized, indices=indices), return_dict)
