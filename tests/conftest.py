import os
import sys

import pytest
import torch

# No test may reach the internet: the Hub is not reachable here, and nothing should try.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel_check(script, shards): a GPU kernel check that this test runs as "
                            "shards (tests/ops/kernel_checks.py: gpu_check)")


def pytest_collection_finish(session):
    """On a GPU machine, start every selected GPU kernel check's processes at once: their time is the import of
    hf_vq and kernel compilation, CPU work that runs in parallel; each test then collects its own results."""
    checks = sys.modules.get("kernel_checks")
    if checks is None or not torch.cuda.is_available():
        return
    for item in session.items:
        marker = item.get_closest_marker("kernel_check")
        if marker is not None:
            script, shards = marker.args
            checks.start_sharded(script, "cuda", shards, env=checks.gpu_env())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

# Hub test double: the `hub_endpoint` fixture starts a local HTTP server speaking the subset of the Hub API
# that huggingface_hub's client uses, for push/pull tests without network (see tests/hub_server.py).
from hub_server import hub_endpoint  # noqa: E402,F401
