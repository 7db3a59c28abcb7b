"""EvoLFQ against vector-quantize-pytorch 1.32 `EvoLFQ` on shared weights, inputs and seeds.

Tolerances: reconstructions and indices equal (tolerance 0); the entropy aux loss atol 1e-5 (hf_vq's LFQ computes
the exact codebook entropy without an N x 2**C matrix: float32 summation order differs, as in test_lfq.py); the
genetic algorithm's populations and fitnesses equal. `best_gene` deliberately differs (see `EvoLFQ.evolve`).
"""

import pytest
import torch
from torch import nn
from transformers import AutoModel
from vector_quantize_pytorch import LFQ as VqpLFQ
from vector_quantize_pytorch.evo_lookup_free_quantization import EvoLFQ as VqpEvoLFQ

import hf_vq
from hf_vq import LFQ, EvoLFQ, EvoLFQConfig
from hf_vq.diffusers_support import DiffusersQuantizer


def _fitness(decoded, bits):
    return -(decoded - 0.5).square().mean(-1)


def _pair(**kwargs):
    torch.manual_seed(0)
    theirs = VqpEvoLFQ(nn.Linear(12, 8), nn.Linear(8, 12), pop_size=10, **kwargs)
    return theirs, EvoLFQ.from_vector_quantize_pytorch(theirs)


