"""An independent re-implementation of the source quantizers' (CogVideo sgm, taming, vqp 1.32) inference forward, from raw checkpoint tensors.

The converter checks every converted model against these functions before it writes anything. They are
written from the source code (CogVideo ``sat/sgm`` regularizers, taming's ``vqvae/quantize.py``,
vector-quantize-pytorch 1.32), in plain torch on the raw tensors and the YAML params, and import nothing from
``hf_vq``, so a bug in an hf_vq model cannot hide itself.

Every function takes ``(params, tensors, x)`` (config params as the source class's constructor takes them, the
quantizer's tensors with the prefix stripped, an input in the source class's layout) and returns a
:class:`Reference`: the output, the flat indices (row-major over the positions, then codebooks/heads), and for
nearest-code searches the relative float64 distance gap to the runner-up code, so that a true tie (a gap at
float32 rounding level) is not reported as a mismatch.

:func:`reference_call` gives what the source module itself returns when sgm code calls it (``z_q, log =
q(z)`` with sgm's log dict keys, taming's ``(z_q, loss, (None, None, indices))``, FSQ's ``(out, indices)``,
LFQ's and vqp's ``(quantized, indices, aux_loss)``), eval mode, built from the same reference forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CALLS", "REFERENCES", "Reference", "reference_call", "reference_forward"]


@dataclass
class Reference:
    output: Tensor
    indices: Tensor  # flat int64; -1 where the source class draws a random index (remap, unknown_index="random")
    gap: Tensor | None = None  # flat float64 relative gap to the runner-up code, same length as indices


def _linear(x: Tensor, tensors: Mapping[str, Tensor], name: str) -> Tensor:
    if f"{name}.weight" not in tensors:
        return x  # nn.Identity in the source class
    return F.linear(x, tensors[f"{name}.weight"], tensors.get(f"{name}.bias"))


def _nearest(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """argmin of sgm's `|z|^2 + |e|^2 - 2 z.e` in float64, and the gap to the second-best code relative to
    `|z|^2 + |e|^2` (the size of the float32 terms whose rounding can swap two codes)."""
    z, e = z.double(), codebook.double()
    z2, e2 = z.pow(2).sum(1, keepdim=True), e.pow(2).sum(1)
    d = z2 + e2 - 2 * z @ e.t()
    best = d.topk(min(2, e.shape[0]), dim=1, largest=False)
    if e.shape[0] == 1:
        return best.indices[:, 0], torch.full_like(best.values[:, 0], math.inf)
    scale = (z2[:, 0] + e2[best.indices[:, 0]]).clamp_min(1e-30)
    return best.indices[:, 0], (best.values[:, 1] - best.values[:, 0]) / scale


def _remap(indices: Tensor, params: Mapping, tensors: Mapping[str, Tensor]) -> Tensor:
    """sgm's `remap_to_used`: the position in `used`; a code outside `used` gets `len(used)` ("extra"), the
    given int, or a random index ("random"), marked -1 here: any index in `[0, len(used))` is right there."""
    if params.get("remap") is None:
        return indices
    used = tensors["used"].long()
    match = indices[:, None] == used[None, :]
    unknown = params.get("unknown_index", "random")
    fill = used.shape[0] if unknown == "extra" else -1 if unknown == "random" else int(unknown)
    return torch.where(match.any(1), match.long().argmax(1), torch.as_tensor(fill))


def _channels_last(x: Tensor) -> Tensor:
    return x.movedim(1, -1) if x.ndim >= 4 else x


def _channels_first(y: Tensor, like: Tensor) -> Tensor:
    return y.movedim(-1, 1) if like.ndim >= 4 else y


def _weight_normed(tensors: Mapping[str, Tensor]) -> Tensor:
    """`weight_norm(nn.Embedding, dim=1)`: w = g * v / ||v||, the norm over dim 0 (one per column)."""
    v, g = tensors["embedding.weight_v"].double(), tensors["embedding.weight_g"].double()
    return (g * v / v.norm(dim=0, keepdim=True)).float()


def vector_quantizer(params, tensors, x: Tensor) -> Reference:
    """sgm `VectorQuantizer` / taming `VectorQuantizer2` (eval: the straight-through output is the code)."""
    e = _weight_normed(tensors) if "embedding.weight_v" in tensors else tensors["embedding.weight"].float()
    z = _channels_last(x)
    ind, gap = _nearest(z.reshape(-1, e.shape[1]), e)
    out = _channels_first(e[ind].reshape(z.shape), x)
    return Reference(out, _remap(ind, params, tensors), gap)


def ema_vector_quantizer(params, tensors, x: Tensor) -> Reference:
    e = tensors["embedding.weight"].float()
    z = x.movedim(1, -1)
    ind, gap = _nearest(z.reshape(-1, e.shape[1]), e)
    return Reference(e[ind].reshape(z.shape).movedim(-1, 1), ind, gap)


def vector_quantizer_with_input_projection(params, tensors, x: Tensor) -> Reference:
    """sgm: `(b, c, ...)` inputs become tokens `(b, n, c)`; proj_in -> VectorQuantizer -> proj_out; the
    feature map comes back only when `output_dim` is set."""
    z = _linear(x.flatten(2).transpose(1, 2) if x.ndim > 3 else x, tensors, "proj_in")
    e = tensors["embedding.weight"].float()
    ind, gap = _nearest(z.reshape(-1, e.shape[1]), e)
    out = _linear(e[ind].reshape(z.shape), tensors, "proj_out")
    if x.ndim > 3 and params.get("output_dim") is not None:
        out = out.transpose(1, 2).reshape(x.shape[0], -1, *x.shape[2:])
    return Reference(out, _remap(ind, params, tensors), gap)


def gumbel_quantizer(params, tensors, x: Tensor) -> Reference:
    """Eval (hard) Gumbel-softmax: argmax of `logits + g`, g = -log(Exp(1)) drawn as torch's `gumbel_softmax`
    draws it; the caller seeds the RNG identically for the model and for this function."""
    return _gumbel(params, tensors, x)[0]


def _gumbel(params, tensors, x: Tensor) -> tuple[Reference, Tensor, Tensor]:
    """(reference, logits over the codes in use, chosen code before the remap `(b, h, w)`)."""
    logits = F.conv2d(x, tensors["proj.weight"], tensors.get("proj.bias"))
    if params.get("remap") is not None:
        logits = logits[:, tensors["used"].long()]
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()
    choice = (logits + gumbels).argmax(1)  # the softmax with temperature keeps the argmax
    full = tensors["used"].long()[choice] if params.get("remap") is not None else choice
    out = tensors["embed.weight"].float()[full].movedim(-1, 1)
    return Reference(out, _remap(full.reshape(-1), params, tensors)), logits, full


def fsq(params, tensors, x: Tensor) -> Reference:
    """sgm/vqp FSQ: project_in, `tanh` bound with the even-level offset, round, normalize, project_out."""
    levels = torch.tensor(list(params["levels"]))
    num_codebooks = int(params.get("num_codebooks", 1))
    z = _linear(_channels_last(x), tensors, "project_in")
    z = z.reshape(*z.shape[:-1], num_codebooks, len(levels))
    eps = 1e-3
    half_l = (levels - 1) * (1 + eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    shift = (offset / half_l).atanh()
    rounded = ((z + shift).tanh() * half_l - offset).round()
    half_width = levels // 2
    basis = torch.cumprod(torch.tensor([1, *levels[:-1].tolist()]), 0)
    # CogVideo sgm's FSQ casts `sum(code * basis)` with int32(): the exact integer is the rounded value
    indices = ((rounded + half_width) * basis).sum(-1).round().long()
    out = _linear((rounded / half_width).flatten(-2), tensors, "project_out")
    return Reference(_channels_first(out, x), indices.reshape(-1))


def lfq(params, tensors, x: Tensor) -> Reference:
    """sgm/vqp LFQ (eval): the sign of each projected feature picks `+-codebook_scale`; bits MSB first."""
    size = params.get("codebook_size") or 2 ** int(params["dim"])
    bits = int(math.log2(size))
    num_codebooks = int(params.get("num_codebooks", 1))
    scale = float(params.get("codebook_scale", 1.0))
    z = _linear(_channels_last(x), tensors, "project_in")
    z = z.reshape(*z.shape[:-1], num_codebooks, bits)
    positive = z > 0
    codes = torch.where(positive, scale, -scale)
    indices = (positive.long() * (2 ** torch.arange(bits - 1, -1, -1))).sum(-1)
    out = _linear(codes.flatten(-2), tensors, "project_out")
    return Reference(_channels_first(out, x), indices.reshape(-1))


def latent_quantize(params, tensors, x: Tensor) -> Reference:
    """vqp LatentQuantize: per latent, the nearest of its values; index = mixed radix of the value positions."""
    values = [tensors[k].float() for k in sorted((k for k in tensors if k.startswith("values_per_latent.")),
                                                  key=lambda k: int(k.rsplit(".", 1)[1]))]
    if not values:  # fixed values (optimize_values=False): linspace over [-0.5, 0.5] per level, as vqp builds them
        levels = params["levels"]
        levels = [levels] * int(params["codebook_dim"]) if isinstance(levels, int) else list(levels)
        values = [torch.linspace(-0.5, 0.5, n) for n in levels]
    z = _linear(x, tensors, "project_in")
    z = z.reshape(*z.shape[:-1], -1, len(values))
    pos = torch.stack([(z[..., i, None] - v).abs().argmin(-1) for i, v in enumerate(values)], -1)
    q = torch.stack([v[pos[..., i]] for i, v in enumerate(values)], -1)
    basis = torch.cumprod(torch.tensor([1] + [len(v) for v in values[:-1]]), 0)
    out = _linear(q.flatten(-2), tensors, "project_out")
    return Reference(out, (pos * basis).sum(-1).reshape(-1))


def vector_quantize(params, tensors, x: Tensor) -> Reference:
    """vqp VectorQuantize (eval): project_in, split heads, euclidean or cosine nearest code, merge, project_out.

    Supports the options that change the eval output: dim, codebook_dim, heads, separate_codebook_per_head,
    use_cosine_sim, accept_image_fmap/accept_3d_fmap, channel_last. Others raise (the caller reports them as unverifiable).
    """
    handled = {"dim", "codebook_size", "codebook_dim", "heads", "separate_codebook_per_head", "use_cosine_sim",
               "accept_image_fmap", "accept_3d_fmap", "channel_last", "decay", "eps", "kmeans_init", "kmeans_iters",
               "threshold_ema_dead_code", "commitment_weight", "ema_update", "learnable_codebook",
               "rotation_trick", "straight_through", "sync_codebook", "sync_kmeans", "orthogonal_reg_weight",
               "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes", "codebook_diversity_loss_weight",
               "codebook_diversity_temperature", "reset_cluster_size", "manual_ema_update", "freeze_codebook"}
    unknown = sorted(set(params) - handled)
    if unknown:
        raise NotImplementedError(f"the reference VectorQuantize does not implement {unknown}")
    embed = tensors["_codebook.embed"].float()  # (codebooks, K, d)
    heads = int(params.get("heads", 1))
    separate = bool(params.get("separate_codebook_per_head", False))
    image = bool(params.get("accept_image_fmap", False) or params.get("accept_3d_fmap", False))
    tokens = x.flatten(2).transpose(1, 2) if image or not params.get("channel_last", True) else x
    z = _linear(tokens, tensors, "project_in")
    b, n = z.shape[:2]
    z = z.reshape(b, n, heads, -1)  # (b n (h d)) -> per head
    inds, gaps, codes = [], [], []
    for h in range(heads):
        e = embed[h if separate else 0]
        zh = z[:, :, h].reshape(-1, e.shape[1])
        if params.get("use_cosine_sim", False):
            zh, e = F.normalize(zh.double(), dim=-1), F.normalize(e.double(), dim=-1)
            sim = zh @ e.t()
            top = sim.topk(min(2, e.shape[0]), dim=1)
            ind, gap = top.indices[:, 0], top.values[:, 0] - top.values[:, -1]
            e = e.float()
        else:
            ind, gap = _nearest(zh, e)
        inds.append(ind.reshape(b, n))
        gaps.append(gap.reshape(b, n))
        codes.append(e[ind].reshape(b, n, -1))
    out = _linear(torch.cat(codes, -1), tensors, "project_out")
    if image or not params.get("channel_last", True):
        out = out.transpose(1, 2).reshape(x.shape[0], out.shape[-1], *x.shape[2:])
    return Reference(out, torch.stack(inds, -1).reshape(-1), torch.stack(gaps, -1).reshape(-1))


REFERENCES: dict[str, Callable[[Mapping, Mapping[str, Tensor], Tensor], Reference]] = {
    "VectorQuantizer": vector_quantizer,
    "VectorQuantizer2": vector_quantizer,
    "EMAVectorQuantizer": ema_vector_quantizer,
    "VectorQuantizerWithInputProjection": vector_quantizer_with_input_projection,
    "GumbelQuantizer": gumbel_quantizer,
    "GumbelQuantize": gumbel_quantizer,
    "FSQ": fsq,
    "LFQ": lfq,
    "LatentQuantize": latent_quantize,
    "VectorQuantize": vector_quantize,
}


def reference_forward(name: str, params: Mapping, tensors: Mapping[str, Tensor], x: Tensor) -> Reference:
    """Run the reference of source class ``name`` on float32 copies of the raw tensors."""
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.no_grad():
        return REFERENCES[name](params, tensors, x.float())


# --------------------------------------------------------------------------------------------------
# The source modules' return values (eval mode), as sgm / taming / vqp code receives them


def _perplexity(indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """sgm's `measure_perplexity`: exp of the entropy of the code frequencies, and the number of codes used."""
    probs = F.one_hot(indices.reshape(-1), n).float().mean(0)
    return (-(probs * torch.log(probs + 1e-10)).sum()).exp(), (probs > 0).sum()


