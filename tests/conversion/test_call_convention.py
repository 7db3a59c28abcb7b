"""A converted quantizer drops into CogVideo code unchanged: called as sgm code calls it, it returns what the
upstream module returns (tuples, log dict keys, None where upstream returns None), compared with the project's
independent re-implementation (`sgm_reference.reference_call`); `return_dict=True` still gives the ModelOutput.
Also: weightless FSQ, parameters checked against the upstream class, assumed values named, CLI flags."""

import json

import pytest
import torch
import yaml
from test_convert import CASES, PREFIX, SGM, cogvideo_yaml, example_input, full_model, write_case
from transformers import AutoModel
from transformers.utils import ModelOutput

import hf_vq
from hf_vq.conversion import sgm_reference
from hf_vq.conversion.convert_cogvideo_sat import ConversionError, compare_structure, convert, main
from hf_vq.conversion.make_sample import sat_split, write_sat_checkpoint


def _called_as_sgm_calls_it(model, case, x, seed=0):
    """(what the converted model returns for `q(x)`, what the source module returns), same RNG state."""
    _, params, tensors, _ = CASES[case]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        got = model(x)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        want = sgm_reference.reference_call(type(model).__name__, params, tensors, x)
    return got, want


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_model_returns_what_the_source_returns(case, tmp_path):
    root, config = write_case(tmp_path, case)
    assert main([str(root), "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["return_dict"] is False
    model = AutoModel.from_pretrained(tmp_path / "out").eval()  # the convention survives save/load
    x = example_input(model, case)
    got, want = _called_as_sgm_calls_it(model, case, x)
    assert compare_structure(got, want, "output") == []
    assert isinstance(model(x, return_dict=True), ModelOutput)
    module = CASES[case][3]
    if module is not None and case != "LatentQuantize":  # the vqp / sgm-equal module itself, where the case has one
        with torch.no_grad():
            upstream = tuple(module(x))
        assert len(got) == len(upstream)
        for mine, theirs in zip(got, upstream):
            assert mine.shape == theirs.shape
            torch.testing.assert_close(mine.float(), theirs.float(), rtol=1e-5, atol=1e-5)


def test_the_issue_s_unpacking_patterns_work(tmp_path):
    """`z, indices = fsq(x)`, `q, i, aux = lfq(x)`, `z, reg_log = regularization(z)` with upstream's keys."""
    models = {}
    for case in ("FSQ", "LFQ", "GumbelQuantizer", "EMAVectorQuantizer", "VectorQuantizer2"):
        root, config = write_case(tmp_path, case)
        convert(root, tmp_path / case, config=config, progress=False)
        models[case] = AutoModel.from_pretrained(tmp_path / case).eval()
    x = example_input(models["FSQ"], "FSQ")
    z, indices = models["FSQ"](x)
    assert isinstance(z, torch.Tensor) and z.shape == x.shape and indices.shape == x.shape[:-1]
    quantized, indices, aux = models["LFQ"](example_input(models["LFQ"], "LFQ"))
    assert not indices.is_floating_point() and float(aux) == 0.0
    _, log = models["GumbelQuantizer"](example_input(models["GumbelQuantizer"], "GumbelQuantizer"))
    assert list(log) == ["loss/vq", "indices"]
    x = example_input(models["EMAVectorQuantizer"], "EMAVectorQuantizer")
    _, log = models["EMAVectorQuantizer"](x)
    assert list(log) == ["loss/vq", "encodings", "encoding_indices", "perplexity"]
    assert log["encodings"].shape == (x.numel() // x.shape[1], 32)
    assert "encodings" not in models["EMAVectorQuantizer"](x, return_dict=True).log_dict  # no N x K there
    _, _, (perplexity, min_encodings, idx) = models["VectorQuantizer2"](example_input(models["VectorQuantizer2"],
                                                                                      "VectorQuantizer2"))
    assert perplexity is None and min_encodings is None and not idx.is_floating_point()


def test_compare_structure_reports_each_kind_of_difference():
    t = torch.zeros(2)
    assert compare_structure((t, {"a": t}), (t, {"a": t}), "out") == []
    assert "not a tuple" in compare_structure({"quantized": t}, (t,), "out")[0]
    assert "keys ['b']" in compare_structure((t, {"b": t}), (t, {"a": t}), "out")[0]
    assert "the source returns None" in compare_structure((t, (t, None, t)), (t, (None, None, t)), "out")[0]
    assert "values differ" in compare_structure((t + 1,), (t,), "out")[0]
    assert compare_structure((torch.tensor([3, 5]),), (torch.tensor([-1, 5]),), "out") == []  # -1: random draw


# ---- a quantizer without tensors ----------------------------------------------------------------------


def test_weightless_fsq_converts_from_its_config_alone(tmp_path, capsys):
    params = {"levels": [8, 5, 5, 5]}  # no dim: no projections, so no tensors at all
    root = tmp_path / "sat"
    write_sat_checkpoint(root, sat_split(full_model({}), 1, {}))
    config = tmp_path / "fsq.yaml"
    config.write_text(yaml.safe_dump(cogvideo_yaml(f"{SGM}.finite_scalar_quantization.FSQ", params)))
    assert main([str(root), "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "no tensors; built from its config alone" in capsys.readouterr().out
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(model) is hf_vq.FSQ and model.config.levels == [8, 5, 5, 5] and not model.state_dict()
    x = torch.randn(2, 4, 3, 3)
    z, indices = model(x)
    want = sgm_reference.reference_call("FSQ", params, {}, x)
    assert compare_structure((z, indices), want, "output") == []
    # without the config there is nothing to go on: the message says what to pass
    assert main([str(root), "--out", str(tmp_path / "out2"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--prefix" in err and "converts from --config alone" in err


# ---- parameters the upstream class rejects ------------------------------------------------------------


@pytest.mark.parametrize("case, change, message", [
    ("LFQ", {"soft_clamp_input_value": 10.0},
     "lookup_free_quantization.LFQ takes no parameter(s) ['soft_clamp_input_value']"),
    ("VectorQuantizer", {"legacy": False}, "quantize.VectorQuantizer takes no parameter(s) ['legacy']"),
    ("EMAVectorQuantizer", {"beta": None}, "quantize.EMAVectorQuantizer requires the parameter(s) ['beta']"),
    ("FSQ", {"levels": None}, "finite_scalar_quantization.FSQ requires the parameter(s) ['levels']"),
])
def test_parameters_are_checked_against_the_upstream_class(case, change, message, tmp_path, capsys):
    root, _ = write_case(tmp_path, case)
    target, params, _, _ = CASES[case]
    params = {k: v for k, v in {**params, **change}.items() if v is not None}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cogvideo_yaml(target, params)))
    assert main([str(root), "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_vqp_targets_keep_vqp_s_arguments(tmp_path):
    # vector_quantize_pytorch's LFQ does take soft_clamp_input_value (vqp 1.32): only the sgm class rejects it
    root, _ = write_case(tmp_path, "LFQ")
    _, params, _, _ = CASES["LFQ"]
    config = cogvideo_yaml("vector_quantize_pytorch.LFQ", {**params, "soft_clamp_input_value": 10.0})
    convert(root, tmp_path / "out", config=config, progress=False)
    assert AutoModel.from_pretrained(tmp_path / "out").config.soft_clamp_input_value == 10.0


# ---- values the tensors cannot tell --------------------------------------------------------------------


@pytest.mark.parametrize("case, field, effect", [
    ("LFQ", "codebook_scale=1.0", "scales every output"),
    ("VectorQuantizer_remap", "unknown_index='random'", "the index a code outside `used` gets"),
    ("GumbelQuantizer", "kl_weight=0.0005", "scales the returned KL loss"),
    ("VectorQuantizer", "sane_index_shape=False", "the indices' shape"),
])
def test_assumed_values_are_named_with_their_effect_in_output_and_card(case, field, effect, tmp_path, capsys):
    root, _ = write_case(tmp_path, case)
    assert main([str(root), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith(f"assumed:        {field}"))
    assert effect in line
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### Assumed values" in card and f"| `{field}` | " in card and effect in card
    assert str(eval(field.split("=", 1)[1])) in str(getattr(AutoModel.from_pretrained(tmp_path / "out").config,
                                                            field.split("=")[0]))


def test_with_a_config_nothing_is_assumed(tmp_path, capsys):
    root, config = write_case(tmp_path, "LFQ")
    result = convert(root, tmp_path / "out", config=config, progress=False)
    assert result.assumed == [] and "Assumed values" not in (tmp_path / "out" / "README.md").read_text()


# ---- CLI flags for what the errors ask -----------------------------------------------------------------


def test_split_rule_flag_merges_a_tensor_sat_rules_do_not_cover(tmp_path, capsys):
    target, params, tensors, _ = CASES["EMAVectorQuantizer"]
    key = PREFIX + "embedding.embed_avg"
    write_sat_checkpoint(tmp_path / "sat", sat_split(full_model(tensors), 2, {key: (0, 1)}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cogvideo_yaml(target, params)))
    args = [str(tmp_path / "sat"), "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 1
    assert "--split-rule 'REGEX=DIM[,STRIDE]'" in capsys.readouterr().err
    assert main([*args, "--split-rule", r"embed_avg$=0"]) == 0
    assert torch.equal(AutoModel.from_pretrained(tmp_path / "out").embedding.embed_avg, tensors["embedding.embed_avg"])
    with pytest.raises(SystemExit):
        main([*args, "--split-rule", "embed_avg"])
    assert "expected REGEX=DIM" in capsys.readouterr().err


def test_yaml_syntax_error_is_one_clear_line(tmp_path, capsys):
    root, _ = write_case(tmp_path, "VectorQuantizer")
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  params:\n    n_e: [64\n    e_dim: 16\n")
    assert main([str(root), "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{config}: not valid YAML" in err and "at line" in err and "Traceback" not in err


def test_ambiguous_node_error_names_the_cli_flag(tmp_path):
    root, _ = write_case(tmp_path, "VectorQuantizer")
    target, params, _, _ = CASES["VectorQuantizer"]
    config = {"a": {"regularizer_config": {"target": target, "params": params}},
              "b": {"regularizer_config": {"target": target, "params": params}}}
    with pytest.raises(ConversionError, match="choose one with --node"):
        convert(root, tmp_path / "out", config=config, progress=False)
