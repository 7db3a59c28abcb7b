"""The CogVideo `sgm` quantizers (and the taming-style `vqvae` pair) under their own names and signatures.

Constructor arguments (positional order too), state-dict keys and return conventions follow CogVideo's
`sat/sgm/modules/autoencoding/{regularizers,vqvae}/quantize.py`: an sgm YAML `params:` dict passes straight in
and sgm weights load unchanged. Called as sgm calls them, they return upstream's tuple and log keys (EMA's
N x K `encodings` one-hot, part of that tuple, is built for it only); `return_dict=True` gives a ModelOutput.
The nearest code comes from `hf_vq.ops.nearest` (bounded memory); outputs keep the input's dtype. With
`embedding_weight_norm` the search uses the current weight-normalized codebook (sgm reads the `weight` the hook
computed on the previous call). `EMAVectorQuantizer` (its EMA codebook) lives in `sgm_ema.py`, re-exported here. Gumbel's soft one-hot is the relaxation itself, kept as sgm.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling_utils import (QuantizerConfig, QuantizerModel, QuantizerOutput, check_features, check_indices,
                              register_quantizer)
from ..ops.ema import code_counts
from ..ops.nearest import nearest_code
from ..ops.remap import check_used, remap_to_used, resolve_unknown_index, unmap_to_all


def measure_perplexity(indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """sgm's `measure_perplexity` from `code_counts` (no host sync on CUDA): `(perplexity, cluster_usage)`."""
    avg_probs = code_counts(indices.reshape(-1), num_codes) / indices.numel()
    perplexity = (-(avg_probs * torch.log(avg_probs + 1e-10)).sum()).exp()
    return perplexity, (avg_probs > 0).sum()


@dataclass
class SgmQuantizerOutput(QuantizerOutput):
    """Output of the sgm quantizers: `quantized`, `indices`, `loss`, `perplexity`, `cluster_usage` and
    `log_dict` (sgm's second return value). The plain tuple is `(quantized, log_dict)`."""

    perplexity: Tensor | None = None
    cluster_usage: Tensor | None = None
    log_dict: dict | None = None

    def to_tuple_output(self) -> tuple:
        return self.quantized, self.log_dict


@dataclass
class TamingQuantizerOutput(SgmQuantizerOutput):
    """taming's `(z_q, loss, (None, None, indices))` (VectorQuantizer2, GumbelQuantize); the ModelOutput has more."""

    def to_tuple_output(self) -> tuple:
        return self.quantized, self.loss, (None, None, self.indices)


def _require(config, name: str, ok, allowed: str) -> None:
    value = getattr(config, name)
    if not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class SgmConfigMixin:
    """Shared config logic: sgm classes return sgm's tuple unless `return_dict=True`; remap bookkeeping."""

    def _require_positive_ints(self, *names: str) -> None:
        for name in names:
            _require(self, name, lambda v: _is_int(v) and v >= 1, "a positive int")

    def _require_bools(self, *names: str) -> None:
        for name in names:
            _require(self, name, lambda v: isinstance(v, bool), "a bool")

    def _require_non_negative(self, *names: str) -> None:
        for name in names:
            _require(self, name, lambda v: _is_number(v) and v >= 0, "a number >= 0")

    def _sgm_defaults(self, kwargs: dict) -> dict:
        kwargs.setdefault("return_dict", False)
        return kwargs

    def _validate_remap(self) -> None:
        resolve_unknown_index(self.unknown_index, self.remap_size or 0)
        if self.remap is not None and self.remap_size is None:
            if not os.path.exists(self.remap):
                raise ValueError(f"remap file {self.remap!r} does not exist")
            self.remap_size = int(np.load(self.remap).shape[0])


class _RemapMixin:
    """Remap state (`used` buffer, as sgm) and the index mapping, for every sgm quantizer."""

    def _init_remap(self, num_codes: int) -> None:
        c = self.config
        self.num_codes = num_codes
        if c.remap is not None:
            used = torch.zeros(c.remap_size, dtype=torch.long)
            if os.path.exists(c.remap):
                used = torch.as_tensor(np.load(c.remap)).long()
            if not used.is_meta:  # from_pretrained builds on meta, then loads `used` from the weights
                check_used(used, num_codes)
            self.register_buffer("used", used)
            self.unknown_index, self.re_embed = resolve_unknown_index(c.unknown_index, c.remap_size)
        else:
            self.used = None
            self.unknown_index, self.re_embed = resolve_unknown_index(c.unknown_index, num_codes)

    def remap_to_used(self, inds: Tensor) -> Tensor:
        return remap_to_used(inds, self.used, self.num_codes, self.unknown_index, self.re_embed)

    def unmap_to_all(self, inds: Tensor) -> Tensor:
        return unmap_to_all(inds, self.used, self.re_embed)

    def get_trainable_parameters(self):
        yield from self.parameters()


