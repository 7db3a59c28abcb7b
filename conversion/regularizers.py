"""Key maps per regularizer type: an sgm/SAT (or taming, lucidrains) quantizer -> an hf_vq model.

One table, :data:`REGULARIZERS`, says for every supported source class (CogVideo sgm, taming, vqp 1.32) which hf_vq class takes its place and in
which input layout it is verified. Three functions use it:

- :func:`config_from_target` maps a YAML ``target`` + ``params`` to hf_vq config kwargs (the sgm classes keep
  sgm's argument names, so params pass through; only non-JSON values are translated);
- :func:`infer_from_state_dict` guesses the type and sizes from tensor names and shapes when there is no
  config, and says what it could not know;
- :func:`load_regularizer_weights` loads the tensors into the model after a key/shape check with a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping
import inspect
from dataclasses import dataclass

import torch

from hf_vq import LFQ

__all__ = [
    "REGULARIZERS",
    "Regularizer",
    "config_from_target",
    "infer_from_state_dict",
    "load_regularizer_weights",
    "resolve_target",
]


@dataclass(frozen=True)
class Regularizer:
    """One supported source quantizer class.

    Attributes:
        name: the source class name; also the hf_vq class that replaces it.
        sources: dotted module paths of the source classes (CogVideo ``sat/sgm``, taming, vector-quantize-pytorch).
        layout: verification input layout: ``"image"`` = ``(b, c, h, w)``, ``"tokens"`` = ``(b, n, d)``.
    """

    name: str
    sources: tuple[str, ...]
    layout: str


_SGM = "sgm.modules.autoencoding.regularizers"
_VQVAE = ("sgm.modules.autoencoding.vqvae.quantize", "taming.modules.vqvae.quantize")
_VQP = ("vector_quantize_pytorch",)

REGULARIZERS: dict[str, Regularizer] = {
    r.name: r
    for r in (
        Regularizer("VectorQuantizer", (f"{_SGM}.quantize", _SGM), "image"),
        Regularizer("EMAVectorQuantizer", (f"{_SGM}.quantize", _SGM), "image"),
        Regularizer("GumbelQuantizer", (f"{_SGM}.quantize", _SGM), "image"),
        Regularizer("VectorQuantizerWithInputProjection", (f"{_SGM}.quantize", _SGM), "tokens"),
        Regularizer("FSQ", (f"{_SGM}.finite_scalar_quantization", _SGM, *_VQP), "image"),
        Regularizer("LFQ", (f"{_SGM}.lookup_free_quantization", _SGM, *_VQP), "image"),
        Regularizer("VectorQuantizer2", _VQVAE, "image"),
        Regularizer("GumbelQuantize", _VQVAE, "image"),
        Regularizer("VectorQuantize", _VQP, "tokens"),
        Regularizer("LatentQuantize", _VQP, "tokens"),
    )
}

# Regularizers that are not quantizers: converting them makes no sense, say so instead of "unsupported".
_NOT_QUANTIZERS = ("DiagonalGaussianRegularizer", "IdentityRegularizer")


def resolve_target(target: str) -> Regularizer:
    """The table entry for a YAML ``target`` such as ``sgm.modules.autoencoding.regularizers.quantize.VectorQuantizer``.

    Accepts the source modules (and their sub-modules, e.g. ``vector_quantize_pytorch.vector_quantize_pytorch``),
    taming's ``VectorQuantizer`` (the same weights and search as ``VectorQuantizer2``) and hf_vq's own classes.

    Raises:
        ValueError: a non-quantizer regularizer, or a class this converter does not know.
    """
    module, _, name = str(target).rpartition(".")
    if name in _NOT_QUANTIZERS:
        raise ValueError(f"{target} is not a quantizer (it has no codebook): there is nothing to convert")
    if module.startswith("taming.") and name == "VectorQuantizer":
        name = "VectorQuantizer2"
    reg = REGULARIZERS.get(name)
    known = module == "hf_vq" or module.startswith("hf_vq.")
    if reg is not None and not known:
        known = any(module == s or module.startswith(s + ".") for s in reg.sources)
    if reg is None or not known:
        supported = sorted(f"{s}.{r.name}" for r in REGULARIZERS.values() for s in r.sources[:1])
        raise ValueError(f"unsupported regularizer target {target!r}; supported: {', '.join(supported)}")
    return reg


# --------------------------------------------------------------------------------------------------
# Config params -> hf_vq config kwargs


def _activation_name(value) -> str:
    """sgm's LFQ takes an nn.Module for `straight_through_activation`; YAML gives a `{target: torch.nn.X}` node."""
    if isinstance(value, Mapping):
        if value.get("params"):
            raise ValueError(f"straight_through_activation with params is not supported: {dict(value)}")
        value = str(value.get("target", "")).rpartition(".")[2]
    return str(value).lower()