def _vq_log(params, z: Tensor, codebook: Tensor, flat: Tensor, beta_default: float) -> dict:
    """sgm `VectorQuantizer`'s log dict for channel-last `z` and its remapped flat indices `flat`."""
    raw, _ = _nearest(z.reshape(-1, codebook.shape[1]), codebook)
    beta = float(params.get("beta", beta_default))
    loss = (1 + beta) * ((codebook[raw].reshape(z.shape) - z) ** 2).mean()  # both terms are one mse in eval
    log = {}
    if params.get("log_perplexity", False):
        log["perplexity"], log["cluster_usage"] = _perplexity(raw, codebook.shape[0])
    indices = flat.reshape(-1, 1) if params.get("remap") is not None else flat
    if params.get("sane_index_shape", False):
        indices = indices.reshape(z.shape[:-1]) if z.ndim == 4 else indices.reshape(z.shape[0], -1)
    log[params.get("loss_key", "loss/vq")] = loss
    log["min_encoding_indices"] = indices
    return log


def vector_quantizer_call(params, tensors, x: Tensor) -> tuple:
    ref = vector_quantizer(params, tensors, x)
    e = _weight_normed(tensors) if "embedding.weight_v" in tensors else tensors["embedding.weight"].float()
    return ref.output, _vq_log(params, _channels_last(x), e, ref.indices, 0.25)


