"""Agreement of VectorQuantize's folded eval (projections folded into the codebook, `hf_vq.ops.projected`) with a
float64 search, next to vector-quantize-pytorch 1.32 and to hf_vq's unfolded general path, on the grid's rows with
projections.

    python benchmarks/folded_agreement.py [--tokens 4096] [--only SUBSTRING ...]

For each row (built as `bench_vs_vqp.py --matrix` builds it, same codebooks), one eval call of each side on the
grid's input; the first `--tokens` tokens are searched in float64 (the float64 projection of the input against the
float64 codebook, euclidean or cosine as configured), and the table gives the share of (token, head) indices that
are that float64 winner, for hf_vq and for vqp, and the share of all indices on which the folded and the general
path agree.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import vqp_matrix
from hf_vq.models.vq_direct_eval import folds
from hf_vq.models.vq_plan import GENERAL

ROWS_WITH_PROJECTIONS = ("heads=8", "heads=4", "codebook_dim 32", "cosine")


def float64_scores(model, x: torch.Tensor, tokens: int) -> torch.Tensor:
    """`(heads, tokens, K)` float64 scores (higher is better) of the first `tokens` tokens of `x (b, n, dim)`."""
    rows = x.reshape(-1, x.shape[-1])[:tokens].double()
    lin = model.project_in
    z = F.linear(rows, lin.weight.double(), lin.bias.double()).view(len(rows), model.heads, -1).transpose(0, 1)
    book = model._codebook.codes().double().expand(model.heads, -1, -1)
    return F.normalize(z, dim=-1) @ book.mT if model.use_cosine_sim else -torch.cdist(z, book)


def share_of_winners(scores: torch.Tensor, indices: torch.Tensor) -> float:
    """Share of `indices (heads, tokens)` that are the float64 winner (exact ties count as winners)."""
    got = scores.gather(-1, indices[..., None])[..., 0]
    return float((got == scores.amax(-1)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--only", nargs="*", default=list(ROWS_WITH_PROJECTIONS))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("| row | folded eval taken | float64 winner, hf_vq | float64 winner, vqp | folded = general path |")
    print("|---|---|---|---|---|")
    for spec in vqp_matrix.specs():
        if spec.family != "VectorQuantize" or not any(part in spec.name for part in args.only):
            continue
        ours, theirs = vqp_matrix.build(spec, device)
        ours.eval(), theirs.eval()
        general = copy.deepcopy(ours)
        general.config_plan, general._plan_cache = GENERAL, None
        x = torch.randn(spec.shape, device=device)
        with torch.no_grad():
            taken = ours.plan.direct_eval and folds(ours, x)
            out, ref = ours(x), general(x)
            _, vqp_indices, _ = theirs(x)
            scores = float64_scores(ours, x, args.tokens)
        heads = ours.heads
        ours_ids = out.indices.reshape(-1, heads)[: args.tokens].T
        vqp_ids = vqp_indices.reshape(-1, heads)[: args.tokens].T
        same = float((out.indices == ref.indices).float().mean())
        print(f"| {spec.name} | {taken} | {share_of_winners(scores, ours_ids):.6f} | "
              f"{share_of_winners(scores, vqp_ids):.6f} | {same:.6f} |", flush=True)
        del ours, theirs, general, x
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
