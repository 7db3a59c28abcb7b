"""`hf-vq convert`: SAT checkpoints of every supported regularizer -> verified hf_vq folders (and the Hub).

Fixtures are written in SAT's exact layout (``latest``, an iteration folder, two model-parallel ranks with a
split fused QKV and row-parallel weight, DeepSpeed bookkeeping, an argparse ``args``), with the quantizer under
``first_stage_model.regularization.`` and its config nested where CogVideo's YAML puts it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants, hf_hub_download
from safetensors.torch import load_file
from transformers import AutoModel

import hf_vq
from hf_vq.conversion import SAMPLE, convert_cogvideo_sat, sgm_reference
from hf_vq.conversion.convert_cogvideo_sat import ConversionError, VerificationError, convert, main
from hf_vq.conversion.make_sample import sat_split, write_sat_checkpoint
from hf_vq.conversion.sat_io import sha256_of

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "first_stage_model.regularization."
QKV = "model.diffusion_model.transformer.layers.0.attention.query_key_value.weight"
DENSE = "model.diffusion_model.transformer.layers.0.attention.dense.weight"
SGM = "sgm.modules.autoencoding.regularizers"


def _g():
    return torch.Generator().manual_seed(3)


def _linear(out_dim, in_dim, name, g):
    return {f"{name}.weight": torch.randn(out_dim, in_dim, generator=g) / in_dim**0.5,
            f"{name}.bias": 0.1 * torch.randn(out_dim, generator=g)}


def _vqp(cls_name, **kwargs):
    """A real vector-quantize-pytorch module (eval) and its state dict: the seed's own tensors."""
    import vector_quantize_pytorch

    torch.manual_seed(5)
    module = getattr(vector_quantize_pytorch, cls_name)(**kwargs).eval()
    return module, {k: v.clone() for k, v in module.state_dict().items()}


