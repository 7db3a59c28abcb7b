"""Every ```python block of README.md runs (in a temporary working directory), and the main job runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


# blocks that talk to the Hub run against the local Hub test double (tests/hub_server.py)
HUB_CALLS = ("push_to_hub", "hf_hub_download", "snapshot_download", "HfApi")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch, request):
    if any(call in BLOCKS[index] for call in HUB_CALLS):
        request.getfixturevalue("hub_endpoint")
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


def test_quickstart_main_job_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("reload identical: True") == 5  # FSQ, LFQ, LatentQuantize, VQ, sgm VQ
