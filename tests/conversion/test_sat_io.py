"""hf_vq.conversion.sat_io (conversion/sat_io.py) on checkpoints built in SAT's exact on-disk layout (no SAT / DeepSpeed needed)."""

import hashlib
import os

import pytest
import torch
import yaml

from hf_vq.conversion.make_sample import sat_split, write_sat_checkpoint
from hf_vq.conversion.sat_io import (
    extract_submodule,
    find_prefix,
    find_regularizer_config,
    load_state_dict,
    merge_model_parallel,
    resolve_checkpoint,
    sha256_of,
)

QKV = "model.diffusion_model.transformer.layers.0.attention.query_key_value.weight"
DENSE_W = "model.diffusion_model.transformer.layers.0.attention.dense.weight"
DENSE_B = "model.diffusion_model.transformer.layers.0.attention.dense.bias"
WORDS = "model.diffusion_model.transformer.word_embeddings.weight"
CODEBOOK = "first_stage_model.regularization.embedding.weight"
CONV = "first_stage_model.encoder.conv_in.weight"


def full_state_dict():
    g = torch.Generator().manual_seed(1)
    return {
        QKV: torch.randn(12, 4, generator=g),  # [q; k; v], 4 rows each
        DENSE_W: torch.randn(4, 4, generator=g),
        DENSE_B: torch.randn(4, generator=g),
        WORDS: torch.randn(8, 4, generator=g),
        CODEBOOK: torch.randn(16, 4, generator=g),
        CONV: torch.randn(4, 3, 3, 3, generator=g),
    }


def sat_partition(sd, mp):
    """Split like SAT's mpu layers: qkv strided dim 0, row-parallel weight dim 1, vocab dim 0, rest replicated."""
    return sat_split(sd, mp, {QKV: (0, 3), DENSE_W: (1, 1), WORDS: (0, 1)})


write_sat = write_sat_checkpoint


@pytest.fixture
def sat_mp2(tmp_path):
    sd = full_state_dict()
    folder = write_sat(tmp_path / "ckpt", sat_partition(sd, 2))
    return tmp_path / "ckpt", folder, sd


# ---- resolution ---------------------------------------------------------------------------------------


def test_resolve_latest_iteration_and_iteration_folder(sat_mp2):
    root, folder, _ = sat_mp2
    expected = [folder / "mp_rank_00_model_states.pt", folder / "mp_rank_01_model_states.pt"]
    assert resolve_checkpoint(root) == expected
    assert resolve_checkpoint(folder) == expected
    assert resolve_checkpoint(str(expected[1])) == [expected[1]]


def test_resolve_release(tmp_path):
    write_sat(tmp_path, [full_state_dict()], tag="release")
    assert resolve_checkpoint(tmp_path) == [tmp_path / "release" / "mp_rank_00_model_states.pt"]


def test_resolve_sorts_ranks_numerically_and_zero_names(tmp_path):
    for r in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9):
        torch.save({"module": {}}, tmp_path / f"mp_rank_{r:02d}_model_states.pt")
    assert [p.name for p in resolve_checkpoint(tmp_path)] == [f"mp_rank_{r:02d}_model_states.pt" for r in range(11)]

    z = tmp_path / "z"
    z.mkdir()
    for dp in (0, 1):
        for mp in (0, 1):
            torch.save({"module": {}}, z / f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt")
    torch.save({}, z / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert [p.name for p in resolve_checkpoint(z)] == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_01_model_states.pt",
    ]


def test_zero3_placeholders_are_refused(tmp_path):
    torch.save({"module": {"w": torch.empty(0)}}, tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="zero_to_fp32"):
        load_state_dict(tmp_path, progress=False)


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        resolve_checkpoint(empty)

    (empty / "latest").write_text("2000\n")
    with pytest.raises(FileNotFoundError, match="iteration '2000'.*does not exist"):
        resolve_checkpoint(empty)

    (empty / "2000").mkdir()
    with pytest.raises(ValueError, match="no mp_rank_XX_model_states.pt"):
        resolve_checkpoint(empty)

    for r in (0, 2):
        torch.save({"module": {}}, empty / "2000" / f"mp_rank_{r:02d}_model_states.pt")
    with pytest.raises(FileNotFoundError, match=r"missing for rank\(s\) \[1\]"):
        resolve_checkpoint(empty)

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a checkpoint file"):
        resolve_checkpoint(tmp_path / "notes.txt")


# ---- loading ----------------------------------------------------------------------------------------


def test_load_merges_model_parallel_shards(sat_mp2):
    root, _, full = sat_mp2
    sd = load_state_dict(root, progress=False)
    assert sd.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(sd[k], full[k], rtol=0, atol=0, msg=k)


def test_load_single_rank_release_and_single_files(tmp_path):
    full = full_state_dict()
    write_sat(tmp_path / "sat", [full], tag="release")
    sd = load_state_dict(tmp_path / "sat", progress=False)
    assert all(torch.equal(sd[k], full[k]) for k in full)

    torch.save({"state_dict": full, "epoch": 3, "global_step": 10}, tmp_path / "3d-vae.pt")
    assert load_state_dict(tmp_path / "3d-vae.pt", progress=False).keys() == full.keys()
    torch.save({"model": full}, tmp_path / "m.pth")
    assert load_state_dict(tmp_path / "m.pth", progress=False).keys() == full.keys()
    torch.save(full, tmp_path / "plain.ckpt")
    assert load_state_dict(tmp_path / "plain.ckpt", progress=False).keys() == full.keys()

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in full.items()}, tmp_path / "w.safetensors")
    sd = load_state_dict(tmp_path / "w.safetensors", progress=False)
    assert all(torch.equal(sd[k], full[k]) for k in full)