def sgm_cases():
    """{case: (target, params, tensors, vqp module or None)} - one per supported regularizer (and variants)."""
    g = _g()
    cases = {
        "VectorQuantizer": (f"{SGM}.quantize.VectorQuantizer", dict(n_e=32, e_dim=8, beta=0.25, log_perplexity=True),
                            {"embedding.weight": torch.randn(32, 8, generator=g)}, None),
        "VectorQuantizer_weight_norm": (
            f"{SGM}.quantize.VectorQuantizer", dict(n_e=32, e_dim=8, beta=0.25, embedding_weight_norm=True),
            {"embedding.weight_g": 0.5 + torch.rand(1, 8, generator=g), "embedding.weight_v": torch.randn(32, 8, generator=g)},
            None),
        "VectorQuantizer_remap": (
            f"{SGM}.quantize.VectorQuantizer",
            dict(n_e=32, e_dim=8, beta=0.25, remap="data/used_codes.npy", unknown_index="extra", sane_index_shape=True),
            {"embedding.weight": torch.randn(32, 8, generator=g), "used": torch.arange(0, 32, 2)}, None),
        "EMAVectorQuantizer": (
            f"{SGM}.quantize.EMAVectorQuantizer", dict(n_embed=32, embedding_dim=8, beta=0.25, decay=0.9),
            {"embedding.weight": torch.randn(32, 8, generator=g), "embedding.cluster_size": 10 * torch.rand(32, generator=g),
             "embedding.embed_avg": torch.randn(32, 8, generator=g)}, None),
        "GumbelQuantizer": (
            f"{SGM}.quantize.GumbelQuantizer", dict(num_hiddens=12, embedding_dim=8, n_embed=32, kl_weight=1e-3),
            {"proj.weight": torch.randn(32, 12, 1, 1, generator=g), "proj.bias": torch.randn(32, generator=g),
             "embed.weight": torch.randn(32, 8, generator=g)}, None),
        "VectorQuantizerWithInputProjection": (
            f"{SGM}.quantize.VectorQuantizerWithInputProjection",
            dict(input_dim=12, n_codes=32, codebook_dim=6, output_dim=12),
            {**_linear(6, 12, "proj_in", g), **_linear(12, 6, "proj_out", g), "embedding.weight": torch.randn(32, 6, generator=g)},
            None),
        "VectorQuantizer2": ("sgm.modules.autoencoding.vqvae.quantize.VectorQuantizer2",
                             dict(n_e=32, e_dim=8, beta=0.25, legacy=False),
                             {"embedding.weight": torch.randn(32, 8, generator=g)}, None),
        "GumbelQuantize": ("sgm.modules.autoencoding.vqvae.quantize.GumbelQuantize",
                           dict(num_hiddens=12, embedding_dim=8, n_embed=32, use_vqinterface=True),
                           {"proj.weight": torch.randn(32, 12, 1, 1, generator=g), "proj.bias": torch.randn(32, generator=g),
                            "embed.weight": torch.randn(32, 8, generator=g)}, None),
    }
    fsq_params = dict(levels=[8, 5, 5], dim=12)
    lfq_params = dict(dim=12, codebook_size=256, entropy_loss_weight=0.1)
    vq_params = dict(dim=12, codebook_size=32, codebook_dim=6, heads=2, separate_codebook_per_head=True)
    cos_params = dict(dim=8, codebook_size=32, use_cosine_sim=True)
    lq_params = dict(levels=[5, 5, 3], dim=12)
    for case, target, cls_name, params in (
        ("FSQ", f"{SGM}.finite_scalar_quantization.FSQ", "FSQ", fsq_params),
        ("LFQ", f"{SGM}.lookup_free_quantization.LFQ", "LFQ", lfq_params),
        ("VectorQuantize", "vector_quantize_pytorch.VectorQuantize", "VectorQuantize", vq_params),
        ("VectorQuantize_cosine", "vector_quantize_pytorch.VectorQuantize", "VectorQuantize", cos_params),
        ("LatentQuantize", "vector_quantize_pytorch.LatentQuantize", "LatentQuantize", lq_params),
    ):
        module, tensors = _vqp(cls_name, **params)
        cases[case] = (target, params, tensors, module)
    return cases


CASES = sgm_cases()
# FSQ keeps its levels only in the config; everything else is inferred from the tensors
INFERABLE = sorted(set(CASES) - {"FSQ"})


def full_model(tensors, prefix=PREFIX):
    g = torch.Generator().manual_seed(7)
    return {QKV: torch.randn(12, 4, generator=g), DENSE: torch.randn(4, 4, generator=g),
            "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
            **{prefix + k: v for k, v in tensors.items()}}


def cogvideo_yaml(target, params):
    return {"model": {"scale_factor": 1.0, "first_stage_config": {
        "target": "vae_modules.autoencoder.VideoAutoencoderInferenceWrapper",
        "params": {"regularizer_config": {"target": target, "params": params}}}}}


def write_case(tmp_path, case, mp=2):
    target, params, tensors, _ = CASES[case]
    root = tmp_path / f"{case}-sat"
    write_sat_checkpoint(root, sat_split(full_model(tensors), mp, {QKV: (0, 3), DENSE: (1, 1)}))
    config = tmp_path / f"{case}.yaml"
    config.write_text(yaml.safe_dump(cogvideo_yaml(target, params)))
    return root, config


