"""VectorQuantize: euclidean / cosine codebooks with EMA, k-means init, dead-code expiry, heads, affine
statistics and the usual gradient estimators, as a Hugging Face model.

Semantics: vector-quantize-pytorch 1.32 `VectorQuantize` (seed: `reference/004_*`). State-dict keys follow
it (`_codebook.embed`, `_codebook.cluster_size`, `_codebook.embed_avg`, `_codebook.initted`, ...), so
`VectorQuantize.from_vector_quantize_pytorch(module)` is a config mapping plus `load_state_dict`.
Memory: nearest-code search, EMA statistics and code lookup are the bounded-memory ops of `hf_vq.ops`
(no N x K one-hot, no codebook repeated per batch element).
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import distributed
from ..modeling_utils import (
    QuantizerConfig,
    QuantizerModel,
    QuantizerOutput,
    check_features,
    check_indices,
    register_quantizer,
)
from ..ops import ema as ema_ops
from ..ops import kmeans as kmeans_ops
from ..ops.estimators import (directional_reparam, gumbel_select, rotate_to, rotate_to_with_commitment,
                              straight_through)
from ..ops.nearest import gather_codes, nearest_code, scores
from ._config_view import fast_view


class VectorQuantizeConfig(QuantizerConfig):
    """Configuration of [`VectorQuantize`] (names and defaults as vector-quantize-pytorch 1.32).

    Args:
        dim (`int`): input feature dim.
        codebook_size (`int`): number of codes K.
        codebook_dim (`int`, *optional*): code dim (per head); projections map `dim` in and out when it differs.
        heads (`int`, defaults to 1): split features into heads; `separate_codebook_per_head` gives each its own.
        decay (`float`, defaults to 0.8), eps (`float`, defaults to 1e-5): EMA decay and Laplace smoothing.
        ema_update (`bool`, *optional*): EMA codebook updates (default on unless `learnable_codebook`).
        manual_ema_update (`bool`): accumulate EMA statistics but leave the codebook update to the caller
            (`update_embed_from_ema()`; a residual quantizer with a shared codebook does it once per step).
        learnable_codebook (`bool`, *optional*): codebook is a parameter trained by gradients (not with EMA).
        kmeans_init (`bool`), kmeans_iters (`int`): initialize codes by k-means on the first batch.
        use_cosine_sim (`bool`): cosine similarity codebook (inputs and codes l2-normalized).
        threshold_ema_dead_code (`float`), reset_cluster_size (`float`, *optional*): codes whose EMA count falls
            below the threshold are replaced by batch vectors, their EMA state reset to `reset_cluster_size`.
        commitment_weight (`float`), commitment_use_cross_entropy_loss (`bool`): commitment loss.
        orthogonal_reg_weight (`float`), orthogonal_reg_active_codes_only (`bool`), orthogonal_reg_max_codes:
            orthogonal regularization of the codebook (makes the codebook a parameter).
        codebook_diversity_loss_weight (`float`), codebook_diversity_temperature (`float`): entropy of mean usage.
        stochastic_sample_codes (`bool`), sample_codebook_temp (`float`), straight_through (`bool`), reinmax
            (`bool`): Gumbel sampling of codes in training, with straight-through / ReinMax gradients.
        rotation_trick (`bool`, *optional*): rotation-trick gradients (arXiv:2410.06424; default on for dim > 1).
        affine_param (`bool`), affine_param_batch_decay, affine_param_codebook_decay: affine re-normalization
            of the codebook to running batch statistics.
        channel_last (`bool`), accept_image_fmap (`bool`), accept_3d_fmap (`bool`): input layout.
        freeze_codebook (`bool`): never update the codebook.
        layernorm_after_project_in (`bool`): LayerNorm after the input projection.
        sync_codebook (`bool`, *optional*): sync codebook state across processes (default: when a group is up).
        sync_kmeans (`bool`, defaults to True): with codebook sync, draw k-means and dead-code samples from all
            ranks (otherwise each rank samples its own batch, as vqp).
        sync_affine_param (`bool`, *optional*): sync affine batch statistics across processes; default (None):
            whenever the codebook is synced (vqp defaults to False).
        directional_reparam (`bool`), directional_reparam_variance (`float`): DiVeQ gradients
            (openreview KRVnpTbx7R): the input moved along the noised direction to its code; learns the codebook
            (defaults `learnable_codebook=True`, `ema_update=False`) and needs `threshold_ema_dead_code > 0`.
        sync_update_v (`float`): synchronous update rule (eq. 21 of the vqtorch draft): adds
            `v * (q - q.detach())` to the output so the codebook gets the output's gradient; needs a learnable codebook.
        manual_in_place_optimizer_update (`bool`): the in-place optimizer computes gradients in `forward`, the
            caller steps it (`update_in_place_optimizer()`).
        return_zeros_for_masked_padding (`bool`): masked positions output zeros (else the input).
        route_gradients_to_input (`bool`): estimator gradients reach the input.
    """

    model_type = "hf_vq_vector_quantize"

    def __init__(
        self,
        dim: int = 256,
        codebook_size: int = 512,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        reset_cluster_size: float | None = None,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        commitment_use_cross_entropy_loss: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        reinmax: bool = False,
        rotation_trick: bool | None = None,
        sync_codebook: bool | None = None,
        ema_update: bool | None = None,
        manual_ema_update: bool = False,
        learnable_codebook: bool | None = None,
        affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        return_zeros_for_masked_padding: bool = True,
        route_gradients_to_input: bool = True,
        sync_kmeans: bool = True,
        sync_affine_param: bool | None = None,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        sync_update_v: float = 0.0,
        manual_in_place_optimizer_update: bool = False,
        **kwargs,
    ):
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        self.decay = decay
        self.eps = eps
        self.freeze_codebook = freeze_codebook
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.use_cosine_sim = use_cosine_sim
        self.layernorm_after_project_in = layernorm_after_project_in
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.reset_cluster_size = reset_cluster_size
        self.channel_last = channel_last
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        self.commitment_weight = commitment_weight
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp
        self.straight_through = straight_through
        self.reinmax = reinmax
        self.rotation_trick = rotation_trick
        self.sync_codebook = sync_codebook
        self.ema_update = ema_update
        self.manual_ema_update = manual_ema_update
        self.learnable_codebook = learnable_codebook
        self.affine_param = affine_param
        self.affine_param_batch_decay = affine_param_batch_decay
        self.affine_param_codebook_decay = affine_param_codebook_decay
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.route_gradients_to_input = route_gradients_to_input
        self.sync_kmeans = sync_kmeans
        self.sync_affine_param = sync_affine_param
        self.directional_reparam = directional_reparam
        self.directional_reparam_variance = directional_reparam_variance
        self.sync_update_v = sync_update_v
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update
        super().__init__(**kwargs)

    def validate(self):
        for name in ("dim", "codebook_size", "heads", "kmeans_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.codebook_dim is not None and (not isinstance(self.codebook_dim, int) or self.codebook_dim < 1):
            raise ValueError(f"codebook_dim must be a positive int or None, got {self.codebook_dim!r}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay!r}")
        if self.resolved_ema_update and self.resolved_learnable_codebook:
            raise ValueError("learnable_codebook=True is incompatible with ema_update=True (set ema_update=False)")
        if self.use_cosine_sim and self.resolved_learnable_codebook:
            raise ValueError("use_cosine_sim=True is not compatible with learnable_codebook=True")
        if self.straight_through and self.resolved_learnable_codebook:
            raise ValueError("straight_through=True is not allowed with learnable_codebook=True")
        if sum(map(bool, (self.straight_through, self.resolved_rotation_trick))) > 1 and self.rotation_trick:
            raise ValueError("choose at most one of straight_through and rotation_trick")
        if self.reinmax and not self.straight_through:
            raise ValueError("reinmax=True requires straight_through=True")
        if self.affine_param and self.use_cosine_sim:
            raise ValueError("affine_param=True is only compatible with the euclidean codebook (use_cosine_sim=False)")
        if self.accept_image_fmap and self.accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap are mutually exclusive")
        if self.directional_reparam:
            if self.straight_through or self.resolved_rotation_trick:
                raise ValueError("directional_reparam=True excludes straight_through and rotation_trick")
            if self.threshold_ema_dead_code <= 0:
                raise ValueError("directional_reparam=True needs dead-code replacement (threshold_ema_dead_code > 0)")
        if not self.directional_reparam_variance >= 0:
            raise ValueError(f"directional_reparam_variance must be >= 0, got {self.directional_reparam_variance!r}")
        if not 0.0 <= self.sync_update_v <= 1.0:
            raise ValueError(f"sync_update_v must be in [0, 1], got {self.sync_update_v!r}")
        if self.sync_update_v > 0 and not self.resolved_learnable_codebook:
            raise ValueError("sync_update_v > 0 needs learnable_codebook=True")

    @property
    def resolved_ema_update(self) -> bool:
        return not self.directional_reparam if self.ema_update is None else bool(self.ema_update)

    @property
    def resolved_learnable_codebook(self) -> bool:
        return self.directional_reparam if self.learnable_codebook is None else bool(self.learnable_codebook)

    @property
    def resolved_rotation_trick(self) -> bool:
        if self.rotation_trick is None:
            return self.dim > 1 and not self.straight_through and not self.directional_reparam
        return bool(self.rotation_trick)

    @property
    def has_commitment_loss(self) -> bool:
        return self.commitment_weight > 0 and not self.directional_reparam

    @property
    def resolved_codebook_dim(self) -> int:
        return self.codebook_dim if self.codebook_dim is not None else self.dim


LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])


@dataclass
class VectorQuantizeOutput(QuantizerOutput):
    """Output of [`VectorQuantize`]: `quantized`, `indices` (-1 where masked), `loss`, the loss terms
    (`commitment_loss`, `codebook_diversity_loss`, `orthogonal_reg_loss`, `inplace_optimize_loss`; also as
    vqp's `LossBreakdown` in `loss_breakdown` with `return_loss_breakdown=True`) and `perplexity`:
    `exp(entropy)` of this batch's code usage (valid positions of this process), averaged over heads."""

    commitment_loss: Tensor | None = None
    codebook_diversity_loss: Tensor | None = None
    orthogonal_reg_loss: Tensor | None = None
    inplace_optimize_loss: Tensor | None = None
    perplexity: Tensor | None = None
    loss_breakdown: LossBreakdown | None = None

    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "indices", "loss")


