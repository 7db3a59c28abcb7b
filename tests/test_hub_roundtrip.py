"""VQAutoencoder and a diffusers pipeline holding it through the Hub test double: push, pull in a fresh cache
(bit-identical), `revision=`, offline from the cache. (Every quantizer class: tests/test_hub_push_pull.py;
their pushed cards: tests/test_model_cards.py.)"""

from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import constants

from hf_vq import VQAutoencoder
from test_vq_autoencoder import FSQ_CONFIG, TINY, _generate, _tiny_ldm


def _fresh_cache(hub, monkeypatch, name):
    cache = str(Path(hub.cache_dir).parent / name)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_vq_autoencoder_push_pull_revision_offline(hub_endpoint, monkeypatch):
    repo_id = "hf-vq-tester/vq-autoencoder"
    model = VQAutoencoder(**TINY, **FSQ_CONFIG).eval()
    first_commit = model.push_to_hub(repo_id).oid
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        first_out = model(x).sample
        model.post_quant_conv.weight.mul_(2)  # a second version
        second_out = model(x).sample
    model.push_to_hub(repo_id)

    _fresh_cache(hub_endpoint, monkeypatch, "cache-autoencoder")
    latest = VQAutoencoder.from_pretrained(repo_id).eval()
    old = VQAutoencoder.from_pretrained(repo_id, revision=first_commit).eval()
    with torch.no_grad():
        assert torch.equal(latest(x).sample, second_out)
        assert torch.equal(old(x).sample, first_out)

    requests = len(hub_endpoint.state.requests)
    _offline(monkeypatch)
    offline = VQAutoencoder.from_pretrained(repo_id).eval()
    with torch.no_grad():
        assert torch.equal(offline(x).sample, second_out)
    assert len(hub_endpoint.state.requests) == requests  # served from the cache


def test_pipeline_with_vq_autoencoder_push_pull(hub_endpoint, monkeypatch):
    repo_id = "hf-vq-tester/ldm-hf-vq"
    pipe = _tiny_ldm(VQAutoencoder(**TINY).eval())
    images = _generate(pipe)
    pipe.push_to_hub(repo_id)

    _fresh_cache(hub_endpoint, monkeypatch, "cache-pipeline")
    loaded = DiffusionPipeline.from_pretrained(repo_id)
    assert type(loaded.vqvae) is VQAutoencoder
    np.testing.assert_array_equal(_generate(loaded), images)
    _offline(monkeypatch)
    assert type(DiffusionPipeline.from_pretrained(repo_id).vqvae) is VQAutoencoder
