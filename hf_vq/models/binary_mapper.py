"""Binary mapper as a Hugging Face model.

Semantics: vector-quantize-pytorch 1.32 `BinaryMapper` (https://arxiv.org/abs/2510.17558, a stable alternative to a
VAE's Gaussian latent): `bits` logits per token are sampled as independent Bernoulli bits, the bits index one of
`2**bits` codes, and the output is that code's one-hot vector, with a straight-through gradient through the
probability of every code. The auxiliary loss is a hinge on the KL divergence of the bit distribution from the
uniform one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modeling_utils import QuantizerConfig, QuantizerModel, QuantizerOutput, check_indices, register_quantizer

NAT = math.log(2)  # one bit, in nats

# the one-hot output is `2**bits` wide per token; indices are int64 sums of powers of two
MAX_BITS = 62


class BinaryMapperConfig(QuantizerConfig):
    """Configuration of [`BinaryMapper`] (vqp 1.32's arguments, names, defaults and order).

    Args:
        bits (`int`, defaults to 1): logits (bits) per token; the output one-hot has `2**bits` entries.
        kl_loss_threshold (`float`, defaults to `log(2)`, one bit): the KL divergence from uniform bits, in nats,
            below which the auxiliary loss is 0.
        deterministic_on_eval (`bool`, defaults to `False`): in eval, threshold the probabilities at 0.5 instead
            of sampling.
    """

    model_type = "hf_vq_binary_mapper"

    vqp_positional = ("bits", "kl_loss_threshold", "deterministic_on_eval")

    def __init__(self, bits: int = 1, kl_loss_threshold: float = NAT, deterministic_on_eval: bool = False, **kwargs):
        self.bits = bits
        self.kl_loss_threshold = kl_loss_threshold
        self.deterministic_on_eval = deterministic_on_eval
        super().__init__(**kwargs)

    def validate(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {self.bits!r}")
        threshold = self.kl_loss_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"kl_loss_threshold must be a finite number (nats), got {threshold!r}")
        if not isinstance(self.deterministic_on_eval, bool):
            raise ValueError(f"deterministic_on_eval must be a bool, got {self.deterministic_on_eval!r}")

    @property
    def dim(self) -> int:
        """The input feature dim: one logit per bit."""
        return self.bits

    @property
    def codebook_size(self) -> int:
        return 2**self.bits


@dataclass
class BinaryMapperOutput(QuantizerOutput):
    """Output of [`BinaryMapper`].

    Args:
        quantized (`torch.Tensor`): float32 one-hot codes `(..., 2**bits)` (straight-through in training).
        indices (`torch.Tensor`): int64 code indices `(...)`: the sampled bits, bit `i` worth `2**i`.
        loss (`torch.Tensor`): the KL hinge loss (a scalar, or per token with `reduce_aux_kl_loss=False`); 0 when
            not computed (eval by default).
    """

    # vqp's default `(one_hot, aux_kl_loss)`; the forward returns `(one_hot, indices, aux_kl_loss)` with
    # `return_indices=True`, as vqp
    tuple_fields: ClassVar[tuple[str, ...]] = ("quantized", "loss")

    @property
    def one_hot(self) -> Tensor:
        return self.quantized


def binary_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of independent Bernoulli bits with these logits, summed over the last dim."""
    prob = logits.sigmoid()
    return -(prob * F.logsigmoid(logits) + (1.0 - prob) * F.logsigmoid(-logits)).sum(dim=-1)


def code_probabilities(logits: Tensor, codes: Tensor) -> Tensor:
    """`(N, 2**bits)` probability of every code under independent bits: `exp(sum_b log p(bit_b = code_b))`,
    written as `sum_b logsigmoid(-l_b) + l @ code` (since `logsigmoid(l) - logsigmoid(-l) = l`): one matmul."""
    return (F.logsigmoid(-logits).sum(dim=-1, keepdim=True) + logits @ codes.t()).exp()


@register_quantizer
class BinaryMapper(QuantizerModel):
    """Maps `bits` logits per token to a sampled one-hot code over `2**bits` codes.

    Takes vqp's positional argument too: `BinaryMapper(8)` is `BinaryMapper(bits=8)`.

    Example:
        >>> mapper = BinaryMapper(bits=8)
        >>> one_hot, indices, aux_loss = mapper(torch.randn(3, 4, 8), return_indices=True, return_dict=False)
        >>> one_hot.shape, indices.shape
        (torch.Size([3, 4, 256]), torch.Size([3, 4]))
    """

    config_class = BinaryMapperConfig
    main_input_name = "logits"

    def __init__(self, config: BinaryMapperConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self.bits = c.bits
        self.num_codes = 2**c.bits
        self.kl_loss_threshold = float(c.kl_loss_threshold)
        self.deterministic_on_eval = c.deterministic_on_eval
        self.check_inputs = c.check_inputs
        self.register_buffer("power_two", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("codes", torch.empty(0, dtype=torch.bool), persistent=False)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self.reset_derived_buffers()
        self.post_init()

    def reset_derived_buffers(self):
        device = self.power_two.device if self.power_two.device.type != "meta" else torch.device("cpu")
        self.power_two = 2 ** torch.arange(self.bits, device=device)
        self.codes = (torch.arange(self.num_codes, device=device)[:, None] & self.power_two) != 0
        self.zero = torch.zeros((), device=device)

    @property
    def codebook_size(self) -> int:
        return self.num_codes

    def example_input_shape(self) -> tuple[int, ...]:
        return (1, 16, self.bits)

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "BinaryMapper":
        """A `BinaryMapper` with the config of a vqp 1.32 `BinaryMapper` (it has no learned state)."""
        model = cls(bits=int(module.bits), kl_loss_threshold=float(module.kl_loss_threshold),
                    deterministic_on_eval=bool(module.deterministic_on_eval))
        model.load_state_dict(module.state_dict())
        return model.to(module.zero.device)

    # -- losses and likelihoods -------------------------------------------------------------------

    def binary_entropy(self, logits: Tensor) -> Tensor:
        return binary_entropy(logits)

    def calc_aux_loss(self, logits: Tensor, reduce_aux_kl_loss: bool = True) -> Tensor:
        """`relu(KL(bits || uniform) - kl_loss_threshold)` per token, averaged unless `reduce_aux_kl_loss=False`."""
        kl_div = self.bits * NAT - binary_entropy(logits)
        aux = F.relu(kl_div - self.kl_loss_threshold)
        return aux.mean() if reduce_aux_kl_loss else aux

    def indices_to_bits(self, indices: Tensor) -> Tensor:
        """Code indices `(...)` to their bool bits `(..., bits)`, bit `i` worth `2**i`."""
        check_indices(indices, self.num_codes)
        return (indices.unsqueeze(-1) & self.power_two) != 0

    def log_prob(self, logits: Tensor, *, indices: Tensor | None = None, one_hot: Tensor | None = None,
                 sum_bits: bool = True) -> Tensor:
        """Log-probability of the given codes (`indices`, or `one_hot` vectors) under `logits`: per bit
        `(..., bits)`, or summed over bits `(...)` (the joint log-probability)."""
        if (indices is None) == (one_hot is None):
            raise ValueError("log_prob needs exactly one of indices or one_hot")
        self._check_logits(logits)
        if one_hot is not None:
            indices = one_hot.argmax(dim=-1)
        bits = self.indices_to_bits(indices)
        log_probs = torch.where(bits, F.logsigmoid(logits), F.logsigmoid(-logits))
        return log_probs.sum(dim=-1) if sum_bits else log_probs

    # -- forward ----------------------------------------------------------------------------------

    def _check_logits(self, logits: Tensor) -> None:
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a floating point tensor, got dtype {logits.dtype}")
        if logits.ndim < 1 or logits.shape[-1] != self.bits:
            raise ValueError(f"logits must have a last dimension of {self.bits} (bits), "
                             f"got shape {tuple(logits.shape)}")

    def forward(
        self,
        logits: Tensor,
        temperature: float = 1.0,
        straight_through: bool | None = None,
        calc_aux_loss: bool | None = None,
        deterministic: bool | None = None,
        return_indices: bool = False,
        reduce_aux_kl_loss: bool = True,
        return_dict: bool | None = None,
    ) -> BinaryMapperOutput | tuple:
        """Sample codes from `logits` `(..., bits)`. `straight_through` and `calc_aux_loss` default to training
        mode, `deterministic` to `deterministic_on_eval` in eval. Returns [`BinaryMapperOutput`], or vqp's
        `(one_hot, aux_kl_loss)` / `(one_hot, indices, aux_kl_loss)` (with `return_indices`) with
        `return_dict=False`."""
        if self.check_inputs:
            self._check_logits(logits)
        deterministic = self.deterministic_on_eval and not self.training if deterministic is None else deterministic
        straight_through = self.training if straight_through is None else straight_through
        calc_aux_loss = self.training if calc_aux_loss is None else calc_aux_loss

        lead_shape = logits.shape[:-1]
        flat = logits.reshape(-1, self.bits)
        prob = (flat / temperature).sigmoid()
        sampled = (prob > 0.5).long() if deterministic else prob.bernoulli().long()
        indices = (self.power_two * sampled).sum(dim=-1)
        one_hot = F.one_hot(indices, self.num_codes).float()

        aux_kl_loss = self.calc_aux_loss(logits, reduce_aux_kl_loss) if calc_aux_loss else self.zero
        if straight_through:
            # values stay exactly one-hot; the gradient is that of every code's probability
            soft = code_probabilities(flat, self.codes.to(flat.dtype))
            one_hot = one_hot + (soft - soft.detach())

        out = BinaryMapperOutput(quantized=one_hot.reshape(*lead_shape, self.num_codes),
                                 indices=indices.reshape(lead_shape), loss=aux_kl_loss)
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return (out.quantized, out.indices, out.loss) if return_indices else out.to_tuple_output()
        return out
