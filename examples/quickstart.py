"""Build each hf_vq quantizer, quantize the bundled sample, save, reload with AutoModel, and report.

    python examples/quickstart.py [--out quickstart-out]
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel

import hf_vq
from hf_vq.data import sample_features

# (class name, config) — every quantizer gets the same (1, 16, 16, 16) channel-first feature map
QUANTIZERS = [
    ("FSQ", dict(levels=[8, 5, 5, 5], dim=16)),
    ("LFQ", dict(codebook_size=2**8, dim=16)),
    ("LatentQuantize", dict(levels=[5, 5, 5, 5], dim=16)),
    ("VectorQuantize", dict(dim=16, codebook_size=64, kmeans_init=True, decay=0.9, accept_image_fmap=True)),
    ("VectorQuantizer", dict(n_e=64, e_dim=16, beta=0.25, sane_index_shape=True)),  # CogVideo sgm
]


def run(name: str, config: dict, features: torch.Tensor, out_dir: Path) -> None:
    torch.manual_seed(0)
    model = getattr(hf_vq, name)(**config)
    model.train()
    model(features, return_dict=True)  # one training step initializes data-dependent state (k-means, EMA)
    model.eval()
    out = model(features, return_dict=True)
    folder = out_dir / name
    model.save_pretrained(folder)
    again = AutoModel.from_pretrained(folder).eval()
    same = torch.equal(again(features, return_dict=True).quantized, out.quantized)
    mse = torch.mean((out.quantized - features) ** 2).item()
    used = out.indices.unique().numel()
    print(f"{name:16s} indices {tuple(out.indices.shape)}  codes used {used:4d}  mse {mse:.4f}  "
          f"saved {folder}  reload identical: {same}")
    if not same:
        raise SystemExit(f"{name}: reloaded model differs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to save (default: a temp folder)")
    args = parser.parse_args()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="hf-vq-quickstart-"))
    features = sample_features()
    print(f"sample features {tuple(features.shape)}")
    for name, config in QUANTIZERS:
        run(name, config, features, out_dir)


if __name__ == "__main__":
    main()