# --------------------------------------------------------------------------------------------------
# VectorQuantizer (sgm) and VectorQuantizer2 (taming / vqvae, legacy-aware)


class VectorQuantizerConfig(SgmConfigMixin, QuantizerConfig):
    """Configuration of [`VectorQuantizer`] (sgm's arguments).

    Args:
        n_e (`int`): number of codes. e_dim (`int`): code dim. beta (`float`, defaults to 0.25): commitment weight.
        remap (`str`, *optional*): `.npy` file of used indices; remap_size (`int`, *optional*): its length
            (read from the file; stored so a saved model rebuilds without the file).
        unknown_index (`"random"`, `"extra"` or `int`): index for codes outside `used`.
        sane_index_shape (`bool`): indices shaped `(b, h, w)` / `(b, n)` instead of `(N, 1)`.
        log_perplexity (`bool`): add perplexity and cluster usage to the log dict.
        embedding_weight_norm (`bool`): weight-normalized embedding (keys `embedding.weight_g/_v`).
        loss_key (`str`): key of the loss in the log dict.
        legacy (`bool`, defaults to `False`): taming's legacy loss ordering (beta on the codebook term).
    """

    model_type = "hf_vq_sgm_vector_quantizer"

    def __init__(self, n_e: int = 512, e_dim: int = 256, beta: float = 0.25, remap: str | None = None,
                 unknown_index: Any = "random", sane_index_shape: bool = False, log_perplexity: bool = False,
                 embedding_weight_norm: bool = False, loss_key: str = "loss/vq", legacy: bool = False,
                 remap_size: int | None = None, **kwargs):
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.remap, self.remap_size, self.unknown_index = remap, remap_size, unknown_index
        self.sane_index_shape, self.log_perplexity = sane_index_shape, log_perplexity
        self.embedding_weight_norm, self.loss_key, self.legacy = embedding_weight_norm, loss_key, legacy
        super().__init__(**self._sgm_defaults(kwargs))

    def validate(self):
        self._require_positive_ints("n_e", "e_dim")
        self._require_non_negative("beta")
        self._require_bools("sane_index_shape", "log_perplexity", "embedding_weight_norm", "legacy")
        _require(self, "loss_key", lambda v: isinstance(v, str), "a str")
        self._validate_remap()


