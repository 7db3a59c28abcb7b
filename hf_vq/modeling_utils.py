"""The Hugging Face contract every hf_vq quantizer follows.

One place for: the config base (`QuantizerConfig`), the model base (`QuantizerModel`), the output
dataclass, input validation, shape handling (channel-first <-> `(b, n, d)`) and Auto registration.
Model families in `hf_vq/models/` subclass these and only compose ops.
"""

from __future__ import annotations

import inspect
import itertools
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_NAME

from .framework_overrides import FastModelOutput
from .ops import graphs
from .ops.utils import autocast_off  # noqa: F401  (re-exported: the models import it from here)

# Keys that PretrainedConfig itself writes into / reads from config.json; anything else a quantizer
# config does not declare is a user error (a typo must not silently become a no-op attribute).
_HF_CONFIG_KEYS = set(inspect.signature(PretrainedConfig.__init__).parameters) | {
    "name_or_path",
    "model_type",
    "transformers_version",
    "architectures",
    "output_attentions",
    "torch_dtype",
    "dtype",
    "use_return_dict",
    "attn_implementation",
    "tie_word_embeddings",
}


class QuantizerConfig(PretrainedConfig):
    """Base config of every hf_vq quantizer.

    Subclasses declare their hyper-parameters as explicit `__init__` arguments, assign them, call
    `super().__init__(**kwargs)` and implement `validate()`. Unknown fields raise a `ValueError`.

    Args:
        check_inputs (`bool`, *optional*, defaults to `True`):
            Validate inputs' metadata in `forward` (type, dtype, rank, feature dim, empty). Non-finite values are
            refused before any state update whatever this says.
    """

    model_type = "hf_vq_quantizer"
    # The model constructor's positional parameters in its reference's order (vqp 1.32), bound to keyword arguments
    # by `bind_positional_args`; they may name model-only arguments too (callables, modules). `()`: keyword arguments
    # only, as vqp's keyword-only classes. `None`: the model's own `__init__` handles its positional arguments.
    vqp_positional: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, check_inputs: bool = True, **kwargs):
        self.check_inputs = bool(check_inputs)
        check_model_type(type(self), kwargs.get("model_type"))
        unknown = sorted(k for k in kwargs if k not in _HF_CONFIG_KEYS and not k.startswith("_"))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} got unknown field(s) {unknown}; "
                f"known fields: {sorted(self.field_names())}"
            )
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the field and the allowed values. Subclasses extend this."""

    @classmethod
    def field_names(cls) -> list[str]:
        """The quantizer's own hyper-parameters (not the generic transformers ones)."""
        names = []
        for klass in cls.__mro__:
            if klass is PretrainedConfig:
                break
            if "__init__" in vars(klass):
                names += [
                    n
                    for n, p in inspect.signature(klass.__init__).parameters.items()
                    if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in names
                ]
        return names

    # Fields whose absence from a saved config.json cannot change what the model computes.
    optional_fields: ClassVar[tuple[str, ...]] = ("check_inputs",)

    def to_diff_dict(self) -> dict[str, Any]:
        """What `save_pretrained` writes: every hyper-parameter (and `return_dict`), not only those that differ
        from a default, so a config.json states the whole model and a default changed later cannot alter it."""
        diff = super().to_diff_dict()
        full = self.to_dict()
        for name in [*self.field_names(), "return_dict"]:
            diff[name] = full.get(name, getattr(self, name))
        return diff

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """Build the config from a saved config.json dict; one of another quantizer (`model_type`), or one that
        lacks a field which decides what the model computes, is a `ValueError` naming it."""
        check_model_type(cls, config_dict.get("model_type"))
        if "model_type" in config_dict:  # a saved config (save_pretrained / to_dict), not hand-written kwargs
            missing = [n for n in cls.field_names() if n not in config_dict and n not in cls.optional_fields
                       and n not in kwargs]
            if missing:
                raise ValueError(f"config.json of {cls.__name__} lacks the field(s) {missing}: they decide what the "
                                 "model computes, so they are not filled in with defaults; add them to config.json")
        return super().from_dict(config_dict, **kwargs)

    def to_kwargs(self) -> dict[str, Any]:
        """The quantizer's hyper-parameters as plain kwargs: `type(config)(**config.to_kwargs())` rebuilds it."""
        return {name: getattr(self, name) for name in self.field_names()}


