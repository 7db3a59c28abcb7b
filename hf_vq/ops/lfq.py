"""Lookup-free quantization ops (LFQ, https://arxiv.org/abs/2310.05737; BSQ, https://arxiv.org/abs/2406.07548).

The entropy aux loss of CogVideo sgm (and vqp 1.32) is defined through the softmax over all `2**C` codes `c in {-m, m}**C` of
`2 * inv_temperature * <x, c>` (the negative squared distance up to a per-sample constant, since every code
has the same norm). That softmax factorizes over bits: code `k` has probability `prod_i p_i(b_ki)` with
independent per-bit Bernoullis `p_i(1) = sigmoid(4 * inv_temperature * m * x_i)`. The ops below use this to
never build the `N x 2**C` probability matrix:

- per-sample entropy = sum of per-bit binary entropies (exact Shannon entropy);
- batch-mean code probability: split the `C` bits into a high and a low half; the probability of code
  `(hi, lo)` is `P_hi[n, hi] * P_lo[n, lo]`, so its mean over samples is the matmul `P_hi^T @ P_lo / N`:
  memory `N * (2**H + 2**L) + 2**C` instead of `N * 2**C`, same flops as CogVideo sgm's einsum, and plain
  autograd gives the gradient with no recomputation needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ENTROPY_EPS = 1e-5


def bits_of(indices: Tensor, codebook_dim: int) -> Tensor:
    """`(...)` int indices to `(...)`, `codebook_dim` bool bits, most significant bit first (CogVideo sgm's mask)."""
    mask = 2 ** torch.arange(codebook_dim - 1, -1, -1, device=indices.device)
    return (indices.unsqueeze(-1).long() & mask) != 0


def bits_to_codes(bits: Tensor, scale: float) -> Tensor:
    """Bits to codes in `{-scale, scale}` (float32 for bool or integer bits, else in the bits' dtype)."""
    return (bits if bits.is_floating_point() else bits.float()) * (2 * scale) - scale


def codes_to_indices(codes: Tensor) -> Tensor:
    """`(..., C)` codes (sign carries the bit) to `(...)` int64 indices, most significant bit first."""
    c = codes.shape[-1]
    mask = 2 ** torch.arange(c - 1, -1, -1, device=codes.device)
    return ((codes > 0).long() * mask).sum(-1)


def sign_codes(positive: Tensor, scale: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """`sign_quantize` from the precomputed `x > 0`: `scale` where set, else `-scale` (exactly: `{0, 1} * 2 * scale
    - scale`; elementwise arithmetic, which runs vectorized where a `where` over scalars does not on CPU)."""
    return positive.to(dtype).mul_(2 * scale).sub_(scale)


def bits_to_indices(positive: Tensor, bit_values: Tensor) -> Tensor:
    """`(..., C)` bits (`x > 0`) to `(...)` int64 indices, `bit_values` the place value of each bit (most
    significant first). On CPU one float32 matrix-vector product (exact: every partial sum is an integer below
    2**24 for C <= 24; full-precision matmuls only, see `fsq.level_digits_to_indices`), where a sum over a short
    trailing axis is a slow reduction; elsewhere the integer sum."""
    if (not torch.compiler.is_compiling() and positive.device.type == "cpu" and positive.shape[-1] <= 24
            and not torch.is_autocast_enabled("cpu")
            and torch.get_float32_matmul_precision() == "highest"):
        return torch.matmul(positive.to(torch.float32), bit_values.to(torch.float32)).long()
    return (positive.long() * bit_values).sum(-1)


def residual_lfq(x: Tensor, scales: list[float], bit_values: Tensor) -> tuple[Tensor, Tensor]:
    """ResidualLFQ's levels outside training on rows `x (..., C)` (updated in place into the last residual: the
    caller's copy): level i quantizes the residual to its signs at scale `scales[i]` (`sign_codes`), and the next
    level the residual less those codes. Returns the summed codes `(..., C)` in `x`'s dtype and the
    indices `(..., levels)` int64: the values of each level's forward, by the same ops, without the levels' module
    calls; the bits of all levels become indices at once."""
    residual = x
    quantized = torch.zeros_like(residual)
    signs = []
    for scale in scales:
        positive = residual > 0
        codes = sign_codes(positive, scale, residual.dtype)
        residual.sub_(codes)
        quantized.add_(codes)
        signs.append(positive)
    return quantized, bits_to_indices(torch.stack(signs, dim=-2), bit_values)


def sign_quantize(x: Tensor, scale: float) -> Tensor:
    """Eq. 3 of the LFQ paper: `scale` where `x > 0`, else `-scale` (no gradient)."""
    value = torch.full_like(x, scale)
    return torch.where(x > 0, value, -value)


def l2norm(x: Tensor, scale: float = 1.0) -> Tensor:
    """Project onto the sphere of radius `scale` (BSQ)."""
    return F.normalize(x, dim=-1) * scale


def soft_clamp(x: Tensor, value: float) -> Tensor:
    """Smoothly squash `x` into `(-value, value)`."""
    return (x / value).tanh() * value


def bit_logits(x: Tensor, inv_temperature: float, code_magnitude: float) -> Tensor:
    """Per-bit logit of `P(bit = 1)` under CogVideo sgm's softmax over codes `{-m, m}**C`: `4 * inv_temp * m * x`."""
    return x * (4.0 * inv_temperature * code_magnitude)


def log_bit_probs(logits: Tensor) -> Tensor:
    """`(..., C)` bit logits -> `(..., C, 2)`: log P(bit set), log P(bit clear) (exact for large |l|)."""
    return torch.stack((F.logsigmoid(logits), F.logsigmoid(-logits)), dim=-1)


def _bits_entropy(log_probs: Tensor) -> Tensor:
    """`(N, c, C, 2)` log bit probabilities -> mean over samples and codebooks of the summed bit entropies."""
    return -(log_probs.exp() * log_probs).sum((-2, -1)).mean()


def per_sample_entropy(logits: Tensor) -> Tensor:
    """`(N, c, C)` bit logits -> mean over samples and codebooks of the entropy of each code distribution."""
    return _bits_entropy(log_bit_probs(logits))


def entropy(prob: Tensor, eps: float = ENTROPY_EPS) -> Tensor:
    """CogVideo sgm's entropy over the last axis, with `log(clamp(p, eps))`."""
    return (-prob * prob.clamp(min=eps).log()).sum(-1)


def code_selection(nbits: int, device: torch.device | str | None = None) -> Tensor:
    """`(2 * nbits, 2**nbits)` float32 0/1: row `2 i` marks the codes with bit `i` set, row `2 i + 1` those with it
    clear (first bit most significant). The table `mean_code_probs` multiplies with; models keep theirs as a
    derived buffer."""
    codes = torch.arange(2**nbits, device=device)
    place = 2 ** torch.arange(nbits - 1, -1, -1, device=device)
    bits = ((codes & place[:, None]) != 0).float()
    return torch.stack((bits, 1 - bits), dim=1).flatten(0, 1)


def code_selections(nbits: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The selection tables of the high and low halves of `nbits` bits (`mean_code_probs`' split)."""
    return code_selection(nbits // 2, device), code_selection(nbits - nbits // 2, device)


def _code_probability_table(log_probs: Tensor, select: Tensor) -> Tensor:
    """`(N, c, B, 2)` log bit probabilities to `(N, c, 2**B)` code probabilities, first bit most significant.

    The probability of a code is the product over bits of P(set) or P(clear): its log is one 0/1 matmul of the
    log bit probabilities with the code-selection table. Every term of that sum is <= 0 (no cancellation), so the
    probability keeps float32's relative precision times `|log p|`, unlike a softmax over code logits, which
    loses `eps * |logit|` when the logits are large."""
    return torch.matmul(log_probs.flatten(-2), select).exp()


def _mean_code_probs(log_probs: Tensor, selections: tuple[Tensor, Tensor] | None) -> Tensor:
    """`(N, c, C, 2)` float32 log bit probabilities -> `(c, 2**C)` batch-mean code probabilities."""
    n, _, nbits, _ = log_probs.shape
    hi_bits = nbits // 2
    if selections is None:
        selections = code_selections(nbits, log_probs.device)
    codebook_major = log_probs.transpose(0, 1)  # (c, N, C, 2): each codebook's rows contiguous in the tables
    p_hi = _code_probability_table(codebook_major[:, :, :hi_bits], selections[0])  # (c, N, 2**H)
    p_lo = _code_probability_table(codebook_major[:, :, hi_bits:], selections[1])  # (c, N, 2**L)
    return row_chunked_gram(p_hi, p_lo).flatten(1) / n


GRAM_CHUNK_ROWS = 2048  # rows per partial product of `row_chunked_gram`


def row_chunked_gram(a: Tensor, b: Tensor) -> Tensor:
    """`a^T b` per batch entry: `(c, N, A)` and `(c, N, B)` -> `(c, A, B)`, summed over the N rows.

    A product whose inner dim is the whole batch (2^16 and more rows) and whose output is small (the code tables'
    16-128 columns) gets few tiles and a serial reduction in cuBLAS; as partial products over chunks of
    `GRAM_CHUNK_ROWS` rows (free views of the contiguous rows) it is one batched GEMM of many tiles and a sum."""
    c, n, _ = a.shape
    chunks = n // GRAM_CHUNK_ROWS
    if chunks < 2:
        return torch.bmm(a.transpose(1, 2), b)
    head = chunks * GRAM_CHUNK_ROWS
    part_a = a[:, :head].reshape(c * chunks, GRAM_CHUNK_ROWS, a.shape[-1])
    part_b = b[:, :head].reshape(c * chunks, GRAM_CHUNK_ROWS, b.shape[-1])
    gram = torch.bmm(part_a.transpose(1, 2), part_b).view(c, chunks, a.shape[-1], b.shape[-1]).sum(1)
    if head < n:
        gram = gram + torch.bmm(a[:, head:].transpose(1, 2), b[:, head:])
    return gram


def mean_code_probs(logits: Tensor, selections: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Batch-mean probability of every code: `(N, c, C)` bit logits -> `(c, 2**C)`.

    Exactly CogVideo sgm's `softmax(logits of all codes).mean(samples)`, computed as `P_hi^T @ P_lo / N` over the
    high and low halves of the bits, never materializing `N x 2**C`. `selections`: `code_selections(C)` on the
    logits' device (built here when not given).
    """
    return _mean_code_probs(log_bit_probs(logits.float()), selections)


def codebook_entropy(logits: Tensor, eps: float = ENTROPY_EPS,
                     selections: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Entropy of the batch-mean code distribution (exact), averaged over codebooks."""
    return entropy(mean_code_probs(logits, selections), eps).mean()


def entropies(logits: Tensor, eps: float = ENTROPY_EPS,
              selections: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """`(per_sample_entropy(logits), codebook_entropy(logits))` sharing the log bit probabilities."""
    log_probs = log_bit_probs(logits)
    log_probs32 = log_probs if logits.dtype == torch.float32 else log_bit_probs(logits.float())
    return _bits_entropy(log_probs), entropy(_mean_code_probs(log_probs32, selections), eps).mean()


def factorized_codebook_entropy(logits: Tensor, eps: float = ENTROPY_EPS) -> Tensor:
    """BSQ / Open-MAGVIT2 approximation: sum over bits of the binary entropy of the batch-mean bit probability
    (an upper bound of the exact codebook entropy), averaged over codebooks."""
    q = torch.sigmoid(logits.float()).mean(0)  # (c, C)
    return entropy(torch.stack((q, 1 - q), dim=-1), eps).sum(-1).mean()


def sample_fraction(tokens: Tensor, frac: float) -> Tensor:
    """A random `int(N * frac)` subset of the `(N, ...)` rows: CogVideo sgm's and vqp 1.32's draw, the rows at the
    positions `p` where `argsort(randn(N))[p] < int(N * frac)`, from the CPU generator (the same rows as theirs
    for the same generator state, up to the order of tied draws).

    Off the CPU the sort runs on the tokens' device and the rows are gathered by index, in any order (the
    entropies average over them): the kept positions are the ranks of the first `int(N * frac)` draws. That
    costs no host sort (tens of ms at 2^18 rows) and no device sync (a boolean mask's row count)."""
    if frac >= 1.0:
        return tokens
    n = tokens.shape[0]
    keep, draws = int(n * frac), torch.randn(n)
    if tokens.device.type == "cpu":
        return tokens[draws.argsort(dim=-1) < keep]
    return tokens.index_select(0, kept_positions(draws.to(tokens.device), keep))


def kept_positions(draws: Tensor, keep: int) -> Tensor:
    """The positions `p` with `argsort(draws)[p] < keep`, in no particular order: the ranks of `draws[:keep]`."""
    return draws.argsort().argsort()[:keep]