@register_quantizer
class VectorQuantizer(_RemapMixin, QuantizerModel):
    """sgm's VQ-VAE bottleneck: `loss = beta * ||z - sg[e]||^2 + ||sg[z] - e||^2` (legacy: beta swapped),
    straight-through output. `z_q, log_dict = q(z)` for `(b, c, h, w)` or `(..., e_dim)` input."""

    config_class = VectorQuantizerConfig
    output_class: ClassVar[type] = SgmQuantizerOutput

    def __init__(self, *args, config: VectorQuantizerConfig | None = None, **kwargs):
        config = _config_from_args(self.config_class, args, config, kwargs)
        super().__init__(config)
        c = self.config
        embedding = nn.Embedding(c.n_e, c.e_dim)
        if c.embedding_weight_norm:
            # the deprecated hook form on purpose: its keys (`embedding.weight_g`, `embedding.weight_v`) are sgm's
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                embedding = torch.nn.utils.weight_norm(embedding, dim=1)
        else:
            embedding.weight.data.uniform_(-1.0 / c.n_e, 1.0 / c.n_e)
        self.embedding = embedding
        self._init_remap(c.n_e)
        self.post_init()

    @property
    def codebook(self) -> Tensor:
        emb = self.embedding
        if self.config.embedding_weight_norm:
            # the hook refreshes `weight` only when the embedding runs: recompute so the search never sees a
            # stale codebook (e.g. the random init right after load_state_dict)
            return torch._weight_norm(emb.weight_v, emb.weight_g, 1)
        return emb.weight

    def _nearest(self, z_flat: Tensor) -> Tensor:
        return nearest_code(z_flat, self.codebook.detach())[0]

    def forward(self, z: Tensor, return_dict: bool | None = None):
        c = self.config
        if c.check_inputs:
            check_features(z, z.shape[-1], name="z")
        channel_first = z.ndim >= 4
        if channel_first:
            z = z.movedim(1, -1).contiguous()
        if z.shape[-1] != c.e_dim:
            raise ValueError(f"expected {c.e_dim} channels, got {z.shape[-1]} (shape {tuple(z.shape)})")
        z_flat = z.reshape(-1, c.e_dim)
        indices = self._nearest(z_flat)
        z_q = self.embedding(indices).view(z.shape).to(z.dtype)
        commitment = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        loss = commitment + c.beta * codebook if c.legacy else c.beta * commitment + codebook
        z_q = z + (z_q - z).detach()
        if channel_first:
            z_q = z_q.movedim(-1, 1).contiguous()
        perplexity, usage = measure_perplexity(indices.detach(), c.n_e)
        indices = self._shape_indices(indices, z)
        log = {"perplexity": perplexity, "cluster_usage": usage} if c.log_perplexity else {}
        log.update({c.loss_key: loss, "min_encoding_indices": indices})
        out = self.output_class(quantized=z_q, indices=indices, loss=loss, perplexity=perplexity,
                                cluster_usage=usage, log_dict=log)
        return self._output(out, return_dict)

    def _shape_indices(self, indices: Tensor, z: Tensor) -> Tensor:
        c = self.config
        if c.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if c.sane_index_shape:
            return indices.reshape(z.shape[:-1]) if z.ndim >= 3 else indices.reshape(z.shape[0], -1)
        return indices

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """Codes for `indices`; with `shape=(b, h, w, c)` returned as `(b, c, h, w)`."""
        check_indices(indices, self.re_embed if self.config.remap is not None else self.config.n_e)
        if self.config.remap is not None:
            if shape is None:
                raise ValueError("get_codebook_entry needs `shape` when a remap is used")
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class VectorQuantizer2Config(VectorQuantizerConfig):
    """Configuration of [`VectorQuantizer2`]: taming's `(n_e, e_dim, beta, remap, unknown_index,
    sane_index_shape, legacy=True)`; diffusers' `VQModel` quantizer has the same semantics."""

    model_type = "hf_vq_vector_quantizer2"

    def __init__(self, n_e: int = 512, e_dim: int = 256, beta: float = 0.25, remap: str | None = None,
                 unknown_index: Any = "random", sane_index_shape: bool = False, legacy: bool = True, **kwargs):
        super().__init__(n_e=n_e, e_dim=e_dim, beta=beta, remap=remap, unknown_index=unknown_index,
                         sane_index_shape=sane_index_shape, legacy=legacy, **kwargs)


@register_quantizer
class VectorQuantizer2(VectorQuantizer):
    """taming's improved VectorQuantizer (CogVideo `vqvae/quantize.py`, diffusers' `VectorQuantizer`):
    `legacy=True` keeps the historical loss ordering; returns `(z_q, loss, (perplexity, None, indices))`."""

    config_class = VectorQuantizer2Config
    output_class = TamingQuantizerOutput

    def forward(self, z: Tensor, temp: float | None = None, rescale_logits: bool = False,
                return_logits: bool = False, return_dict: bool | None = None):
        """taming's signature: `temp`, `rescale_logits` and `return_logits` exist only for interface
        compatibility with [`GumbelQuantize`] and must keep their defaults."""
        if (temp is not None and temp != 1.0) or rescale_logits or return_logits:
            raise ValueError("VectorQuantizer2 takes temp, rescale_logits and return_logits only for interface "
                             "compatibility with GumbelQuantize: leave them at their defaults")
        return super().forward(z, return_dict=return_dict)


# --------------------------------------------------------------------------------------------------
# VectorQuantizerWithInputProjection


class VectorQuantizerWithInputProjectionConfig(VectorQuantizerConfig):
    """Configuration of [`VectorQuantizerWithInputProjection`]: sgm's `(input_dim, n_codes, codebook_dim,
    beta=1.0, output_dim=None, **VectorQuantizer kwargs)`."""

    model_type = "hf_vq_sgm_vector_quantizer_with_input_projection"

    def __init__(self, input_dim: int = 256, n_codes: int = 512, codebook_dim: int = 16, beta: float = 1.0,
                 output_dim: int | None = None, **kwargs):
        self.input_dim, self.n_codes, self.codebook_dim, self.output_dim = input_dim, n_codes, codebook_dim, output_dim
        kwargs.pop("n_e", None), kwargs.pop("e_dim", None)
        super().__init__(n_e=n_codes, e_dim=codebook_dim, beta=beta, **kwargs)

    @classmethod
    def field_names(cls) -> list[str]:
        return [n for n in super().field_names() if n not in ("n_e", "e_dim")]

    def validate(self):
        self._require_positive_ints("input_dim", "n_codes", "codebook_dim")
        _require(self, "output_dim", lambda v: v is None or (_is_int(v) and v >= 1), "None or a positive int")
        super().validate()


