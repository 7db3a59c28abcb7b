"""LatentQuantize's training step as one autograd node: input projection, nearest value per latent,
straight-through codes, output projection and both loss terms, with a hand-written backward.

The values are those of `LatentQuantize`'s module path (vqp 1.32 semantics, with hf_vq's learnable-values
deviation); the node exists because that path is a long chain of small ops, whose launches rather than their
arithmetic bound a step on a GPU. Here:

- The commitment term `cw * mse(input.detach(), output_from_values)` and the quantization term
  `qw * mse(output.detach(), input)` have one value (the output projection of the values is the output, the codes
  being the values), so the loss is `(cw + qw) * mse(output, input)`, computed once. Their gradients are the
  residual `output - input` times `2 / numel`: the quantization term's goes to the input, the commitment term's to
  the output projection and then to the values (`values_learn`) or, as vqp, through the straight-through codes.
- The values' gradient is a sum over a few slots (`latents x values`); on CUDA it is summed into many private
  copies of those slots first (`sum_into_slots`) instead of having every row's atomic add hit the same few.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import (
    linear,
    linear_input_grad,
    linear_input_grad_rows,
    linear_param_grads,
)


class LatentTrainSpec(NamedTuple):
    """What the node needs of the quantizer besides tensors."""

    channel_first: bool  # features `(b, d, n)` (projections along axis 1), else `(..., d)`
    num_codebooks: int
    commitment_weight: float
    quantization_weight: float
    values_learn: bool  # the commitment term's gradient goes to the values (else through the codes, as vqp)
    nearest: Callable[[Tensor, Tensor], Tensor]  # (latents (..., C, L), table (L, W)) -> level numbers (int or float)


def sum_into_slots(index: Tensor, src: Tensor, size: int, copies: int | None = None) -> Tensor:
    """`zeros(size).index_add_(0, index, src)` for 1-D `index`, `src`. On CUDA, with many more elements than
    slots, the elements are first summed into `copies` (default: up to 256) private copies of the slots, one per
    contiguous chunk of the input, so that far fewer threads' atomic adds meet at one address."""
    if copies is None:
        copies = math.gcd(index.numel(), 256) if src.is_cuda and index.numel() >= 64 * size else 1
    if copies == 1:
        return src.new_zeros(size).index_add_(0, index, src)
    sums = src.new_zeros(copies, size).scatter_add_(1, index.view(copies, -1), src.view(copies, -1))
    return sums.sum(0)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


class LatentTrainStep(torch.autograd.Function):
    """`(output, loss, levels)` of a LatentQuantize training step on float32 `features`; see the module
    docstring. `table (L, W)`: each latent's values (padded with +inf); `offsets (L,)`: where each latent's row
    starts in the flattened table. `levels (..., C, L)` are the level numbers of the codes as `spec.nearest` gives
    them (int64, or exact floats; no gradient)."""

    @staticmethod
    def forward(ctx, features: Tensor, w_in: Tensor | None, b_in: Tensor | None, w_out: Tensor | None,
                b_out: Tensor | None, table: Tensor, offsets: Tensor, spec: LatentTrainSpec
                ) -> tuple[Tensor, Tensor, Tensor]:
        cf = spec.channel_first
        z = linear(features, w_in, b_in, cf)
        latents = (z.transpose(1, 2) if cf else z).unflatten(-1, (spec.num_codebooks, table.shape[0]))
        levels = spec.nearest(latents, table)
        flat = (levels.long() + offsets).reshape(-1)  # (in row order, whatever the layout `nearest` gave)
        values = table.view(-1).index_select(0, flat).view(levels.shape)
        codes = (latents + (values - latents)).flatten(-2)  # the straight-through value, as vqp
        codes = codes.transpose(1, 2) if cf else codes  # (z's layout)
        out = linear(codes, w_out, b_out, cf)
        weight = spec.commitment_weight + spec.quantization_weight
        loss = F.mse_loss(out, features) * weight if weight else features.new_zeros((), dtype=torch.float32)
        if not weight:
            ctx.mark_non_differentiable(loss)
        ctx.mark_non_differentiable(levels)
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.table_shape, ctx.has_bias = spec, table.shape, (b_in is not None, b_out is not None)
        ctx.save_for_backward(features, w_in, w_out, codes, out, flat)
        return out, loss, levels

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_loss: Tensor | None, _grad_levels):
        features, w_in, w_out, codes, out, flat = ctx.saved_tensors
        spec, cf = ctx.spec, ctx.spec.channel_first
        need_x, need_w_in, need_b_in, need_w_out, need_b_out, need_table, _, _ = ctx.needs_input_grad
        cw, qw = spec.commitment_weight, spec.quantization_weight
        # Both loss terms' gradients are multiples of one tensor, the residual scaled in place (`loss_grad`, the one
        # full-size temporary here): the commitment term's (at the output) is `loss_grad` itself when cw != 0, the
        # quantization term's (at the input) is `loss_grad * input_factor`.
        loss_grad = commit = None
        input_factor = 0.0
        if grad_loss is not None and (cw or qw):
            loss_grad = (out - features).mul_(grad_loss * (2.0 * (cw or -qw) / out.numel()))
            commit = loss_grad if cw else None
            input_factor = (-qw / cw if cw else 1.0) if qw and need_x else 0.0
        grad_table = None
        if spec.values_learn and commit is not None and need_table:
            to_values = linear_input_grad_rows(commit, w_out, cf)
            grad_table = sum_into_slots(flat, to_values.reshape(-1), math.prod(ctx.table_shape)).view(ctx.table_shape)
        to_codes = grad_out if spec.values_learn else _add(grad_out, commit)
        grad_x = grad_w_in = grad_b_in = None
        if to_codes is not None:
            grad_z = linear_input_grad(to_codes, w_out, cf)  # straight through the codes to the projected input
            if w_in is not None and (need_w_in or need_b_in):
                grad_w_in, grad_b_in = linear_param_grads(grad_z, features, cf, ctx.has_bias[0])
            if need_x:
                grad_x = linear_input_grad(grad_z, w_in, cf, add=loss_grad if input_factor else None, beta=input_factor)
        elif input_factor:
            grad_x = loss_grad * input_factor
        # everything that reaches the output projection (summed into `loss_grad`, which is not read after this)
        at_output = to_codes if not spec.values_learn or commit is None else \
            commit if grad_out is None else commit.add_(grad_out)
        grad_w_out = grad_b_out = None
        if at_output is not None and w_out is not None and (need_w_out or need_b_out):
            grad_w_out, grad_b_out = linear_param_grads(at_output, codes, cf, ctx.has_bias[1])
        return (grad_x, grad_w_in, grad_b_in if need_b_in else None, grad_w_out,
                grad_b_out if need_b_out else None, grad_table, None, None)
