"""Resume at a different world size through a DeepSpeed universal checkpoint.

ZeRO shards optimizer state (and under stage 3 the weights) by data-parallel rank, so a
checkpoint written by N ranks cannot be loaded by M != N ranks as is. The first restart
at a new world size converts it once with `deepspeed.checkpoint.ds_to_universal` (rank 0
converts, the others wait for it up to distributed.long_wait_timeout_s), into `<tag>/universal/`, then loads it with
DeepSpeed's `load_universal` switched on for that one load. Later saves are ordinary
checkpoints at the new world size. EMA, sampler history, step and data position are
ours and world-size independent already (full tensors / global state).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import dist
from .checkpoint import COMPLETE, atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

UNIVERSAL = "universal"


class ConversionError(RuntimeError):
    """ds_to_universal failed; its output is in the message."""


def convert_to_universal(tag_dir: Path) -> float:
    """Convert one checkpoint (rank 0 only); returns seconds. Idempotent and crash-safe:
    the output appears under its final name only once complete."""
    out = tag_dir / UNIVERSAL
    if (out / COMPLETE).is_file():
        return 0.0
    start = time.perf_counter()
    tmp = tag_dir / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(tag_dir), "--output_folder", str(tmp), "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConversionError(f"ds_to_universal failed on {tag_dir}:\n{proc.stderr[-3000:]}")
    atomic_write_bytes(tmp / COMPLETE, b"{}")
    tmp.rename(out)
    return time.perf_counter() - start


def load_at_new_world_size(trainer: "Trainer", tag: str, state: dict[str, Any]) -> None:
    """Load `tag`, written at another world size, into this engine."""
    tag_dir = trainer.ckpt_dir / tag
    seconds = 0.0
    if dist.is_main():
        seconds = convert_to_universal(tag_dir)
    dist.wait_for_main(f"converting {tag_dir} to a universal checkpoint")
    engine = trainer.engine
    engine._config.load_universal_checkpoint = True  # for this one load only
    try:
        path, _ = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL, load_optimizer_states=True,
                                         load_lr_scheduler_states=True, load_module_strict=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise ConversionError(f"DeepSpeed could not load the universal checkpoint in {tag_dir}")
    _log_batch_change(trainer, state, seconds)


def _log_batch_change(trainer: "Trainer", state: dict[str, Any], seconds: float) -> None:
    plan, train = trainer.plan, trainer.job.train
    policy = "global_batch_size fixed" if train.global_batch_size else "per-rank batch_size fixed"
    dist.log0("resume_world_size_changed", saved_world_size=int(state["world_size"]),
              world_size=plan.world_size, policy=policy,
              global_batch=f"{state['global_batch']} -> {plan.global_batch}",
              per_rank_batch=f"{state['per_rank_batch']} -> {plan.per_rank}",
              conversion_seconds=round(seconds, 2))
