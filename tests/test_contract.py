"""The Hugging Face contract, checked for every quantizer in `quantizer_examples.EXAMPLES`."""

import json
from dataclasses import dataclass

import pytest
import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from transformers import AutoConfig, AutoModel
from transformers.utils import ModelOutput

import hf_vq
from hf_vq.diffusers_support import DiffusersQuantizer
from hf_vq.modeling_utils import own_storage
from quantizer_examples import EXAMPLES, example

NAMES = sorted(EXAMPLES)


def _outputs(model, x):
    torch.manual_seed(1)
    return model(x, return_dict=True).to_tuple()


def _assert_same(a, b):
    """Recursive equality of (nested tuples / dicts of) tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    else:
        assert a == b


def _build(name):
    cls_name, kwargs, x = example(name)
    model = getattr(hf_vq, cls_name)(**kwargs)
    return model.eval(), x


@pytest.mark.parametrize("name", NAMES)
def test_config_and_kwargs_constructors_agree(name):
    cls_name, kwargs, _ = example(name)
    cls = getattr(hf_vq, cls_name)
    a = cls(**kwargs)
    b = cls(cls.config_class(**kwargs))
    assert a.config.to_kwargs() == b.config.to_kwargs()
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_automodel_round_trip_is_bit_identical(name, tmp_path):
    model, x = _build(name)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model.config.model_type
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), type(model.config))
    _assert_same(_outputs(model, x), _outputs(loaded, x))
    # derived (non-persistent) buffers are rebuilt, not left as uninitialized memory
    for (n1, b1), (n2, b2) in zip(model.named_buffers(), loaded.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2), n1


@pytest.mark.parametrize("name", NAMES)
def test_return_dict_false_gives_the_reference_tuple(name):
    model, x = _build(name)
    with torch.no_grad():
        model(x)  # a first call may initialize the codebook (k-means), after which the path is fixed
    torch.manual_seed(1)
    out = model(x, return_dict=True)
    torch.manual_seed(1)
    tup = model(x, return_dict=False)
    # a reference that returns one tensor (vqp's RandomProjectionQuantizer) is matched by a bare tensor
    assert isinstance(tup, tuple) or (len(type(out).tuple_fields) == 1 and isinstance(tup, torch.Tensor))
    _assert_same(tup, out.to_tuple_output())


# the first output is features in the input's dtype, except BinaryMapper's: a float32 one-hot code
FEATURE_DTYPE = {"BinaryMapper": torch.float32}


@pytest.mark.parametrize("name", NAMES)
def test_a_bfloat16_model_trains_and_evaluates(name):
    """`model.to(torch.bfloat16)`, as a tokenizer trained in bf16 does: buffers keep that dtype through a training
    step (the EMA statistics are computed in float32 and written back), and the output keeps the input's dtype."""
    cls_name, kwargs, x = example(name)
    model = getattr(hf_vq, cls_name)(**kwargs).to(torch.bfloat16)
    dtypes = {key: value.dtype for key, value in model.state_dict().items()}
    x = x.to(torch.bfloat16).requires_grad_()
    torch.manual_seed(1)
    quantized = model.train()(x, return_dict=True).to_tuple()[0]
    assert quantized.dtype == FEATURE_DTYPE.get(cls_name, torch.bfloat16)
    quantized.float().square().sum().backward()
    assert x.grad is None or torch.isfinite(x.grad).all()  # None: an output without a gradient path to x
    with torch.no_grad():
        assert model.eval()(x, return_dict=True).to_tuple()[0].dtype == FEATURE_DTYPE.get(cls_name, torch.bfloat16)
    state = model.state_dict()
    assert {key: value.dtype for key, value in state.items()} == dtypes
    for key, value in state.items():
        assert not value.is_floating_point() or torch.isfinite(value).all(), key


class _QuantizerPipeline(DiffusionPipeline):
    def __init__(self, quantizer):
        super().__init__()
        self.register_modules(quantizer=quantizer)


@pytest.mark.parametrize("name", NAMES)
def test_diffusers_pipeline_component(name, tmp_path):
    model, x = _build(name)
    _QuantizerPipeline(model).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["quantizer"] == ["hf_vq", type(model).__name__]
    loaded = _QuantizerPipeline.from_pretrained(tmp_path).quantizer.eval()
    assert type(loaded) is type(model)
    _assert_same(_outputs(model, x), _outputs(loaded, x))