@dataclass
class QuantizerOutput(FastModelOutput):
    """Output of a quantizer forward pass.

    Args:
        quantized (`torch.Tensor`): the quantized features, in the input's layout and dtype.
        indices (`torch.Tensor`): the code indices, `(b, *spatial)` or `(b, *spatial, num_codebooks)`.
        loss (`torch.Tensor`, *optional*): the auxiliary loss to add to the training objective.
    """

    quantized: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    loss: torch.Tensor | None = None

    # the order of the plain tuple the reference implementation returns (`return_dict=False`; vqp 1.32, CogVideo sgm)
    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices", "loss")

    def to_tuple_output(self) -> tuple:
        return tuple(getattr(self, name) for name in self.tuple_fields)


class PretrainedIOMixin:
    """`from_pretrained` / `save_pretrained` additions shared by the transformers and diffusers faces: a
    quantizer loads exactly or not at all (a missing, unexpected or mis-shaped tensor is an error naming the key
    and both shapes, where the frameworks only log it), derived buffers are rebuilt after a (meta-device) load,
    stateless quantizers get a weights file, and a file in place of the target folder is an error."""

    weights_name: ClassVar[str] = SAFE_WEIGHTS_NAME

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        wants_info = kwargs.pop("output_loading_info", False)
        tolerate_shapes = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  ignore_mismatched_sizes=True, **kwargs)
        except OSError as e:
            raise offline_error(pretrained_model_name_or_path, e) or e
        check_loading_info(model, info, pretrained_model_name_or_path, tolerate_shapes)
        own_storage(model)
        rebuild_derived_buffers(model)
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained: {save_directory!r} is a file; pass a folder to save the model into")
        super().save_pretrained(save_directory, *args, **kwargs)
        write_empty_weights_if_stateless(self, os.path.join(save_directory, self.weights_name))


def check_loading_info(model: torch.nn.Module, info: dict, source, tolerate_shapes: bool = False) -> None:
    """Raise `ValueError` for every tensor that `from_pretrained` did not load exactly (transformers and
    diffusers initialize it afresh and only log a report): missing and unexpected keys, and shape mismatches
    unless the caller passed `ignore_mismatched_sizes=True`."""
    expected = model.state_dict()
    problems = [f"{key!r} is missing from the weights file (the model expects shape {tuple(expected[key].shape)})"
                for key in sorted(info.get("missing_keys") or ())]
    problems += [f"{key!r} in the weights file is not a tensor of {type(model).__name__}"
                 for key in sorted(info.get("unexpected_keys") or ())]
    if not tolerate_shapes:
        problems += [f"{key!r} has shape {tuple(found)} in the weights file, the model expects {tuple(wanted)}"
                     for key, found, wanted in sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])]
    problems += [str(msg) for msg in info.get("error_msgs") or ()]
    if problems:
        raise ValueError(f"cannot load {type(model).__name__} from {str(source)!r} exactly: " + "; ".join(problems))


