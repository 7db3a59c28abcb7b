"""Evolutionary LFQ (EvoLFQ) as a Hugging Face model.

Semantics: vector-quantize-pytorch 1.32 `EvoLFQ`: an encoder, an [`LFQ`] bottleneck and a decoder, plus a genetic
algorithm over the bottleneck's bits (random or data-seeded populations, tournament selection, uniform crossover,
bit-flip mutation, elitism) that searches the code space for bits whose decoding maximizes a fitness function.

The encoder and decoder are arbitrary modules, passed to the constructor (vqp's positional order: `encoder,
decoder, lfq`) and to `from_pretrained(path, encoder=..., decoder=...)`; they default to the identity. Their
weights are saved with the model; their classes are not part of the (JSON) config. The LFQ is built from the config
(`dim`, `codebook_size`, `num_codebooks` and any other LFQ option, collected in `lfq_kwargs`).
"""

from __future__ import annotations

import contextlib
import copy
from collections import namedtuple
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..modeling_utils import QuantizerConfig, QuantizerModel, QuantizerOutput, register_quantizer
from .lfq import ACTIVATIONS, LFQ, LFQConfig

# vqp's `evolve` yields these, same field order
Result = namedtuple("Result", ["pop_bits", "best_gene", "best_fitness", "best_decoded"])

_OWN_LFQ_FIELDS = ("dim", "codebook_size", "num_codebooks")
_LFQ_OPTIONS = tuple(n for n in LFQConfig.field_names() if n not in _OWN_LFQ_FIELDS + ("check_inputs",))


