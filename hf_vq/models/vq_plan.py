"""Which forward path a VectorQuantize (and a ResidualVQ over such levels) takes, decided from its config.

Five fast paths compute what the general path computes, for a subset of configurations:

- `fused_estimator`: in training, the rotation trick on detached codes and vqp 1.32's MSE commitment loss in one
  op (`ops.estimators.rotate_to_with_commitment`), instead of the estimator and the loss separately.
- `lean_eval`: outside training, a level is "nearest euclidean code of its raw `(..., d)` rows, looked up by
  index"; ResidualVQ's eval loop then runs `nearest_code` and the lookup itself, without the level's forward.
- `fused_levels`: in training, a level's step is one level of `ops.triton_residual.residual_train_levels`
  (nearest euclidean code, rotation trick with the MSE commitment loss, EMA codebook, dead-code expiry);
  ResidualVQ then runs all its levels in one fused pass.
- `direct_eval`: outside training, a call is "nearest code of each head's rows, looked up": `VectorQuantize` runs
  the search and the lookup without the training step's machinery (`vq_direct_eval.direct_eval`), for any layout
  and head count. A model with projections folds them into the codebook (`ops.projected`): the input projection
  into the search when a head's codebook dim is at least the input dim (the search then costs what it costs in code
  space), the output projection into a table of projected codes always (the same values up to float32 rounding);
  it folds where the input projection is a plain `nn.Linear` and the call has float32 input and weights, no
  autocast, a search mode other than `"exact"` and fewer codes than rows, else it projects as the general path
  does (`vq_direct_eval.folds`). A direct call needs no mask and no `indices` target.
- `graphed_call`: on a GPU, a plain call (`model(x)`, no mask or other tensor argument) is replayed as CUDA graphs,
  forward and backward (`QuantizerModel.__call__`, `ops.graphs.GraphedCall`), for models without projections (a
  capture of the projections' backward failed on an H100 in one test, so they stay eager until that is
  understood). The options it excludes read the host during a call (dead-code expiry, a manual EMA step's
  finiteness check, the affine statistics' update, whose capture failed on an H100 too), draw random numbers
  (stochastic sampling, the orthogonal loss's code subset), score every row against the whole codebook in
  checkpointed chunks (cross-entropy commitment, diversity loss, a straight-through mixture of codes), or run a
  module the user gave (`vq_bridge`).

`FAST_PATH_RULES` classifies every `VectorQuantizeConfig` field: for each path, `ANY` (the path honours every
value) or a rule `(value, config) -> bool` naming the values it honours. A config whose fields all pass a path's
rules may take it; any other value sends the model to the general path. `plan_for` refuses a config with a field
that is not classified, so a new option cannot be silently ignored by a fused kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

ANY = None
Rule = Callable[[object, object], bool] | None


def only(*values) -> Callable[[object, object], bool]:
    return lambda value, config: value in values


def _no_projection(value, config) -> bool:
    return value is None or value == config.dim


def _rotation_trick(value, config) -> bool:
    return config.resolved_rotation_trick


def _not_learnable(value, config) -> bool:
    return not config.resolved_learnable_codebook


def _ema_codebook(value, config) -> bool:
    return config.resolved_ema_update


def _heads_without_projections(value, config) -> bool:
    """The heads' codebook dims add up to the input dim: no projections, whatever the head count."""
    return config.resolved_codebook_dim * config.heads == config.dim


def mixes_soft_codes(straight_through: bool, stochastic_sample_codes: bool, route_gradients_to_input: bool) -> bool:
    """Whether training codes carry the softmax mixture's gradient (vqp 1.32's straight-through `gumbel_sample`;
    without sampling it counts only where the output is not routed straight through to the input)."""
    return straight_through and (stochastic_sample_codes or not route_gradients_to_input)


def _no_soft_codes(value, config) -> bool:
    """No straight-through mixture of codes, sampled in checkpointed chunks."""
    return not mixes_soft_codes(value, config.stochastic_sample_codes, config.route_gradients_to_input)


def _positive(value, config) -> bool:
    return value > 0


_OFF = only(False)
_ZERO = only(0, 0.0)