@register_quantizer
class VectorQuantizerWithInputProjection(VectorQuantizer):
    """sgm's VectorQuantizer with `proj_in` (input_dim -> codebook_dim) and `proj_out`; 4D and 5D inputs
    are flattened to tokens, and restored when `output_dim` is set (as sgm)."""

    config_class = VectorQuantizerWithInputProjectionConfig

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, config=config, **kwargs)
        c = self.config
        self.proj_in = nn.Linear(c.input_dim, c.codebook_dim)
        self.proj_out = nn.Linear(c.codebook_dim, c.output_dim) if c.output_dim is not None else nn.Identity()

    def forward(self, z: Tensor, return_dict: bool | None = None):
        in_shape = z.shape
        restore = z.ndim > 3 and self.config.output_dim is not None
        if z.ndim > 3:
            z = z.flatten(2).transpose(1, 2)
        out = super().forward(self.proj_in(z), return_dict=True)
        z_q = self.proj_out(out.quantized)
        if restore:
            z_q = z_q.transpose(1, 2).reshape(in_shape[0], -1, *in_shape[2:])
        out.quantized = z_q
        return self._output(out, return_dict)


# --------------------------------------------------------------------------------------------------
# Gumbel


class GumbelQuantizerConfig(SgmConfigMixin, QuantizerConfig):
    """Configuration of [`GumbelQuantizer`]: sgm's `(num_hiddens, embedding_dim, n_embed, straight_through,
    kl_weight, temp_init, remap, unknown_index, loss_key)`."""

    model_type = "hf_vq_sgm_gumbel_quantizer"

    def __init__(self, num_hiddens: int = 256, embedding_dim: int = 64, n_embed: int = 512,
                 straight_through: bool = True, kl_weight: float = 5e-4, temp_init: float = 1.0,
                 remap: str | None = None, unknown_index: Any = "random", loss_key: str = "loss/vq",
                 remap_size: int | None = None, **kwargs):
        self.num_hiddens, self.embedding_dim, self.n_embed = num_hiddens, embedding_dim, n_embed
        self.straight_through, self.kl_weight, self.temp_init = straight_through, kl_weight, temp_init
        self.remap, self.remap_size, self.unknown_index, self.loss_key = remap, remap_size, unknown_index, loss_key
        super().__init__(**self._sgm_defaults(kwargs))

    def validate(self):
        self._require_positive_ints("num_hiddens", "embedding_dim", "n_embed")
        self._require_bools("straight_through")
        self._require_non_negative("kl_weight")
        _require(self, "temp_init", lambda v: _is_number(v) and v > 0, "a number > 0")
        _require(self, "loss_key", lambda v: isinstance(v, str), "a str")
        self._validate_remap()


@register_quantizer
class GumbelQuantizer(_RemapMixin, QuantizerModel):
    """Gumbel-softmax quantizer (Jang et al. 2016; karpathy's deep-vector-quantization, as in sgm): a 1x1 conv
    `proj` gives logits over codes; a (hard in eval) Gumbel-softmax sample mixes `embed`; KL to uniform."""

    config_class = GumbelQuantizerConfig

    def __init__(self, *args, config: GumbelQuantizerConfig | None = None, **kwargs):
        config = _config_from_args(self.config_class, args, config, kwargs)
        super().__init__(config)
        c = self.config
        self.temperature = c.temp_init
        self.proj = nn.Conv2d(c.num_hiddens, c.n_embed, 1)
        self.embed = nn.Embedding(c.n_embed, c.embedding_dim)
        self._init_remap(c.n_embed)
        self.post_init()

    def _gumbel(self, z: Tensor, temp: float | None):
        c = self.config
        if c.check_inputs:
            check_features(z, c.num_hiddens, name="z")
        if z.ndim != 4 or z.shape[1] != c.num_hiddens:
            raise ValueError(f"expected (b, {c.num_hiddens}, h, w) input, got shape {tuple(z.shape)}")
        hard = c.straight_through if self.training else True
        temp = self.temperature if temp is None else temp
        logits = self.proj(z)
        if self.used is not None:
            full = torch.zeros_like(logits)
            logits = logits[:, self.used]
        # the soft one-hot is the Gumbel relaxation itself: a distribution over codes per position
        soft_one_hot = F.gumbel_softmax(logits, tau=temp, dim=1, hard=hard)
        if self.used is not None:
            full[:, self.used] = soft_one_hot
            soft_one_hot = full
        z_q = torch.einsum("bnhw,nd->bdhw", soft_one_hot, self.embed.weight)
        qy = F.softmax(logits, dim=1)
        loss = c.kl_weight * torch.sum(qy * torch.log(qy * c.n_embed + 1e-10), dim=1).mean()
        full_indices = soft_one_hot.argmax(dim=1)
        indices = self.remap_to_used(full_indices) if self.used is not None else full_indices
        return z_q, loss, indices, logits, full_indices

    def forward(self, z: Tensor, temp: float | None = None, return_logits: bool = False,
                return_dict: bool | None = None):
        z_q, loss, indices, logits, full_indices = self._gumbel(z, temp)
        log = {self.config.loss_key: loss, "indices": full_indices}  # sgm logs the index before the remap
        if return_logits:
            log["logits"] = logits
        out = SgmQuantizerOutput(quantized=z_q, indices=indices, loss=loss, log_dict=log)
        return self._output(out, return_dict)

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
        b, h, w, _ = shape
        check_indices(indices, self.re_embed if self.used is not None else self.config.n_embed)
        if b * h * w != indices.shape[0]:
            raise ValueError(f"shape {shape} does not match {indices.shape[0]} indices")
        indices = indices.reshape(b, h, w)
        if self.used is not None:
            indices = self.unmap_to_all(indices)
        return self.embed(indices).permute(0, 3, 1, 2)


