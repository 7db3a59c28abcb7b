"""The kernel-check runner (`kernel_checks.py`): shards started ahead of their test are the ones its run collects."""

import os

import kernel_checks
from kernel_checks import SHARD_PREAMBLE, run_check, run_sharded, start_sharded

SCRIPT = SHARD_PREAMBLE + """
import json, os
print("RESULT" + json.dumps({f"case{shard}": [shard, shards, os.getpid()]}))
"""


def test_shards_started_ahead_are_collected_by_their_run():
    start_sharded(SCRIPT, "cpu", 2, env=dict(os.environ))
    procs = kernel_checks._STARTED[(SCRIPT, "cpu", 2)]
    res = run_sharded(SCRIPT, "cpu", 2, env=dict(os.environ))
    assert {k: v[:2] for k, v in res.items()} == {"case0": [0, 2], "case1": [1, 2]}
    assert sorted(v[2] for v in res.values()) == sorted(p.pid for p in procs)  # the processes started ahead
    assert (SCRIPT, "cpu", 2) not in kernel_checks._STARTED
    assert {k: v[:2] for k, v in run_check(SCRIPT, "cpu", env=dict(os.environ)).items()} == {"case0": [0, 1]}
