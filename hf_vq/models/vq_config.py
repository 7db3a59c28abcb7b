"""Configuration of [`VectorQuantize`]: vector-quantize-pytorch 1.32's `VectorQuantize` arguments (names and
defaults), validated when built, plus the values derived from them (`resolved_*`)."""

from __future__ import annotations

from ..modeling_utils import QuantizerConfig


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
        has_vq_bridge (`bool`): the codebook is searched through a `vq_bridge` module (vqp 1.32's `vq_bridge`, a
            module mapping the `(heads, K, d)` codebook to the codes searched and returned; passed to the model's
            constructor, set automatically then). Defaults `learnable_codebook=True`, `ema_update=False`.
        return_zeros_for_masked_padding (`bool`): masked positions output zeros (else the input).
        route_gradients_to_input (`bool`): estimator gradients reach the input.
    """

    model_type = "hf_vq_vector_quantize"
    # vqp 1.32's positional order (`in_place_codebook_optimizer` is a model argument, not a config field)
    vqp_positional = (
        "dim", "codebook_size", "codebook_dim", "heads", "separate_codebook_per_head", "decay", "eps",
        "freeze_codebook", "kmeans_init", "kmeans_iters", "sync_kmeans", "use_cosine_sim", "layernorm_after_project_in",
        "threshold_ema_dead_code", "channel_last", "accept_image_fmap", "accept_3d_fmap", "commitment_weight",
        "commitment_use_cross_entropy_loss", "orthogonal_reg_weight", "orthogonal_reg_active_codes_only",
        "orthogonal_reg_max_codes", "codebook_diversity_loss_weight", "codebook_diversity_temperature",
        "stochastic_sample_codes", "sample_codebook_temp", "straight_through", "rotation_trick", "directional_reparam",
        "directional_reparam_variance", "sync_codebook", "sync_affine_param", "ema_update", "vq_bridge",
        "manual_ema_update", "learnable_codebook", "in_place_codebook_optimizer", "manual_in_place_optimizer_update",
        "affine_param", "affine_param_batch_decay", "affine_param_codebook_decay", "sync_update_v",
        "return_zeros_for_masked_padding", "route_gradients_to_input",
    )

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
        has_vq_bridge: bool = False,
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
        self.has_vq_bridge = has_vq_bridge
        super().__init__(**kwargs)

    def validate(self):
        for name in ("dim", "codebook_size", "heads", "kmeans_iters"):
            value = getattr(self, name)
            if name == "kmeans_iters" and not self.kmeans_init and value == 0:
                continue  # (unused without k-means init; vqp 1.32 accepts 0 there)
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
        if self.has_vq_bridge and not (self.resolved_learnable_codebook and not self.resolved_ema_update):
            raise ValueError("has_vq_bridge=True needs learnable_codebook=True and ema_update=False")
        if self.sync_update_v > 0 and not self.resolved_learnable_codebook:
            raise ValueError("sync_update_v > 0 needs learnable_codebook=True")

    @property
    def resolved_ema_update(self) -> bool:
        if self.ema_update is None:
            return not (self.directional_reparam or self.has_vq_bridge)
        return bool(self.ema_update)

    @property
    def resolved_learnable_codebook(self) -> bool:
        if self.learnable_codebook is None:
            return bool(self.directional_reparam or self.has_vq_bridge)
        return bool(self.learnable_codebook)

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