class Codebook(nn.Module):
    """The codebook state: `embed` (buffer, or parameter when learnable), EMA `cluster_size`/`embed_avg`,
    `initted`, and affine statistics. Keys match vector-quantize-pytorch's `_codebook` submodule."""

    def __init__(self, config: VectorQuantizeConfig):
        super().__init__()
        c = config
        num_codebooks = c.heads if c.separate_codebook_per_head else 1
        shape = (num_codebooks, c.codebook_size, c.resolved_codebook_dim)
        if c.kmeans_init:
            embed = torch.zeros(shape)
        else:
            embed = torch.empty(shape)
            nn.init.kaiming_uniform_(embed)  # (some loaders patch init functions to return None)
            if c.use_cosine_sim:
                embed = F.normalize(embed, dim=-1, eps=1e-6)
        self.register_buffer("initted", torch.tensor(not c.kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, c.codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if c.resolved_learnable_codebook or c.orthogonal_reg_weight > 0:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        if c.affine_param:
            for name in ("batch_mean", "batch_variance", "codebook_mean", "codebook_variance"):
                self.register_buffer(name, torch.zeros(num_codebooks, 1, c.resolved_codebook_dim))
                self.register_buffer(f"{name}_needs_init", torch.tensor(True))


def _l2norm(t: Tensor) -> Tensor:
    return F.normalize(t, p=2, dim=-1, eps=1e-6)


def orthogonal_loss(codes: Tensor) -> Tensor:
    """Eq. 2 of arXiv:2112.00384 over `(h, n, d)` codes."""
    h, n = codes.shape[:2]
    normed = _l2norm(codes)
    cosine = torch.einsum("hid,hjd->hij", normed, normed)
    return (cosine**2).sum() / (h * n**2) - (1 / n)


@register_quantizer
class VectorQuantize(QuantizerModel):
    """Vector quantizer with a learned codebook (EMA or gradient), as in vector-quantize-pytorch.

    Args:
        config ([`VectorQuantizeConfig`]): or its fields as keyword arguments.
        in_place_codebook_optimizer (`Callable[[iterable of parameters], torch.optim.Optimizer]`, *optional*):
            optimizer factory for a learnable codebook, stepped inside `forward` in training. A callable is not
            JSON-serializable, so it is a constructor argument, not a config field.

    Example:
        >>> vq = VectorQuantize(dim=64, codebook_size=512, decay=0.99)
        >>> out = vq(torch.randn(2, 100, 64))
        >>> out.quantized.shape, out.indices.shape
        (torch.Size([2, 100, 64]), torch.Size([2, 100]))
    """

    config_class = VectorQuantizeConfig

    def __init__(
        self,
        config: VectorQuantizeConfig | None = None,
        in_place_codebook_optimizer: Callable | None = None,
        **kwargs,
    ):
        super().__init__(config, **kwargs)
        c = self.config
        inner = c.resolved_codebook_dim * c.heads
        self.has_projections = inner != c.dim
        if self.has_projections:
            linear = nn.Linear(c.dim, inner)
            self.project_in = nn.Sequential(linear, nn.LayerNorm(inner)) if c.layernorm_after_project_in else linear
            self.project_out = nn.Linear(inner, c.dim)
        else:
            self.project_in = self.project_out = nn.Identity()
        self._codebook = Codebook(c)
        if in_place_codebook_optimizer is not None and not isinstance(self._codebook.embed, nn.Parameter):
            raise ValueError("in_place_codebook_optimizer needs learnable_codebook=True (and ema_update=False)")
        self.in_place_codebook_optimizer = (
            in_place_codebook_optimizer(self._codebook.parameters()) if in_place_codebook_optimizer else None
        )
        self.post_init()

    def _init_weights(self, module):
        # the codebook is initialized in Codebook.__init__ (kaiming uniform, as vqp); nothing else to do
        super()._init_weights(module)

    # -- conversions ------------------------------------------------------------------------------

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "VectorQuantize":
        """Build an hf_vq VectorQuantize with a vector-quantize-pytorch module's config and full state."""
        cb = module._codebook
        learnable = bool(module.learnable_codebook)
        config = VectorQuantizeConfig(
            dim=module.dim,
            codebook_size=module.codebook_size,
            codebook_dim=cb.embed.shape[-1],
            heads=module.heads,
            separate_codebook_per_head=module.separate_codebook_per_head,
            decay=cb.decay,
            eps=cb.eps,
            freeze_codebook=module.freeze_codebook,
            kmeans_init=not bool(cb.initted),
            kmeans_iters=cb.kmeans_iters,
            use_cosine_sim=module.use_cosine_sim,
            layernorm_after_project_in=isinstance(module.project_in, nn.Sequential),
            threshold_ema_dead_code=cb.threshold_ema_dead_code,
            reset_cluster_size=cb.reset_cluster_size,
            channel_last=module.channel_last,
            accept_image_fmap=module.accept_image_fmap,
            accept_3d_fmap=module.accept_3d_fmap,
            commitment_weight=module.commitment_weight,
            commitment_use_cross_entropy_loss=module.commitment_use_cross_entropy_loss,
            orthogonal_reg_weight=module.orthogonal_reg_weight,
            orthogonal_reg_active_codes_only=module.orthogonal_reg_active_codes_only,
            orthogonal_reg_max_codes=module.orthogonal_reg_max_codes,
            codebook_diversity_loss_weight=module.codebook_diversity_loss_weight,
            codebook_diversity_temperature=module.codebook_diversity_temperature,
            stochastic_sample_codes=cb.gumbel_sample.keywords.get("stochastic", False),
            sample_codebook_temp=cb.sample_codebook_temp,
            straight_through=cb.gumbel_sample.keywords.get("straight_through", False),
            rotation_trick=bool(module.rotation_trick),
            ema_update=bool(cb.ema_update),
            manual_ema_update=bool(cb.manual_ema_update),
            learnable_codebook=learnable,
            affine_param=cb.affine_param,
            affine_param_batch_decay=getattr(cb, "affine_param_batch_decay", 0.99),
            affine_param_codebook_decay=getattr(cb, "affine_param_codebook_decay", 0.9),
            return_zeros_for_masked_padding=module.return_zeros_for_masked_padding,
            route_gradients_to_input=module.route_gradients_to_input,
            # vqp keeps sync_kmeans only as its choice of sampler, and only when it syncs at all
            sync_kmeans=not (cb.use_ddp and cb.kmeans_all_reduce_fn is not cb.all_reduce_fn),
            sync_affine_param=bool(getattr(cb, "sync_affine_param", False)),
            directional_reparam=bool(module.directional_reparam),
            directional_reparam_variance=module.directional_reparam_variance,
            sync_update_v=module.sync_update_v,
            manual_in_place_optimizer_update=bool(module.manual_in_place_optimizer_update),
        )
        if getattr(cb, "vq_bridge", None) is not None:
            raise ValueError("vqp modules with a vq_bridge are not supported (hf_vq has no vq_bridge option)")
        if module.in_place_codebook_optimizer is not None:
            raise ValueError("the vqp module has an in-place codebook optimizer: pass in_place_codebook_optimizer= "
                             "to VectorQuantize yourself (an optimizer is not part of a config or checkpoint)")
        model = cls(config)
        state = dict(module.state_dict())
        if cb.affine_param:
            # vqp registers batch statistics as None until the first batch: keep ours flagged "needs init"
            for name in ("batch_mean", "batch_variance"):
                key = f"_codebook.{name}"
                if state.get(key) is None:
                    state[key] = model._codebook.get_buffer(name)
                    state[f"{key}_needs_init"] = torch.tensor(True)
                else:
                    state[f"{key}_needs_init"] = torch.tensor(False)
        model.load_state_dict(state, strict=True)
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict` with an error that names every missing, unexpected or mis-shaped key."""
        own = self.state_dict()
        problems = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state_dict.items()
            if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
        ]
        if strict:
            problems += [f"missing key {k}" for k in own if k not in state_dict]
            problems += [f"unexpected key {k}" for k in state_dict if k not in own]
        if problems:
            raise ValueError("VectorQuantize state dict does not match the model:\n  " + "\n  ".join(problems))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- codebook access --------------------------------------------------------------------------

    @property
    def codebook(self) -> Tensor:
        embed = self._codebook.embed
        return embed if self.config.separate_codebook_per_head else embed[0]

    def _needs_transpose(self) -> bool:
        c = fast_view(self.config)
        return not c.channel_last or c.accept_image_fmap or c.accept_3d_fmap

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes `(b, ..., heads * codebook_dim)` (channel-first for image/3d layouts) for `indices`."""
        c = fast_view(self.config)
        check_indices(indices, c.codebook_size)
        embed = self._codebook.embed
        if c.heads == 1:
            codes = embed[0][indices]
        else:
            if indices.shape[-1] != c.heads:
                raise ValueError(f"multi-head indices must end with a heads axis of size {c.heads}")
            head_ids = torch.arange(c.heads, device=indices.device)
            table = embed if c.separate_codebook_per_head else embed.expand(c.heads, -1, -1)
            codes = table[head_ids, indices].flatten(-2)  # (..., heads, d) -> (..., heads * d)
        return codes.movedim(-1, 1) if self._needs_transpose() else codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        codes = self.get_codes_from_indices(indices)
        if self._needs_transpose():
            return self.project_out(codes.movedim(1, -1)).movedim(-1, 1)
        return self.project_out(codes)

    # -- layout -----------------------------------------------------------------------------------

    def _to_tokens(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """`x` to `(b, n, d)` plus functions restoring features and indices to the input layout."""
        c = fast_view(self.config)
        if x.ndim == 2:
            return x.unsqueeze(1), lambda q: q.squeeze(1), lambda i: i.squeeze(1)
        if c.accept_image_fmap or c.accept_3d_fmap:
            want = 4 if c.accept_image_fmap else 5
            if x.ndim != want:
                raise ValueError(f"expected a rank-{want} feature map (b, d, ...), got shape {tuple(x.shape)}")
            spatial = x.shape[2:]
            tokens = x.flatten(2).transpose(1, 2)
            return (
                tokens,
                lambda q: q.transpose(1, 2).reshape(q.shape[0], q.shape[-1], *spatial),
                lambda i: i.reshape(i.shape[0], *spatial, *i.shape[2:]),
            )
        if x.ndim != 3:
            raise ValueError(
                f"expected (b, n, d) input (or set accept_image_fmap / accept_3d_fmap), got shape {tuple(x.shape)}"
            )
        if not c.channel_last:
            return x.transpose(1, 2), lambda q: q.transpose(1, 2), lambda i: i
        return x, lambda q: q, lambda i: i

    def _split_heads(self, x: Tensor) -> Tensor:
        """`(b, n, h*d)` -> `(h, b, n, d)` (separate codebooks) or `(1, b*h, n, d)` (shared)."""
        c = fast_view(self.config)
        if c.heads == 1:  # (one view: in a training step every view is an autograd node, i.e. host time)
            return x.unsqueeze(0)
        b, n, _ = x.shape
        x = x.view(b, n, c.heads, -1)
        if c.separate_codebook_per_head:
            return x.permute(2, 0, 1, 3)
        return x.permute(0, 2, 1, 3).reshape(1, b * c.heads, n, -1)

    def _merge_heads(self, t: Tensor, b: int) -> Tensor:
        """Inverse of `_split_heads` for `(H, B, n, ...)` tensors -> `(b, n, heads, ...)`."""
        c = fast_view(self.config)
        if c.separate_codebook_per_head:
            return t.movedim(0, 2)
        return t.reshape(b, c.heads, *t.shape[2:]).movedim(1, 2)

    # -- codebook state updates -------------------------------------------------------------------

    def _sync(self) -> bool:
        sync = self.config.sync_codebook
        return distributed.is_distributed() if sync is None else bool(sync) and distributed.is_distributed()

    def _sync_samples(self) -> bool:
        """k-means and dead-code samples drawn from every rank (vqp: `use_ddp and sync_kmeans`)."""
        return self._sync() and self.config.sync_kmeans

    def _sync_affine(self) -> bool:
        sync = self.config.sync_affine_param
        return self._sync() if sync is None else bool(sync) and distributed.is_distributed()

    def _all_reduce(self, *tensors: Tensor) -> None:
        if self._sync():
            distributed.all_reduce_sum_(*tensors)

    def _is_initted(self) -> bool:
        """`bool(initted)` without a host sync per forward once it is True: the answer is kept with the buffer's
        identity and version counter (any in-place write, e.g. `load_state_dict` or `fill_`, bumps it).

        Under torch.compile the buffer cannot be read: a codebook without k-means init is initialized at
        construction, and one with it must have been seen initialized by an eager call (the k-means step runs
        eagerly); dynamo guards on that host-side answer."""
        if torch.compiler.is_compiling():
            if not self.config.kmeans_init or self.__dict__.get("_initted_key") is not None:
                return True
            raise RuntimeError("kmeans_init=True: run one forward outside torch.compile first (k-means initializes "
                               "the codebook eagerly; a loaded, initialized checkpoint also needs one eager call)")
        t = self._codebook.initted
        key = (t.data_ptr(), t._version, t.device)
        if self.__dict__.get("_initted_key") == key:
            return True
        if not bool(t):
            return False
        self.__dict__["_initted_key"] = key
        return True

    @torch.no_grad()
    def _init_embed(self, flat: Tensor, mask: Tensor | None) -> None:
        """k-means on the first batch; every rank ends with the same centroids."""
        cb, c = self._codebook, fast_view(self.config)
        if mask is not None:
            flat = flat[:, mask[0]] if flat.shape[0] == 1 else torch.stack([f[m] for f, m in zip(flat, mask)])
        sync = self._sync_samples()
        # initial centroids drawn from the union of all ranks' rows (only the drawn rows travel)
        init = torch.stack([kmeans_ops.sample_rows_across_ranks(f, c.codebook_size, sync) for f in flat])
        metric = "cosine" if c.use_cosine_sim else "euclidean"
        embed, counts = kmeans_ops.kmeans(flat, c.codebook_size, c.kmeans_iters, metric=metric, init=init,
                                          all_reduce=self._all_reduce if sync else None)
        cb.embed_avg.copy_(embed * counts.unsqueeze(-1))
        cb.cluster_size.copy_(counts)
        self.update_embed_from_ema()
        cb.initted.fill_(True)
        self._is_initted()  # keep the answer on the host (torch.compile reads only that)

    @torch.no_grad()
    def update_embed_from_ema(self) -> None:
        cb, c = self._codebook, fast_view(self.config)
        ema_ops.codebooks_from_ema_([cb.cluster_size], [cb.embed_avg], [cb.embed.data], c.eps)
        if c.use_cosine_sim:
            cb.embed.data.copy_(_l2norm(cb.embed.data))

    def _decayed(self, name: str, new: Tensor, decay: float) -> None:
        """vqp's `update_with_decay`: first value taken as is, then `old * decay + new * (1 - decay)`."""
        cb = self._codebook
        flag = cb.get_buffer(f"{name}_needs_init")
        old = cb.get_buffer(name)
        new = new.detach()
        old.copy_(new if bool(flag) else old * decay + new * (1 - decay))
        flag.fill_(False)

    @torch.no_grad()
    def _update_affine(self, flat: Tensor, mask: Tensor | None) -> None:
        c, cb = fast_view(self.config), self._codebook
        if self.training:
            self._decayed("codebook_mean", cb.embed.mean(dim=1, keepdim=True), c.affine_param_codebook_decay)
            self._decayed("codebook_variance", cb.embed.var(dim=1, unbiased=False, keepdim=True),
                          c.affine_param_codebook_decay)
        if mask is not None:
            flat = torch.stack([f[m] for f, m in zip(flat, mask)])
        count = torch.tensor(float(flat.shape[1]), device=flat.device)
        total = flat.sum(dim=1, keepdim=True)
        if self._sync_affine():
            self._all_reduce(count, total)
            mean = total / count
            sq = ((flat - mean) ** 2).sum(dim=1, keepdim=True)
            self._all_reduce(sq)
            var = sq / count
        else:
            mean, var = flat.mean(dim=1, keepdim=True), flat.var(dim=1, unbiased=False, keepdim=True)
        self._decayed("batch_mean", mean, c.affine_param_batch_decay)
        self._decayed("batch_variance", var, c.affine_param_batch_decay)

    def _affine_embed(self, embed: Tensor) -> Tensor:
        cb = self._codebook
        codebook_std = cb.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = cb.batch_variance.clamp(min=1e-5).sqrt()
        return (embed - cb.codebook_mean) * (batch_std / codebook_std) + cb.batch_mean

    @torch.no_grad()
    def _update_codebook(
        self,
        flat: Tensor,
        indices: Tensor,
        mask: Tensor | None,
        ema_update: bool | None = None,
        ema_update_weight: Tensor | Callable | None = None,
        accum_ema_update: bool = False,
    ) -> Tensor | None:
        """EMA counts/sums (one fused all-reduce), codebook from EMA, then dead-code expiry. Returns this batch's
        code counts `(H, K)` on this rank (what the perplexity counts), or None when nothing was counted.

        `ema_update_weight` scales each code's EMA step (a tensor `(K,)`/`(heads, K)`, or a function of the
        batch's `(sums, counts)`); `accum_ema_update` only accumulates the batch statistics, which the next
        update adds to its own (vqp keeps them in the buffers' `.grad`; here in memory, not checkpointed)."""
        c, cb = fast_view(self.config), self._codebook
        ema_update = c.resolved_ema_update if ema_update is None else ema_update
        has_dead = c.threshold_ema_dead_code > 0
        if not ema_update and not has_dead:
            return None
        stats_input = flat
        if c.affine_param:
            codebook_std = cb.codebook_variance.clamp(min=1e-5).sqrt()
            batch_std = cb.batch_variance.clamp(min=1e-5).sqrt()
            stats_input = (flat - cb.batch_mean) * (codebook_std / batch_std) + cb.codebook_mean
        counts, sums = ema_ops.cluster_stats(stats_input, indices, c.codebook_size, mask)
        local = counts.clone() if self._sync() else counts  # (the all-reduce sums in place)
        self._all_reduce(counts, sums)
        if callable(ema_update_weight):
            ema_update_weight = ema_update_weight(sums, counts)
        pending = self.__dict__.get("_pending_ema")  # (`get`, not `pop`: dynamo of torch 2.11 cannot trace the latter)
        if pending is not None:
            del self.__dict__["_pending_ema"]
            counts, sums = counts + pending[0], sums + pending[1]
        if accum_ema_update:
            self.__dict__["_pending_ema"] = (counts, sums)
            return local
        ema_ops.ema_update_((cb.cluster_size, cb.embed_avg), (counts, sums), c.decay, ema_update_weight)
        if ema_update and not c.manual_ema_update:
            self.update_embed_from_ema()
        if has_dead:
            self.expire_codes(flat, mask)
        return local

    @torch.no_grad()
    @torch.compiler.disable  # data-dependent (which codes, how many samples): runs eagerly, one graph break
    def expire_codes(self, flat: Tensor, mask: Tensor | None) -> None:
        """Replace codes whose EMA count fell below the threshold by batch vectors, and reset their EMA
        state (count and sum) so the stale average cannot overwrite the new vector."""
        c, cb = fast_view(self.config), self._codebook
        expired = cb.cluster_size < c.threshold_ema_dead_code
        if self._sync():
            distributed.broadcast_(expired)
        if not bool(expired.any()):
            return
        reset = c.reset_cluster_size if c.reset_cluster_size is not None else c.threshold_ema_dead_code
        samples_all = _l2norm(flat) if c.use_cosine_sim else flat
        sync = self._sync_samples()
        for head, (samples, dead) in enumerate(zip(samples_all, expired)):
            if mask is not None:
                samples = samples[mask[head]]
            available = kmeans_ops.global_row_count(samples, sync)  # the same on every rank
            if available == 0:
                continue
            dead_ids = dead.nonzero(as_tuple=True)[0]
            if dead_ids.numel() > available:
                # more dead codes than samples: replace a random subset now, the rest in later steps
                chosen = torch.randperm(dead_ids.numel(), device=dead_ids.device)[:available]
                dead_ids = dead_ids[chosen.sort().values]  # ascending, as vqp fills its boolean mask
                if sync:
                    distributed.broadcast_(dead_ids)
            new = kmeans_ops.sample_rows_across_ranks(samples, dead_ids.numel(), sync).to(cb.embed.dtype)
            cb.embed.data[head, dead_ids] = new
            cb.cluster_size[head, dead_ids] = reset
            cb.embed_avg[head, dead_ids] = new * reset

    def update_in_place_optimizer(self) -> None:
        """Step the in-place codebook optimizer; gradients are averaged across ranks first."""
        if self.in_place_codebook_optimizer is None:
            return
        if self._sync():
            grads = [p.grad for p in self._codebook.parameters() if p.grad is not None]
            distributed.all_reduce_sum_(*grads)
            for g in grads:
                g /= distributed.world_size()
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    # -- forward ----------------------------------------------------------------------------------

    def plain_eval_codebook(self) -> Tensor | None:
        """The `(K, d)` codebook when this layer's forward, outside training, is exactly "nearest euclidean code of
        the raw `(..., d)` input, looked up by index" (one head, no projection or affine, initialized,
        token-last layout): a caller may then run `nearest_code` and the lookup itself (ResidualVQ's eval loop,
        without this forward's per-call bookkeeping). None otherwise. Keeps the codebook's autograd link when
        it is learnable, as the forward does."""
        c, cb = fast_view(self.config), self._codebook
        if self.training or c.use_cosine_sim or c.affine_param or not self.takes_tokens_as_rows() \
                or not self._is_initted():
            return None
        learn = isinstance(cb.embed, nn.Parameter) and c.resolved_learnable_codebook
        return (cb.embed if learn else cb.embed.detach())[0]

    def residual_train_codebook(self) -> Tensor | None:
        """The `(K, d)` float32 codebook when this layer's training step on `(b, n, d)` input that requires grad is
        exactly a level of `triton_residual.residual_train_levels` followed by the EMA update and dead-code expiry:
        nearest euclidean code, the rotation trick with the MSE commitment loss, EMA codebook (decay, eps), nothing
        else (no affine, in-place optimizer, sampling, extra losses, pending accumulated statistics); initialized.
        ResidualVQ then runs all its levels in one fused pass. None otherwise."""
        c, cb = fast_view(self.config), self._codebook
        if not (self.takes_tokens_as_rows() and self._rotation_and_commitment(None, True)):
            return None
        if (c.use_cosine_sim or c.affine_param or not c.resolved_ema_update or c.manual_ema_update
                or c.freeze_codebook or c.stochastic_sample_codes or c.codebook_diversity_loss_weight > 0
                or c.orthogonal_reg_weight > 0 or self.in_place_codebook_optimizer is not None
                or self.__dict__.get("_pending_ema") is not None or cb.embed.dtype != torch.float32
                or not self._is_initted()):
            return None
        return cb.embed.detach()[0]

    def _quantize(self, flat: Tensor, embed: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """Codes and indices for `flat (H, N, d)`: nearest code, or a Gumbel sample in training."""
        c = fast_view(self.config)
        metric = "cosine" if c.use_cosine_sim else "euclidean"
        sample = self.training and c.stochastic_sample_codes and temperature > 0
        if not sample:
            differentiable = embed.requires_grad and torch.is_grad_enabled()  # a learnable codebook's lookup
            found = nearest_code(flat, embed.expand(flat.shape[0], -1, -1), metric=metric,
                                 return_codes=not differentiable)
            return (gather_codes(embed, found[0]) if differentiable else found[2]), found[0]
        embed = embed.expand(flat.shape[0], -1, -1)
        indices, soft = [], []
        for sl in _row_slices(flat, embed):  # row chunks: never a full (N, K) matrix of logits
            if c.straight_through:  # recomputed in backward (same Gumbel noise: the RNG state is replayed)
                idx, mix = checkpoint(self._sample_rows, flat[:, sl], embed, temperature, use_reentrant=False)
                soft.append(mix)
            else:
                with torch.no_grad():
                    idx, _ = self._sample_rows(flat[:, sl], embed, temperature)
            indices.append(idx)
        indices = torch.cat(indices, dim=1)
        codes = gather_codes(embed, indices)
        if soft:  # straight-through: value of the hard code, gradient of the soft mixture
            mix = torch.cat(soft, dim=1)
            codes = codes + mix - mix.detach()
        return codes, indices

    def _sample_rows(self, x: Tensor, embed: Tensor, temperature: float) -> tuple[Tensor, Tensor | None]:
        """Gumbel-sampled indices for rows `x`, and (straight-through) the soft mixture of codes."""
        c = fast_view(self.config)
        logits = scores(x, embed, "cosine" if c.use_cosine_sim else "euclidean")
        indices, weights = gumbel_select(logits, temperature, straight_through=c.straight_through, reinmax=c.reinmax)
        mix = torch.einsum("hnk,hkd->hnd", weights, embed) if weights is not None else None
        return indices, mix

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_dict: bool | None = None,
        *,
        indices: Tensor | None = None,
        ema_update: bool | None = None,
        ema_update_weight: Tensor | Callable | None = None,
        accum_ema_update: bool = False,
        return_loss_breakdown: bool = False,
    ) -> VectorQuantizeOutput | tuple:
        """Quantize `x` (`(b, n, d)`; `(b, d, n)` with `channel_last=False`; `(b, d, h, w)` / `(b, d, t, h, w)`
        with `accept_image_fmap` / `accept_3d_fmap`; `(b, d)` as one token). `mask`/`lens` mark valid
        positions of `(b, n)` input. Returns [`VectorQuantizeOutput`] or `(quantized, indices, loss)`
        (`(..., loss_breakdown)` with `return_loss_breakdown`).

        As vqp: `indices` (shaped like the output indices, -1 ignored) makes `loss` the cross-entropy of the
        code scores against those codes (NaturalSpeech 2) and the tuple form `(quantized, loss)`;
        `ema_update` overrides the config for this call; `ema_update_weight` and `accum_ema_update` are
        described in `_update_codebook`."""
        c, cb = fast_view(self.config), self._codebook
        if c.check_inputs:
            check_features(x, c.dim, name="x")
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        if lens is not None:
            mask = torch.arange(x.shape[1], device=x.device) < lens[:, None]
        freeze_codebook = c.freeze_codebook if freeze_codebook is None else freeze_codebook
        temperature = c.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        dtype, input_requires_grad = x.dtype, x.requires_grad

        tokens, restore, restore_indices = self._to_tokens(x)
        if tokens.shape[-1] != c.dim:
            raise ValueError(f"expected feature dim {c.dim}, got {tokens.shape[-1]} (input shape {tuple(x.shape)})")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape[:2]):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(tokens.shape[:2])}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        orig_tokens = tokens
        b, n = tokens.shape[:2]
        projected = self.project_in(tokens)
        heads_x = self._split_heads(projected)  # (H, B, n, d)
        if c.use_cosine_sim:
            heads_x = _l2norm(heads_x)
        H, B = heads_x.shape[:2]
        flat_mask = None
        if mask is not None:
            per_row = mask if B == b else mask.repeat_interleave(c.heads, dim=0)
            flat_mask = per_row.reshape(1, -1).expand(H, -1)

        target = self._indices_to_rows(indices, b, n) if indices is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = heads_x.float().reshape(H, B * n, -1)
            rows = self._quantize_rows(flat, flat_mask, temperature, freeze_codebook, input_requires_grad, B,
                                       target=target, ema_update=ema_update, ema_update_weight=ema_update_weight,
                                       accum_ema_update=accum_ema_update)
            perplexity = _perplexity(rows.indices, c.codebook_size, flat_mask, rows.counts)

        if c.heads == 1:
            codes = rows.codes.reshape(b, n, -1)
        else:
            codes = self._merge_heads(rows.codes.reshape(H, B, n, -1), b).flatten(-2)
        quantized = self.project_out(codes.to(dtype))
        if indices is not None:  # vqp returns here, its codes not yet merged/projected; ours in the output layout
            output = VectorQuantizeOutput(quantized=restore(quantized), loss=rows.loss, perplexity=perplexity)
            return output if (c.return_dict if return_dict is None else return_dict) else (output.quantized, rows.loss)
        indices = self._merge_heads(rows.indices.reshape(H, B, n), b)
        if c.heads == 1:
            indices = indices.squeeze(-1)
        if mask is not None:
            fill = torch.zeros_like(orig_tokens) if c.return_zeros_for_masked_padding else orig_tokens
            quantized = torch.where(mask.unsqueeze(-1), quantized, fill)
            indices = indices.masked_fill(~(mask if c.heads == 1 else mask.unsqueeze(-1)), -1)
        inplace_loss = rows.inplace_loss if rows.inplace_loss is not None else torch.zeros((), device=x.device)
        output = VectorQuantizeOutput(
            quantized=restore(quantized),
            indices=restore_indices(indices),
            loss=rows.loss,
            inplace_optimize_loss=inplace_loss,
            perplexity=perplexity,
            **rows.loss_terms,
        )
        if return_loss_breakdown:
            output.loss_breakdown = LossBreakdown(output.commitment_loss, output.codebook_diversity_loss,
                                                  output.orthogonal_reg_loss, inplace_loss)
        result = self._output(output, return_dict)
        return (*result, output.loss_breakdown) if return_loss_breakdown and isinstance(result, tuple) else result

    def quantize_tokens(self, tokens: Tensor, sample_codebook_temp: float | None = None,
                        freeze_codebook: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`(quantized, indices, loss)` of `forward(tokens)` for `(b, n, d)` tokens when `takes_tokens_as_rows()`:
        the same row-level work, without the layout, perplexity and output object (a residual quantizer's
        levels, which need none of them, call this). Unmasked input only."""
        c = fast_view(self.config)
        freeze_codebook = c.freeze_codebook if freeze_codebook is None else freeze_codebook
        temperature = c.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        b, n, d = tokens.shape
        flat = tokens.view(1, b, n, d)  # forward's (heads, batch, n, d) layout
        if c.use_cosine_sim:
            flat = _l2norm(flat)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            rows = self._quantize_rows(flat.float().reshape(1, b * n, d), None, temperature, freeze_codebook,
                                       tokens.requires_grad, b)
        return rows.codes.view(b, n, d).to(tokens.dtype), rows.indices.view(b, n), rows.loss

    def takes_tokens_as_rows(self) -> bool:
        """Whether `(b, n, dim)` tokens are this layer's code-space rows as they are: one head, no projections,
        token-last layout (then `quantize_tokens` and `plain_eval_codebook` apply)."""
        return fast_view(self.config).heads == 1 and not self.has_projections and not self._needs_transpose()

    def _quantize_rows(self, flat: Tensor, flat_mask: Tensor | None, temperature: float, freeze_codebook: bool,
                       input_requires_grad: bool, batch: int, *, target: Tensor | None = None,
                       ema_update: bool | None = None, ema_update_weight: Tensor | Callable | None = None,
                       accum_ema_update: bool = False) -> "_Rows":
        """The row-level step of `forward` on `flat (H, N, d)` float32 (cosine: already normalized): initialization,
        in-place optimizer, code choice, codebook update, losses and the gradient estimator. `target (H, N)`:
        the `indices=` argument's codes (the loss is then their cross-entropy)."""
        c, cb = fast_view(self.config), self._codebook
        if not self._is_initted():
            self._init_embed(flat.detach(), flat_mask)
        if c.affine_param:
            self._update_affine(flat.detach(), flat_mask)
        learn = isinstance(cb.embed, nn.Parameter) and c.resolved_learnable_codebook
        embed = cb.embed if learn else cb.embed.detach()
        if c.affine_param:
            embed = self._affine_embed(embed)

        inplace_loss, counts = None, None
        if self.in_place_codebook_optimizer is not None and self.training and not freeze_codebook:
            codes, _ = self._quantize(flat, embed, temperature)
            inplace_loss = _masked_mse(codes, flat.detach(), flat_mask)
            inplace_loss.backward()
            if not c.manual_in_place_optimizer_update:
                self.update_in_place_optimizer()
            embed = cb.embed
        codes, code_ids = self._quantize(flat, embed, temperature)
        if c.commitment_use_cross_entropy_loss or c.codebook_diversity_loss_weight > 0 or target is not None:
            embed = embed.clone()  # these losses score against the codebook as it was before the update
        if self.training and not freeze_codebook:
            counts = self._update_codebook(flat.detach(), code_ids, flat_mask, ema_update, ema_update_weight,
                                           accum_ema_update)

        if target is not None:
            H = flat.shape[0]
            valid = target >= 0 if flat_mask is None else (target >= 0) & flat_mask
            metric = "cosine" if c.use_cosine_sim else "euclidean"
            loss = _cross_entropy_to_codes(flat, embed.expand(H, -1, -1), metric, target.clamp(min=0), valid)
            return _Rows(self._estimator(flat, codes, input_requires_grad), code_ids, loss, {}, inplace_loss, counts)
        if self._rotation_and_commitment(flat_mask, input_requires_grad):
            # vqp's defaults: both read (flat, detached codes); one fused pass each way on CUDA
            rotated, commit = rotate_to_with_commitment(flat, codes.detach())
            loss, terms = self._losses(flat, codes, code_ids, embed, flat_mask, freeze_codebook, batch, commit)
            return _Rows(rotated, code_ids, loss, terms, inplace_loss, counts)
        loss, terms = self._losses(flat, codes, code_ids, embed, flat_mask, freeze_codebook, batch)
        return _Rows(self._estimator(flat, codes, input_requires_grad), code_ids, loss, terms, inplace_loss, counts)

    def _rotation_and_commitment(self, flat_mask: Tensor | None, input_requires_grad: bool) -> bool:
        """Whether `_estimator` is the rotation trick on detached codes and the commitment loss is the MSE to
        detached codes over all rows (what `rotate_to_with_commitment` computes)."""
        c = fast_view(self.config)
        return (self.training and flat_mask is None and input_requires_grad and c.route_gradients_to_input
                and c.resolved_rotation_trick and not c.directional_reparam and c.has_commitment_loss
                and not c.commitment_use_cross_entropy_loss and not c.resolved_learnable_codebook
                and not (c.stochastic_sample_codes and c.straight_through) and not c.sync_update_v)

    def _indices_to_rows(self, indices: Tensor, b: int, n: int) -> Tensor:
        """Indices in the output layout (`(b, ...)`, heads last) to the internal `(H, B * n)` row layout."""
        c = fast_view(self.config)
        if indices.is_floating_point() or indices.numel() != b * n * c.heads:
            raise ValueError(f"indices must be an integer tensor with {b * n * c.heads} entries (the output "
                             f"indices' shape), got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (indices.min() < -1 or indices.max() >= c.codebook_size):
            raise ValueError(f"indices must be in [-1, {c.codebook_size}) (-1 = ignored)")
        rows = indices.reshape(b, n, c.heads)
        if c.separate_codebook_per_head:
            return rows.permute(2, 0, 1).reshape(c.heads, b * n)
        return rows.permute(0, 2, 1).reshape(1, -1)

    def _estimator(self, flat: Tensor, codes: Tensor, input_requires_grad: bool) -> Tensor:
        c = fast_view(self.config)
        if not self.training:
            return codes
        learn = c.resolved_learnable_codebook
        if not learn:
            codes = codes.detach() if not (c.stochastic_sample_codes and c.straight_through) else codes
        if input_requires_grad and c.route_gradients_to_input:
            if c.resolved_rotation_trick:
                codes = rotate_to(flat, codes)
            elif c.directional_reparam:
                codes = directional_reparam(flat, codes, c.directional_reparam_variance)
            else:
                codes = straight_through(flat, codes)
        if c.sync_update_v > 0:
            # synchronous update (vqtorch draft eq. 21): the codebook also receives the output's gradient
            codes = codes + c.sync_update_v * (codes - codes.detach())
        return codes

    def _losses(self, flat, codes, indices, embed, mask, freeze_codebook, batch,
                commit: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """`(loss, terms)`: the weighted training loss and its unweighted terms (0-dim tensors, zero when off or
        outside training); `commit`: the commitment term when the caller computed it. As vqp, the training loss
        is differentiable even when no term is."""
        c = fast_view(self.config)
        zero = torch.zeros((), device=flat.device)
        terms = dict(commitment_loss=zero, codebook_diversity_loss=zero, orthogonal_reg_loss=zero)
        if not self.training:
            return zero, terms
        weighted = []
        metric = "cosine" if c.use_cosine_sim else "euclidean"
        if c.codebook_diversity_loss_weight > 0:
            diversity = -_mean_position_entropy(flat, embed.expand(flat.shape[0], -1, -1), metric,
                                                c.codebook_diversity_temperature, batch)
            terms["codebook_diversity_loss"] = diversity
            weighted.append(diversity * c.codebook_diversity_loss_weight)
        if c.has_commitment_loss:
            if commit is None and c.commitment_use_cross_entropy_loss:
                commit = _cross_entropy_to_codes(flat, embed.expand(flat.shape[0], -1, -1), metric, indices, mask)
            elif commit is None:
                learn = c.resolved_learnable_codebook and not freeze_codebook
                commit = _masked_mse(codes if learn else codes.detach(), flat, mask)
            terms["commitment_loss"] = commit
            weighted.append(commit if c.commitment_weight == 1 else commit * c.commitment_weight)
        if c.orthogonal_reg_weight > 0:
            codebook = self._codebook.embed
            if c.orthogonal_reg_active_codes_only:
                if c.heads > 1 and c.separate_codebook_per_head:
                    raise ValueError("orthogonal_reg_active_codes_only is not supported with separate codebooks per head")
                codebook = codebook[:, torch.unique(indices)]
            if c.orthogonal_reg_max_codes is not None and codebook.shape[-2] > c.orthogonal_reg_max_codes:
                keep = torch.randperm(codebook.shape[-2], device=codebook.device)[: c.orthogonal_reg_max_codes]
                codebook = codebook[:, keep]
            ortho = orthogonal_loss(codebook)
            terms["orthogonal_reg_loss"] = ortho
            weighted.append(ortho * c.orthogonal_reg_weight)
        loss = sum(weighted[1:], weighted[0]) if weighted else zero
        if torch.is_grad_enabled() and not loss.requires_grad and not torch.compiler.is_compiling():
            loss = loss.detach().requires_grad_()  # (a graph cannot make a leaf: compiled, such a loss stays constant)
        return loss, terms


class _Rows(NamedTuple):
    """What `VectorQuantize._quantize_rows` returns: codes `(H, N, d)` (through the estimator), indices `(H, N)`,
    the loss, its unweighted terms, and the in-place optimizer's loss (None when it did not run)."""

    codes: Tensor
    indices: Tensor
    loss: Tensor
    loss_terms: dict[str, Tensor]
    inplace_loss: Tensor | None
    counts: Tensor | None = None  # this batch's code counts `(H, K)` when the codebook update computed them


@torch.no_grad()
def _perplexity(indices: Tensor, num_codes: int, mask: Tensor | None, counts: Tensor | None = None) -> Tensor:
    """`exp(entropy)` of code usage per head `(H, N)` (valid rows only), averaged over heads; by bincount, unless
    the codebook update already counted them (`counts (H, K)`)."""
    if counts is None:
        heads = indices.shape[0]
        weights = None if mask is None else mask.reshape(-1).float()
        counts = ema_ops.code_counts(ema_ops.head_code_ids(indices, num_codes), heads * num_codes, weights)
        counts = counts.view(heads, num_codes)
    prob = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return (-(prob * prob.clamp(min=1e-10).log()).sum(-1)).exp().mean()


def _masked_mse(a: Tensor, b: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return F.mse_loss(a, b)
    return F.mse_loss(a, b, reduction="none")[mask].mean()


def _mean_position_entropy(flat: Tensor, embed: Tensor, metric: str, temperature: float, batch: int) -> Tensor:
    """vector-quantize-pytorch 1.32's codebook diversity term: `softmax(scores * temperature)` averaged over
    heads and batch for each sequence position, its entropy, averaged over positions. Positions are taken in
    chunks with recomputation in backward, so no `(N, K)` matrix is kept."""
    heads, rows, dim = flat.shape
    per_position = flat.view(heads, batch, rows // batch, dim)

    def chunk_sum(x_chunk, emb):
        h, b, m, d = x_chunk.shape
        prob = (scores(x_chunk.reshape(h, b * m, d), emb, metric) * temperature).softmax(-1)
        prob = prob.view(h, b, m, -1).mean(dim=(0, 1))
        return (-prob * prob.clamp(min=1e-5).log()).sum()

    total = 0
    step = max(1, (256 * 2**20) // (4 * embed.shape[-2] * heads * batch))
    for start in range(0, per_position.shape[2], step):
        chunk = per_position[:, :, start : start + step]
        total = total + checkpoint(chunk_sum, chunk, embed, use_reentrant=False)
    return total / per_position.shape[2]


def _cross_entropy_to_codes(flat, embed, metric, indices, mask) -> Tensor:
    """Cross-entropy of the scores as logits against the chosen codes, chunked with recomputation."""

    def chunk_sum(x_chunk, emb, target, valid):
        logp = scores(x_chunk, emb, metric).log_softmax(-1)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (nll * valid).sum()

    valid_all = torch.ones_like(indices, dtype=flat.dtype) if mask is None else mask.to(flat.dtype)
    total = 0
    for sl in _row_slices(flat, embed):
        total = total + checkpoint(chunk_sum, flat[:, sl], embed, indices[:, sl], valid_all[:, sl], use_reentrant=False)
    return total / valid_all.sum().clamp(min=1)


def _row_slices(flat: Tensor, embed: Tensor):
    """Row chunks sized like the nearest-code search's (the scores themselves are recomputed by callers)."""
    rows = max(1, (256 * 2**20) // (4 * embed.shape[-2] * flat.shape[0]))
    for start in range(0, flat.shape[1], rows):
        yield slice(start, start + rows)
