"""Load a converted quantizer with AutoModel and tokenize the bundled sample feature map with it.

    hf-vq convert conversion/sample/checkpoint --config conversion/sample/sat.yaml --out sample-vq
    python examples/load_converted.py sample-vq
"""

import argparse

import torch
from transformers import AutoModel

import hf_vq  # noqa: F401  (registers the hf_vq classes with AutoModel)
from hf_vq.data import sample_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder written by `hf-vq convert` (or a Hub repo id)")
    args = parser.parse_args()
    model = AutoModel.from_pretrained(args.folder).eval()
    features = sample_features()  # (1, 16, 16, 16), channel-first
    with torch.no_grad():
        out = model(features.to(next(model.parameters()).dtype), return_dict=True)
    mse = torch.mean((out.quantized.float() - features) ** 2).item()
    print(f"{type(model).__name__} from {args.folder}: {tuple(features.shape)} -> indices "
          f"{tuple(out.indices.shape)}, {out.indices.unique().numel()} codes used, relative mse "
          f"{mse / features.var().item():.3f}")


if __name__ == "__main__":
    main()
