"""Loading and saving never lose data silently: bad weights files, bad config.json files, a file in place of the
target folder and an offline Hub are errors that name the problem (transformers and diffusers only log them)."""

import json

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import hf_vq
from hf_vq import DiffusersQuantizer, FSQ, LFQ, VectorQuantize
from hf_vq.modeling_utils import QuantizerModel


def _saved_vq(tmp_path):
    model = VectorQuantize(dim=8, codebook_size=16, decay=0.99)
    model.save_pretrained(tmp_path)
    return model, tmp_path / "model.safetensors"


def _rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_missing_tensor_is_an_error_naming_the_key_and_shape(tmp_path):
    _, weights = _saved_vq(tmp_path)
    _rewrite(weights, lambda t: t.pop("_codebook.embed"))
    with pytest.raises(ValueError, match=r"'_codebook.embed' is missing from the weights file \(the model expects "
                                         r"shape \(1, 16, 8\)\)"):
        AutoModel.from_pretrained(tmp_path)


def test_a_mis_shaped_tensor_is_an_error_naming_both_shapes(tmp_path):
    model, weights = _saved_vq(tmp_path)
    _rewrite(weights, lambda t: t.update({"_codebook.embed": torch.zeros(1, 3, 8)}))
    with pytest.raises(ValueError, match=r"'_codebook.embed' has shape \(1, 3, 8\) in the weights file, the model "
                                         r"expects \(1, 16, 8\)"):
        VectorQuantize.from_pretrained(tmp_path)
    # asked for explicitly, a mismatch is tolerated, and the loading report is returned
    loaded, info = VectorQuantize.from_pretrained(tmp_path, ignore_mismatched_sizes=True, output_loading_info=True)
    assert [m[0] for m in info["mismatched_keys"]] == ["_codebook.embed"]


def test_an_unexpected_tensor_is_an_error(tmp_path):
    _, weights = _saved_vq(tmp_path)
    _rewrite(weights, lambda t: t.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="'extra.weight' in the weights file is not a tensor of VectorQuantize"):
        AutoModel.from_pretrained(tmp_path)


def test_an_exact_load_returns_the_loading_info_on_request(tmp_path):
    model, _ = _saved_vq(tmp_path)
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_the_diffusers_face_loads_exactly_or_not_at_all(tmp_path):
    DiffusersQuantizer.from_quantizer(VectorQuantize(dim=8, codebook_size=16)).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    _rewrite(weights, lambda t: t.update({"quantizer._codebook.embed": torch.zeros(1, 3, 8)}))
    with pytest.raises(ValueError, match=r"'quantizer._codebook.embed' has shape \(1, 3, 8\) in the weights file, "
                                         r"the model expects \(1, 16, 8\)"):
        DiffusersQuantizer.from_pretrained(tmp_path)
    _rewrite(weights, lambda t: t.pop("quantizer._codebook.embed"))
    with pytest.raises(ValueError, match="'quantizer._codebook.embed' is missing"):
        DiffusersQuantizer.from_pretrained(tmp_path)


def test_a_saved_config_holds_every_field(tmp_path):
    model = FSQ(levels=[8, 5, 5, 5], return_dict=True)  # every value at its default
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(type(model.config).field_names()) <= set(saved)
    assert saved["levels"] == [8, 5, 5, 5] and saved["return_dict"] is True


@pytest.mark.parametrize("model, field", [(FSQ(levels=[7, 5, 3]), "levels"),
                                          (VectorQuantize(dim=8, codebook_size=16, decay=0.8), "decay")])
def test_a_config_field_removed_is_an_error_naming_it(model, field, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config[field]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"lacks the field\(s\) \['{field}'\]"):
        AutoModel.from_pretrained(tmp_path)


def test_check_inputs_may_be_absent(tmp_path):
    FSQ(levels=[7, 5, 3], check_inputs=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["check_inputs"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert AutoModel.from_pretrained(tmp_path).config.levels == [7, 5, 3]


def test_a_config_of_another_quantizer_names_model_type_and_both_classes(tmp_path):
    LFQ(dim=4, codebook_size=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'hf_vq_lfq', which belongs to LFQConfig \(LFQ\), not to "
                                         r"FSQConfig \(model_type 'hf_vq_fsq'\)"):
        FSQ.from_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is LFQ
    with pytest.raises(ValueError, match=r"model_type 'hf_vq_lfq', which belongs to LFQConfig"):
        hf_vq.FSQConfig(**json.loads((tmp_path / "config.json").read_text()))


@pytest.mark.parametrize("make", [lambda: VectorQuantize(dim=8, codebook_size=16),
                                  lambda: DiffusersQuantizer("FSQ", {"levels": [5, 3]})])
def test_saving_onto_a_file_is_an_error_and_leaves_the_file(make, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("mine")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        make().save_pretrained(target)
    assert target.read_text() == "mine"


def test_a_missing_repo_offline_names_the_repo_and_says_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(OSError, match=r"cannot load 'org/missing': the Hugging Face Hub is offline"):
        VectorQuantize.from_pretrained("org/missing")
    with pytest.raises(OSError, match=r"cannot load 'org/missing': the Hugging Face Hub is offline"):
        DiffusersQuantizer.from_pretrained("org/missing")
    with pytest.raises(OSError) as local:  # a local path that is not there: the framework's own message
        VectorQuantize.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    assert "the Hugging Face Hub is offline" not in str(local.value)


def test_push_to_hub_uses_public_api_only():
    # no override of transformers' private upload method: push_to_hub is ours, over huggingface_hub's API
    assert "_upload_modified_files" not in vars(QuantizerModel)
    assert "push_to_hub" in vars(QuantizerModel)
    assert hf_vq.modeling_utils.QuantizerModel.push_to_hub.__doc__


def test_the_call_convention_survives_save_load_on_both_faces(tmp_path):
    model = FSQ(levels=[5, 3], return_dict=False)  # as the SAT converter writes it
    x = torch.randn(2, 2, 3, 3)
    model.save_pretrained(tmp_path / "hf")
    z, indices = AutoModel.from_pretrained(tmp_path / "hf")(x)
    assert torch.equal(z, model(x)[0]) and torch.equal(indices, model(x)[1])
    DiffusersQuantizer.from_quantizer(model).save_pretrained(tmp_path / "diffusers")
    loaded = DiffusersQuantizer.from_pretrained(tmp_path / "diffusers")
    assert isinstance(loaded(x), tuple) and loaded(x, return_dict=True).quantized.shape == x.shape
