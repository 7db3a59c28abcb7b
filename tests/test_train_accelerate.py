"""examples/train_accelerate.py runs in one process and under torchrun with 2 processes (gloo on CPU),
and the saved quantizer loads with AutoModel."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

import hf_vq

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_accelerate.py"


@pytest.mark.parametrize("processes", [1, 2])
def test_train_accelerate_example(processes, tmp_path):
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run(
        [*launcher, str(SCRIPT), "--steps", "5", "--out", str(tmp_path / "vq"), "--cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"after 5 steps on {processes} process(es)" in result.stdout
    model = AutoModel.from_pretrained(tmp_path / "vq")
    assert isinstance(model, hf_vq.VectorQuantize) and bool(model._codebook.initted)
    assert model(torch.randn(1, 32, 4, 4)).indices.shape == (1, 4, 4)
