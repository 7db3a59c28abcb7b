"""hf_vq.VQAutoencoder: diffusers' VQModel with any hf_vq quantizer.

Loads a folder written by diffusers' own VQModel and matches it; FSQ in its place; inside LDMPipeline.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, LDMPipeline, UNet2DModel, VQModel

import hf_vq
from hf_vq import VQAutoencoder

TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=16,
)
FSQ_CONFIG = dict(quantizer_type="FSQ", quantizer_config={"levels": [8, 5, 5, 5]})


def _tiny_vqmodel(**kwargs):
    torch.manual_seed(0)
    model = VQModel(**{**TINY, **kwargs}, num_vq_embeddings=16, vq_embed_dim=4).eval()
    with torch.no_grad():  # codes drawn from real latents, so many codes are in use
        latents = model.encode(torch.randn(4, 3, 16, 16)).latents.movedim(1, -1).reshape(-1, 4)
        model.quantize.embedding.weight.copy_(latents[torch.randperm(len(latents))[:16]])
    return model


def _assert_same(a, b, atol=1e-5):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# diffusers' SpatialNorm has 32 groups: "spatial" needs 32-multiple block channels
@pytest.mark.parametrize("arch", [dict(norm_type="group"), dict(norm_type="spatial", block_out_channels=(32, 32))],
                         ids=["group", "spatial"])
def test_loads_a_diffusers_vqmodel_folder_with_the_same_outputs(arch, tmp_path):
    reference = _tiny_vqmodel(**arch)
    reference.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "VQModel"
    model = VQAutoencoder.from_pretrained(tmp_path).eval()
    assert type(model.quantize) is hf_vq.VectorQuantizer2 and model.quantize.config.legacy
    assert model.config.quantizer_type is None

    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h_ref, h = reference.encode(x).latents, model.encode(x).latents
        _assert_same(h, h_ref)
        dec_ref, dec = reference.decode(h_ref), model.decode(h_ref)
        _assert_same(dec.sample, dec_ref.sample)
        _assert_same(dec.commit_loss, dec_ref.commit_loss)
        # same codes chosen, not only close images
        idx_ref = reference.quantize(h_ref)[2][2].flatten()
        idx = model.quantize(h_ref, return_dict=True).indices.flatten()
        assert torch.equal(idx, idx_ref) and idx.unique().numel() > 1
        fwd_ref, fwd = reference(x, return_dict=False), model(x, return_dict=False)
        for a, b in zip(fwd, fwd_ref):
            _assert_same(a, b)
        _assert_same(model.decode(h_ref, force_not_quantize=True).sample,
                     reference.decode(h_ref, force_not_quantize=True).sample)


@pytest.mark.parametrize("quantizer_type, quantizer_config", [
    ("VectorQuantize", dict(dim=4, codebook_size=16, accept_image_fmap=True)),
    ("EMAVectorQuantizer", dict(n_embed=16, embedding_dim=4)),
])
def test_a_vqmodel_codebook_goes_into_another_quantizer(quantizer_type, quantizer_config, tmp_path):
    reference = _tiny_vqmodel()
    reference.save_pretrained(tmp_path)
    model = VQAutoencoder.from_pretrained(tmp_path, quantizer_type=quantizer_type,
                                          quantizer_config=quantizer_config).eval()
    assert type(model.quantize).__name__ == quantizer_type
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _assert_same(model(x).sample, reference(x).sample)  # same nearest codes, same images


def test_a_vqmodel_codebook_that_cannot_fit_is_refused(tmp_path):
    _tiny_vqmodel().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not map onto FSQ"):
        VQAutoencoder.from_pretrained(tmp_path, **FSQ_CONFIG)
    with pytest.raises(ValueError, match="codebook_size=16"):
        VQAutoencoder.from_pretrained(tmp_path, quantizer_type="VectorQuantize",
                                      quantizer_config=dict(dim=4, codebook_size=32, accept_image_fmap=True))


def test_lookup_from_codebook_matches_vqmodel(tmp_path):
    reference = _tiny_vqmodel(lookup_from_codebook=True)
    reference.save_pretrained(tmp_path)
    model = VQAutoencoder.from_pretrained(tmp_path).eval()
    indices = torch.randint(0, 16, (2 * 8 * 8,))
    with torch.no_grad():
        out = model.decode(indices, force_not_quantize=True, shape=(2, 8, 8, 4)).sample
        ref = reference.decode(indices, force_not_quantize=True, shape=(2, 8, 8, 4)).sample
    _assert_same(out, ref)


def test_default_vqautoencoder_loads_into_diffusers_vqmodel(tmp_path):
    """The other direction: the default quantizer keeps VQModel's keys, so VQModel reads our folder."""
    model = VQAutoencoder(**TINY, num_vq_embeddings=16, vq_embed_dim=4).eval()
    model.save_pretrained(tmp_path)
    reference = VQModel.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        _assert_same(model(x).sample, reference(x).sample)


