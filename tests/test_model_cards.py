"""Every save_pretrained / push_to_hub renders hf_vq's model card; its usage snippet runs."""

import re

import pytest
import torch
from huggingface_hub import ModelCard, hf_hub_download

import hf_vq
from quantizer_examples import EXAMPLES, example

CLASSES = sorted({name.split("_")[0]: name for name in sorted(EXAMPLES)}.values())


@pytest.mark.parametrize("name", CLASSES)
def test_saved_card_has_metadata_and_a_snippet_that_runs(name, tmp_path):
    cls_name, kwargs, _ = example(name)
    model = getattr(hf_vq, cls_name)(**kwargs)
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "hf-vq"
    assert {"vector-quantization", cls_name.lower(), model.config.model_type} <= set(card.data.tags)
    assert f"`{cls_name}`" in card.text
    snippet = re.search(r"```python\n(.*?)```", card.text, flags=re.S).group(1)
    assert str(tmp_path) in snippet
    namespace = {}
    exec(compile(snippet, "model card", "exec"), namespace)  # loads the folder and quantizes an example input
    assert isinstance(namespace["model"], type(model)) and namespace["out"].quantized is not None


def test_card_reports_usage_statistics_of_a_trained_codebook(tmp_path):
    model = hf_vq.VectorQuantize(dim=8, codebook_size=16, decay=0.5).train()
    for _ in range(3):
        model(torch.randn(2, 20, 8))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    used = int((model._codebook.cluster_size > 1e-3).sum())
    assert f"| codes in use | {used} / 16 |" in text
    assert "usage perplexity" in text and "| codebook size | 16 |" in text and "| decay | 0.5 |" in text


def test_a_user_readme_is_kept_and_ours_is_regenerated(tmp_path):
    (tmp_path / "README.md").write_text("# my own notes\n")
    model = hf_vq.FSQ(levels=[5, 5, 3])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own notes\n"
    (tmp_path / "README.md").unlink()
    model.save_pretrained(tmp_path)
    hf_vq.FSQ(levels=[7, 5]).save_pretrained(tmp_path)  # an hf_vq card is regenerated
    assert "| levels | [7, 5] |" in (tmp_path / "README.md").read_text()


def test_pushed_repo_carries_our_card_with_extra_tags(hub_endpoint):
    model = hf_vq.LFQ(codebook_size=2**6)
    model.push_to_hub("hf-vq-tester/lfq-card", tags=["my-tag"])
    card = ModelCard.load(hf_hub_download("hf-vq-tester/lfq-card", "README.md"))
    assert card.data.library_name == "hf-vq"  # not transformers' generic card
    assert {"my-tag", "vector-quantization", "lfq"} <= set(card.data.tags)
    assert 'AutoModel.from_pretrained("hf-vq-tester/lfq-card")' in card.text


def test_a_users_card_on_the_hub_is_kept_on_push(hub_endpoint):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("hf-vq-tester/own-card")
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# hand written\n", path_in_repo="README.md",
                    repo_id="hf-vq-tester/own-card")
    hf_vq.FSQ(levels=[5, 3]).push_to_hub("hf-vq-tester/own-card")
    text = open(hf_hub_download("hf-vq-tester/own-card", "README.md", force_download=True)).read()
    assert "# hand written" in text and "hf-vq model card" not in text
