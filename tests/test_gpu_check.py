"""bench/gpu_check.sh --dry-run: the GPU check's own functions on CPU, so it never rots;
its batch fit, row budgets and table; and the engine's refusal of an accelerator that does
not match placement.device() (the device the tests and the project must agree on)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["fp16 loss scaling, forced overflow", "bf16 training (ZeRO-1)", "ZeRO-2, one device (bf16)",
        "ZeRO-3, one device (fp32)", "NCCL initialisation", "ImageNet-64 paper job: img/s, MFU",
        "sampler: no host sync"]
GPU_ONLY = {"NCCL initialisation": "NCCL needs a GPU", "sampler: no host sync": "needs a GPU"}
HEADER = "| check | result | s (budget) | peak GPU memory | img/s | MFU | detail |"


def gpu_check():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check as module

    return module


def parse_table(stdout: str) -> dict[str, list[str]]:
    """Markdown rows by check name: [result, seconds, memory, img/s, MFU, detail]."""
    lines = stdout[stdout.index(HEADER):].splitlines()[2:]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    return {row[0]: row[1:] for row in cells}


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_cpu_row_fp16_included():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("IDDPM_CPU_FP16", None)  # the dry run sets the fp16 seam itself
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "gpu_check on CPU (dry run)" in proc.stdout
    table = parse_table(proc.stdout)
    assert list(table) == ROWS
    for name, (status, *_, detail) in table.items():
        if name in GPU_ONLY:
            assert status == "SKIP" and GPU_ONLY[name] in detail, (name, status, detail)
        else:
            assert status == "PASS", (name, status, detail)
    fp16 = table["fp16 loss scaling, forced overflow"][-1]
    assert "ZeRO-0: " in fp16 and "ZeRO-2: " in fp16 and "2^40 -> 2^39" in fp16, fp16
    status, seconds, memory, img_s, mfu, detail = table["ImageNet-64 paper job: img/s, MFU"]
    assert float(img_s) > 0 and mfu.endswith("%") and memory == "—", (img_s, mfu, memory)
    # the dry run's injected out-of-memory error at batch 4: the failed engine was freed
    # (free_failed asserts it) and the retry ran at 3/4 of it
    assert "after out-of-memory at 4 (engine freed)" in detail and "batch 3/GPU" in detail, detail


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check would run")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "use --dry-run" in proc.stderr


def test_fit_batch_is_linear_through_the_two_probes():
    fit_batch = gpu_check().fit_batch
    gib = 2**30
    # 2 GiB fixed + 0.25 GiB per image; 80 GiB device, 90% usable: (72 - 2) / 0.25 = 280
    assert fit_batch(2 * gib + 8 * gib // 4, 2 * gib + 16 * gib // 4, 8, 16, 80 * gib) == 280
    # 1 GiB fixed, 80.85 GiB device: (72.765 - 1) / 0.25 = 287.06 images, down to a multiple of 8
    assert fit_batch(gib + 8 * gib // 4, gib + 16 * gib // 4, 8, 16, int(80.85 * gib)) == 280
    # 55 GiB fixed + 2.5 GiB per image: 6.8 images fit; still 8 (the retry takes it from there)
    assert fit_batch(75 * gib, 95 * gib, 8, 16, 80 * gib) == 8


def test_a_row_over_its_budget_fails_and_the_next_row_runs(tmp_path):
    module = gpu_check()
    ctx = module.Context(gpu=False, tmp=tmp_path, shards16=tmp_path, shards64=tmp_path, warmup=1, steps=1,
                         probe_batches=(2, 4), cpu_batch=4, paper_sets=[], matmul_reps=1, budgets=True)

    def hangs(ctx):
        time.sleep(30)

    table = [module.Row("hangs", hangs, 1), module.Row("quick", lambda c: module.Result("done", img_s=2.5), 5)]
    began = time.perf_counter()
    outcomes = module.run_rows(table, ctx)
    assert time.perf_counter() - began < 20  # the hung row was stopped at its budget (1 s)
    assert [(o.status, o.detail) for o in outcomes] == [
        ("FAIL", "OverBudget: over its 1 s budget"), ("PASS", "done")]
    markdown = module.markdown_table(outcomes, ctx).splitlines()
    assert markdown[0] == HEADER
    assert markdown[3].startswith("| quick | PASS | 0 (5) | — | 2.5 | — | done |")


def test_check_accelerator_refuses_a_device_of_another_kind():
    from iddpm_ds.placement import PlacementError
    from iddpm_ds.train.engine import check_accelerator

    check_accelerator("cpu", torch.device("cpu"))
    check_accelerator("cuda", torch.device("cuda", 1))
    with pytest.raises(PlacementError) as err:
        check_accelerator("cpu", torch.device("cuda", 0))
    assert str(err.value).count("\n") == 0
    assert "accelerator is cpu" in str(err.value) and "cuda:0" in str(err.value)
    with pytest.raises(PlacementError, match="set DS_ACCELERATOR=cpu"):
        check_accelerator("cuda", torch.device("cpu"))


def test_build_engine_refuses_when_deepspeed_and_dist_disagree(tmp_path, monkeypatch):
    """DS_ACCELERATOR=cpu here; placement.device() as a rank with a GPU would see it (the
    device init() fixed in the dist state, the one input changed): the engine is refused
    before DeepSpeed builds anything."""
    from iddpm_ds.dist import state
    from iddpm_ds.placement import PlacementError
    from iddpm_ds.spec.distributed import DistributedSpec
    from iddpm_ds.train.engine import build_engine

    job = gpu_check().tiny_job(tmp_path, tmp_path / "run")
    as_gpu_rank = state.DistState(DistributedSpec(), launcher_local_rank=0,
                                  device=torch.device("cuda", 0))
    monkeypatch.setattr(state.SLOT, "state", as_gpu_rank)
    with pytest.raises(PlacementError, match="accelerator is cpu .* device is cuda:0"):
        build_engine(job)
