"""RandomProjectionQuantizer (BEST-RQ, arXiv:2202.01855), with vector-quantize-pytorch 1.32's arguments and results.

Targets for self-supervised speech models: the input is layer-normalized (no affine), projected by frozen random
matrices, one per codebook, and quantized by a cosine-similarity [`VectorQuantize`] with a separate codebook per
head that always runs in eval mode (the codebook never learns). The forward returns the code indices, or, given
target `indices`, the cross-entropy of the code scores against them. The composed `VectorQuantize` does the
nearest-code search (`nearest_code`) and holds any codebook state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..modeling_utils import QuantizerConfig, QuantizerModel, QuantizerOutput, check_features, register_quantizer
from .vector_quantize import VectorQuantize, VectorQuantizeConfig

# VectorQuantize options a RandomProjectionQuantizer passes through (vqp's `**kwargs`), and those it sets itself
_VQ_FIELDS = frozenset(VectorQuantizeConfig.field_names()) - frozenset(QuantizerConfig.field_names())
_SET_BY_RPQ = frozenset({"dim", "heads", "codebook_size", "use_cosine_sim", "separate_codebook_per_head"})


class RandomProjectionQuantizerConfig(QuantizerConfig):
    """Configuration of [`RandomProjectionQuantizer`] (names and defaults of vector-quantize-pytorch 1.32).

    Args:
        dim (`int`): input feature dim.
        codebook_size (`int`): codes per codebook.
        codebook_dim (`int`): dim of each random projection (the code space of one codebook).
        num_codebooks (`int`, defaults to 1): independent projections and codebooks (USM used up to 16).
        norm (`bool`, defaults to `True`): layer-normalize the input (mean 0, std 1, no affine) first.
        vq_kwargs (`dict`, *optional*): further [`VectorQuantizeConfig`] fields for the inner quantizer (vqp's
            `**kwargs`); any such field may also be passed flat, as in vqp (`decay=0.9`).
    """

    model_type = "hf_vq_random_projection_quantizer"
    vqp_positional = ()  # keyword-only in vqp 1.32

    def __init__(
        self,
        dim: int = 256,
        codebook_size: int = 512,
        codebook_dim: int = 16,
        num_codebooks: int = 1,
        norm: bool = True,
        vq_kwargs: dict | None = None,
        **kwargs,
    ):
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.norm = norm
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in _VQ_FIELDS}
        self.vq_kwargs = {**(vq_kwargs or {}), **flat}
        super().__init__(**kwargs)

    def validate(self):
        for name in ("dim", "codebook_size", "codebook_dim", "num_codebooks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.vq_kwargs, dict):
            raise ValueError(f"vq_kwargs must be a dict of VectorQuantizeConfig fields, got {self.vq_kwargs!r}")
        reserved = sorted(_SET_BY_RPQ & set(self.vq_kwargs))
        if reserved:
            raise ValueError(f"vq_kwargs may not set {reserved}: RandomProjectionQuantizer sets them itself")
        unknown = sorted(set(self.vq_kwargs) - _VQ_FIELDS)
        if unknown:
            raise ValueError(f"vq_kwargs has unknown VectorQuantize field(s) {unknown}")
        self.vq_config()

    def vq_config(self) -> VectorQuantizeConfig:
        """The inner quantizer: cosine similarity, one codebook per projection, as vqp builds it."""
        return VectorQuantizeConfig(dim=self.codebook_dim * self.num_codebooks, heads=self.num_codebooks,
                                    codebook_size=self.codebook_size, use_cosine_sim=True,
                                    separate_codebook_per_head=True, check_inputs=False, **self.vq_kwargs)


@dataclass
class RandomProjectionQuantizerOutput(QuantizerOutput):
    """Output of [`RandomProjectionQuantizer`]: `indices` `(b, n)` (`(b, n, num_codebooks)` for several
    codebooks), or, when target indices were given, the cross-entropy `loss`; `quantized` holds the chosen codes
    in the projected space `(b, n, num_codebooks * codebook_dim)`. With `return_dict=False` the forward returns
    the one tensor vqp returns (the indices, or the loss)."""

    tuple_fields: ClassVar[tuple[str, ...]] = ("indices",)

    def to_tuple_output(self):
        return self.loss if self.indices is None else self.indices


@register_quantizer
class RandomProjectionQuantizer(QuantizerModel):
    """Random-projection quantizer (BEST-RQ targets), as vqp 1.32's `RandomProjectionQuantizer`.

    Example:
        >>> rpq = RandomProjectionQuantizer(dim=32, codebook_size=64, codebook_dim=8, num_codebooks=2)
        >>> indices = rpq(torch.randn(2, 10, 32), return_dict=False)
        >>> indices.shape
        torch.Size([2, 10, 2])
    """

    config_class = RandomProjectionQuantizerConfig

    def __init__(self, config: RandomProjectionQuantizerConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self.dim, self.num_codebooks, self.check_inputs = c.dim, c.num_codebooks, c.check_inputs
        projections = torch.empty(c.num_codebooks, c.dim, c.codebook_dim)
        nn.init.xavier_normal_(projections)
        self.register_buffer("rand_projs", projections)
        self.norm = nn.LayerNorm(c.dim, elementwise_affine=False) if c.norm else nn.Identity()
        self.vq = VectorQuantize(c.vq_config())
        self.post_init()
        self.vq.eval()

    def train(self, mode: bool = True):
        """The inner quantizer stays in eval mode (its codebook is a fixed random target)."""
        super().train(mode)
        self.vq.eval()
        return self

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "RandomProjectionQuantizer":
        """An hf_vq RandomProjectionQuantizer with a vqp module's config, projections and codebooks."""
        inner = VectorQuantize.from_vector_quantize_pytorch(module.vq)
        defaults = VectorQuantizeConfig().to_kwargs()
        vq_kwargs = {k: v for k, v in inner.config.to_kwargs().items()
                     if k in _VQ_FIELDS and k not in _SET_BY_RPQ and v != defaults[k]}
        num_codebooks, dim, codebook_dim = module.rand_projs.shape
        config = RandomProjectionQuantizerConfig(dim=dim, codebook_size=module.vq.codebook_size,
                                                 codebook_dim=codebook_dim, num_codebooks=num_codebooks,
                                                 norm=isinstance(module.norm, nn.LayerNorm), vq_kwargs=vq_kwargs)
        model = cls(config)
        with torch.no_grad():
            model.rand_projs.copy_(module.rand_projs)
        model.vq.load_state_dict(inner.state_dict())
        return model

    def project(self, x: Tensor) -> Tensor:
        """Normalized input through every random projection: `(b, n, num_codebooks * codebook_dim)`."""
        projected = torch.einsum("bnd,hde->bnhe", self.norm(x), self.rand_projs.to(x.dtype))
        return projected.flatten(-2)

    def forward(self, x: Tensor, indices: Tensor | None = None,
                return_dict: bool | None = None) -> RandomProjectionQuantizerOutput | Tensor:
        """`x (b, n, dim)` to code indices, or with target `indices` (as returned, -1 ignored) the cross-entropy
        loss of the code scores against them. Returns [`RandomProjectionQuantizerOutput`], or the one tensor
        (indices or loss) with `return_dict=False`."""
        if self.check_inputs:
            check_features(x, self.dim, name="x")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, seq, dim={self.dim}), got {tuple(x.shape)}")
        if self.vq.training:  # a user's `.train()` on the inner module: vqp also resets it on every call
            self.vq.eval()
        projected = self.project(x)
        if indices is not None:
            quantized, loss = self.vq(projected, indices=indices, return_dict=False)
            out = RandomProjectionQuantizerOutput(quantized=quantized, loss=loss)
        else:
            quantized, codes, _ = self.vq(projected, return_dict=False)
            out = RandomProjectionQuantizerOutput(quantized=quantized, indices=codes)
        return self._output(out, return_dict)
