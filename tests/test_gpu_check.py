"""bench/gpu_check.sh --dry-run: the GPU check's own code on CPU, so it never rots."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["fp16 loss scaling, forced overflow", "bf16 training (ZeRO-1)", "ZeRO-2, one device (bf16)",
        "ZeRO-3, one device (fp32)", "NCCL initialisation", "ImageNet-64 paper job: img/s, MFU",
        "sampler: no host sync"]
GPU_ONLY = {"fp16 loss scaling, forced overflow": "fp16 needs a GPU",
            "NCCL initialisation": "NCCL needs a GPU", "sampler: no host sync": "needs a GPU"}


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_cpu_row():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    table = proc.stdout[proc.stdout.index("gpu_check on CPU (dry run)"):].splitlines()[2:]
    results = {}
    for line in table:
        name = next(row for row in ROWS if line.startswith(row))
        status, _, detail = line[len(name):].split(None, 2)
        results[name] = (status, detail)
    assert list(results) == ROWS
    for name, (status, detail) in results.items():
        if name in GPU_ONLY:
            assert status == "SKIP" and GPU_ONLY[name] in detail, (name, status, detail)
        else:
            assert status == "PASS", (name, status, detail)
    assert "img/s" in results["ImageNet-64 paper job: img/s, MFU"][1]


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check would run")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "use --dry-run" in proc.stderr
