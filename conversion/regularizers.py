"""Key maps per regularizer type: an sgm/SAT (or taming, lucidrains) quantizer -> an hf_vq model.

One table, :data:`REGULARIZERS`, says for every supported seed class which hf_vq class takes its place and in
which input layout it is verified. Three functions use it:

- :func:`config_from_target` maps a YAML ``target`` + ``params`` to hf_vq config kwargs (the sgm classes keep
  sgm's argument names, so params pass through; only non-JSON values are translated);
- :func:`infer_from_state_dict` guesses the type and sizes from tensor names and shapes when there is no
  config, and says what it could not know;
- :func:`load_regularizer_weights` loads the tensors into the model after a key/shape check with a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    """One supported seed quantizer class.

    Attributes:
        name: the seed class name; also the hf_vq class that replaces it.
        sources: dotted module paths of the seed classes (CogVideo ``sat/sgm``, taming, vector-quantize-pytorch).
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

    Accepts the seed modules (and their sub-modules, e.g. ``vector_quantize_pytorch.vector_quantize_pytorch``),
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


def config_from_target(target: str, params: Mapping, state_dict: Mapping[str, torch.Tensor]) -> tuple[Regularizer, dict]:
    """``(table entry, hf_vq config kwargs)`` for a quantizer node of an sgm/SAT YAML config.

    ``remap`` (a ``.npy`` path in sgm) is kept as provenance; its length comes from the checkpoint's ``used``
    tensor, which hf_vq loads as a buffer, so the file is not needed.

    Raises:
        ValueError: unsupported target, or a remap without a ``used`` tensor in the checkpoint.
    """
    reg = resolve_target(target)
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


def _remap_kwargs(sd, notes: list[str]) -> dict:
    if "used" not in sd:
        return {}
    notes.append("a 'used' tensor: remapped indices; unknown_index assumed 'random' (sgm's default)")
    return {"remap": "used (from the checkpoint)", "remap_size": int(sd["used"].shape[0])}


def _unit_rows(t: torch.Tensor) -> bool:
    norms = t.float().norm(dim=-1)
    return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3))


def _infer_vector_quantize(sd, notes) -> dict:
    heads, size, cdim = _shape(sd, "_codebook.embed")
    dim = _shape(sd, "project_in.weight")[1] if "project_in.weight" in sd else cdim * heads
    cosine = _unit_rows(sd["_codebook.embed"])
    notes.append(f"use_cosine_sim={cosine} (codebook rows {'are' if cosine else 'are not'} unit norm)")
    kwargs = dict(dim=dim, codebook_size=size, use_cosine_sim=cosine)
    if cdim * heads != dim or heads > 1:
        kwargs["codebook_dim"] = cdim
    if heads > 1:
        kwargs.update(heads=heads, separate_codebook_per_head=True)
    elif "project_in.weight" in sd and _shape(sd, "project_in.weight")[0] != cdim:
        kwargs["heads"] = _shape(sd, "project_in.weight")[0] // cdim
        notes.append(f"heads={kwargs['heads']} sharing one codebook (projection width / codebook dim)")
    if "_codebook.batch_mean" in sd:
        kwargs["affine_param"] = True
    notes.append("training options (decay, dead-code threshold, commitment weight) are vqp defaults")
    return kwargs


def _infer_latent_quantize(sd, notes) -> dict:
    keys = sorted((k for k in sd if k.startswith("values_per_latent.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    levels = [int(sd[k].shape[0]) for k in keys]
    kwargs = dict(levels=levels, dim=_shape(sd, "project_in.weight")[1] if "project_in.weight" in sd else len(levels))
    notes.append("loss weights are vqp defaults")
    return kwargs


def _infer_lfq(sd, notes) -> dict:
    bits = _shape(sd, "mask")[0]
    if "project_in.weight" in sd:
        width, dim = _shape(sd, "project_in.weight")
        num_codebooks = width // bits
    else:
        dim, num_codebooks = bits, 1
        notes.append("no projections: num_codebooks assumed 1")
    notes.append("loss weights are sgm defaults")
    return dict(dim=dim, codebook_size=2**bits, num_codebooks=num_codebooks)


def infer_from_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[Regularizer, dict, list[str]]:
    """Guess ``(table entry, config kwargs, notes)`` from a quantizer's tensors (prefix already stripped).

    The notes say what was read from shapes and what was assumed (loss weights, flags that leave no trace in
    the weights). FSQ has no tensors that give its levels, so it needs a config.

    Raises:
        ValueError: no rule matches (the message lists the keys and asks for ``--config``).
    """
    notes: list[str] = []
    keys = set(sd)
    if "_codebook.embed" in keys:
        name, kwargs = "VectorQuantize", _infer_vector_quantize(sd, notes)
    elif any(k.startswith("values_per_latent.") for k in keys):
        name, kwargs = "LatentQuantize", _infer_latent_quantize(sd, notes)
    elif "mask" in keys:
        name, kwargs = "LFQ", _infer_lfq(sd, notes)
    elif {"embedding.weight_g", "embedding.weight_v"} <= keys:
        n_e, e_dim = _shape(sd, "embedding.weight_v")
        name, kwargs = "VectorQuantizer", dict(n_e=n_e, e_dim=e_dim, embedding_weight_norm=True)
        notes.append("beta assumed 0.25 (sgm's default)")
    elif {"embedding.weight", "embedding.cluster_size", "embedding.embed_avg"} <= keys:
        n, d = _shape(sd, "embedding.weight")
        name, kwargs = "EMAVectorQuantizer", dict(n_embed=n, embedding_dim=d, beta=0.25)
        notes.append("beta assumed 0.25; decay 0.99 and eps 1e-5 are sgm's defaults")
    elif {"embedding.weight", "proj_in.weight"} <= keys:
        n, d = _shape(sd, "embedding.weight")
        kwargs = dict(input_dim=_shape(sd, "proj_in.weight")[1], n_codes=n, codebook_dim=d)
        if "proj_out.weight" in keys:
            kwargs["output_dim"] = _shape(sd, "proj_out.weight")[0]
        name = "VectorQuantizerWithInputProjection"
        notes.append("beta assumed 1.0 (sgm's default)")
    elif {"proj.weight", "embed.weight"} <= keys:
        n, d = _shape(sd, "embed.weight")
        name = "GumbelQuantizer"
        kwargs = dict(num_hiddens=_shape(sd, "proj.weight")[1], embedding_dim=d, n_embed=n)
        notes.append("sgm GumbelQuantizer (taming's GumbelQuantize has the same tensors); kl_weight, temp_init "
                     "and straight_through are sgm's defaults")
    elif keys - {"used"} == {"embedding.weight"}:
        n_e, e_dim = _shape(sd, "embedding.weight")
        name, kwargs = "VectorQuantizer", dict(n_e=n_e, e_dim=e_dim)
        notes.append("sgm VectorQuantizer (VectorQuantizer2 has the same tensors; its legacy flag only changes the "
                     "training loss); beta assumed 0.25")
    else:
        raise ValueError(
            f"cannot infer the quantizer type from its tensors {sorted(keys)[:20]}: pass --config with the sgm "
            "YAML (FSQ, for one, keeps its levels only in the config)"
        )
    kwargs.update(_remap_kwargs(sd, notes))
    return REGULARIZERS[name], kwargs, notes


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
