"""Which GPU a rank uses, and the job's layout over nodes.

The rules (gpu_index, plan_layout) are pure functions of launcher facts, so every launcher
layout can be tested on a machine without a GPU; device(), layout() and place_on_device()
apply them to this process, with the facts read by iddpm_ds.dist.env (the only module that
reads the environment).

The one rule: a rank uses the visible device numbered by its local rank, except when it
sees a single device, which Slurm's per-task binding (`srun --gpus-per-task=1`,
`--gpu-bind=...`) leaves as device 0 for every task. A rank without a device of its own
is an error at start, naming the fix, instead of a CUDA "invalid device ordinal" (or two
ranks silently sharing one GPU) deep inside DeepSpeed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .dist import env, state

FIX = ("start at most {count} rank(s) per node (deepspeed --num_gpus, torchrun --nproc_per_node, "
       "sbatch --ntasks-per-node) or give each task its own GPU (srun --gpus-per-task=1)")


class PlacementError(ValueError):
    """A rank has no GPU of its own; the message is one line naming the fix."""


def gpu_index(local_rank: int, local_world_size: Optional[int], visible_devices: Optional[str],
              device_count: int) -> Optional[int]:
    """The CUDA device index of local rank `local_rank`, or None on a machine without GPUs.

    local_world_size: ranks on this node, None when the launcher does not say.
    visible_devices: CUDA_VISIBLE_DEVICES as set (None when unset).
    device_count: devices this process sees (torch.cuda.device_count()).
    """
    if device_count <= 0:
        return None
    ranks = local_world_size or local_rank + 1
    seen = _describe(device_count, visible_devices)
    if device_count == 1:
        bound = visible_devices is not None and len(_ids(visible_devices)) == 1
        if ranks > 1 and not bound:  # every rank of the node sees the node's only GPU
            raise PlacementError(f"{ranks} ranks on this node share {seen}: " + FIX.format(count=1))
        return 0  # a per-task binding: each task's own GPU is its device 0
    if ranks > device_count or local_rank >= device_count:
        raise PlacementError(f"local rank {local_rank} of {ranks} on this node has no GPU of its own "
                             f"({seen}): " + FIX.format(count=device_count))
    return local_rank


def _ids(visible_devices: str) -> list[str]:
    return [part.strip() for part in visible_devices.split(",") if part.strip()]


def _describe(device_count: int, visible_devices: Optional[str]) -> str:
    text = f"{device_count} visible GPU" + ("s" if device_count != 1 else "")
    if visible_devices is not None:
        text += f", CUDA_VISIBLE_DEVICES={visible_devices}"
    return text


@dataclass(frozen=True)
class Layout:
    """Where the job's ranks run: nodes x ranks per node, and each local rank's device."""

    world_size: int
    nodes: int
    ranks_per_node: int
    devices: tuple[str, ...]
    """Device of local rank 0, 1, ... on a node (e.g. "cuda:0", "cpu")."""
    assumption: str = ""
    """How ranks were spread when no launcher said (empty under a launcher)."""

    def describe(self) -> list[str]:
        """One line for nodes x ranks, then one per local rank with its device."""
        head = f"{self.world_size} rank(s) = {self.nodes} node(s) x {self.ranks_per_node} per node"
        head += f" ({self.assumption})" if self.assumption else ""
        return [head] + [f"local rank {r} -> {d}" for r, d in enumerate(self.devices)]


def plan_layout(world_size: int, nodes: Optional[int], ranks_per_node: Optional[int],
                visible_devices: Optional[str], device_count: int) -> Layout:
    """The layout every node will use; raises PlacementError when a local rank has no GPU."""
    assumption = ""
    if ranks_per_node is None:
        assumption = ("no launcher: all ranks on this machine" if device_count == 0
                      else "no launcher: one rank per visible GPU")
        ranks_per_node = world_size if device_count == 0 else min(world_size, device_count)
    if nodes is None:
        nodes = math.ceil(world_size / max(1, ranks_per_node))
    devices = []
    for local_rank in range(ranks_per_node):
        index = gpu_index(local_rank, ranks_per_node, visible_devices, device_count)
        devices.append("cpu" if index is None else f"cuda:{index}")
    return Layout(world_size, nodes, ranks_per_node, tuple(devices), assumption)


def has_gpu() -> bool:
    return torch.cuda.is_available()


def fp16_capable() -> bool:
    """Whether this process may train in fp16: a GPU, or the CPU test seam (dist.env)."""
    return has_gpu() or env.cpu_fp16_seam()


def _visible_gpus() -> tuple[Optional[str], int]:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return env.visible_devices(), count


def rank_device(local_rank: int) -> torch.device:
    """The device of node-local rank `local_rank` here; PlacementError if it has no GPU."""
    visible, count = _visible_gpus()
    index = gpu_index(local_rank, env.local_world_size(), visible, count)
    return torch.device("cpu") if index is None else torch.device("cuda", index)


def device() -> torch.device:
    """This rank's device: the one init() chose, or (before init) the one it would choose.
    PlacementError if the rank has no GPU of its own."""
    current = state.current()
    return current.device if current is not None else rank_device(env.local_rank())


def place_on_device(launcher_local_rank: int) -> torch.device:
    """Pick this rank's GPU (PlacementError if it has none) and make DeepSpeed use it:
    DeepSpeed takes LOCAL_RANK as the device index (engine, ZeRO-3 init, NCCL device_id),
    which a per-task GPU binding (each task sees one device, index 0) contradicts."""
    chosen = rank_device(launcher_local_rank)
    if chosen.index is not None:
        torch.cuda.set_device(chosen.index)
        env.set_local_rank(chosen.index)
    return chosen


def layout(world: Optional[int] = None) -> Layout:
    """Nodes, ranks per node and each local rank's device, for --check (PlacementError too)."""
    world = world or env.world_size()
    per_node = env.local_world_size() if env.launched_distributed() else None
    nodes = env.num_nodes() if env.launched_distributed() else None
    visible, count = _visible_gpus()
    return plan_layout(world, nodes, per_node, visible, count)