# The constructor parameters of the sgm / taming source classes (CogVideo sat/sgm regularizers and vqvae/quantize.py):
# (required, optional). A parameter the source class does not take is rejected, as the source would reject it.
_VQ_OPTIONAL = ("beta", "remap", "unknown_index", "sane_index_shape", "log_perplexity", "embedding_weight_norm",
                "loss_key")
SOURCE_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "VectorQuantizer": (("n_e", "e_dim"), _VQ_OPTIONAL),
    "EMAVectorQuantizer": (("n_embed", "embedding_dim", "beta"),
                           ("decay", "eps", "remap", "unknown_index", "loss_key")),
    "GumbelQuantizer": (("num_hiddens", "embedding_dim", "n_embed"),
                        ("straight_through", "kl_weight", "temp_init", "remap", "unknown_index", "loss_key")),
    "VectorQuantizerWithInputProjection": (("input_dim", "n_codes", "codebook_dim"), ("output_dim", *_VQ_OPTIONAL)),
    "FSQ": (("levels",), ("dim", "num_codebooks", "keep_num_codebooks_dim", "scale")),
    "LFQ": ((), ("dim", "codebook_size", "entropy_loss_weight", "commitment_loss_weight", "diversity_gamma",
                 "straight_through_activation", "num_codebooks", "keep_num_codebooks_dim", "codebook_scale",
                 "frac_per_sample_entropy")),
    "VectorQuantizer2": (("n_e", "e_dim", "beta"), ("remap", "unknown_index", "sane_index_shape", "legacy")),
    "GumbelQuantize": (("num_hiddens", "embedding_dim", "n_embed"),
                       ("straight_through", "kl_weight", "temp_init", "use_vqinterface", "remap", "unknown_index")),
}


def check_source_params(target: str, reg: Regularizer, params: Mapping) -> None:
    """Reject what the sgm / taming class named by ``target`` rejects: a parameter its constructor does not take,
    or a required one that is missing (vqp and hf_vq targets are checked by the hf_vq config, which takes vqp
    1.32's arguments)."""
    module = str(target).rpartition(".")[0]
    if not module.startswith(("sgm.", "taming.")) or reg.name not in SOURCE_SIGNATURES:
        return
    required, optional = SOURCE_SIGNATURES[reg.name]
    source = f"{module}.{str(target).rpartition('.')[2]}"
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{source} takes no parameter(s) {unknown} (its parameters: {[*required, *optional]}); "
                         "remove them from the config")
    missing = [name for name in required if name not in params]
    if missing:
        raise ValueError(f"{source} requires the parameter(s) {missing}; add them to the config")
    if reg.name == "LFQ" and params.get("dim") is None and params.get("codebook_size") is None:
        raise ValueError(f"{source} requires dim or codebook_size")


def config_from_target(target: str, params: Mapping, state_dict: Mapping[str, torch.Tensor]) -> tuple[Regularizer, dict]:
    """``(table entry, hf_vq config kwargs)`` for a quantizer node of an sgm/SAT YAML config.

    ``remap`` (a ``.npy`` path in sgm) is kept as provenance; its length comes from the checkpoint's ``used``
    tensor, which hf_vq loads as a buffer, so the file is not needed.

    Raises:
        ValueError: unsupported target, a parameter the source class rejects, or a remap without a ``used``
            tensor in the checkpoint.
    """
    reg = resolve_target(target)
    check_source_params(target, reg, params)
    kwargs = dict(params)
    if kwargs.get("remap") is not None:
        used = state_dict.get("used")
        if used is None:
            raise ValueError(f"the config sets remap={kwargs['remap']!r} but the checkpoint has no 'used' tensor")
        kwargs["remap_size"] = int(used.shape[0])
    if reg.name == "LFQ" and "straight_through_activation" in kwargs:
        kwargs["straight_through_activation"] = _activation_name(kwargs["straight_through_activation"])
    return reg, kwargs


# --------------------------------------------------------------------------------------------------
# Inference from tensor names and shapes


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


