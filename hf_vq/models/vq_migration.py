"""Migration of vector-quantize-pytorch 1.32 `VectorQuantize` modules to hf_vq's (`from_vector_quantize_pytorch`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .vq_config import VectorQuantizeConfig


def from_vqp(cls, module):
    """An instance of `cls` (VectorQuantize) with a vector-quantize-pytorch 1.32 `VectorQuantize`'s config and full
    state: the config mapping, then `load_state_dict`. A `vq_bridge` module is deep-copied into the new model."""
    cb = module._codebook
    bridge = getattr(cb, "vq_bridge", None)
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
        has_vq_bridge=bridge is not None,
    )
    bridge = getattr(cb, "vq_bridge", None)
    if module.in_place_codebook_optimizer is not None:
        raise ValueError("the vqp module has an in-place codebook optimizer: pass in_place_codebook_optimizer= "
                         "to VectorQuantize yourself (an optimizer is not part of a config or checkpoint)")
    model = cls(config, vq_bridge=copy.deepcopy(bridge) if bridge is not None else None)
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