def test_load_progress_bar(sat_mp2, capsys):
    load_state_dict(sat_mp2[0], progress=True)
    assert "Loading checkpoint" in capsys.readouterr().err


def test_truncated_file_names_the_file(sat_mp2):
    _, folder, _ = sat_mp2
    f = folder / "mp_rank_01_model_states.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"mp_rank_01_model_states\.pt.*corrupt or truncated"):
        load_state_dict(folder, progress=False)


def test_truncated_legacy_format_file(tmp_path):
    torch.save({"module": full_state_dict()}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert load_state_dict(tmp_path / "old.pt", progress=False).keys() == full_state_dict().keys()
    data = (tmp_path / "old.pt").read_bytes()
    for cut in (len(data) // 2, 40, 7):
        (tmp_path / "old.pt").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"old\.pt: corrupt or truncated"):
            load_state_dict(tmp_path / "old.pt", progress=False)


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(100)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="w.safetensors.*corrupt or truncated"):
        load_state_dict(tmp_path / "w.safetensors", progress=False)


class _Pwn:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    write_sat(tmp_path / "ckpt", [full_state_dict()])
    f = tmp_path / "ckpt" / "1000" / "mp_rank_00_model_states.pt"
    torch.save({"module": full_state_dict(), "extra": _Pwn(marker)}, f)
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt: refused.*system.*allowlist") as e:
        load_state_dict(tmp_path / "ckpt", progress=False)
    assert "argparse.Namespace" in str(e.value)
    assert not marker.exists()
    # the legacy (non-zip) torch.save format goes through the same restricted unpickler
    torch.save({"module": {}, "extra": _Pwn(marker)}, f, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="refused.*posix.system|refused.*nt.system"):
        load_state_dict(f, progress=False)
    assert not marker.exists()


def test_unimportable_deepspeed_class_is_refused(tmp_path):
    # DeepSpeed's fp16 optimizer state pickles its LossScaler object; build a stand-in with that name.
    cls = type("DynamicLossScaler", (), {"__module__": "deepspeed.runtime.fp16.loss_scaler"})
    import sys
    import types

    mod = types.ModuleType("deepspeed.runtime.fp16.loss_scaler")
    mod.DynamicLossScaler = cls
    names = ["deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", "deepspeed.runtime.fp16.loss_scaler"]
    for n in names[:-1]:
        sys.modules.setdefault(n, types.ModuleType(n))
    sys.modules[names[-1]] = mod
    try:
        torch.save({"module": {"w": torch.ones(2)}, "optimizer": {"loss_scaler": cls()}}, tmp_path / "m.pt")
    finally:
        for n in names:
            sys.modules.pop(n, None)
    with pytest.raises(ValueError, match="deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"):
        load_state_dict(tmp_path / "m.pt", progress=False)