CONFIGS = [
    dict(dim=8, codebook_size=2**4, entropy_loss_weight=0.2),
    dict(dim=8, codebook_size=2**3, num_codebooks=2, commitment_loss_weight=0.1, spherical=True),
    dict(dim=8, codebook_size=2**8, elitism_count=3, tournament_size=3, mutation_rate=0.1),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("shape", [(4, 12), (2, 3, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_matches_vqp(kwargs, shape, train):
    theirs, ours = _pair(**kwargs)
    theirs.train(train), ours.train(train)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    want = theirs(x1)
    torch.manual_seed(1)
    got = ours(x2, return_dict=False)
    assert len(got) == 3
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-5)
    (want[0].square().sum() + want[2]).backward()
    (got[0].square().sum() + got[2]).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=range(len(CONFIGS)))
def test_encode_decode_and_evolution_match_vqp(kwargs):
    theirs, ours = _pair(**kwargs)
    x = torch.randn(5, 12)
    assert torch.equal(theirs.encode(x), ours.encode(x))
    assert torch.equal(theirs.encode(x, return_signs=True), ours.encode(x, return_signs=True))
    width = ours.lfq.config.codebook_dim * ours.lfq.config.num_codebooks
    bits = (torch.randn(6, width) > 0).float()
    assert torch.equal(theirs.decode_bits(bits), ours.decode_bits(bits))
    assert torch.equal(theirs.decode_bits(bits * 2 - 1), ours.decode_bits(bits * 2 - 1))  # -1/+1 bits
    for is_sign in (False, True):
        torch.manual_seed(3)
        want = theirs.init_population_from_data(x, is_sign=is_sign)
        torch.manual_seed(3)
        assert torch.equal(want, ours.init_population_from_data(x, is_sign=is_sign))
        torch.manual_seed(4)
        want = list(theirs.evolve(_fitness, shape=(width,), generations=4, is_sign=is_sign, batch_size=3))
        torch.manual_seed(4)
        got = list(ours.evolve(_fitness, shape=(width,), generations=4, is_sign=is_sign, batch_size=3))
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a.pop_bits, b.pop_bits) and a.best_fitness == b.best_fitness


def test_best_gene_scores_best_fitness():
    _, evo = _pair(**CONFIGS[0])
    for result in evo.evolve(_fitness, shape=(4,), generations=6, return_best_decoded=True):
        decoded = evo.decode_bits(result.best_gene[None])
        assert float(_fitness(decoded, result.best_gene[None])[0]) == pytest.approx(result.best_fitness, abs=1e-6)
        assert torch.equal(result.best_decoded, decoded[0])
    # elitism keeps the best individual of a generation at the front of the next one
    pop = evo.init_random_population(shape=(4,))
    nxt, fitness = evo.step(pop, _fitness)
    assert torch.equal(nxt[0], pop[fitness.argmax()]) and nxt.shape == pop.shape


def test_ga_operators():
    _, evo = _pair(**CONFIGS[0])
    pop = evo.init_random_population(pop_size=200, shape=(16,), is_sign=True)
    assert pop.shape == (200, 16) and set(pop.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(evo.mutate(pop, mutation_rate=1.0, is_sign=True), -pop)
    assert torch.equal(evo.mutate(pop, mutation_rate=0.0, is_sign=True), pop)
    zeros, ones = torch.zeros(100, 16), torch.ones(100, 16)
    child = evo.uniform_crossover(zeros, ones)
    assert 0.3 < child.mean() < 0.7
    fitness = torch.arange(200.0)
    winners = evo.tournament_selection(pop, fitness, tournament_size=200)
    assert winners.shape == pop.shape  # 200 contenders each: (almost surely) the best individual wins most
    assert (winners == pop[199]).all(-1).float().mean() > 0.5


def test_training_steps_match_vqp():
    theirs, ours = _pair(**CONFIGS[0])
    opt_t = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    opt_o = torch.optim.Adam(ours.parameters(), lr=1e-2)
    for step in range(3):
        x = torch.randn(6, 12, generator=torch.Generator().manual_seed(step))
        for model, opt in ((theirs, opt_t), (ours, opt_o)):
            rec, _, aux = model(x) if model is theirs else model(x, return_dict=False)
            ((rec - x).square().mean() + aux).backward()
            opt.step()
            opt.zero_grad()
    want = theirs.state_dict()
    assert set(want) - set(ours.state_dict()) == {"lfq.mask"}  # vqp's derived bit mask, not state here
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_constructors_and_config():
    enc, dec = nn.Linear(6, 4), nn.Linear(4, 6)
    evo = EvoLFQ(enc, dec, dim=4, entropy_loss_weight=0.3)  # vqp's positional encoder, decoder; flat LFQ options
    assert evo.encoder is enc and evo.decoder is dec and isinstance(evo.lfq, LFQ)
    assert evo.config.lfq_kwargs == {"commitment_loss_weight": 0.0, "entropy_loss_weight": 0.3}
    assert evo.lfq.config.entropy_loss_weight == 0.3 and evo.lfq.codebook_size == 16
    lfq = LFQ(dim=4, codebook_size=4)
    assert EvoLFQ(enc, dec, lfq).lfq is lfq  # an hf_vq LFQ is used as is
    vqp_lfq = VqpLFQ(dim=4, codebook_size=4, orthogonal_rotation=True)
    evo = EvoLFQ(enc, dec, vqp_lfq)  # a vqp LFQ is migrated
    assert torch.equal(evo.lfq.orthogonal_rot, vqp_lfq.orthogonal_rot)
    assert EvoLFQ(dim=4).encoder.__class__ is nn.Identity


def test_migration_round_trip_through_automodel(tmp_path):
    theirs, ours = _pair(**CONFIGS[1])
    ours.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, encoder=nn.Linear(12, 8), decoder=nn.Linear(8, 12))
    assert type(loaded) is EvoLFQ and (tmp_path / "README.md").exists()
    assert loaded.config.to_kwargs() == ours.config.to_kwargs()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(3, 12)
    theirs.eval(), loaded.eval()
    want, got = theirs(x), loaded(x, return_dict=False)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_diffusers_face_round_trip(tmp_path):
    evo = EvoLFQ(dim=6, codebook_size=8).eval()
    DiffusersQuantizer.from_quantizer(evo).save_pretrained(tmp_path)
    loaded = DiffusersQuantizer.from_pretrained(tmp_path).quantizer.eval()
    x = torch.randn(2, 5, 6)
    assert type(loaded) is EvoLFQ and torch.equal(loaded(x).reconstructed, evo(x).reconstructed)
    assert isinstance(hf_vq.build_quantizer("EvoLFQ", {"dim": 4}), EvoLFQ)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "needs an lfq module, or dim and/or codebook_size"),
    (dict(dim=4, pop_size=2, elitism_count=2), r"pop_size \(2\) must be greater than elitism_count \(2\)"),
    (dict(dim=4, mutation_rate=2.0), r"mutation_rate must be in \[0, 1\]"),
    (dict(dim=4, tournament_size=0), "tournament_size must be an int >= 1"),
    (dict(dim=4, lfq_kwargs={"dim": 3}), r"reserved field\(s\) \['dim'\]"),
    (dict(codebook_size=12), "codebook_size must be a power of 2"),
    (dict(dim=4, straight_through_activation="swish"), "straight_through_activation must be one of"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvoLFQConfig(**kwargs)


def test_bad_arguments():
    evo = EvoLFQ(dim=4, codebook_size=16)
    with pytest.raises(ValueError, match="bits must have a last dim of 4"):
        evo.decode_bits(torch.ones(2, 5))
    with pytest.raises(ValueError, match="evolve needs pop_bits or the shape"):
        next(evo.evolve(_fitness))
    with pytest.raises(ValueError, match=r"one fitness per individual, shape \(64,\)"):
        evo.step(evo.init_random_population(shape=(4,)), lambda decoded, bits: decoded.sum())
    with pytest.raises(ValueError, match="expected feature dim 4"):
        evo(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="lfq module's config differs"):
        EvoLFQ(EvoLFQConfig(dim=4), lfq=LFQ(dim=4, codebook_size=4))
    with pytest.raises(TypeError, match="at most 3 positional"):
        EvoLFQ(nn.Identity(), nn.Identity(), None, 4)
