"""The diffusers face of hf_vq: one generic `ModelMixin`/`ConfigMixin` that hosts any hf_vq quantizer.

Every hf_vq quantizer already is a `transformers.PreTrainedModel`, which diffusers pipelines save and load
as components (model_index.json then names `["hf_vq", "<Class>"]`). Inside a diffusers model, though,
weights are saved by diffusers' `ModelMixin` with a diffusers `config.json`; `DiffusersQuantizer` is that
face, for every quantizer at once: its diffusers config is `(quantizer_type, quantizer_config)` and it
builds the quantizer through `hf_vq.build_quantizer`, so there is no per-class wrapper to maintain.
`register_with_diffusers()` (run on `import hf_vq`) adds hf_vq to diffusers' table of loadable libraries,
the extension point diffusers uses for transformers and onnxruntime, so model_index.json names `hf_vq`.
Quantizers used directly as submodules of a user's `ModelMixin` also work: diffusers loads their
persistent state, and `rebuild_derived_buffers` restores derived tables after a meta-device load.
"""

from __future__ import annotations

from typing import Any

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines import pipeline_loading_utils

from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from .modeling_utils import PretrainedIOMixin, QuantizerModel, build_quantizer


class DiffusersQuantizer(PretrainedIOMixin, ModelMixin, ConfigMixin):
    """Any hf_vq quantizer as a diffusers model.

    Args:
        quantizer_type (`str`): class name (`"FSQ"`, `"VectorQuantize"`, ...) or model_type of the quantizer.
        quantizer_config (`dict`, *optional*): the quantizer's hyper-parameters (its config's `to_kwargs()`).

    Example:
        >>> dq = DiffusersQuantizer("FSQ", {"levels": [8, 5, 5, 5]})
        >>> dq.save_pretrained("fsq-diffusers")
        >>> DiffusersQuantizer.from_pretrained("fsq-diffusers").quantizer
    """

    config_name = "config.json"
    weights_name = SAFETENSORS_WEIGHTS_NAME

    @register_to_config
    def __init__(self, quantizer_type: str, quantizer_config: dict[str, Any] | None = None):
        super().__init__()
        self.quantizer = build_quantizer(quantizer_type, quantizer_config or {})

    @classmethod
    def from_quantizer(cls, quantizer: QuantizerModel) -> "DiffusersQuantizer":
        """Wrap an existing quantizer, copying its full state (parameters and running buffers) and its call
        convention (`return_dict`: a converted model keeps returning what its source returns)."""
        config = {**quantizer.config.to_kwargs(), "return_dict": quantizer.config.return_dict}
        wrapper = cls(type(quantizer).__name__, config)
        wrapper.quantizer.load_state_dict(quantizer.state_dict())
        return wrapper.to(quantizer.device)

    def forward(self, *args, **kwargs):
        return self.quantizer(*args, **kwargs)


def register_with_diffusers() -> None:
    """Let diffusers pipelines save/load hf_vq components under the library name `hf_vq`."""
    methods = ["save_pretrained", "from_pretrained"]
    entry = {"QuantizerModel": methods, "DiffusersQuantizer": methods, "VQAutoencoder": methods}
    pipeline_loading_utils.LOADABLE_CLASSES["hf_vq"] = entry
    # the same dict object is imported by diffusers.pipelines.pipeline_utils: update it in place
    pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.update(entry)
