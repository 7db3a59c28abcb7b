"""Running a kernel check script in a fresh process: under Triton's CPU interpreter, or compiled for the GPU. A
script prints `RESULT` and a JSON object of its measurements, which the test then asserts on.

A script with many cases can run as shards (`run_sharded`): processes started together, each given
`sys.argv[2:4] = (shard, shards)` (parsed by `SHARD_PREAMBLE` into `shard` and `shards`) and taking the cases
its `mine()` gives it (or choosing by `shard` itself). A check's time is mostly the compilation (or the
interpretation) of kernel variants, which runs in parallel across processes."""

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


def run_sharded(script: str, dev: str, shards: int, *, env: dict) -> dict:
    """`script` (which starts with `SHARD_PREAMBLE`) as `shards` processes at once, their results merged."""
    procs = [start_check(script, dev, str(i), str(shards), env=env) for i in range(shards)]
    res = {}
    for proc in procs:
        part = check_result(proc)
        assert not res.keys() & part.keys(), "two shards ran the same case"
        res.update(part)
    return res


def run_check(script: str, *args: str, env: dict) -> dict:
    """`check_result` of `script` run with `args` in `env`."""
    return check_result(start_check(script, *args, env=env))
