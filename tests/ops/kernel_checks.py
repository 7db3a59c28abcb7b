"""Running a kernel check script in a fresh process: under Triton's CPU interpreter, or compiled for the GPU. A
script prints `RESULT` and a JSON object of its measurements, which the test then asserts on.

A script with many cases can run as shards (`run_sharded`): processes started together, each given
`sys.argv[2:4] = (shard, shards)` (parsed by `SHARD_PREAMBLE` into `shard` and `shards`) and taking the cases
its `mine()` gives it (or choosing by `shard` itself). A check's time is the import of hf_vq in each process and
the compilation (or the interpretation) of kernel variants, which run in parallel across processes; on a GPU
machine the checks marked with `gpu_check` all start when collection ends (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def interpreter_env() -> dict:
    """The kernels run by Triton's CPU interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("HF_VQ_DISABLE_TRITON", None)
    return env


def gpu_env() -> dict:
    """The kernels compiled for the GPU."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HF_VQ_DISABLE_TRITON")}


def start_check(script: str, *args: str, env: dict) -> subprocess.Popen:
    """`script` (run with `args`) in a new process from the repository root."""
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)


def check_result(proc: subprocess.Popen) -> dict:
    """The JSON object a check process printed after `RESULT`; a process that fails or prints none fails the test
    (triton is a test dependency: an interpreter run that breaks is a failure, not a skip)."""
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "RESULT" in stdout, stderr[-4000:]
    return json.loads(stdout.split("RESULT", 1)[1])


SHARD_PREAMBLE = """
import itertools, sys
shard, shards = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (0, 1)
_turn = itertools.count()
def mine():
    # whether the next case (in the script's fixed order) is this shard's; call once per case
    return next(_turn) % shards == shard
"""


# shards started ahead of their test (`start_sharded`), by (script, device, shards)
_STARTED: dict[tuple[str, str, int], list[subprocess.Popen]] = {}


def gpu_check(script: str, shards: int = 1):
    """Mark a test that runs `script` on the GPU as `shards` processes (`run_sharded(script, "cuda", shards, ...)`):
    skipped without a GPU; with one, tests/conftest.py starts every selected check's processes when collection
    ends, so all of them import and compile at once instead of test after test."""
    def mark(test):
        return needs_gpu(pytest.mark.kernel_check(script, shards)(test))
    return mark


def start_sharded(script: str, dev: str, shards: int, *, env: dict) -> None:
    """Start `script`'s `shards` processes now; the `run_sharded` call with the same arguments collects them."""
    key = (script, dev, shards)
    if key not in _STARTED:
        _STARTED[key] = [start_check(script, dev, str(i), str(shards), env=env) for i in range(shards)]


def run_sharded(script: str, dev: str, shards: int, *, env: dict) -> dict:
    """`script` (which starts with `SHARD_PREAMBLE`, or has one case) as `shards` processes at once (started
    earlier by `start_sharded`, or now), their results merged."""
    start_sharded(script, dev, shards, env=env)
    procs = _STARTED.pop((script, dev, shards))
    res = {}
    for proc in procs:
        part = check_result(proc)
        assert not res.keys() & part.keys(), "two shards ran the same case"
        res.update(part)
    return res


def run_check(script: str, dev: str, *, env: dict) -> dict:
    """`check_result` of `script` run on `dev` in `env`, as one process."""
    return run_sharded(script, dev, 1, env=env)
