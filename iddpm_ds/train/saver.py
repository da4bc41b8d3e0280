"""Writing one complete checkpoint of every registered piece (all ranks take part)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from .. import dist
from . import checkpoint as ckpt
from .registry import Policy, StateRegistry

TRAINER_STATE = "trainer_state.pt"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def save_checkpoint(registry: StateRegistry, ckpt_dir: Path, step: int, meta: dict[str, Any],
                    keep: int) -> None:
    """Every registered piece by its policy, plus `meta` (facts about this run: world size,
    batch sizes, spec) in trainer_state.pt; `latest` moves only after every rank's files
    are on disk and complete.json is written."""
    start = time.perf_counter()
    tag = ckpt.tag_for(step)
    tag_dir = ckpt_dir / tag
    if dist.is_main() and tag_dir.is_dir() and not ckpt.is_complete(tag_dir):
        # a killed save of this step, maybe at another world size: its stray shards
        # (zero_pp_rank_N of a rank that no longer exists) would poison conversion
        shutil.rmtree(tag_dir)
    dist.wait_for_main("clearing a partial checkpoint")
    tag_dir.mkdir(parents=True, exist_ok=True)
    replicated: dict[str, Any] = {"meta": {**meta, "step": step}}
    mine: dict[str, Any] = {}
    for entry in registry:
        if entry.policy is Policy.SHARDED:
            entry.obj.save_shards(tag_dir, step)      # collective under ZeRO
        elif entry.policy is Policy.REPLICATED:
            if dist.is_main():
                replicated[entry.name] = entry.obj.state_dict()
        else:
            mine[entry.name] = entry.obj.state_dict()
    if dist.is_main():
        ckpt.atomic_torch_save(replicated, tag_dir / TRAINER_STATE)
    ckpt.atomic_torch_save(mine, tag_dir / rank_file(dist.rank()))
    dist.wait_for_main("writing the checkpoint")  # every rank's files are on disk before it counts
    if dist.is_main():
        mark = {"step": step, "world_size": dist.world_size(), "time": time.time()}
        ckpt.mark_complete(ckpt_dir, tag, mark, keep)
    dist.wait_for_main("pruning old checkpoints")
    dist.log0("checkpoint_saved", step=step, tag=tag, seconds=round(time.perf_counter() - start, 2))