def vector_quantizer2_call(params, tensors, x: Tensor) -> tuple:
    z_q, log = vector_quantizer_call({**params, "log_perplexity": False}, tensors, x)
    return z_q, log.pop(params.get("loss_key", "loss/vq")), (None, None, log["min_encoding_indices"])


def ema_vector_quantizer_call(params, tensors, x: Tensor) -> tuple:
    ref = ema_vector_quantizer(params, tensors, x)
    e = tensors["embedding.weight"].float()
    encodings = F.one_hot(ref.indices, e.shape[0]).to(x.dtype)
    loss = float(params["beta"]) * ((ref.output - x) ** 2).mean()
    return ref.output, {params.get("loss_key", "loss/vq"): loss, "encodings": encodings,
                        "encoding_indices": ref.indices, "perplexity": _perplexity(ref.indices, e.shape[0])[0]}


def vector_quantizer_with_input_projection_call(params, tensors, x: Tensor) -> tuple:
    ref = vector_quantizer_with_input_projection(params, tensors, x)
    z = _linear(x.flatten(2).transpose(1, 2) if x.ndim > 3 else x, tensors, "proj_in")
    return ref.output, _vq_log(params, z, tensors["embedding.weight"].float(), ref.indices, 1.0)


def _gumbel_loss(params, logits: Tensor) -> Tensor:
    qy = F.softmax(logits, dim=1)
    n = int(params["n_embed"])
    return float(params.get("kl_weight", 5e-4)) * torch.sum(qy * torch.log(qy * n + 1e-10), dim=1).mean()


