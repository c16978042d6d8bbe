"""Importing the light packages must not pull in ray, deepspeed or vllm."""

import subprocess
import sys
from pathlib import Path

from tests.subprocess_env import child_env

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_light_imports_do_not_load_heavy_libraries():
    code = (
        "import prime.algo, prime.config, sys; "
        "heavy = [m for m in ('ray', 'deepspeed', 'vllm') if m in sys.modules]; "
        "assert not heavy, f'heavy modules imported: {heavy}'"
    )
    env = child_env()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env
    )
    assert result.returncode == 0, result.stderr