# What each value the tensors cannot tell changes, named in the CLI output and the model card when assumed.
_EFFECTS = {
    "unknown_index": "the index a code outside `used` gets ('extra': len(used), an int: that int)",
    "codebook_scale": "the output codes are +-codebook_scale: another value scales every output by the ratio",
    "num_codebooks": "how the bits split into codebooks per position (the shape and values of the indices)",
    "sane_index_shape": "the indices' shape: flat (N,) when False, (b, h, w) when True",
    "log_perplexity": "whether the log dict holds perplexity and cluster_usage",
    "loss_key": "the log dict's key for the loss",
    "kl_weight": "scales the returned KL loss",
    "beta": "the commitment weight in the returned loss",
    "temp_init": "the Gumbel-softmax temperature in training (eval samples are hard)",
    "straight_through": "training gradients only",
    "decay": "the EMA update speed in training",
    "eps": "the Laplace smoothing of the EMA codebook in training",
    "entropy_loss_weight": "training loss only (zero in eval)",
    "commitment_loss_weight": "training loss only (zero in eval)",
    "diversity_gamma": "training loss only (zero in eval)",
    "frac_per_sample_entropy": "training loss only (zero in eval)",
    "straight_through_activation": "training gradients only",
    "commitment_weight": "training loss only (zero in eval)",
    "quantization_loss_weight": "training loss only (zero in eval)",
}


class _Inference:
    """Collects what inference read from the tensors (`notes`) and what it had to assume (`assumed`: each value
    named with the source default it took and its effect); assumed values are written into the config."""

    def __init__(self, name: str):
        import hf_vq

        self.name, self.kwargs, self.notes, self.assumed = name, {}, [], []
        self._defaults = {}  # the config's defaults (the source's), the subclass's first
        for klass in getattr(hf_vq, name).config_class.__mro__:
            for key, param in inspect.signature(klass.__init__).parameters.items() if "__init__" in vars(klass) else ():
                self._defaults.setdefault(key, param.default)

    def assume(self, *fields: str) -> None:
        for field in fields:
            value = self._defaults[field]
            self.kwargs[field] = value
            self.assumed.append(f"{field}={value!r} (the source's default): {_EFFECTS[field]}")


def _remap_kwargs(sd, inf: _Inference) -> None:
    if "used" not in sd:
        return
    inf.notes.append(f"a 'used' tensor: indices remapped to its {int(sd['used'].shape[0])} codes")
    inf.kwargs.update(remap="used (from the checkpoint)", remap_size=int(sd["used"].shape[0]))
    inf.assume("unknown_index")


def _unit_rows(t: torch.Tensor) -> bool:
    norms = t.float().norm(dim=-1)
    return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3))


def _infer_vector_quantize(sd, inf: _Inference) -> None:
    heads, size, cdim = _shape(sd, "_codebook.embed")
    dim = _shape(sd, "project_in.weight")[1] if "project_in.weight" in sd else cdim * heads
    cosine = _unit_rows(sd["_codebook.embed"])
    inf.notes.append(f"use_cosine_sim={cosine} (codebook rows {'are' if cosine else 'are not'} unit norm)")
    kwargs = dict(dim=dim, codebook_size=size, use_cosine_sim=cosine)
    if cdim * heads != dim or heads > 1:
        kwargs["codebook_dim"] = cdim
    if heads > 1:
        kwargs.update(heads=heads, separate_codebook_per_head=True)
    elif "project_in.weight" in sd and _shape(sd, "project_in.weight")[0] != cdim:
        kwargs["heads"] = _shape(sd, "project_in.weight")[0] // cdim
        inf.notes.append(f"heads={kwargs['heads']} sharing one codebook (projection width / codebook dim)")
    if "_codebook.batch_mean" in sd:
        kwargs["affine_param"] = True
    inf.kwargs.update(kwargs)
    inf.assume("decay", "eps", "commitment_weight")


