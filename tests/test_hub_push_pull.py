"""Every quantizer class pushed to the Hub test double and pulled back with AutoModel in a fresh cache:
bit-identical outputs; offline loading from the cache; `revision=` for an older commit."""

from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from transformers import AutoModel

import hf_vq
from quantizer_examples import EXAMPLES, example

# one example per class: every class goes through the Hub once
CLASSES = sorted({name.split("_")[0]: name for name in sorted(EXAMPLES)}.values())


def _fresh_cache(hub, monkeypatch, name):
    cache = str(Path(hub.cache_dir).parent / name)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    return cache


def _outputs(model, x):
    torch.manual_seed(1)
    return [t for t in model(x, return_dict=True).to_tuple() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", CLASSES)
def test_push_then_pull_in_a_fresh_cache_is_bit_identical(name, hub_endpoint, monkeypatch):
    cls_name, kwargs, x = example(name)
    model = getattr(hf_vq, cls_name)(**kwargs).eval()
    repo_id = f"hf-vq-tester/{cls_name.lower()}"
    model.push_to_hub(repo_id)
    _fresh_cache(hub_endpoint, monkeypatch, f"cache-{cls_name}")
    loaded = AutoModel.from_pretrained(repo_id).eval()
    assert type(loaded) is type(model)
    for a, b in zip(_outputs(model, x), _outputs(loaded, x)):
        assert torch.equal(a, b)


def test_revisions_and_offline_loading(hub_endpoint, monkeypatch):
    repo_id = "hf-vq-tester/vq-revisions"
    model = hf_vq.VectorQuantize(dim=8, codebook_size=16, decay=0.9).train()
    first_commit = model.push_to_hub(repo_id).oid
    first_codebook = model.codebook.detach().clone()
    model(torch.randn(2, 20, 8))  # an EMA step changes the codebook
    model.push_to_hub(repo_id)

    _fresh_cache(hub_endpoint, monkeypatch, "cache-revisions")
    latest = AutoModel.from_pretrained(repo_id)
    old = AutoModel.from_pretrained(repo_id, revision=first_commit)
    assert torch.equal(latest.codebook, model.codebook)
    assert torch.equal(old.codebook, first_codebook)

    requests = len(hub_endpoint.state.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = AutoModel.from_pretrained(repo_id)
    assert torch.equal(offline.codebook, model.codebook)
    assert len(hub_endpoint.state.requests) == requests  # served from the cache
