"""`nn.Linear`'s map along the feature axis of either layout, `(..., d)` or channel-first `(b, d, n)` (the
projections of the scalar quantizers, without transposing their input), and its gradients, for autograd nodes
that write their own backward (`ops.latent`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear(t: Tensor, weight: Tensor | None, bias: Tensor | None, channel_first: bool) -> Tensor:
    """`nn.Linear`'s map along the feature axis of `t` (axis 1 when `channel_first`: a batched product and the
    bias added in place, without transposing `t`; `baddbmm` would first broadcast-copy the bias into the output,
    a slow extra pass on CPU); the identity when `weight` is None."""
    if weight is None:
        return t
    if not channel_first:
        return F.linear(t, weight, bias)
    out = torch.bmm(weight.expand(t.shape[0], -1, -1), t)
    return out if bias is None else out.add_(bias.unsqueeze(-1))


def linear_input_grad(grad: Tensor, weight: Tensor | None, channel_first: bool, add: Tensor | None = None,
                      beta: float = 1.0) -> Tensor:
    """The gradient of `linear`'s input from its output's gradient, plus `beta * add` (of the input's shape) in
    the same product."""
    if weight is None:
        return grad if add is None else torch.add(grad, add, alpha=beta)
    if not channel_first:
        if add is None:
            return grad @ weight
        rows = grad.reshape(-1, grad.shape[-1])
        return torch.addmm(add.reshape(-1, add.shape[-1]), rows, weight, beta=beta).view(add.shape)
    weight_t = weight.t().expand(grad.shape[0], -1, -1)
    return torch.bmm(weight_t, grad) if add is None else torch.baddbmm(add, weight_t, grad, beta=beta)


def linear_input_grad_rows(grad: Tensor, weight: Tensor | None, channel_first: bool) -> Tensor:
    """`linear_input_grad` as rows `(..., d_in)` whatever the layout (channel-first: `(b, n, d_in)`, straight from
    the product, without a transposed copy)."""
    if not channel_first:
        return linear_input_grad(grad, weight, False)
    if weight is None:
        return grad.transpose(1, 2)
    return torch.bmm(grad.transpose(1, 2), weight.expand(grad.shape[0], -1, -1))


def linear_param_grads(grad: Tensor, t: Tensor, channel_first: bool, bias: bool) -> tuple[Tensor, Tensor | None]:
    """The gradients of `linear`'s weight and bias from its output's gradient and its input `t`."""
    if channel_first:
        weight_grad = torch.bmm(grad, t.transpose(1, 2)).sum(0)
        return weight_grad, grad.sum((0, 2)) if bias else None
    rows, t_rows = grad.reshape(-1, grad.shape[-1]), t.reshape(-1, t.shape[-1])
    return rows.t() @ t_rows, rows.sum(0) if bias else None
