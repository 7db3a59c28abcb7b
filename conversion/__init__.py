"""CogVideo SAT checkpoint conversion (installed as ``hf_vq.conversion``): ``hf-vq convert --help``.

``SAMPLE`` is the shipped sample SAT checkpoint folder (``checkpoint/`` and ``sat.yaml``).
"""

from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "sample"
