import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(args, cwd, timeout=300, env=None, **kwargs):
    """``python -m experiments ...`` in a subprocess that imports this checkout's code."""
    import subprocess

    env = {**(env or os.environ), "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def repo_root():
    return REPO_ROOT
