"""Train a small VQ tokenizer on the bundled sample with Accelerate; codebooks stay synced across processes.

    python examples/train_accelerate.py --steps 200 --out vq-tokenizer
    accelerate launch --num_processes 2 examples/train_accelerate.py      # (or torchrun --nproc_per_node 2)

The tokenizer is a 1x1-conv encoder, an hf_vq `VectorQuantize` (k-means init, EMA, dead-code expiry) and a
1x1-conv decoder, trained to reconstruct random crops of the bundled feature map. No code in this script
deals with codebook sync: hf_vq does it whenever a process group is up. The main process saves the
quantizer with `save_pretrained`.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

import hf_vq
from hf_vq.data import sample_features


class Tokenizer(nn.Module):
    def __init__(self, channels: int = 16, dim: int = 32, codebook_size: int = 64):
        super().__init__()
        self.encoder = nn.Conv2d(channels, dim, 1)
        self.quantizer = hf_vq.VectorQuantize(dim=dim, codebook_size=codebook_size, decay=0.9, kmeans_init=True,
                                              threshold_ema_dead_code=1, accept_image_fmap=True)
        self.decoder = nn.Conv2d(dim, channels, 1)

    def forward(self, x):
        out = self.quantizer(self.encoder(x))
        return self.decoder(out.quantized), out.loss, out.indices


def crops(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    features = sample_features()[0]
    tops = torch.randint(0, features.shape[1] - size + 1, (batch,), generator=generator)
    lefts = torch.randint(0, features.shape[2] - size + 1, (batch,), generator=generator)
    x = torch.stack([features[:, t : t + size, l : l + size] for t, l in zip(tops.tolist(), lefts.tolist())])
    return x + 0.05 * torch.randn(x.shape, generator=generator)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8, help="per process")
    parser.add_argument("--out", type=Path, default=Path("vq-tokenizer"))
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=args.cpu)
    torch.manual_seed(0)  # the same initial weights on every process
    model = Tokenizer()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    data_rng = torch.Generator().manual_seed(1000 + accelerator.process_index)  # each process its own data

    progress = tqdm(range(args.steps), disable=not accelerator.is_local_main_process, desc="training")
    for _ in progress:
        x = crops(args.batch, 8, data_rng).to(accelerator.device)
        recon, vq_loss, indices = model(x)
        loss = nn.functional.mse_loss(recon, x) + vq_loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.4f}", codes=int(indices.unique().numel()))

    quantizer = accelerator.unwrap_model(model).quantizer
    hf_vq.distributed.assert_same_across_ranks(quantizer)  # codebooks identical on every process
    if accelerator.is_main_process:
        quantizer.save_pretrained(args.out)
        accelerator.print(f"saved the quantizer to {args.out} after {args.steps} steps "
                          f"on {accelerator.num_processes} process(es); final loss {loss.item():.4f}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank is past the final barrier and everything is written: leave without tearing the gloo group
        # down, which on a busy CPU sometimes hung a torchrun worker (torch 2.13 CPU, 2 processes on 2 cores)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