def test_fsq_replaces_the_quantizer_and_round_trips(tmp_path):
    model = VQAutoencoder(**TINY, **FSQ_CONFIG).eval()
    assert type(model.quantize) is hf_vq.FSQ
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = model.encode(x).latents
        assert h.shape == (2, 4, 8, 8)
        out = model(x)
        assert out.sample.shape == x.shape and out.commit_loss.shape == ()
        # FSQ codes: every latent channel sits on its level grid after quantization
        quant, _, q_out = model.quantize_latents(h)
        _assert_same(model.quantize_latents(quant)[0], quant)
        assert q_out.indices.shape == (2, 8, 8) and int(q_out.indices.max()) < 8 * 5 * 5 * 5
        _assert_same(model.decode(quant, force_not_quantize=True).sample, out.sample)  # FSQ is idempotent
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "VQAutoencoder" and config["quantizer_type"] == "FSQ"
    loaded = VQAutoencoder.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, model(x).sample)


def test_fsq_lookup_from_codebook_decodes_indices():
    model = VQAutoencoder(**TINY, **FSQ_CONFIG, lookup_from_codebook=True).eval()
    h = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        quant, _, out = model.quantize_latents(h)
        from_indices = model.decode(out.indices.flatten(), force_not_quantize=True, shape=(2, 8, 8, 4)).sample
        _assert_same(from_indices, model.decode(h).sample)


def test_a_trained_vector_quantize_keeps_its_running_state(tmp_path):
    model = VQAutoencoder(**TINY, quantizer_type="VectorQuantize",
                          quantizer_config=dict(dim=4, codebook_size=16, decay=0.5, accept_image_fmap=True))
    model.train()(torch.randn(2, 3, 16, 16))  # one EMA step
    model.save_pretrained(tmp_path)
    loaded = VQAutoencoder.from_pretrained(tmp_path)
    for key, value in model.quantize.state_dict().items():
        assert torch.equal(loaded.quantize.state_dict()[key], value), key


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(quantizer_type="FSQ", quantizer_config={"levels": [5, 3], "dim": 6}), "vq_embed_dim"),
        (dict(quantizer_type="VectorQuantize", quantizer_config={"dim": 4, "codebook_size": 8}), "accept_image_fmap"),
        (dict(quantizer_config={"levels": [5, 3]}), "quantizer_type"),
        (dict(quantizer_type="NoSuchQuantizer"), "quantizer_type"),
        (dict(norm_type="layer"), "norm_type"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VQAutoencoder(**TINY, **kwargs)


def _tiny_ldm(vqvae):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    return LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler())


def _generate(pipe):
    return pipe(batch_size=1, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("quantizer", ["default", "FSQ"])
def test_runs_in_ldm_pipeline_and_round_trips(quantizer, tmp_path):
    extra = {} if quantizer == "default" else FSQ_CONFIG
    pipe = _tiny_ldm(VQAutoencoder(**TINY, **extra).eval())
    images = _generate(pipe)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vqvae"] == ["hf_vq", "VQAutoencoder"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is LDMPipeline and type(loaded.vqvae) is VQAutoencoder
    np.testing.assert_allclose(_generate(loaded), images, atol=1e-6)


def test_same_images_as_the_pipeline_with_diffusers_vqmodel(tmp_path):
    reference = _tiny_vqmodel()
    reference.save_pretrained(tmp_path)
    ours = _generate(_tiny_ldm(VQAutoencoder.from_pretrained(tmp_path).eval()))
    theirs = _generate(_tiny_ldm(reference))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
