"""Shared test set-up: few threads per process (2-core CI machine), the digits shards."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
# tests/ has no __init__.py: pytest puts it on sys.path (rootdir-relative "prepend" import
# mode), so `from train_utils import ...` works without a path edit here

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The bundled demo data (sklearn digits), written once per test session."""
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "digits", "--out",
                    str(out), "--overwrite", "--quiet"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory, digits_shards):
    """Shared 2-rank demo runs by (ZeRO stage, precision): train_utils.DemoRuns."""
    from train_utils import DemoRuns

    return DemoRuns(tmp_path_factory.mktemp("demo_runs"), digits_shards)
