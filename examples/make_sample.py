"""Regenerate the bundled sample `hf_vq/data/sample_features.safetensors` (committed; ~16 KB).

A smooth 16-channel 16x16 feature map (low-pass filtered noise), the kind of tensor an image tokenizer's
encoder hands to its quantizer.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(0)
coarse = torch.randn(1, 16, 4, 4)
features = F.interpolate(coarse, size=(16, 16), mode="bicubic", align_corners=False)
features = features + 0.1 * torch.randn_like(features)
out = Path(__file__).resolve().parents[1] / "hf_vq" / "data" / "sample_features.safetensors"
save_file({"features": features.contiguous()}, out)
print(f"wrote {out} {tuple(features.shape)}")