def gumbel_quantizer_call(params, tensors, x: Tensor) -> tuple:
    ref, logits, full = _gumbel(params, tensors, x)
    return ref.output, {params.get("loss_key", "loss/vq"): _gumbel_loss(params, logits), "indices": full}


def gumbel_quantize_call(params, tensors, x: Tensor) -> tuple:
    ref, logits, full = _gumbel(params, tensors, x)
    indices = ref.indices.reshape(full.shape)
    if params.get("use_vqinterface", True):
        return ref.output, _gumbel_loss(params, logits), (None, None, indices)
    return ref.output, _gumbel_loss(params, logits), indices


def _code_indices(flat: Tensor, x: Tensor, codebooks: int, keep: bool | None, image: bool) -> Tensor:
    """`(b, *positions[, codebooks])`: the codebook axis is kept when there are several (or when asked)."""
    positions = tuple(x.shape[2:]) if image else tuple(x.shape[1:-1])
    keep = codebooks > 1 if keep is None else keep
    return flat.reshape(x.shape[0], *positions, *((codebooks,) if keep else ()))


def fsq_call(params, tensors, x: Tensor) -> tuple:
    ref = fsq(params, tensors, x)
    codebooks = int(params.get("num_codebooks", 1))
    return ref.output, _code_indices(ref.indices, x, codebooks, params.get("keep_num_codebooks_dim"), x.ndim >= 4)