@pytest.mark.parametrize("name", NAMES)
def test_diffusers_quantizer_face(name, tmp_path):
    model, x = _build(name)
    face = DiffusersQuantizer.from_quantizer(model)
    face.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "DiffusersQuantizer" and config["quantizer_type"] == type(model).__name__
    loaded = DiffusersQuantizer.from_pretrained(tmp_path).eval()
    _assert_same(_outputs(model, x), _outputs(loaded.quantizer, x))


class _Net(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, quantizer_type: str, quantizer_config: dict):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.quantizer = hf_vq.build_quantizer(quantizer_type, quantizer_config)


@pytest.mark.parametrize("name", NAMES)
def test_quantizer_as_submodule_of_a_diffusers_model(name, tmp_path):
    cls_name, kwargs, x = example(name)
    net = _Net(cls_name, kwargs).eval()
    net.save_pretrained(tmp_path)
    loaded = _Net.from_pretrained(tmp_path).eval()
    _assert_same(net.state_dict(), loaded.state_dict())
    # diffusers may leave the weights in the loaded file's buffer, at addresses where vectorized GEMMs round
    # differently in the last bit; with storage of their own the outputs are the saved model's exactly
    own_storage(loaded)
    _assert_same(_outputs(net.quantizer, x), _outputs(loaded.quantizer, x))


def test_unknown_config_field_is_an_error():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['levls'\]"):
        hf_vq.FSQConfig(levls=[8, 5])


def test_build_quantizer_unknown_type():
    with pytest.raises(ValueError, match="unknown quantizer_type 'Nope'"):
        hf_vq.build_quantizer("Nope", {})


def test_config_and_kwargs_together_is_an_error():
    with pytest.raises(ValueError, match="either a config or keyword arguments"):
        hf_vq.FSQ(hf_vq.FSQConfig(levels=[8, 5, 5]), dim=4)


@dataclass
class _PlainOutput(ModelOutput):  # transformers' own behaviour, for comparison
    quantized: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    loss: torch.Tensor | None = None


def test_outputs_behave_as_transformers_model_outputs():
    """`QuantizerOutput` skips ModelOutput's per-write `fields()` scans (host time): same mapping and tuple."""
    q, i, loss = torch.randn(2, 3), torch.arange(2), torch.tensor(0.5)
    for kwargs in (dict(quantized=q, indices=i, loss=loss), dict(quantized=q, loss=loss), dict(indices=i), {}):
        ours, plain = hf_vq.modeling_utils.QuantizerOutput(**kwargs), _PlainOutput(**kwargs)
        assert list(ours.keys()) == list(plain.keys())
        assert all(a is b for a, b in zip(ours.to_tuple(), plain.to_tuple(), strict=True))
        assert [getattr(ours, f) for f in ("quantized", "indices", "loss")] == \
            [getattr(plain, f) for f in ("quantized", "indices", "loss")]
        leaves = torch.utils._pytree.tree_flatten(ours)[0]
        assert all(a is b for a, b in zip(leaves, torch.utils._pytree.tree_flatten(plain)[0], strict=True))
    out = hf_vq.FSQOutput(quantized=q)
    out.indices = i  # a later write enters the mapping too
    assert list(out.keys()) == ["quantized", "indices"] and out["indices"] is i and out[1] is i
    assert isinstance(out, ModelOutput)


def test_framework_overrides_are_pinned_to_the_checked_transformers_versions():
    """`hf_vq.framework_overrides` replaces ModelOutput internals: a transformers release outside the checked range
    fails here until the overrides (and the test above) are checked against it and the range is extended."""
    import transformers
    from packaging.version import Version

    from hf_vq.framework_overrides import TRANSFORMERS_VERSIONS, FastModelOutput

    oldest, newest = TRANSFORMERS_VERSIONS
    version = Version(transformers.__version__)
    assert oldest <= (version.major, version.minor) <= newest, transformers.__version__
    assert issubclass(hf_vq.QuantizerOutput, FastModelOutput)
    # the ModelOutput internals the overrides replace are still the ones they were written for
    assert {"__post_init__", "__setattr__", "__setitem__"} <= set(vars(ModelOutput))
