"""Small files bundled with hf_vq for examples and tests."""

from importlib import resources

import torch
from safetensors.torch import load_file


def sample_features() -> torch.Tensor:
    """A `(1, 16, 16, 16)` channel-first feature map (see examples/make_sample.py)."""
    with resources.as_file(resources.files(__name__) / "sample_features.safetensors") as path:
        return load_file(path)["features"]
