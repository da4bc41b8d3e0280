"""GPU placement for every launcher layout, as a pure function (no GPU needed)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from iddpm_ds.dist.env import tasks_on_node
from iddpm_ds.placement import PlacementError, gpu_index, plan_layout
from train_utils import ROOT


@pytest.mark.parametrize("local_rank", range(8))
def test_launcher_with_all_devices_visible_uses_local_rank(local_rank):
    # deepspeed launcher (CUDA_VISIBLE_DEVICES lists all) and torchrun (unset)
    assert gpu_index(local_rank, 8, "0,1,2,3,4,5,6,7", 8) == local_rank
    assert gpu_index(local_rank, 8, None, 8) == local_rank


@pytest.mark.parametrize("local_rank", range(4))
@pytest.mark.parametrize("visible", ["0", "1", "2", "3", "GPU-7f3c9a2e"])
def test_srun_one_device_per_task_uses_device_0(local_rank, visible):
    # srun --gpus-per-task=1 / --gpu-bind: each task sees only its own GPU
    assert gpu_index(local_rank, 4, visible, 1) == 0


def test_no_gpu_means_cpu():
    assert gpu_index(0, 2, None, 0) is None
    assert gpu_index(1, 2, "", 0) is None


def test_single_gpu_single_rank():
    assert gpu_index(0, 1, None, 1) == 0
    assert gpu_index(0, None, None, 1) == 0


@pytest.mark.parametrize("local_rank", range(4))
def test_more_local_ranks_than_devices_fails_on_every_rank_naming_the_fix(local_rank):
    with pytest.raises(PlacementError) as err:
        gpu_index(local_rank, 4, "0,1", 2)
    message = str(err.value)
    assert "\n" not in message
    assert "2 visible GPUs" in message and "CUDA_VISIBLE_DEVICES=0,1" in message
    assert "at most 2 rank(s) per node" in message and "--gpus-per-task=1" in message


def test_local_rank_beyond_devices_fails_when_ranks_per_node_unknown():
    assert gpu_index(1, None, None, 2) == 1
    with pytest.raises(PlacementError, match="local rank 2 of 3"):
        gpu_index(2, None, None, 2)


def test_ranks_sharing_the_only_unbound_gpu_fail():
    with pytest.raises(PlacementError, match="2 ranks on this node share 1 visible GPU"):
        gpu_index(1, 2, None, 1)


@pytest.mark.parametrize("spec,node,expected", [
    ("4", 0, 4), ("4(x2)", 1, 4), ("4(x2),3", 2, 3), ("2,1(x3)", 3, 1), ("2", 5, None)])
def test_slurm_tasks_per_node(spec, node, expected):
    assert tasks_on_node(spec, node) == expected


def test_layout_lists_each_local_rank_device():
    layout = plan_layout(16, 2, 8, "0,1,2,3,4,5,6,7", 8)
    assert (layout.nodes, layout.ranks_per_node) == (2, 8)
    assert layout.devices == tuple(f"cuda:{i}" for i in range(8))
    bound = plan_layout(8, 2, 4, "3", 1)
    assert bound.devices == ("cuda:0",) * 4
    assumed = plan_layout(12, None, None, None, 8)  # no launcher: one rank per GPU
    assert (assumed.nodes, assumed.ranks_per_node) == (2, 8) and assumed.assumption
    with pytest.raises(PlacementError):
        plan_layout(8, 1, 8, None, 4)


def _check(env: dict[str, str], shards: Path) -> subprocess.CompletedProcess:
    """--check of the demo job on the session's digits shards (--check opens the data; a
    fresh clone has no data/digits)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "CROSS_"))}
    index = shards / "index.json"
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--job",
                           str(ROOT / "launch" / "jobs" / "digits.yaml"), "--check",
                           "--set", f"data.shards={index}#train", "--set", f"data.eval_shards={index}#eval"],
                          capture_output=True, text=True, env={**base, **env}, cwd=ROOT, timeout=300)


def test_check_prints_the_layout_of_a_launcher(digits_shards):
    # what a deepspeed launcher with 2 nodes x 3 ranks sets for local rank 1 of node 1
    env = {"RANK": "4", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_SIZE": "3", "CROSS_SIZE": "2",
           "CROSS_RANK": "1"}
    proc = _check(env, digits_shards)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# layout: 6 rank(s) = 2 node(s) x 3 per node" in out
    for local_rank in range(3):
        assert f"local rank {local_rank} -> cpu" in out  # this test machine has no GPU


def test_check_prints_the_layout_of_srun(digits_shards):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    proc = _check(env, digits_shards)
    assert proc.returncode == 0, proc.stderr
    assert "# layout: 4 rank(s) = 2 node(s) x 2 per node" in proc.stdout