def example_input(model, case, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn([3, *model.example_input_shape()[1:]], generator=g)


def assert_matches_source(model, case, x, params=None):
    """Indices identical and outputs allclose to the reference forward on the raw tensors (with the case's
    params, or the inferred ones), and to the vector-quantize-pytorch module itself where the case has one."""
    target, case_params, tensors, module = CASES[case]
    params = case_params if params is None else params
    name = type(model).__name__
    model = model.float().eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = model(x, return_dict=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = sgm_reference.reference_forward(name, params, tensors, x)
    known = ref.indices >= 0  # -1: the seed's remap draws a random index there
    assert torch.equal(out.indices.reshape(-1).long()[known], ref.indices[known])
    torch.testing.assert_close(out.quantized, ref.output, rtol=1e-5, atol=1e-5)
    if module is not None:
        # vqp 1.32's LatentQuantize reads rank-3 input as (b, d, n); the seed (and hf_vq) as (b, n, d)
        channel_first = name == "LatentQuantize" and x.ndim == 3
        with torch.no_grad():
            seed_out = module(x.transpose(1, 2) if channel_first else x)
        seed_quantized, seed_indices = seed_out[0], seed_out[1]
        seed_quantized = seed_quantized.transpose(1, 2) if channel_first else seed_quantized
        assert torch.equal(out.indices.long(), seed_indices.long())
        torch.testing.assert_close(out.quantized, seed_quantized, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_converts_sat_checkpoint_with_config(case, tmp_path, capsys):
    root, config = write_case(tmp_path, case)
    out = tmp_path / "out"
    assert main([str(root), "--config", str(config), "--out", str(out), "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "indices identical" in report and PREFIX in report
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    model = AutoModel.from_pretrained(out)
    name = case.split("_")[0]
    assert type(model) is getattr(hf_vq, name)
    _, params, tensors, _ = CASES[case]
    saved = load_file(out / "model.safetensors")
    expected = {k: v for k, v in tensors.items() if k != "mask"}  # LFQ's bit mask is rebuilt from the config
    assert set(saved) == set(expected)
    assert all(torch.equal(saved[k], expected[k].to(saved[k].dtype)) for k in expected)
    for key, value in params.items():
        if key not in ("remap",):
            assert getattr(model.config, key) == value, key
    assert_matches_source(model, case, example_input(model, case))

    card = (out / "README.md").read_text()
    for name_, digest in sha256_of(sorted((root / "1000").iterdir())).items():
        assert f"`{name_}` | `{digest}`" in card and f"{name_}: {digest}" in card
    assert "library_name: hf-vq" in card and "license: other" in card and convert_cogvideo_sat.CONVERTER in card


@pytest.mark.parametrize("case", INFERABLE)
def test_infers_type_and_sizes_without_config(case, tmp_path, capsys):
    root, _ = write_case(tmp_path, case)
    result = convert(root, tmp_path / "out", progress=False)
    model = AutoModel.from_pretrained(tmp_path / "out")
    # the taming pair has the same tensors as the sgm classes: inference picks the sgm class
    expected = {"VectorQuantizer2": "VectorQuantizer", "GumbelQuantize": "GumbelQuantizer"}
    assert type(model).__name__ == expected.get(case, case.split("_")[0])
    assert result.assumed  # names what it assumed
    assert_matches_source(model, case, example_input(model, case), params=result.params)
    if "remap" in case:
        assert any(a.startswith("unknown_index='random'") for a in result.assumed)
    _, params, _, _ = CASES[case]
    for size_field in ("n_e", "e_dim", "n_embed", "embedding_dim", "num_hiddens", "input_dim", "n_codes",
                       "codebook_dim", "output_dim", "dim", "codebook_size", "heads", "levels", "use_cosine_sim"):
        if size_field in params:
            assert getattr(model.config, size_field) == params[size_field], size_field


def test_single_file_state_dict_and_standalone_autoencoder_prefix(tmp_path):
    """A CogVideoX-VAE-style `{"state_dict": ...}` file of a standalone autoencoder (`regularization.*`) with
    the regularizer node near the top of its config; the dtype follows the checkpoint (fp16)."""
    target, params, tensors, _ = CASES["EMAVectorQuantizer"]
    sd = {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3), **{f"regularization.{k}": v.half() for k, v in tensors.items()}}
    file = tmp_path / "3d-vae.pt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1200}, file)
    config = {"model": {"target": "sgm.models.autoencoder.AutoencodingEngine",
                        "params": {"regularizer_config": {"target": target, "params": params}}}}
    result = convert(file, tmp_path / "out", config=config, progress=False)
    assert result.prefix == "regularization."
    assert result.dtype == torch.float16
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert model.embedding.weight.dtype == torch.float16
    assert torch.equal(model.embedding.weight, tensors["embedding.weight"].half())
    assert "`3d-vae.pt`" in (tmp_path / "out" / "README.md").read_text()


def test_dtype_and_explicit_prefix(tmp_path):
    root, config = write_case(tmp_path, "VectorQuantizer")
    convert(root, tmp_path / "bf16", config=config, prefix="first_stage_model.regularization", dtype="bfloat16",
            progress=False)
    assert load_file(tmp_path / "bf16" / "model.safetensors")["embedding.weight"].dtype == torch.bfloat16
    assert AutoModel.from_pretrained(tmp_path / "bf16").embedding.weight.dtype == torch.bfloat16


def test_several_regularizer_nodes_need_node(tmp_path):
    root, _ = write_case(tmp_path, "VectorQuantizer")
    target, params, _, _ = CASES["VectorQuantizer"]
    config = {"a": {"regularizer_config": {"target": target, "params": params}},
              "b": {"regularizer_config": {"target": target, "params": {**params, "n_e": 16}}}}
    with pytest.raises(ConversionError, match="several quantizer configs"):
        convert(root, tmp_path / "out", config=config, progress=False)
    convert(root, tmp_path / "out", config=config, node="a.regularizer_config", progress=False)
    assert AutoModel.from_pretrained(tmp_path / "out").config.n_e == 32


# ---- failures write nothing --------------------------------------------------------------------------


def _fails(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main([*map(str, args), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folder left behind
    return err


def test_corrupt_and_truncated_checkpoints(tmp_path, capsys):
    root, config = write_case(tmp_path, "VectorQuantizer")
    rank0 = root / "1000" / "mp_rank_00_model_states.pt"
    data = rank0.read_bytes()
    rank0.write_bytes(data[: len(data) // 2])
    _fails(tmp_path, capsys, [root, "--config", config], "corrupt or truncated")
    rank0.write_bytes(os.urandom(len(data)))
    _fails(tmp_path, capsys, [root, "--config", config], "corrupt or truncated")


def test_missing_rank_and_missing_latest_target(tmp_path, capsys):
    root, config = write_case(tmp_path, "VectorQuantizer")
    (root / "1000" / "mp_rank_01_model_states.pt").unlink()
    (root / "latest").write_text("2000")
    _fails(tmp_path, capsys, [root, "--config", config], "2000")


def test_missing_keys_and_wrong_shapes(tmp_path, capsys):
    target, params, tensors, _ = CASES["EMAVectorQuantizer"]
    partial = {k: v for k, v in tensors.items() if k != "embedding.cluster_size"}
    write_sat_checkpoint(tmp_path / "missing", [full_model(partial)])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cogvideo_yaml(target, params)))
    _fails(tmp_path, capsys, [tmp_path / "missing", "--config", config], "missing keys ['embedding.cluster_size']")

    config.write_text(yaml.safe_dump(cogvideo_yaml(target, {**params, "n_embed": 16})))
    write_sat_checkpoint(tmp_path / "shapes", [full_model(tensors)])
    err = _fails(tmp_path, capsys, [tmp_path / "shapes", "--config", config], "shape mismatches")
    assert "embedding.weight: checkpoint (32, 8) vs model (16, 8)" in err


def test_unsupported_and_non_quantizer_targets(tmp_path, capsys):
    root, _ = write_case(tmp_path, "VectorQuantizer")
    config = tmp_path / "kl.yaml"
    config.write_text(yaml.safe_dump(cogvideo_yaml(f"{SGM}.DiagonalGaussianRegularizer", {})))
    _fails(tmp_path, capsys, [root, "--config", config], "is not a quantizer")
    config.write_text(yaml.safe_dump(cogvideo_yaml("my_lib.MyQuantizer", {})))
    _fails(tmp_path, capsys, [root, "--config", config], "unsupported regularizer target 'my_lib.MyQuantizer'")


def test_lfq_mask_must_match_the_codebook_size(tmp_path, capsys):
    target, params, tensors, _ = CASES["LFQ"]
    write_sat_checkpoint(tmp_path / "sat", [full_model({**tensors, "mask": torch.tensor([1, 2, 4, 8, 16, 32, 64, 128])})])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cogvideo_yaml(target, params)))
    _fails(tmp_path, capsys, [tmp_path / "sat", "--config", config], "LFQ 'mask' tensor")


def test_fsq_cannot_be_inferred(tmp_path, capsys):
    root, _ = write_case(tmp_path, "FSQ")
    _fails(tmp_path, capsys, [root], "pass --config")


def test_malicious_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    root, config = write_case(tmp_path, "VectorQuantizer")
    rank0 = root / "1000" / "mp_rank_00_model_states.pt"
    states = torch.load(rank0, weights_only=False)
    states["payload"] = Evil()
    torch.save(states, rank0)
    _fails(tmp_path, capsys, [root, "--config", config], "refused to load")
    assert not marker.exists()


def test_verification_mismatch_stops_with_a_report(tmp_path, capsys, monkeypatch):
    root, config = write_case(tmp_path, "VectorQuantizer")
    honest = sgm_reference.REFERENCES["VectorQuantizer"]

    def off_by_one(params, tensors, x):
        ref = honest(params, tensors, x)
        ref.indices = (ref.indices + 1) % 32
        return ref

    monkeypatch.setitem(sgm_reference.REFERENCES, "VectorQuantizer", off_by_one)
    err = _fails(tmp_path, capsys, [root, "--config", config], "verification failed")
    assert "indices differ" in err and "nothing was written" in err
    with pytest.raises(VerificationError):
        convert(root, tmp_path / "out", config=config, progress=False)


def test_failure_while_writing_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    root, config = write_case(tmp_path, "VectorQuantizer")

    def broken(folder, model):
        assert (folder / "model.safetensors").exists()  # the write went as far as it could
        raise ConversionError("simulated failure after writing")

    monkeypatch.setattr(convert_cogvideo_sat, "_check_reload", broken)
    _fails(tmp_path, capsys, [root, "--config", config], "simulated failure")


def test_existing_output_needs_overwrite(tmp_path, capsys):
    root, config = write_case(tmp_path, "VectorQuantizer")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([str(root), "--config", str(config), "--out", str(out), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main([str(root), "--config", str(config), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ---- Hub ----------------------------------------------------------------------------------------------


def test_push_to_hub_then_pull(tmp_path, hub_endpoint, monkeypatch, capsys):
    root, config = write_case(tmp_path, "LFQ")
    repo = "hf-vq-tester/cogvideo-lfq"
    assert main([str(root), "--config", str(config), "--out", str(tmp_path / "out"), "--push-to-hub", repo,
                 "--quiet"]) == 0
    assert "pushed:" in capsys.readouterr().out
    cache = str(tmp_path / "fresh-cache")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    pulled = AutoModel.from_pretrained(repo)
    local = AutoModel.from_pretrained(tmp_path / "out")
    assert type(pulled) is hf_vq.LFQ
    assert all(torch.equal(a, b) for a, b in zip(pulled.state_dict().values(), local.state_dict().values()))
    card = Path(hf_hub_download(repo, "README.md")).read_text()
    assert card == (tmp_path / "out" / "README.md").read_text()
    assert_matches_source(pulled, "LFQ", example_input(pulled, "LFQ"))


# ---- the two ways to run it ---------------------------------------------------------------------------


def test_script_form_converts_the_shipped_sample(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "conversion" / "convert_cogvideo_sat.py"), str(SAMPLE / "checkpoint"),
         "--config", str(SAMPLE / "sat.yaml"), "--out", str(tmp_path / "sample-vq"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hf_vq.VectorQuantizer" in result.stdout
    assert type(AutoModel.from_pretrained(tmp_path / "sample-vq")) is hf_vq.VectorQuantizer


def test_readme_main_command_runs(tmp_path):
    """README.md's main job, verbatim after the install step, in a scratch folder (console script included)."""
    line = next(l for l in (ROOT / "README.md").read_text().splitlines() if l.startswith("python -m pip install")
                and "hf-vq convert" in l)
    command = line.split("&&", 1)[1]
    for name in ("conversion", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = os.path.dirname(sys.executable)  # where pip put the `hf-vq` console script
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "TQDM_DISABLE": "1"}
    if shutil.which("hf-vq", path=env["PATH"]) is None:
        pytest.fail("the hf-vq console script is not installed (pip install -e . installs it)")
    result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "VectorQuantizer from sample-vq" in result.stdout and "64 codes used" in result.stdout


def test_conversion_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "conversion" / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "conversion/README.md", "exec"), {"__name__": "__readme__"})
    assert "hf_vq.VectorQuantizer" in capsys.readouterr().out
    assert type(AutoModel.from_pretrained(tmp_path / "sample-vq-py")) is hf_vq.VectorQuantizer


def test_shipped_sample_is_what_make_sample_generates():
    from hf_vq.conversion import make_sample
    from hf_vq.conversion.sat_io import load_state_dict

    committed = load_state_dict(SAMPLE / "checkpoint", progress=False)
    torch.manual_seed(0)
    generated = make_sample.sample_state_dict()
    assert set(committed) == set(generated)
    for key in generated:
        torch.testing.assert_close(committed[key], generated[key], rtol=0, atol=1e-6)
    target, params = yaml.safe_load((SAMPLE / "sat.yaml").read_text())["model"]["first_stage_config"]["params"][
        "regularizer_config"].values()
    assert target.endswith("quantize.VectorQuantizer") and params["n_e"] == 64


def test_prefix_errors_name_the_key_groups_and_bare_state_dicts_convert(tmp_path, capsys):
    _, params, tensors, _ = CASES["VectorQuantizer"]
    file = tmp_path / "bare.pt"
    torch.save(tensors, file)  # a bare quantizer state dict: no module name to find
    err = _fails(tmp_path, capsys, [file], "no quantizer found")
    assert "['embedding']" in err and "--prefix" in err
    _fails(tmp_path, capsys, [file, "--prefix", "first_stage_model.regularization"], "no key starts with prefix")
    assert main([str(file), "--prefix", "", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert AutoModel.from_pretrained(tmp_path / "out").config.n_e == 32


def test_unknown_regularizer_param_is_named(tmp_path, capsys):
    root, _ = write_case(tmp_path, "VectorQuantizer")
    target, params, _, _ = CASES["VectorQuantizer"]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cogvideo_yaml(target, {**params, "bogus_option": 1})))
    _fails(tmp_path, capsys, [root, "--config", config], "bogus_option")


def test_push_failure_is_reported_after_the_folder_is_written(tmp_path, capsys, monkeypatch):
    root, config = write_case(tmp_path, "VectorQuantizer")

    def offline(*args, **kwargs):
        raise OSError("Hub unreachable")

    monkeypatch.setattr(convert_cogvideo_sat, "push_folder", offline)
    assert main([str(root), "--config", str(config), "--out", str(tmp_path / "out"), "--push-to-hub", "a/b",
                 "--quiet"]) == 1
    assert "was written, but pushing it to a/b failed: Hub unreachable" in capsys.readouterr().err
    assert type(AutoModel.from_pretrained(tmp_path / "out")) is hf_vq.VectorQuantizer