def _infer_latent_quantize(sd, inf: _Inference) -> None:
    keys = sorted((k for k in sd if k.startswith("values_per_latent.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    levels = [int(sd[k].shape[0]) for k in keys]
    dim = _shape(sd, "project_in.weight")[1] if "project_in.weight" in sd else len(levels)
    inf.kwargs.update(levels=levels, dim=dim)
    inf.assume("commitment_loss_weight", "quantization_loss_weight")


def _infer_lfq(sd, inf: _Inference) -> None:
    bits = _shape(sd, "mask")[0]
    if "project_in.weight" in sd:
        width, dim = _shape(sd, "project_in.weight")
        inf.kwargs.update(dim=dim, codebook_size=2**bits, num_codebooks=width // bits)
    else:
        inf.kwargs.update(dim=bits, codebook_size=2**bits)
        inf.assume("num_codebooks")
    inf.assume("codebook_scale", "entropy_loss_weight", "commitment_loss_weight", "diversity_gamma",
               "frac_per_sample_entropy", "straight_through_activation")


def _infer_sgm(name: str, sd, keys: set) -> _Inference:
    """The sgm classes, told apart by their tensor names."""
    inf = _Inference(name)
    if name == "VectorQuantizer":
        n_e, e_dim = _shape(sd, "embedding.weight_v" if "embedding.weight_v" in keys else "embedding.weight")
        inf.kwargs.update(n_e=n_e, e_dim=e_dim, embedding_weight_norm="embedding.weight_v" in keys)
        inf.notes.append("sgm VectorQuantizer (taming's VectorQuantizer2 has the same tensors; its legacy flag only "
                         "changes the training loss)")
        inf.assume("beta", "sane_index_shape", "log_perplexity", "loss_key")
    elif name == "EMAVectorQuantizer":
        n, d = _shape(sd, "embedding.weight")
        inf.kwargs.update(n_embed=n, embedding_dim=d)
        inf.assume("beta", "decay", "eps", "loss_key")
    elif name == "VectorQuantizerWithInputProjection":
        n, d = _shape(sd, "embedding.weight")
        inf.kwargs.update(input_dim=_shape(sd, "proj_in.weight")[1], n_codes=n, codebook_dim=d)
        if "proj_out.weight" in keys:
            inf.kwargs["output_dim"] = _shape(sd, "proj_out.weight")[0]
        inf.assume("beta", "sane_index_shape", "log_perplexity", "loss_key")
    else:  # GumbelQuantizer
        n, d = _shape(sd, "embed.weight")
        inf.kwargs.update(num_hiddens=_shape(sd, "proj.weight")[1], embedding_dim=d, n_embed=n)
        inf.notes.append("sgm GumbelQuantizer (taming's GumbelQuantize has the same tensors)")
        inf.assume("kl_weight", "temp_init", "straight_through", "loss_key")
    return inf


def _sgm_class(keys: set) -> str | None:
    if {"embedding.weight_g", "embedding.weight_v"} <= keys or keys - {"used"} == {"embedding.weight"}:
        return "VectorQuantizer"
    if {"embedding.weight", "embedding.cluster_size", "embedding.embed_avg"} <= keys:
        return "EMAVectorQuantizer"
    if {"embedding.weight", "proj_in.weight"} <= keys:
        return "VectorQuantizerWithInputProjection"
    if {"proj.weight", "embed.weight"} <= keys:
        return "GumbelQuantizer"
    return None


def infer_from_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[Regularizer, dict, list[str], list[str]]:
    """Guess ``(table entry, config kwargs, notes, assumed)`` from a quantizer's tensors (prefix stripped).

    ``notes`` say what was read from names and shapes; ``assumed`` names every value the tensors cannot tell
    (the source's default is taken and written into the config) with its effect. FSQ has no tensors that give
    its levels, so it needs a config.

    Raises:
        ValueError: no rule matches (the message lists the keys and asks for ``--config``).
    """
    keys = set(sd)
    if "_codebook.embed" in keys:
        inf = _Inference("VectorQuantize")
        _infer_vector_quantize(sd, inf)
    elif any(k.startswith("values_per_latent.") for k in keys):
        inf = _Inference("LatentQuantize")
        _infer_latent_quantize(sd, inf)
    elif "mask" in keys:
        inf = _Inference("LFQ")
        _infer_lfq(sd, inf)
    elif (name := _sgm_class(keys)) is not None:
        inf = _infer_sgm(name, sd, keys)
    else:
        raise ValueError(
            f"cannot infer the quantizer type from its tensors {sorted(keys)[:20]}: pass --config with the sgm "
            "YAML (FSQ, for one, keeps its levels only in the config)"
        )
    _remap_kwargs(sd, inf)
    return REGULARIZERS[inf.name], inf.kwargs, inf.notes, inf.assumed


# --------------------------------------------------------------------------------------------------
# Loading the tensors


def _drop_lfq_mask(model, sd: dict) -> None:
    """sgm's and vqp's LFQ save their bit mask; hf_vq rebuilds it from the config. Check it, then drop it."""
    mask = sd.pop("mask", None)
    if mask is None:
        return
    bits = model.config.codebook_size.bit_length() - 1
    expected = 2 ** torch.arange(bits - 1, -1, -1)
    if tuple(mask.shape) != (bits,) or not torch.equal(mask.long(), expected):
        raise ValueError(f"LFQ 'mask' tensor {mask.tolist()} does not match codebook_size "
                         f"{model.config.codebook_size} (expected {expected.tolist()})")


def load_regularizer_weights(model, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load a quantizer's tensors (prefix stripped) into ``model``, exactly.

    Raises:
        ValueError: missing keys, unexpected keys or shape mismatches, all listed in one message.
    """
    sd = dict(tensors)
    if isinstance(model, LFQ):
        _drop_lfq_mask(model, sd)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise ValueError(f"the checkpoint does not fit {type(model).__name__}({_config_summary(model)}): "
                         + ". ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


def _config_summary(model) -> str:
    c = model.config
    fields = [n for n in type(c).field_names() if n not in ("return_dict", "check_inputs")][:4]
    return ", ".join(f"{n}={getattr(c, n)!r}" for n in fields)
