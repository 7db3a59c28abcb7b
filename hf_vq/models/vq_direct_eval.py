"""VectorQuantize's eval call as a search and a lookup (`VQPlan.direct_eval`): each head's nearest code, looked up,
without the training step's machinery. Projections fold into the codebook (`ops.projected`) where that pays and
keeps the call's arithmetic float32 (`folds`); otherwise they run as in the general path.

Functions of the model, kept out of `vector_quantize.py` as `vq_topk.py` is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import projected
from ..ops.nearest import nearest_code, resolve_mode
from ..ops.utils import autocast_off
from .codebook import l2norm
from .vq_losses import perplexity


def folds(model, tokens: Tensor) -> bool:
    """Whether this direct eval call folds the projections into the codebook (`VQPlan.direct_eval`)."""
    return (model.can_fold and tokens.dtype == torch.float32 and model.project_out.weight.dtype == torch.float32
            and not torch.is_autocast_enabled(tokens.device.type)
            and projected.folding_pays(tokens.shape[0] * tokens.shape[1], model.codebook_size)
            and resolve_mode() != "exact")


def direct_eval(model, tokens: Tensor, return_perplexity: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The eval forward as a search and a lookup (`VQPlan.direct_eval`): each head's nearest code, looked up,
    without the training step's machinery. Projections fold into the codebook where `folds` (the search of the
    raw rows through the input projection when `fold_search`, the output as a sum of projected codes: the same
    values up to float32 rounding); else they run as in the general path, whose values this then has. Returns
    token-layout `(quantized, indices, perplexity)`."""
    b, n, dim = tokens.shape
    rows, heads = tokens.reshape(b * n, dim), model.heads
    embed = model._codebook.codes()  # (1 or heads, K, codebook_dim)
    folded = folds(model, tokens)
    if folded and model.fold_search:
        with torch.no_grad():
            table, offset = projected.search_table(embed, model.project_in.weight, model.project_in.bias,
                                                   model.metric)
            ids, _ = nearest_code(rows.expand(heads, -1, -1), table, metric="dot", code_offset=offset)
    else:
        z = model.project_in(rows) if model.has_projections else rows
        z = z.reshape(b * n, heads, -1).transpose(0, 1)  # (heads, N, codebook_dim)
        if model.use_cosine_sim:
            z = l2norm(z)
        with autocast_off(tokens.device.type):
            codes, ids = model._quantize(z.float(), embed, 0.0)
    if folded:
        out = projected.lookup_sum(projected.lookup_table(embed, model.project_out.weight), ids,
                                   model.project_out.bias)
    else:
        out = (codes[0] if heads == 1 else codes.transpose(0, 1).reshape(b * n, -1)).to(tokens.dtype)
        out = model.project_out(out) if model.has_projections else out
    usage = None
    if return_perplexity:  # one shared codebook: one distribution over every head's codes (as the general path)
        usage = perplexity(ids if model.separate_codebook_per_head else ids.reshape(1, -1), model.codebook_size,
                           None)
    ids = ids[0].view(b, n) if heads == 1 else ids.view(heads, b, n).permute(1, 2, 0)
    return out.view(b, n, dim), ids, usage