# field: (fused_estimator, lean_eval, fused_levels, direct_eval, graphed_call)
FAST_PATH_RULES: dict[str, tuple[Rule, Rule, Rule, Rule, Rule]] = {
    "dim": (ANY, ANY, ANY, ANY, ANY),
    "codebook_size": (ANY, ANY, ANY, ANY, ANY),
    "codebook_dim": (ANY, _no_projection, _no_projection, ANY, _heads_without_projections),
    "heads": (ANY, only(1), only(1), ANY, _heads_without_projections),
    "separate_codebook_per_head": (ANY, ANY, ANY, ANY, ANY),  # one head: one codebook either way
    "decay": (ANY, ANY, ANY, ANY, ANY),
    "eps": (ANY, ANY, ANY, ANY, ANY),
    "freeze_codebook": (ANY, ANY, _OFF, ANY, ANY),
    "kmeans_init": (ANY, ANY, ANY, ANY, ANY),  # the plan waits for the codebook to be initialized
    "kmeans_iters": (ANY, ANY, ANY, ANY, ANY),
    "use_cosine_sim": (ANY, _OFF, _OFF, ANY, ANY),
    "layernorm_after_project_in": (ANY, ANY, ANY, ANY, ANY),  # with projections only (a LayerNorm is not folded)
    "threshold_ema_dead_code": (ANY, ANY, ANY, ANY, _ZERO),
    "reset_cluster_size": (ANY, ANY, ANY, ANY, ANY),
    "channel_last": (ANY, only(True), only(True), ANY, ANY),
    "accept_image_fmap": (ANY, _OFF, _OFF, ANY, ANY),
    "accept_3d_fmap": (ANY, _OFF, _OFF, ANY, ANY),
    "commitment_weight": (_positive, ANY, _positive, ANY, ANY),
    "commitment_use_cross_entropy_loss": (_OFF, ANY, _OFF, ANY, _OFF),
    "orthogonal_reg_weight": (ANY, ANY, _ZERO, ANY, _ZERO),
    "orthogonal_reg_active_codes_only": (ANY, ANY, ANY, ANY, ANY),
    "orthogonal_reg_max_codes": (ANY, ANY, ANY, ANY, ANY),
    "codebook_diversity_loss_weight": (ANY, ANY, _ZERO, ANY, _ZERO),
    "codebook_diversity_temperature": (ANY, ANY, ANY, ANY, ANY),
    "stochastic_sample_codes": (ANY, ANY, _OFF, ANY, _OFF),  # (with straight_through: no rotation trick, see below)
    "sample_codebook_temp": (ANY, ANY, ANY, ANY, ANY),
    "straight_through": (ANY, ANY, ANY, ANY, _no_soft_codes),  # excludes the rotation trick (its rule)
    "reinmax": (ANY, ANY, ANY, ANY, ANY),  # needs straight_through
    "rotation_trick": (_rotation_trick, ANY, _rotation_trick, ANY, ANY),
    "sync_codebook": (ANY, ANY, ANY, ANY, ANY),
    "ema_update": (ANY, ANY, _ema_codebook, ANY, ANY),
    "manual_ema_update": (ANY, ANY, _OFF, ANY, _OFF),
    "learnable_codebook": (_not_learnable, ANY, _not_learnable, ANY, ANY),
    "affine_param": (ANY, _OFF, _OFF, _OFF, _OFF),
    "affine_param_batch_decay": (ANY, ANY, ANY, ANY, ANY),
    "affine_param_codebook_decay": (ANY, ANY, ANY, ANY, ANY),
    "return_zeros_for_masked_padding": (ANY, ANY, ANY, ANY, ANY),  # masked calls take the general path
    "route_gradients_to_input": (only(True), ANY, only(True), ANY, ANY),
    "sync_kmeans": (ANY, ANY, ANY, ANY, ANY),
    "sync_affine_param": (ANY, ANY, ANY, ANY, ANY),
    "directional_reparam": (_OFF, ANY, _OFF, ANY, ANY),
    "directional_reparam_variance": (ANY, ANY, ANY, ANY, ANY),
    "sync_update_v": (_ZERO, ANY, _ZERO, ANY, _ZERO),
    "manual_in_place_optimizer_update": (ANY, ANY, ANY, ANY, ANY),  # an in-place optimizer itself excludes fused_levels
    "check_inputs": (ANY, ANY, ANY, ANY, ANY),
    # the bridge maps the codebook before every search: general path (the direct eval reads the mapped codes)
    "has_vq_bridge": (_OFF, _OFF, _OFF, ANY, _OFF),
}


@dataclass(frozen=True)
class VQPlan:
    """The fast paths a VectorQuantize may take (see the module docstring); all False is the general path."""

    fused_estimator: bool = False
    lean_eval: bool = False
    fused_levels: bool = False
    direct_eval: bool = False
    graphed_call: bool = False


GENERAL = VQPlan()


def _honours(config, path: int) -> bool:
    for name in config.field_names():
        if name not in FAST_PATH_RULES:
            raise KeyError(f"VectorQuantizeConfig field {name!r} is not classified in hf_vq.models.vq_plan."
                           "FAST_PATH_RULES: say which values each fast path honours")
        rule = FAST_PATH_RULES[name][path]
        if rule is not ANY and not rule(getattr(config, name), config):
            return False
    return True


def plan_for(config, *, in_place_optimizer: bool = False) -> VQPlan:
    """The plan of a VectorQuantize built from `config` (before any state is considered)."""
    estimator, lean, levels, direct, graphed = (_honours(config, path) for path in range(5))
    return VQPlan(fused_estimator=estimator, lean_eval=lean,
                  fused_levels=levels and estimator and not in_place_optimizer, direct_eval=direct,
                  graphed_call=graphed and not in_place_optimizer)


def with_state(plan: VQPlan, *, initted: bool, float32_codebook: bool, pending_stats: bool) -> VQPlan:
    """`plan` restricted by the codebook's state: the residual paths, the direct eval and the graphed call need an
    initialized codebook, the fused levels a float32 codebook, and both of these no accumulated statistics waiting
    (`accum_ema_update`)."""
    if not initted:
        return replace(plan, lean_eval=False, fused_levels=False, direct_eval=False, graphed_call=False)
    if pending_stats:
        plan = replace(plan, fused_levels=False, graphed_call=False)
    if plan.fused_levels and not float32_codebook:
        return replace(plan, fused_levels=False)
    return plan