def test_non_tensor_entry(tmp_path):
    sd = {"regularization.embedding.weight": torch.ones(4, 2), "regularization._extra_state": {"v": 1}}
    torch.save({"module": sd}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"not tensors: \['regularization._extra_state'\]"):
        load_state_dict(tmp_path / "m.pt", progress=False)
    with pytest.warns(UserWarning, match="dropping"):
        out = load_state_dict(tmp_path / "m.pt", progress=False, allow_non_tensor=True)
    assert list(out) == ["regularization.embedding.weight"]


def test_no_state_dict_and_zero3_module_none(tmp_path):
    torch.save({"iteration": 3, "foo": "bar"}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="no state dict found.*'foo', 'iteration'"):
        load_state_dict(tmp_path / "a.pt", progress=False)
    torch.save({"module": None, "ds_version": "0.14"}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="ZeRO-3"):
        load_state_dict(tmp_path / "b.pt", progress=False)


# ---- model-parallel merge ---------------------------------------------------------------------------


def test_merge_rules():
    a, b = torch.arange(6.0).view(2, 3), torch.arange(6.0, 12.0).view(2, 3)
    # replicated kept once; uneven shapes concatenated along the differing dim
    out = merge_model_parallel([{"ln.weight": a, "x": a}, {"ln.weight": a.clone(), "x": b[:1]}])
    assert torch.equal(out["ln.weight"], a) and torch.equal(out["x"], torch.cat([a, b[:1]]))
    # same shape, different values, no rule: refuse to guess
    with pytest.raises(ValueError, match="'proj.weight' differs.*split_rules"):
        merge_model_parallel([{"proj.weight": a}, {"proj.weight": b}])
    out = merge_model_parallel([{"proj.weight": a}, {"proj.weight": b}], split_rules={r"proj\.weight$": (1, 1)})
    assert torch.equal(out["proj.weight"], torch.cat([a, b], 1))
    with pytest.raises(ValueError, match="different keys"):
        merge_model_parallel([{"a": a}, {"b": a}])


def test_merge_strided_qkv_four_ranks():
    full = full_state_dict()
    out = merge_model_parallel(sat_partition(full, 4))
    for k in full:
        assert torch.equal(out[k], full[k]), k


# ---- prefix detection -------------------------------------------------------------------------------


def test_find_prefix_full_model_and_autoencoder():
    full = {"model." + k: v for k, v in full_state_dict().items()}
    assert find_prefix(full) == "model.first_stage_model.regularization."
    sub = extract_submodule(full)
    assert list(sub) == ["embedding.weight"]

    ae = {"encoder.conv_in.weight": 0, "regularization.embedding.weight": 1, "regularization.embedding.cluster_size": 2}
    assert extract_submodule(ae) == {"embedding.weight": 1, "embedding.cluster_size": 2}

    taming = {"quant_conv.weight": 0, "post_quant_conv.weight": 0, "quantize.embedding.weight": 3}
    assert extract_submodule(taming) == {"embedding.weight": 3}
    assert find_prefix({"quantizer.layers.0.codebook": 0, "quantizer.layers.1.codebook": 0}) == "quantizer."


def test_find_prefix_ambiguous_none_and_explicit():
    sd = {"first_stage_model.regularization.embedding.weight": 1, "cond.quantizer.embed": 2, "cond.proj.weight": 3}
    with pytest.raises(ValueError, match=r"several.*'cond.quantizer.' \(1 keys\).*'first_stage_model.regularization.'"):
        find_prefix(sd)
    assert extract_submodule(sd, prefix="cond.quantizer") == {"embed": 2}
    assert extract_submodule(sd, prefix="cond.") == {"quantizer.embed": 2, "proj.weight": 3}
    with pytest.raises(ValueError, match="no key starts with prefix 'nope.'"):
        extract_submodule(sd, prefix="nope")
    with pytest.raises(ValueError, match=r"no quantizer found.*\['decoder', 'encoder'\]"):
        find_prefix({"encoder.a": 1, "decoder.b": 2})


# ---- config ----------------------------------------------------------------------------------------