def offline_error(source, error: OSError) -> OSError | None:
    """A clear error for a Hub repo id that is not in the local cache while the Hub is offline (`HF_HUB_OFFLINE`);
    None when that is not the situation."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    if not offline or os.path.exists(str(source)) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)):
        return None  # online, or a local path: the framework's own message says what is wrong
    return OSError(f"cannot load {str(source)!r}: the Hugging Face Hub is offline (HF_HUB_OFFLINE=1) and this repo "
                   f"is not in the local cache ({constants.HF_HUB_CACHE}). Download it once while online, or pass a "
                   f"local folder. ({error})")


def bind_positional_args(cls: type, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """`(args, kwargs)` for `cls.__init__`: positional values named by `cls.config_class.vqp_positional`, in order,
    moved into `kwargs`. A config as the only positional argument (what `from_pretrained` passes) is kept.

    Raises `TypeError` for more values than names, a name given twice, or a config mixed with positional values.
    """
    order = cls.config_class.vqp_positional
    if order is None or not args:
        return args, kwargs
    if isinstance(args[0], PretrainedConfig) or "config" in kwargs:
        if len(args) > 1 or ("config" in kwargs and args):
            raise TypeError(f"{cls.__name__}: pass either a config or vqp's positional arguments, not both")
        return args, kwargs
    if not order:
        raise TypeError(f"{cls.__name__} takes keyword arguments only (as vqp 1.32), or a "
                        f"{cls.config_class.__name__}")
    if len(args) > len(order):
        raise TypeError(f"{cls.__name__} takes at most {len(order)} positional arguments ({', '.join(order)}), "
                        f"got {len(args)}")
    bound = dict(kwargs)
    for name, value in zip(order, args):
        if name in bound:
            raise TypeError(f"{cls.__name__} got multiple values for argument {name!r}")
        bound[name] = value
    return (), bound


class PositionalArgsMeta(type):
    """Binds reference-style positional constructor arguments before any `__init__` runs.

    A metaclass rather than code in `QuantizerModel.__init__`: a subclass whose `__init__` takes extra model-only
    parameters after `config` (`VectorQuantize(config, in_place_codebook_optimizer)`) would otherwise receive vqp's
    second positional value in that parameter before the base class could see it.
    """

    def __call__(cls, *args, **kwargs):
        args, kwargs = bind_positional_args(cls, args, kwargs)
        return super().__call__(*args, **kwargs)


class QuantizerModel(PretrainedIOMixin, PreTrainedModel, metaclass=PositionalArgsMeta):
    """Base model of every hf_vq quantizer: a `PreTrainedModel` built from its config or from kwargs.

    `Model(config)` and `Model(**config_kwargs)` are equivalent; where the reference takes positional arguments
    (`FSQ([8, 5, 5, 5])`, `VectorQuantize(256, 512)`), so does the model: their names, in the reference's order, are
    the config class's `vqp_positional`.

    Derived tables (implicit codebooks, bit masks, bases) live in non-persistent buffers rebuilt by
    `reset_derived_buffers()`, which runs after `from_pretrained`: transformers materializes models from the meta
    device, which leaves non-persistent buffers as uninitialized memory.
    """

    config_class = QuantizerConfig
    base_model_prefix = "quantizer"
    main_input_name = "x"
    _supports_sdpa = False

    def __init__(self, config: QuantizerConfig | None = None, **kwargs):
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            raise ValueError(f"{type(self).__name__}: pass either a config or keyword arguments, not both")
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes keyword arguments or a {self.config_class.__name__} "
                            f"positionally, got {type(config).__name__}")
        super().__init__(config)

    # Parameter-free quantizers (FSQ without projections) exist: fall back to buffers, then defaults.
    @property
    def dtype(self) -> torch.dtype:
        for t in itertools.chain(self.parameters(), self.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for t in itertools.chain(self.parameters(), self.buffers()):
            return t.device
        return torch.device("cpu")

    def reset_derived_buffers(self) -> None:
        """Recompute non-persistent buffers from the config. Override where a model has any."""

    # -- calls replayed as CUDA graphs ------------------------------------------------------------------

    # the keyword arguments a replayed call may take (their values are part of its signature)
    graph_kwargs: ClassVar[frozenset[str]] = frozenset()

    def graphable(self) -> bool:
        """Whether a plain call (`model(x)`) may be replayed as CUDA graphs now (`ops.graphs.GraphedCall`): a
        family opts in where its config and state make the call capturable (no host reads, no random numbers, no
        Python state that the call changes other than through `ops.graphs.host_effect`)."""
        return False

    def __call__(self, *args, **kwargs):
        if self.graph_kwargs and graphs.replayable(self, args, kwargs, self.graph_kwargs) and self.graphable():
            return graphs.call_graphed(self, args[0], kwargs)
        return super().__call__(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        graphs.drop_graphs(self)  # (their memory belongs to the state before the move)
        return super()._apply(fn, recurse)

    def _init_weights(self, module):
        if isinstance(module, QuantizerModel):
            module.reset_derived_buffers()

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        from .hub import write_model_card  # hub imports this module

        if kwargs.get("is_main_process", True):
            write_model_card(self, save_directory)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, tags: list[str] | None = None, **save_kwargs):
        """Save into a temporary folder with hf_vq's model card (naming `repo_id`, with `tags` added) and upload
        it with `huggingface_hub.upload_folder`; a card on the Hub that hf_vq did not write is kept.
        Returns the `CommitInfo` of the upload. `save_kwargs` go to `save_pretrained`."""
        from .hub import push_model_to_hub

        return push_model_to_hub(self, repo_id, commit_message=commit_message, commit_description=commit_description,
                                 private=private, token=token, revision=revision, create_pr=create_pr, tags=tags,
                                 save_kwargs=save_kwargs)

    def example_input_shape(self) -> tuple[int, ...]:
        """A valid input shape for this quantizer (used by the model card's usage snippet)."""
        c = self.config
        candidates = ("num_hiddens", "effective_dim", "dim", "input_dim", "e_dim", "embedding_dim")
        dim = next(v for v in (getattr(c, n, None) for n in candidates) if v is not None)
        if getattr(c, "accept_3d_fmap", False):
            return (1, dim, 2, 4, 4)
        # sgm / taming quantizers (their configs carry `remap`) take (b, c, h, w) feature maps
        if any(getattr(c, n, False) for n in ("accept_image_fmap", "is_channel_first")) or hasattr(c, "remap"):
            return (1, dim, 4, 4)
        if not getattr(c, "channel_last", True) or getattr(c, "channel_first", False):
            return (1, dim, 16)
        return (1, 16, dim)

    def _output(self, output: QuantizerOutput, return_dict: bool | None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple_output()


def write_empty_weights_if_stateless(model: torch.nn.Module, weights_path: str) -> None:
    """transformers and diffusers write no weights file for an empty state dict, then refuse to load the
    folder; a parameter-free quantizer (FSQ without projections) gets an empty safetensors file instead."""
    if not model.state_dict() and not os.path.exists(weights_path):
        save_file({}, weights_path, metadata={"format": "pt"})


def own_storage(module: torch.nn.Module) -> None:
    """Give every parameter and buffer of `module` whose memory PyTorch's allocator did not lay out (a view into a
    larger storage, or memory at an address not aligned to 64 bytes, as diffusers' safetensors loading can hand
    out) a contiguous copy of its own: vectorized kernels then round exactly as they did for the saved model, and
    nothing keeps the loaded file's buffer alive."""
    with torch.no_grad():
        for sub in module.modules():
            for tensors in (sub._parameters, sub._buffers):
                for name, t in tensors.items():
                    if t is not None and (t.data_ptr() % 64 or t.untyped_storage().nbytes() != t.nbytes):
                        if isinstance(t, torch.nn.Parameter):
                            t.data = t.data.clone(memory_format=torch.contiguous_format)
                        else:
                            tensors[name] = t.clone(memory_format=torch.contiguous_format)


def rebuild_derived_buffers(module: torch.nn.Module) -> None:
    """Run `reset_derived_buffers` on every hf_vq quantizer inside `module` (after a meta-device load)."""
    for sub in module.modules():
        if isinstance(sub, QuantizerModel):
            with torch.no_grad():
                sub.reset_derived_buffers()


# --------------------------------------------------------------------------------------------------
# registration


def check_model_type(config_cls: type, model_type: str | None) -> None:
    """A config.json whose `model_type` belongs to another quantizer cannot build `config_cls`: say so."""
    own = getattr(config_cls, "model_type", None)
    if model_type is None or model_type == own or own == QuantizerConfig.model_type:
        return
    other = QUANTIZER_CLASSES.get(model_type)
    owner = f"{other.config_class.__name__} ({other.__name__})" if other is not None else "no hf_vq quantizer"
    raise ValueError(f"config.json has model_type {model_type!r}, which belongs to {owner}, not to "
                     f"{config_cls.__name__} (model_type {own!r}); load it with "
                     f"{other.__name__ if other is not None else 'the class it was saved from'} or AutoModel")


QUANTIZER_CLASSES: dict[str, type[QuantizerModel]] = {}


def register_quantizer(model_cls: type[QuantizerModel]) -> type[QuantizerModel]:
    """Class decorator: register with AutoConfig/AutoModel and with `build_quantizer` (by model_type and name)."""
    config_cls = model_cls.config_class
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModel.register(config_cls, model_cls, exist_ok=True)
    QUANTIZER_CLASSES[config_cls.model_type] = model_cls
    QUANTIZER_CLASSES[model_cls.__name__] = model_cls
    return model_cls


def build_quantizer(quantizer_type: str, config: dict[str, Any] | QuantizerConfig | None = None) -> QuantizerModel:
    """Build any hf_vq quantizer from its type (class name such as `"FSQ"`, or model_type) and config."""
    if quantizer_type not in QUANTIZER_CLASSES:
        raise ValueError(f"unknown quantizer_type {quantizer_type!r}; known: {sorted(QUANTIZER_CLASSES)}")
    model_cls = QUANTIZER_CLASSES[quantizer_type]
    if isinstance(config, QuantizerConfig):
        return model_cls(config)
    return model_cls(**dict(config or {}))


# --------------------------------------------------------------------------------------------------
# input validation and shape handling


def check_features(x: torch.Tensor, dim: int, *, name: str = "input") -> None:
    """Validate a feature tensor's metadata: a floating point tensor of rank 2..5, non-empty. No value is read
    (no device sync): non-finite values are refused where they would do harm, on the statistics of a state update
    (`hf_vq.ops.ema.require_finite`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    if x.ndim < 2 or x.ndim > 5:
        raise ValueError(
            f"{name} must have rank 2 (b, d), 3 (b, n, d), 4 (b, d, h, w) or 5 (b, d, t, h, w); "
            f"got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")


def check_indices(indices: torch.Tensor, codebook_size: int, *, codebook_axis: int | None = None) -> None:
    """Validate code indices: integer dtype, in `[0, codebook_size)`, and (optionally) a trailing codebook axis."""
    if indices.is_floating_point():
        raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if codebook_axis is not None and indices.shape[-1] != codebook_axis:
        raise ValueError(f"indices must end with a codebook axis of size {codebook_axis}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= codebook_size):
        raise ValueError(
            f"indices must be in [0, {codebook_size}), got range [{int(indices.min())}, {int(indices.max())}]"
        )


@dataclass
class TokenLayout:
    """How a feature tensor maps to `(b, n, d)` tokens and back.

    Channel-first `(b, d, *spatial)` for rank >= 4 (images, video) unless `channel_first=False`;
    `(b, n, d)` for rank 3 (or `(b, d, n)` with `channel_first=True`); `(b, d)` is one token per row.
    `strided_tokens`: channel-first input maps to a transposed view (no copy; the token rows are strided) and the
    output back to a contiguous channel-first tensor (vqp 1.32's `VectorQuantize` layout); otherwise the tokens
    are contiguous and the output a channel-first view of them.
    """

    spatial: tuple[int, ...]
    channel_first: bool
    single_token: bool
    is_tokens: bool = False  # the input already is `(b, n, d)`: every map is the identity (no view op per call)
    strided_tokens: bool = False

    @classmethod
    def of(cls, x: torch.Tensor, channel_first: bool | None = None, strided_tokens: bool = False) -> "TokenLayout":
        if channel_first is None:
            channel_first = x.ndim >= 4
        single = x.ndim == 2
        spatial = tuple(x.shape[2:]) if channel_first else tuple(x.shape[1:-1])
        return cls(spatial=spatial, channel_first=channel_first and not single, single_token=single,
                   is_tokens=x.ndim == 3 and not channel_first, strided_tokens=strided_tokens)

    @classmethod
    def of_fmap(cls, x: torch.Tensor, *, channel_last: bool = True, accept_image_fmap: bool = False,
                accept_3d_fmap: bool = False) -> "TokenLayout":
        """The layout of vqp 1.32's `VectorQuantize` / `ResidualVQ` flags: `(b, d)` one token per row; with
        `accept_image_fmap` / `accept_3d_fmap` a `(b, d, h, w)` / `(b, d, t, h, w)` feature map; else `(b, n, d)`,
        or `(b, d, n)` with `channel_last=False`. Raises `ValueError` for another rank."""
        if x.ndim == 2:
            return cls.of(x)
        if accept_image_fmap or accept_3d_fmap:
            want = 4 if accept_image_fmap else 5
            if x.ndim != want:
                raise ValueError(f"expected a rank-{want} feature map (b, d, ...), got shape {tuple(x.shape)}")
            return cls.of(x, channel_first=True, strided_tokens=True)
        if x.ndim != 3:
            raise ValueError(
                f"expected (b, n, d) input (or set accept_image_fmap / accept_3d_fmap), got shape {tuple(x.shape)}"
            )
        return cls.of(x, channel_first=not channel_last, strided_tokens=True)

    def feature_dim(self, x: torch.Tensor) -> int:
        """The feature dim of input `x` in this layout."""
        return x.shape[1] if self.channel_first or self.single_token else x.shape[-1]

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_tokens:
            return x
        if self.single_token:
            return x.unsqueeze(1)
        if self.channel_first and self.strided_tokens:
            return x.flatten(2).transpose(1, 2)
        if self.channel_first:
            x = x.movedim(1, -1)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """`(b, n, d)` features back to the input layout."""
        if self.is_tokens:
            return t
        if self.single_token:
            return t.squeeze(1)
        if self.channel_first and self.strided_tokens:
            t = t.transpose(1, 2)
            return t if len(self.spatial) == 1 else t.reshape(t.shape[0], t.shape[1], *self.spatial)
        t = t.reshape(t.shape[0], *self.spatial, t.shape[-1])
        return t.movedim(-1, 1) if self.channel_first else t

    def indices_from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """`(b, n, *extra)` indices or per-token values to `(b, *spatial, *extra)`."""
        if self.is_tokens:
            return t
        if self.single_token:
            return t.squeeze(1)
        return t.reshape(t.shape[0], *self.spatial, *t.shape[2:])

    def mask_to_tokens(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """A `(b, *spatial)` or `(b, n)` boolean mask to `(b, n)`."""
        if mask is None:
            return None
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        return mask.reshape(mask.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# config helpers shared by the residual and grouped configs


def absorb_nested_kwargs(kwargs: dict[str, Any], nested: dict[str, Any] | None, fields) -> dict[str, Any]:
    """The options of a nested config (`vq_kwargs`, `fsq_kwargs`, ...): `nested` plus every entry of `kwargs` named
    in `fields`, which is removed from `kwargs` (so `ResidualVQConfig(decay=0.9)` means `vq_kwargs={"decay": 0.9}`)."""
    options = dict(nested or {})
    for name in [k for k in kwargs if k in fields]:
        options[name] = kwargs.pop(name)
    return options


def validate_quantize_dropout(config) -> None:
    """`num_quantizers`, `quantize_dropout_multiple_of` positive ints; `quantize_dropout_cutoff_index` a level."""
    for name in ("num_quantizers", "quantize_dropout_multiple_of"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= config.quantize_dropout_cutoff_index < config.num_quantizers:
        raise ValueError(f"quantize_dropout_cutoff_index must be in [0, {config.num_quantizers}), "
                         f"got {config.quantize_dropout_cutoff_index!r}")