def lfq_call(params, tensors, x: Tensor) -> tuple:
    ref = lfq(params, tensors, x)
    codebooks = int(params.get("num_codebooks", 1))
    indices = _code_indices(ref.indices, x, codebooks, params.get("keep_num_codebooks_dim"), x.ndim >= 4)
    return ref.output, indices, torch.tensor(0.0)  # the auxiliary losses are zero in eval


def vector_quantize_call(params, tensors, x: Tensor) -> tuple:
    ref = vector_quantize(params, tensors, x)
    heads = int(params.get("heads", 1))
    image = bool(params.get("accept_image_fmap", False) or params.get("accept_3d_fmap", False))
    if image:
        positions = tuple(x.shape[2:])
    else:
        positions = (x.shape[2],) if not params.get("channel_last", True) else (x.shape[1],)
    indices = ref.indices.reshape(x.shape[0], *positions, *((heads,) if heads > 1 else ()))
    return ref.output, indices, torch.tensor(0.0)


def latent_quantize_call(params, tensors, x: Tensor) -> tuple:
    ref = latent_quantize(params, tensors, x)
    codebooks = int(params.get("num_codebooks", 1))
    indices = _code_indices(ref.indices, x, codebooks, params.get("keep_num_codebooks_dim"), False)
    return ref.output, indices, torch.tensor(0.0)


CALLS: dict[str, Callable[[Mapping, Mapping[str, Tensor], Tensor], tuple]] = {
    "VectorQuantizer": vector_quantizer_call,
    "VectorQuantizer2": vector_quantizer2_call,
    "EMAVectorQuantizer": ema_vector_quantizer_call,
    "VectorQuantizerWithInputProjection": vector_quantizer_with_input_projection_call,
    "GumbelQuantizer": gumbel_quantizer_call,
    "GumbelQuantize": gumbel_quantize_call,
    "FSQ": fsq_call,
    "LFQ": lfq_call,
    "LatentQuantize": latent_quantize_call,
    "VectorQuantize": vector_quantize_call,
}


def reference_call(name: str, params: Mapping, tensors: Mapping[str, Tensor], x: Tensor) -> tuple:
    """What the source class ``name`` returns for ``q(x)`` in eval mode (remapped random indices are -1)."""
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.no_grad():
        return CALLS[name](params, tensors, x.float())
