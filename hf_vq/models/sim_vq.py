"""SimVQ and ResidualSimVQ (arXiv:2411.02038), with vector-quantize-pytorch 1.32's arguments and results.

The codebook is implicit: a frozen Gaussian table `frozen_codebook (K, frozen_codebook_dim)` mapped by a learned
transform (a bias-free linear layer by default, or an MLP) to `(K, dim)`. Codes are chosen by euclidean
distance to the transformed codebook (through `nearest_code`: bounded memory, the GPU kernel on CUDA); the
transform learns from the commitment loss `mse(x.detach(), q) + w * mse(x, q.detach())`, and the input gets
its gradient through the rotation trick (or straight-through). Nothing is updated outside the optimizer, so
there is no codebook state to sync across processes: the ResidualSimVQ dropout cutoff is the only shared
random draw, and it is broadcast from rank 0.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..modeling_utils import (
    QuantizerConfig,
    QuantizerModel,
    QuantizerOutput,
    TokenLayout,
    check_features,
    register_quantizer,
)
from ..ops.estimators import rotate_to, straight_through
from ..ops.nearest import nearest_code

# ----------------------------------------------------------------------------------------------------
# the codebook transform, as a JSON spec

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}
_SPEC_KEYS = ("hidden_dims", "activation", "bias")


def normalize_transform_spec(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate a `codebook_transform` spec and fill its defaults. `None` is vqp's default transform (one
    bias-free linear layer); a dict `{"hidden_dims": [...], "activation": "relu", "bias": True}` is an MLP
    `frozen_codebook_dim -> hidden_dims... -> dim` with the activation between its linear layers."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"codebook_transform must be None or a dict with keys {_SPEC_KEYS} (an nn.Linear / "
                         f"nn.Sequential passed to the model is converted to one), got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise ValueError(f"codebook_transform has unknown key(s) {unknown}; allowed: {list(_SPEC_KEYS)}")
    hidden = list(spec.get("hidden_dims", []))
    if not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise ValueError(f"codebook_transform['hidden_dims'] must be positive ints, got {hidden!r}")
    activation = spec.get("activation", "relu")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"codebook_transform['activation'] must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    bias = spec.get("bias", True)
    if not isinstance(bias, bool):
        raise ValueError(f"codebook_transform['bias'] must be a bool, got {bias!r}")
    return {"hidden_dims": hidden, "activation": activation, "bias": bias}


def build_code_transform(spec: dict[str, Any] | None, in_dim: int, out_dim: int) -> nn.Module:
    """The module a spec describes (a lone `nn.Linear`, or an `nn.Sequential` as vqp's README example builds)."""
    if spec is None:
        return nn.Linear(in_dim, out_dim, bias=False)
    dims = [in_dim, *spec["hidden_dims"], out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        if i:
            layers.append(_ACTIVATIONS[spec["activation"]]())
        layers.append(nn.Linear(a, b, bias=spec["bias"]))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def transform_spec_of(module: nn.Module) -> dict[str, Any] | None:
    """The spec of an `nn.Linear` or of an `nn.Sequential` alternating linear layers and one activation type;
    a `TypeError` for anything else (its structure could not be saved in a JSON config)."""
    if isinstance(module, nn.Linear):
        return None if module.bias is None else {"hidden_dims": [], "activation": "relu", "bias": True}
    names = {cls: name for name, cls in _ACTIVATIONS.items()}
    layers = list(module) if isinstance(module, nn.Sequential) else []
    linears, acts = layers[0::2], layers[1::2]
    ok = (len(layers) % 2 == 1 and all(type(m) is nn.Linear for m in linears)
          and all(type(m) in names for m in acts) and len({type(m) for m in acts}) <= 1
          and len({m.bias is not None for m in linears}) == 1)
    if not ok:
        raise TypeError("codebook_transform must be an nn.Linear or an nn.Sequential of nn.Linear layers with one "
                        f"activation type from {sorted(_ACTIVATIONS)} between them (so the config can describe it "
                        f"as JSON); got {module!r}")
    return {"hidden_dims": [m.out_features for m in linears[:-1]],
            "activation": names[type(acts[0])] if acts else "relu", "bias": linears[0].bias is not None}


def _positive_int(config, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _non_negative(config, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# SimVQ


class SimVQConfig(QuantizerConfig):
    """Configuration of [`SimVQ`] (names, defaults and positional order of vector-quantize-pytorch 1.32).

    Args:
        dim (`int`): feature dim of the input and of the transformed codes.
        codebook_size (`int`): number of codes K.
        codebook_transform (`dict`, *optional*): `None` for vqp's bias-free linear transform, or an MLP spec
            `{"hidden_dims": [...], "activation": "relu", "bias": True}` (the model also accepts the module).
        channel_first (`bool`, defaults to `False`): input is `(b, d, ...)` instead of `(b, ..., d)`.
        rotation_trick (`bool`, defaults to `True`): rotation-trick gradients to the input (else straight-through).
        input_to_quantize_commit_loss_weight (`float`, defaults to 0.25): weight of `mse(x, q.detach())`.
        commitment_weight (`float`, defaults to 1.0): weight of the whole commitment loss.
        frozen_codebook_dim (`int`, *optional*): dim of the frozen table (defaults to `dim`).
    """

    model_type = "hf_vq_sim_vq"

    # vqp 1.32's positional order; `init_fn` is a model argument (a callable is not part of a JSON config)
    vqp_positional = ("dim", "codebook_size", "codebook_transform", "init_fn", "channel_first", "rotation_trick",
                      "input_to_quantize_commit_loss_weight", "commitment_weight", "frozen_codebook_dim")

    def __init__(
        self,
        dim: int = 256,
        codebook_size: int = 512,
        codebook_transform: dict | None = None,
        channel_first: bool = False,
        rotation_trick: bool = True,
        input_to_quantize_commit_loss_weight: float = 0.25,
        commitment_weight: float = 1.0,
        frozen_codebook_dim: int | None = None,
        **kwargs,
    ):
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_transform = codebook_transform
        self.channel_first = channel_first
        self.rotation_trick = rotation_trick
        self.input_to_quantize_commit_loss_weight = input_to_quantize_commit_loss_weight
        self.commitment_weight = commitment_weight
        self.frozen_codebook_dim = frozen_codebook_dim
        super().__init__(**kwargs)

    def validate(self):
        _positive_int(self, "dim")
        _positive_int(self, "codebook_size")
        if self.frozen_codebook_dim is not None:
            _positive_int(self, "frozen_codebook_dim")
        _non_negative(self, "input_to_quantize_commit_loss_weight")
        _non_negative(self, "commitment_weight")
        self.codebook_transform = normalize_transform_spec(self.codebook_transform)

    @property
    def resolved_frozen_codebook_dim(self) -> int:
        return self.dim if self.frozen_codebook_dim is None else self.frozen_codebook_dim


@dataclass
class SimVQOutput(QuantizerOutput):
    """Output of [`SimVQ`]: `quantized`, `indices` and the weighted commitment `loss` (vqp's tuple order)."""

    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices", "loss")


def _split_transform_module(kwargs: dict) -> nn.Module | None:
    """A `codebook_transform` module in `kwargs` replaced by its JSON spec; the module (to adopt its weights) or
    `None`."""
    module = kwargs.get("codebook_transform")
    if not isinstance(module, nn.Module):
        return None
    kwargs["codebook_transform"] = transform_spec_of(module)
    return module


@register_quantizer
class SimVQ(QuantizerModel):
    """SimVQ: nearest code in a learned linear (or MLP) image of a frozen random codebook.

    Accepts vqp's positional arguments (`SimVQ(dim, codebook_size)`), a [`SimVQConfig`], or keyword fields.
    `codebook_transform` may be an `nn.Linear`/`nn.Sequential` (its weights are kept, its structure stored as a
    spec); `init_fn` maps the initial frozen table (the table itself is saved, so it is not a config field).

    Example:
        >>> vq = SimVQ(16, 64)
        >>> out = vq(torch.randn(2, 10, 16))
        >>> out.quantized.shape, out.indices.shape
        (torch.Size([2, 10, 16]), torch.Size([2, 10]))
    """

    config_class = SimVQConfig

    def __init__(self, config: SimVQConfig | None = None, init_fn: Callable[[Tensor], Tensor] | None = None,
                 **kwargs):
        if init_fn is not None and not callable(init_fn):
            raise TypeError(f"init_fn must be callable, got {type(init_fn).__name__}")
        module = _split_transform_module(kwargs)
        super().__init__(config, **kwargs)
        c = self.config
        self.codebook_size, self.dim, self.channel_first = c.codebook_size, c.dim, c.channel_first
        self.rotation_trick = c.rotation_trick
        self.input_to_quantize_commit_loss_weight = c.input_to_quantize_commit_loss_weight
        self.commitment_weight = c.commitment_weight
        self.check_inputs = c.check_inputs
        frozen_dim = c.resolved_frozen_codebook_dim
        table = torch.randn(c.codebook_size, frozen_dim) * frozen_dim**-0.5
        if init_fn is not None:
            table = init_fn(table)
        self.register_buffer("frozen_codebook", table)
        self.code_transform = build_code_transform(c.codebook_transform, frozen_dim, c.dim)
        if module is not None:
            self._adopt_transform(module)
        self.post_init()

    def _adopt_transform(self, module: nn.Module) -> None:
        try:
            self.code_transform.load_state_dict(module.state_dict())
        except RuntimeError as err:
            raise ValueError(f"codebook_transform must map frozen_codebook_dim={self.frozen_codebook.shape[1]} to "
                             f"dim={self.dim}: {err}") from None

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "SimVQ":
        """An hf_vq SimVQ with a vector-quantize-pytorch `SimVQ`'s config and state (frozen table, transform)."""
        model = cls(SimVQConfig(**sim_vq_fields_of(module)))
        model.load_state_dict(module.state_dict(), strict=True)
        return model

    # -- codebook ---------------------------------------------------------------------------------

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook `(K, dim)`: the transform of the frozen table (differentiable)."""
        return self.code_transform(self.frozen_codebook)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes for `indices (b, ...)`: `(b, ..., dim)`, or `(b, dim, ...)` with `channel_first`."""
        _check_code_indices(indices, self.codebook_size)
        codes = F.embedding(indices, self.codebook)
        return codes.movedim(-1, 1) if self.channel_first else codes

    # -- forward ----------------------------------------------------------------------------------

    def quantize_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`(quantized, indices, loss)` for `(b, n, dim)` tokens: the nearest transformed code per token, the
        weighted commitment loss, and the rotation-trick (or straight-through) output in the tokens' dtype."""
        codebook = self.codebook
        indices, _ = nearest_code(tokens.reshape(-1, tokens.shape[-1]), codebook.detach())
        indices = indices.view(tokens.shape[:-1])
        codes = F.embedding(indices, codebook).to(tokens.dtype)
        loss = (F.mse_loss(tokens.detach(), codes)
                + F.mse_loss(tokens, codes.detach()) * self.input_to_quantize_commit_loss_weight)
        quantized = rotate_to(tokens, codes) if self.rotation_trick else straight_through(tokens, codes)
        return quantized, indices, loss * self.commitment_weight

    def forward(self, x: Tensor, return_dict: bool | None = None) -> SimVQOutput | tuple:
        """Quantize `x` (`(b, ..., dim)`, or `(b, dim, ...)` with `channel_first`). Returns [`SimVQOutput`], or
        `(quantized, indices, loss)` with `return_dict=False`."""
        if self.check_inputs:
            check_features(x, self.dim, name="x")
        layout = TokenLayout.of(x, channel_first=self.channel_first)
        tokens = layout.to_tokens(x)
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"expected feature dim {self.dim}, got {tokens.shape[-1]} (input shape {tuple(x.shape)}, "
                             f"channel_first={self.channel_first})")
        quantized, indices, loss = self.quantize_tokens(tokens)
        out = SimVQOutput(quantized=layout.from_tokens(quantized), indices=_indices_to_layout(indices, layout),
                          loss=loss)
        return self._output(out, return_dict)


def _indices_to_layout(indices: Tensor, layout: TokenLayout) -> Tensor:
    """`(b, n)` token indices back to `(b, *spatial)` (`(b,)` for a `(b, d)` input)."""
    if layout.single_token:
        return indices.squeeze(1)
    return indices.reshape(indices.shape[0], *layout.spatial)


def _check_code_indices(indices: Tensor, codebook_size: int, allow_padding: bool = False) -> None:
    """Integer indices in `[0, K)` (`-1` also allowed where it marks a dropped level)."""
    if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    low = -1 if allow_padding else 0
    lo, hi = int(indices.min()), int(indices.max())
    if lo < low or hi >= codebook_size:
        raise ValueError(f"indices must be in [{low}, {codebook_size}), got range [{lo}, {hi}]")


def sim_vq_fields_of(module) -> dict[str, Any]:
    """The SimVQConfig fields a vector-quantize-pytorch `SimVQ` was built with."""
    transform = module.code_transform
    spec = transform_spec_of(transform)
    last = transform if isinstance(transform, nn.Linear) else transform[-1]
    dim, frozen_dim = last.out_features, module.frozen_codebook.shape[1]
    return dict(dim=dim, codebook_size=module.codebook_size, codebook_transform=spec,
                channel_first=bool(module.channel_first), rotation_trick=bool(module.rotation_trick),
                input_to_quantize_commit_loss_weight=module.input_to_quantize_commit_loss_weight,
                commitment_weight=module.commitment_weight,
                frozen_codebook_dim=None if frozen_dim == dim else frozen_dim)


# ----------------------------------------------------------------------------------------------------
# ResidualSimVQ


class ResidualSimVQConfig(QuantizerConfig):
    """Configuration of [`ResidualSimVQ`] (names and defaults of vector-quantize-pytorch 1.32).

    Args:
        dim (`int`), num_quantizers (`int`), codebook_size (`int`): feature dim, levels, codes per level.
        heads (`int`, defaults to 1): must be 1 (as vqp: residual SimVQ has no multi-head codes).
        quantize_dropout (`bool`), quantize_dropout_cutoff_index (`int`), quantize_dropout_multiple_of (`int`):
            in training, drop every level after a random cutoff (indices -1, loss 0), as vqp's ResidualSimVQ.
        channel_first (`bool`, defaults to `False`): input is `(b, d, ...)`.
        rotation_trick (`bool`, defaults to `True`): rotation-trick gradients in every level.
        codebook_transform, input_to_quantize_commit_loss_weight, commitment_weight, frozen_codebook_dim: each
            level's [`SimVQConfig`] fields (vqp's `**sim_vq_kwargs`).
    """

    model_type = "hf_vq_residual_sim_vq"
    vqp_positional = ()  # keyword-only in vqp 1.32

    def __init__(
        self,
        dim: int = 256,
        num_quantizers: int = 4,
        codebook_size: int = 512,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool = False,
        rotation_trick: bool = True,
        codebook_transform: dict | None = None,
        input_to_quantize_commit_loss_weight: float = 0.25,
        commitment_weight: float = 1.0,
        frozen_codebook_dim: int | None = None,
        **kwargs,
    ):
        self.dim = dim
        self.num_quantizers = num_quantizers
        self.codebook_size = codebook_size
        self.heads = heads
        self.quantize_dropout = quantize_dropout
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.channel_first = channel_first
        self.rotation_trick = rotation_trick
        self.codebook_transform = codebook_transform
        self.input_to_quantize_commit_loss_weight = input_to_quantize_commit_loss_weight
        self.commitment_weight = commitment_weight
        self.frozen_codebook_dim = frozen_codebook_dim
        super().__init__(**kwargs)

    def validate(self):
        _positive_int(self, "num_quantizers")
        _positive_int(self, "quantize_dropout_multiple_of")
        if self.heads != 1:
            raise ValueError(f"heads must be 1 (residual SimVQ is not compatible with multi-headed codes), "
                             f"got {self.heads!r}")
        cutoff = self.quantize_dropout_cutoff_index
        if not isinstance(cutoff, int) or isinstance(cutoff, bool) or not 0 <= cutoff < self.num_quantizers:
            raise ValueError(f"quantize_dropout_cutoff_index must be an int in [0, num_quantizers="
                             f"{self.num_quantizers}), got {cutoff!r}")
        self.level_config()  # validates the per-level fields

    def level_config(self) -> SimVQConfig:
        return SimVQConfig(
            dim=self.dim, codebook_size=self.codebook_size, codebook_transform=self.codebook_transform,
            channel_first=self.channel_first, rotation_trick=self.rotation_trick,
            input_to_quantize_commit_loss_weight=self.input_to_quantize_commit_loss_weight,
            commitment_weight=self.commitment_weight, frozen_codebook_dim=self.frozen_codebook_dim,
            check_inputs=False)


@dataclass
class ResidualSimVQOutput(QuantizerOutput):
    """Output of [`ResidualSimVQ`]: summed `quantized`, `indices (b, ..., num_quantizers)` (-1 for dropped
    levels), per-level `loss (num_quantizers,)`, and with `return_all_codes` every level's codes
    `(num_quantizers, b, ..., dim)` (channel-first: `(num_quantizers, b, dim, ...)`)."""

    all_codes: Tensor | None = None

    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices", "loss")

    def to_tuple_output(self) -> tuple:
        base = super().to_tuple_output()
        return base if self.all_codes is None else (*base, self.all_codes)


@register_quantizer
class ResidualSimVQ(QuantizerModel):
    """Residual SimVQ (Algorithm 1 of arXiv:2107.03312 over SimVQ levels), as vqp 1.32's `ResidualSimVQ`.

    Example:
        >>> rq = ResidualSimVQ(dim=16, num_quantizers=3, codebook_size=64)
        >>> out = rq(torch.randn(2, 10, 16))
        >>> out.quantized.shape, out.indices.shape, out.loss.shape
        (torch.Size([2, 10, 16]), torch.Size([2, 10, 3]), torch.Size([3]))
    """

    config_class = ResidualSimVQConfig

    def __init__(self, config: ResidualSimVQConfig | None = None, init_fn: Callable[[Tensor], Tensor] | None = None,
                 **kwargs):
        if isinstance(kwargs.get("codebook_transform"), nn.Module):
            raise ValueError("ResidualSimVQ: pass codebook_transform as a spec dict ({'hidden_dims': [...], "
                             "'activation': ..., 'bias': ...}); a module instance would be one transform tied across "
                             "all levels, which a config cannot describe")
        super().__init__(config, **kwargs)
        c = self.config
        self.num_quantizers, self.codebook_size, self.dim = c.num_quantizers, c.codebook_size, c.dim
        self.channel_first, self.check_inputs = c.channel_first, c.check_inputs
        self.quantize_dropout = bool(c.quantize_dropout) and c.num_quantizers > 1
        self.quantize_dropout_cutoff_index = c.quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = c.quantize_dropout_multiple_of
        level = c.level_config()
        self.layers = nn.ModuleList(SimVQ(level, init_fn=init_fn) for _ in range(c.num_quantizers))
        self.post_init()

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "ResidualSimVQ":
        """An hf_vq ResidualSimVQ with a vector-quantize-pytorch `ResidualSimVQ`'s config and every level's state."""
        layers = list(module.layers)
        if len({id(layer.code_transform) for layer in layers}) < len(layers):
            raise ValueError("the vqp module's levels share one codebook_transform module (tied weights), which "
                             "hf_vq's ResidualSimVQ does not support")
        fields = sim_vq_fields_of(layers[0])
        fields.pop("codebook_size")
        config = ResidualSimVQConfig(
            num_quantizers=module.num_quantizers, codebook_size=module.codebook_size,
            quantize_dropout=bool(module.quantize_dropout),
            quantize_dropout_cutoff_index=module.quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=module.quantize_dropout_multiple_of, **fields)
        model = cls(config)
        model.load_state_dict(module.state_dict(), strict=True)
        return model

    @property
    def codebooks(self) -> Tensor:
        """Every level's implicit codebook, `(num_quantizers, K, dim)`."""
        return torch.stack([layer.codebook for layer in self.layers])

    def dropout_cutoff(self, device, seed: int | None = None) -> int | None:
        """The last level kept in this training step (None: all), from a seed drawn on rank 0 and broadcast, so
        every process drops the same levels (vqp 1.32 draws its dropout seed as `randint(0, 10_000)` too)."""
        if not (self.training and self.quantize_dropout):
            return None
        if seed is None:
            drawn = torch.randint(0, 10_000, (), device=device)
            seed = int(distributed.broadcast_(drawn))
        cutoff = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        multiple = self.quantize_dropout_multiple_of
        if multiple != 1:
            cutoff = math.ceil((cutoff + 1) / multiple) * multiple - 1
        return cutoff

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None,
                return_dict: bool | None = None) -> ResidualSimVQOutput | tuple:
        """Quantize `x` (`(b, ..., dim)`, or `(b, dim, ...)` with `channel_first`) level by level on the residual.
        Returns [`ResidualSimVQOutput`], or `(quantized, indices, losses[, all_codes])` with `return_dict=False`."""
        if self.check_inputs:
            check_features(x, self.dim, name="x")
        layout = TokenLayout.of(x, channel_first=self.channel_first)
        residual = layout.to_tokens(x)
        if residual.shape[-1] != self.dim:
            raise ValueError(f"expected feature dim {self.dim}, got {residual.shape[-1]} (input shape "
                             f"{tuple(x.shape)}, channel_first={self.channel_first})")
        cutoff = self.dropout_cutoff(x.device, rand_quantize_dropout_fixed_seed)
        total, all_indices, losses = torch.zeros_like(residual), [], []
        for level, layer in enumerate(self.layers):
            if cutoff is not None and level > cutoff:
                all_indices.append(torch.full(residual.shape[:-1], -1, dtype=torch.long, device=x.device))
                losses.append(torch.zeros((), device=x.device, dtype=x.dtype))
                continue
            quantized, indices, loss = layer.quantize_tokens(residual)
            residual = residual - quantized.detach()
            total = total + quantized
            all_indices.append(indices)
            losses.append(loss)
        indices = torch.stack(all_indices, dim=-1)  # (b, n, q)
        indices = indices.squeeze(1) if layout.single_token else indices.reshape(x.shape[0], *layout.spatial, -1)
        out = ResidualSimVQOutput(quantized=layout.from_tokens(total), indices=indices, loss=torch.stack(losses))
        if return_all_codes:
            out.all_codes = self.get_codes_from_indices(indices)
        return self._output(out, return_dict)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Every level's codes for `indices (b, ..., q)` with `q <= num_quantizers` (fewer only with quantize
        dropout) and -1 for dropped levels, which give zeros (as vqp 1.32): `(num_quantizers, b, ..., dim)`,
        channel-first `(num_quantizers, b, dim, ...)`."""
        _check_code_indices(indices, self.codebook_size, allow_padding=True)
        given = indices.shape[-1]
        if given > self.num_quantizers:
            raise ValueError(f"indices have {given} levels on their last axis, the model has {self.num_quantizers}")
        if given < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("indices with fewer levels than num_quantizers need quantize_dropout=True")
            indices = F.pad(indices, (0, self.num_quantizers - given), value=-1)
        dropped = indices < 0
        safe = indices.clamp(min=0)
        codes = torch.stack([F.embedding(safe[..., q], layer.codebook) for q, layer in enumerate(self.layers)])
        codes = codes.masked_fill(dropped.movedim(-1, 0).unsqueeze(-1), 0.0)
        return codes.movedim(-1, 2) if self.channel_first else codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The summed output for `indices (b, ..., q)` (the forward's `quantized`, up to float rounding)."""
        return self.get_codes_from_indices(indices).sum(0)
