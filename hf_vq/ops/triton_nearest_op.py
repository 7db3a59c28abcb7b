"""The nearest-code kernel as one opaque op for torch.compile (`hf_vq::nearest_code`): dynamo does not trace into
the Triton launch or exact mode's host-side fallback. Eager calls use `triton_nearest.nearest_code_triton`
directly (no op dispatch)."""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_nearest import nearest_code_triton
from .utils import HAS_TRITON

if HAS_TRITON:

    @torch.library.custom_op("hf_vq::nearest_code", mutates_args=())
    def nearest_code_op(x: Tensor, codebook: Tensor, codebook_sq_norm: Tensor, metric: str, mode: str,
                        return_codes: bool) -> tuple[Tensor, Tensor, Tensor]:
        """`nearest_code_triton` as one op: `(indices, score, codes)`, codes empty unless `return_codes`."""
        codes = x.new_empty(x.shape if return_codes else (0,), dtype=codebook.dtype)
        idx, score = nearest_code_triton(x, codebook, codebook_sq_norm, metric=metric, mode=mode,
                                         out_codes=codes if return_codes else None)
        return idx, score, codes

    @nearest_code_op.register_fake
    def _nearest_code_op_shapes(x, codebook, codebook_sq_norm, metric, mode, return_codes):
        H, N, _ = x.shape
        codes = x.new_empty(x.shape if return_codes else (0,), dtype=codebook.dtype)
        return x.new_empty((H, N), dtype=torch.long), x.new_empty((H, N), dtype=torch.float32), codes