FULL_MODEL_YAML = """
model:
  scale_factor: 0.7
  network_config:
    target: dit_video_concat.DiffusionTransformer
    params: {num_layers: 30}
  first_stage_config:
    target: vae_modules.autoencoder.VideoAutoencoderInferenceWrapper
    params:
      cp_size: 1
      ckpt_path: "vae/3d-vae.pt"
      ignore_keys: ['loss']
      loss_config:
        target: torch.nn.Identity
      regularizer_config:
        target: sgm.modules.autoencoding.regularizers.quantize.VectorQuantizer
        params:
          n_e: 8192
          e_dim: 16
          beta: 0.25
      encoder_config:
        target: vae_modules.cp_enc_dec.ContextParallelEncoder3D
        params: {z_channels: 16, ch_mult: [1, 2, 2, 4]}
"""

AUTOENCODER_YAML = """
model:
  target: sgm.models.autoencoder.AutoencodingEngine
  params:
    input_key: jpg
    regularizer_config:
      target: sgm.modules.autoencoding.regularizers.quantize.EMAVectorQuantizer
      params: {n_embed: 1024, embedding_dim: 8, beta: 0.25, decay: 0.99}
    loss_config:
      target: torch.nn.Identity
"""

TAMING_YAML = """
model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 8192
    ddconfig: {z_channels: 256, double_z: false}
    lossconfig: {target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator}
"""


def test_find_regularizer_config_full_model_and_autoencoder(tmp_path):
    f = tmp_path / "cogvideox.yaml"
    f.write_text(FULL_MODEL_YAML)
    target, params = find_regularizer_config(f)
    assert target == "sgm.modules.autoencoding.regularizers.quantize.VectorQuantizer"
    assert params == {"n_e": 8192, "e_dim": 16, "beta": 0.25}
    target, params = find_regularizer_config(yaml.safe_load(AUTOENCODER_YAML))
    assert target.endswith("EMAVectorQuantizer") and params["n_embed"] == 1024


def test_find_regularizer_config_without_params_and_merged_bases(tmp_path):
    # CogVideoX's real configs: a params-less DiagonalGaussianRegularizer node
    cfg = {"model": {"first_stage_config": {"params": {"regularizer_config": {
        "target": "vae_modules.regularizers.DiagonalGaussianRegularizer"}}}}}
    assert find_regularizer_config(cfg) == ("vae_modules.regularizers.DiagonalGaussianRegularizer", {})
    # SAT --base a.yaml b.yaml: later files override
    override = {"model": {"first_stage_config": {"params": {"regularizer_config": {
        "target": "sgm.modules.autoencoding.regularizers.quantize.GumbelQuantizer",
        "params": {"num_hiddens": 16, "embedding_dim": 16, "n_embed": 512}}}}}}
    target, params = find_regularizer_config([cfg, override])
    assert target.endswith("GumbelQuantizer") and params["n_embed"] == 512


def test_find_regularizer_config_taming_vqmodel():
    target, params = find_regularizer_config(yaml.safe_load(TAMING_YAML))
    assert target == "taming.modules.vqvae.quantize.VectorQuantizer2"
    assert params == {"n_e": 8192, "e_dim": 256, "beta": 0.25, "remap": None, "sane_index_shape": False}
    cfg = yaml.safe_load(TAMING_YAML.replace("vqgan.VQModel", "vqgan.GumbelVQ"))
    target, params = find_regularizer_config(cfg)
    assert target.endswith("GumbelQuantize") and params["num_hiddens"] == 256 and params["kl_weight"] == 1e-8


def test_find_regularizer_config_errors():
    with pytest.raises(ValueError, match="no quantizer config found"):
        find_regularizer_config({"model": {"params": {"a": 1}}})
    two = {"a": {"regularizer_config": {"target": "x.A"}}, "b": {"quantizer_config": {"target": "x.B"}}}
    with pytest.raises(ValueError, match=r"several.*\['a.regularizer_config', 'b.quantizer_config'\]"):
        find_regularizer_config(two)
    assert find_regularizer_config(two, node_path="b.quantizer_config") == ("x.B", {})
    with pytest.raises(ValueError, match="has no 'target'"):
        find_regularizer_config({"regularizer_config": {"params": {}}})


# ---- provenance ------------------------------------------------------------------------------------


def test_sha256_of(sat_mp2):
    files = resolve_checkpoint(sat_mp2[0])
    digests = sha256_of(files)
    assert digests == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert sha256_of(files[0]) == {files[0].name: digests[files[0].name]}
