import os

import pytest
import torch

# No test may reach the internet: the Hub is not reachable here, and nothing should try.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

# Hub test double: the `hub_endpoint` fixture starts a local HTTP server speaking the subset of the Hub API
# that huggingface_hub's client uses, for push/pull tests without network (see tests/hub_server.py).
from hub_server import hub_endpoint  # noqa: E402,F401
