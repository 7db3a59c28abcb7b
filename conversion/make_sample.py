"""Write checkpoints in SwissArmyTransformer's on-disk layout, and (as a script) the shipped sample.

    python conversion/make_sample.py        # regenerates conversion/sample/ (committed, ~40 KB)

The sample is a tiny CogVideo-style SAT save: ``latest`` -> ``1000/mp_rank_0{0,1}_model_states.pt`` (two
model-parallel ranks; a fused QKV weight and a row-parallel weight are split as SAT's mpu layers split them),
DeepSpeed's bookkeeping and SAT's client state (``iteration``, an argparse ``args``, RNG states) next to the
``module`` state dict, and ``sat.yaml`` with the regularizer node nested where CogVideo's configs put it. Its
quantizer is an sgm ``VectorQuantizer`` whose 64 x 16 codebook is k-means of the bundled sample features
(``hf_vq/data/sample_features.safetensors``), so the converted model quantizes that sample well.

The writer functions are also what the tests use to build their SAT fixtures.
"""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["deepspeed_model_states", "sat_split", "write_sat_checkpoint"]

SAMPLE = Path(__file__).resolve().parent / "sample"
PREFIX = "first_stage_model.regularization."
QKV = "model.diffusion_model.transformer.layers.0.attention.query_key_value.weight"
DENSE = "model.diffusion_model.transformer.layers.0.attention.dense.weight"


def deepspeed_model_states(module: Mapping[str, torch.Tensor], iteration: int = 1000, mp_world_size: int = 1) -> dict:
    """What DeepSpeed's ``_save_checkpoint`` plus SAT's client state put in ``mp_rank_XX_model_states.pt``."""
    return {
        "module": dict(module),
        "buffer_names": [],
        "optimizer": None,  # ZeRO stage >= 1 keeps optimizer states in separate files
        "param_shapes": [OrderedDict((k, v.shape) for k, v in module.items())],
        "lr_scheduler": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": iteration * 8,
        "dp_world_size": 8,
        "mp_world_size": mp_world_size,
        "ds_config": {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "bf16": {"enabled": 1}},
        "ds_version": "0.14.4",
        "iteration": iteration,
        "client_lr_scheduler": {"start_lr": 1e-5, "num_iters": iteration, "decay_style": "linear"},
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "args": argparse.Namespace(model_parallel_size=mp_world_size, mode="finetune", save="ckpts"),
    }


def sat_split(sd: Mapping[str, torch.Tensor], mp: int, splits: Mapping[str, tuple[int, int]]) -> list[dict]:
    """Split a full state dict into ``mp`` ranks as SAT's mpu layers do: ``splits`` = {key: (dim, stride)}
    (stride 3 for fused QKV: each rank holds ``[q_r; k_r; v_r]``); every other tensor is replicated."""
    shards = []
    for r in range(mp):
        shard = dict(sd)
        for key, (dim, stride) in splits.items():
            parts = sd[key].chunk(stride, dim)
            shard[key] = torch.cat([p.chunk(mp, dim)[r] for p in parts], dim).clone()
        shards.append(shard)
    return shards


def write_sat_checkpoint(root: str | Path, shards: Sequence[Mapping[str, torch.Tensor]], tag: str = "1000") -> Path:
    """``root/latest`` naming ``tag`` and one ``root/<tag>/mp_rank_XX_model_states.pt`` per shard."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest").write_text(tag)
    folder = root / tag
    folder.mkdir()
    iteration = int(tag) if tag.isdigit() else 0
    for r, sd in enumerate(shards):
        torch.save(deepspeed_model_states(sd, iteration, len(shards)), folder / f"mp_rank_{r:02d}_model_states.pt")
    return folder


SAMPLE_YAML = """\
# A CogVideo-style SAT config (trimmed): the quantizer is the autoencoder's regularizer.
model:
  scale_factor: 1.0
  network_config:
    target: dit_video_concat.DiffusionTransformer
    params:
      num_layers: 1
      hidden_size: 4
      num_attention_heads: 1
  first_stage_config:
    target: vae_modules.autoencoder.VideoAutoencoderInferenceWrapper
    params:
      embed_dim: 16
      regularizer_config:
        target: sgm.modules.autoencoding.regularizers.quantize.VectorQuantizer
        params:
          n_e: 64
          e_dim: 16
          beta: 0.25
          log_perplexity: true
"""


def sample_state_dict() -> dict[str, torch.Tensor]:
    """A full model's state dict (transformer, autoencoder, quantizer) with a k-means codebook."""
    from safetensors.torch import load_file

    from hf_vq.ops.kmeans import kmeans

    g = torch.Generator().manual_seed(0)
    features = load_file(str(Path(__file__).resolve().parents[1] / "hf_vq" / "data" / "sample_features.safetensors"))
    tokens = features["features"].movedim(1, -1).reshape(1, -1, 16)
    torch.manual_seed(0)
    codebook, _ = kmeans(tokens, 64, num_iters=20)
    return {
        QKV: torch.randn(12, 4, generator=g),
        DENSE: torch.randn(4, 4, generator=g),
        "first_stage_model.encoder.conv_in.weight": torch.randn(16, 3, 3, 3, generator=g),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 16, 3, 3, generator=g),
        PREFIX + "embedding.weight": codebook[0].contiguous(),
    }


def main() -> None:
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # the RNG states saved as client state too
    if SAMPLE.exists():
        import shutil

        shutil.rmtree(SAMPLE)
    shards = sat_split(sample_state_dict(), 2, {QKV: (0, 3), DENSE: (1, 1)})
    write_sat_checkpoint(SAMPLE / "checkpoint", shards)
    (SAMPLE / "sat.yaml").write_text(SAMPLE_YAML)
    size = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    print(f"wrote {SAMPLE} ({size} bytes)")


if __name__ == "__main__":
    main()