class GumbelQuantizeConfig(GumbelQuantizerConfig):
    """Configuration of [`GumbelQuantize`] (taming / CogVideo `vqvae`): adds `use_vqinterface`."""

    model_type = "hf_vq_gumbel_quantize"

    def __init__(self, num_hiddens: int = 256, embedding_dim: int = 64, n_embed: int = 512,
                 straight_through: bool = True, kl_weight: float = 5e-4, temp_init: float = 1.0,
                 use_vqinterface: bool = True, remap: str | None = None, unknown_index: Any = "random", **kwargs):
        self.use_vqinterface = use_vqinterface
        if not isinstance(use_vqinterface, bool):
            raise ValueError(f"use_vqinterface must be a bool, got {use_vqinterface!r}")
        super().__init__(num_hiddens=num_hiddens, embedding_dim=embedding_dim, n_embed=n_embed,
                         straight_through=straight_through, kl_weight=kl_weight, temp_init=temp_init,
                         remap=remap, unknown_index=unknown_index, **kwargs)


@register_quantizer
class GumbelQuantize(GumbelQuantizer):
    """taming's GumbelQuantize: returns `(z_q, loss, (None, None, indices))` with `use_vqinterface`, else
    `(z_q, loss, indices)`; `return_logits=True` appends the logits."""

    config_class = GumbelQuantizeConfig

    def forward(self, z: Tensor, temp: float | None = None, return_logits: bool = False,
                return_dict: bool | None = None):
        z_q, loss, indices, logits, _ = self._gumbel(z, temp)
        output_class = TamingQuantizerOutput if self.config.use_vqinterface else GumbelQuantizeOutput
        out = output_class(quantized=z_q, indices=indices, loss=loss, log_dict={"logits": logits} if return_logits else {})
        if self.config.return_dict if return_dict is None else return_dict:
            return out
        # taming appends the logits only with the VQ interface (and ignores return_logits without it)
        if return_logits and self.config.use_vqinterface:
            return (*out.to_tuple_output(), logits)
        return out.to_tuple_output()


@dataclass
class GumbelQuantizeOutput(SgmQuantizerOutput):
    """taming GumbelQuantize without the VQ interface: `(z_q, loss, indices)`."""

    def to_tuple_output(self) -> tuple:
        return self.quantized, self.loss, self.indices


def _config_from_args(config_cls, args: tuple, config, kwargs: dict):
    """sgm passes constructor arguments positionally too: map them onto the config's fields in order."""
    if config is not None:
        if args or kwargs:
            raise ValueError(f"{config_cls.__name__}: pass either a config or arguments, not both")
        return config
    if args and isinstance(args[0], QuantizerConfig):
        if len(args) > 1 or kwargs:
            raise ValueError(f"{config_cls.__name__}: pass either a config or arguments, not both")
        return args[0]
    names = config_cls.field_names()
    if len(args) > len(names):
        raise ValueError(f"{config_cls.__name__} takes at most {len(names)} positional arguments")
    for name, value in zip(names, args):
        if name in kwargs:
            raise ValueError(f"{config_cls.__name__}: {name} given twice")
        kwargs[name] = value
    return config_cls(**kwargs)


# sgm's EMAVectorQuantizer (its own module: the EMA codebook and its guarded update); importable from here too
from .sgm_ema import EMAQuantizerOutput, EMAVectorQuantizer, EMAVectorQuantizerConfig, EmbeddingEMA  # noqa: E402,F401