class EvoLFQConfig(QuantizerConfig):
    """Configuration of [`EvoLFQ`] (vqp 1.32's keyword arguments, names and defaults).

    Args:
        dim (`int`, *optional*): the LFQ's input feature dim (the encoder's output dim).
        codebook_size (`int`, *optional*): the LFQ's codebook size (a power of two); `dim` or `codebook_size` is
            required.
        num_codebooks (`int`, defaults to 1): the LFQ's number of codebooks.
        pop_size (`int`, defaults to 64): population size of the genetic algorithm.
        mutation_rate (`float`, defaults to 0.02): chance of flipping each bit of an offspring.
        tournament_size (`int`, defaults to 2): contenders per tournament selection.
        elitism_count (`int`, defaults to 1): best individuals carried over unchanged; less than `pop_size`.
        generations (`int`, defaults to 50): generations `evolve` runs by default.
        lfq_kwargs (`dict`, *optional*): any other [`LFQConfig`] option (vqp's `**lfq_kwargs`; they may also be
            passed flat, `EvoLFQConfig(dim=8, entropy_loss_weight=0.2)`). `commitment_loss_weight` defaults to 0 as
            in vqp's LFQ (hf_vq's LFQ defaults to CogVideo sgm's 0.25).
    """

    model_type = "hf_vq_evo_lfq"

    # vqp 1.32 takes the modules positionally (model arguments, not config fields)
    vqp_positional = ("encoder", "decoder", "lfq")

    def __init__(
        self,
        dim: int | None = None,
        codebook_size: int | None = None,
        num_codebooks: int = 1,
        pop_size: int = 64,
        mutation_rate: float = 0.02,
        tournament_size: int = 2,
        elitism_count: int = 1,
        generations: int = 50,
        lfq_kwargs: dict | None = None,
        **kwargs,
    ):
        flat = {name: kwargs.pop(name) for name in list(kwargs) if name in _LFQ_OPTIONS}
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.pop_size = pop_size
        self.mutation_rate = mutation_rate
        self.tournament_size = tournament_size
        self.elitism_count = elitism_count
        self.generations = generations
        self.lfq_kwargs = {"commitment_loss_weight": 0.0, **dict(lfq_kwargs or {}), **flat}
        super().__init__(**kwargs)

    def validate(self):
        if self.dim is None and self.codebook_size is None:
            raise ValueError("EvoLFQ needs an lfq module, or dim and/or codebook_size to build one")
        for name, low in (("pop_size", 1), ("tournament_size", 1), ("elitism_count", 0), ("generations", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.pop_size <= self.elitism_count:
            raise ValueError(f"pop_size ({self.pop_size}) must be greater than elitism_count ({self.elitism_count})")
        rate = self.mutation_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"mutation_rate must be in [0, 1], got {rate!r}")
        if not isinstance(self.lfq_kwargs, dict):
            raise ValueError(f"lfq_kwargs must be a dict of LFQ options, got {self.lfq_kwargs!r}")
        unknown = sorted(set(self.lfq_kwargs) - set(_LFQ_OPTIONS))
        if unknown:
            raise ValueError(f"lfq_kwargs got unknown or reserved field(s) {unknown} (dim, codebook_size and "
                             f"num_codebooks are EvoLFQConfig fields); LFQ options: {list(_LFQ_OPTIONS)}")
        self.lfq_config()  # the LFQ's own validation names any bad option

    def lfq_config(self) -> LFQConfig:
        """The config of the LFQ bottleneck."""
        return LFQConfig(dim=self.dim, codebook_size=self.codebook_size, num_codebooks=self.num_codebooks,
                         check_inputs=self.check_inputs, **self.lfq_kwargs)

    @property
    def effective_dim(self) -> int:
        return self.lfq_config().effective_dim


@dataclass
class EvoLFQOutput(QuantizerOutput):
    """Output of [`EvoLFQ`].

    Args:
        reconstructed (`torch.Tensor`): the decoder's output on the quantized latents.
        indices (`torch.Tensor`): the LFQ's code indices.
        loss (`torch.Tensor`): the LFQ's entropy aux loss.
        quantized (`torch.Tensor`): the quantized latents (the decoder's input).
    """

    reconstructed: Tensor | None = None

    # vqp's `Return(reconstructed, indices, entropy_aux_loss)`
    tuple_fields: ClassVar[tuple[str, ...]] = ("reconstructed", "indices", "loss")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put `module` and its submodules in eval mode, restoring each one's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def lfq_from_vector_quantize_pytorch(module, check_inputs: bool = True) -> LFQ:
    """An hf_vq [`LFQ`] with the config and state of a vqp 1.32 `LFQ` module."""
    lfq = LFQ(lfq_config_from_vector_quantize_pytorch(module, check_inputs))
    lfq.load_state_dict(module.state_dict())
    return lfq.to(next(iter(module.buffers())).device)


def lfq_config_from_vector_quantize_pytorch(module, check_inputs: bool = True) -> LFQConfig:
    """The [`LFQConfig`] of a vqp 1.32 `LFQ` module (its straight-through activation must be one of
    `ACTIVATIONS`)."""
    activation = next((name for name, klass in ACTIVATIONS.items() if type(module.activation) is klass), None)
    if activation is None:
        raise ValueError(f"straight_through_activation {type(module.activation).__name__} has no hf_vq name; "
                         f"supported: {sorted(ACTIVATIONS)}")
    cosine = module.has_projections and not isinstance(module.project_in, nn.Linear)
    return LFQConfig(
        dim=module.dim,
        codebook_size=module.codebook_size,
        entropy_loss_weight=module.entropy_loss_weight,
        commitment_loss_weight=module.commitment_loss_weight,
        diversity_gamma=module.diversity_gamma,
        straight_through_activation=activation,
        num_codebooks=module.num_codebooks,
        keep_num_codebooks_dim=module.keep_num_codebooks_dim,
        codebook_scale=module.codebook_scale,
        frac_per_sample_entropy=module.frac_per_sample_entropy,
        has_projections=module.has_projections,
        projection_has_bias=not module.has_projections or module.project_out.bias is not None,
        soft_clamp_input_value=module.soft_clamp_input_value,
        cosine_sim_project_in=cosine,
        cosine_sim_project_in_scale=module.project_in.scale if cosine else None,
        channel_first=bool(module.channel_first),
        experimental_softplus_entropy_loss=module.experimental_softplus_entropy_loss,
        entropy_loss_offset=module.entropy_loss_offset,
        spherical=module.spherical,
        force_quantization_f32=module.force_quantization_f32,
        orthogonal_rotation=module.orthogonal_rotation,
        check_inputs=check_inputs,
    )


@register_quantizer
class EvoLFQ(QuantizerModel):
    """Encoder -> [`LFQ`] -> decoder, with a genetic algorithm over the LFQ's bits (`evolve`, `step`).

    Example:
        >>> evo = EvoLFQ(nn.Linear(32, 8), nn.Linear(8, 32), dim=8, codebook_size=2**8)
        >>> reconstructed, indices, aux_loss = evo(torch.randn(4, 32), return_dict=False)
        >>> fitness = lambda decoded, bits: -decoded.square().mean(-1)
        >>> result = list(evo.evolve(fitness, shape=(8,), generations=3))[-1]
        >>> result.best_gene.shape
        torch.Size([8])
    """

    config_class = EvoLFQConfig

    def __init__(self, config: EvoLFQConfig | None = None, encoder: nn.Module | None = None,
                 decoder: nn.Module | None = None, lfq: nn.Module | None = None, **kwargs):
        if lfq is not None and not isinstance(lfq, LFQ):  # a vqp LFQ: migrated (a copy of its state)
            lfq = lfq_from_vector_quantize_pytorch(lfq)
        if lfq is not None and config is None:
            lfq_kwargs = lfq.config.to_kwargs()
            kwargs = {**{n: lfq_kwargs.pop(n) for n in _OWN_LFQ_FIELDS}, "check_inputs": lfq_kwargs.pop("check_inputs"),
                      "lfq_kwargs": lfq_kwargs, **kwargs}
        super().__init__(config, **kwargs)
        c = self.config
        if lfq is not None and lfq.config.to_kwargs() != c.lfq_config().to_kwargs():
            raise ValueError("the lfq module's config differs from the EvoLFQ config's LFQ settings")
        self.encoder = encoder if encoder is not None else nn.Identity()
        self.decoder = decoder if decoder is not None else nn.Identity()
        self.lfq = lfq if lfq is not None else LFQ(c.lfq_config())
        self.pop_size = c.pop_size
        self.mutation_rate = c.mutation_rate
        self.tournament_size = c.tournament_size
        self.elitism_count = c.elitism_count
        self.generations = c.generations
        self.post_init()

    def example_input_shape(self) -> tuple[int, ...]:
        return (1, 16, self.config.effective_dim)

    @property
    def codebook_size(self) -> int:
        return self.lfq.codebook_size

    @classmethod
    def from_vector_quantize_pytorch(cls, module) -> "EvoLFQ":
        """An `EvoLFQ` with the GA settings, LFQ (config and state) and copies of the encoder and decoder of a
        vqp 1.32 `EvoLFQ` module."""
        return cls(copy.deepcopy(module.encoder), copy.deepcopy(module.decoder), module.lfq,
                   pop_size=module.pop_size, mutation_rate=module.mutation_rate,
                   tournament_size=module.tournament_size, elitism_count=module.elitism_count,
                   generations=module.generations)

    # -- encode / decode --------------------------------------------------------------------------

    def _quantize(self, latents: Tensor, **lfq_kwargs):
        """LFQ output of encoder latents; `(b, d)` latents are one token each, as vqp."""
        single = latents.ndim == 2
        out = self.lfq(latents.unsqueeze(1) if single else latents, return_dict=True, **lfq_kwargs)
        if single:
            out.quantized = out.quantized.squeeze(1)
            out.indices = out.indices.squeeze(1)
        return out

    def forward(self, x: Tensor, return_dict: bool | None = None, **lfq_kwargs) -> EvoLFQOutput | tuple:
        """Encode `x`, quantize with the LFQ (`lfq_kwargs`: its forward's `inv_temperature`, `mask`) and decode.
        Returns [`EvoLFQOutput`], or vqp's `(reconstructed, indices, entropy_aux_loss)` with `return_dict=False`."""
        out = self._quantize(self.encoder(x), **lfq_kwargs)
        result = EvoLFQOutput(reconstructed=self.decoder(out.quantized), indices=out.indices, loss=out.loss,
                              quantized=out.quantized)
        return self._output(result, return_dict)

    @torch.no_grad()
    def encode(self, x: Tensor, return_signs: bool = False) -> Tensor:
        """The sign pattern of the quantized latents (in eval mode): 0/1 floats, or -1/+1 with `return_signs`."""
        with eval_mode(self):
            quantized = self._quantize(self.encoder(x)).quantized
        return torch.where(quantized > 0, 1.0, -1.0) if return_signs else (quantized > 0).float()

    @torch.no_grad()
    def decode_bits(self, bits: Tensor) -> Tensor:
        """Bits `(..., C * num_codebooks)` (0/1 or -1/+1; the first bit is the most significant) to the decoder's
        output on their LFQ codes."""
        cd, nc = self.lfq.config.codebook_dim, self.lfq.config.num_codebooks
        if bits.shape[-1] not in (cd, cd * nc):
            raise ValueError(f"bits must have a last dim of {cd * nc} (log2(codebook_size) * num_codebooks), "
                             f"got shape {tuple(bits.shape)}")
        with eval_mode(self):
            lead = bits.shape[:-1]
            flat = (bits > 0).int().reshape(-1, bits.shape[-1])
            if nc > 1 and flat.shape[-1] == cd * nc:
                flat = flat.unflatten(-1, (nc, cd))
            if flat.ndim == 2:
                flat = flat.unsqueeze(1)
            place = 2 ** torch.arange(cd - 1, -1, -1, device=flat.device)
            indices = (flat * place).sum(dim=-1)
            if not self.lfq.keep_num_codebooks_dim and indices.shape[-1] == 1:
                indices = indices.squeeze(-1)
            codes = self.lfq.indices_to_codes(indices)
            if codes.ndim == 3 and codes.shape[1] == 1:
                codes = codes.squeeze(1)
            return self.decoder(codes.reshape(*lead, codes.shape[-1]))

    # -- genetic algorithm (vqp's random draws, in vqp's order) ------------------------------------

    def init_random_population(self, pop_size: int | None = None, shape: tuple[int, ...] | None = None,
                               device=None, is_sign: bool = False) -> Tensor:
        """`(pop_size, *shape)` uniformly random bits (0/1, or -1/+1 with `is_sign`)."""
        if shape is None:
            raise ValueError("init_random_population needs the shape of one individual's bits")
        pop_size = self.pop_size if pop_size is None else pop_size
        bits = torch.randint(0, 2, (pop_size, *shape), device=self.device if device is None else device).float()
        return torch.where(bits > 0, 1.0, -1.0) if is_sign else bits

    def init_population_from_data(self, x: Tensor, pop_size: int | None = None, mutation_rate: float | None = None,
                                  is_sign: bool = False) -> Tensor:
        """A population of the encoded bits of `x` (cycled to `pop_size` individuals), mutated."""
        pop_size = self.pop_size if pop_size is None else pop_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        bits = self.encode(x, return_signs=is_sign)
        repeats = -(-pop_size // bits.shape[0])
        bits = bits.repeat(repeats, *([1] * (bits.ndim - 1)))[:pop_size]
        return self.mutate(bits, mutation_rate=mutation_rate, is_sign=is_sign) if mutation_rate > 0 else bits

    def uniform_crossover(self, parent1: Tensor, parent2: Tensor) -> Tensor:
        """Each bit from either parent with probability 1/2."""
        return torch.where(torch.rand_like(parent1.float()) < 0.5, parent1, parent2)

    def mutate(self, population: Tensor, mutation_rate: float | None = None, is_sign: bool = False) -> Tensor:
        """Flip each bit with probability `mutation_rate`."""
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        flip = torch.rand_like(population.float()) < mutation_rate
        return torch.where(flip, -population if is_sign else 1.0 - population, population)

    def tournament_selection(self, population: Tensor, fitnesses: Tensor, tournament_size: int | None = None) -> Tensor:
        """`pop_size` winners of tournaments among `tournament_size` random contenders each."""
        tournament_size = self.tournament_size if tournament_size is None else tournament_size
        pop_size = population.shape[0]
        contenders = torch.randint(0, pop_size, (pop_size, tournament_size), device=population.device)
        winners = contenders.gather(1, fitnesses[contenders].argmax(dim=-1, keepdim=True))
        return population[winners.squeeze(1)]

    def _fitness(self, pop_bits: Tensor, fitness_fn: Callable, batch_size: int | None) -> Tensor:
        chunks = pop_bits.split(batch_size) if batch_size is not None else (pop_bits,)
        decoded = torch.cat([self.decode_bits(chunk) for chunk in chunks], dim=0)
        fitnesses = fitness_fn(decoded, pop_bits)
        if not torch.is_tensor(fitnesses):
            fitnesses = torch.tensor(fitnesses, device=pop_bits.device, dtype=torch.float32)
        if fitnesses.shape != (pop_bits.shape[0],):
            raise ValueError(f"fitness_fn must return one fitness per individual, shape ({pop_bits.shape[0]},), "
                             f"got {tuple(fitnesses.shape)}")
        return fitnesses

    @torch.no_grad()
    def step(self, pop_bits: Tensor, fitness_fn: Callable, tournament_size: int | None = None,
             mutation_rate: float | None = None, elitism_count: int | None = None, is_sign: bool = False,
             batch_size: int | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        """One generation: `(next population, fitnesses of pop_bits)`. `fitness_fn(decoded, pop_bits)` scores each
        individual (higher is better); `batch_size` decodes the population in chunks."""
        tournament_size = self.tournament_size if tournament_size is None else tournament_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        elitism_count = self.elitism_count if elitism_count is None else elitism_count
        pop_size = pop_bits.shape[0]
        num_offspring = pop_size - elitism_count

        fitnesses = self._fitness(pop_bits, fitness_fn, batch_size)
        elites = pop_bits[torch.argsort(fitnesses, descending=True)[:elitism_count]].clone()
        # two tournaments per child, one child per pair of parents
        contenders = torch.randint(0, pop_size, (num_offspring, 2, tournament_size), device=pop_bits.device)
        parents = contenders.gather(-1, fitnesses[contenders].argmax(dim=-1, keepdim=True)).squeeze(-1)
        parent1, parent2 = pop_bits[parents].unbind(1)
        offspring = self.mutate(self.uniform_crossover(parent1, parent2), mutation_rate=mutation_rate, is_sign=is_sign)
        return torch.cat([elites, offspring], dim=0), fitnesses

    @torch.no_grad()
    def evolve(self, fitness_fn: Callable, pop_bits: Tensor | None = None, pop_size: int | None = None,
               shape: tuple[int, ...] | None = None, generations: int | None = None, is_sign: bool = False,
               return_best_decoded: bool = False, **step_kwargs) -> Iterator[Result]:
        """Run the genetic algorithm, yielding a `Result(pop_bits, best_gene, best_fitness, best_decoded)` per
        generation. Start from `pop_bits` or a random population of individuals of `shape`.

        `best_gene` is the best individual evaluated so far, the one that scored `best_fitness` (vqp 1.32 takes
        the gene at that position in the *next* population instead, which is another individual unless it is
        the elite at position 0)."""
        generations = self.generations if generations is None else generations
        if pop_bits is None:
            if shape is None:
                raise ValueError("evolve needs pop_bits or the shape of one individual's bits")
            pop_bits = self.init_random_population(pop_size, shape, is_sign=is_sign)
        best_fitness, best_gene = float("-inf"), None
        for _ in range(generations):
            evaluated = pop_bits
            pop_bits, fitnesses = self.step(pop_bits, fitness_fn, is_sign=is_sign, **step_kwargs)
            best = torch.argmax(fitnesses)
            if fitnesses[best].item() > best_fitness:
                best_fitness, best_gene = fitnesses[best].item(), evaluated[best].clone()
            best_decoded = self.decode_bits(best_gene.unsqueeze(0)).squeeze(0) if return_best_decoded else None
            yield Result(pop_bits, best_gene, best_fitness, best_decoded)
