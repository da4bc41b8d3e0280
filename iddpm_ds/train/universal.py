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
from typing import Any

from ..dist import env, group, output
from .checkpoint import COMPLETE, atomic_write_bytes

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


def load_at_new_world_size(engine: Any, tag_dir: Path) -> None:
    """Load the checkpoint in `tag_dir`, written at another world size, into `engine`
    (collective: every rank calls it)."""
    seconds = 0.0
    if env.is_main():
        seconds = convert_to_universal(tag_dir)
    group.wait_for_main(f"converting {tag_dir} to a universal checkpoint")
    engine._config.load_universal_checkpoint = True  # for this one load only
    try:
        path, _ = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL, load_optimizer_states=True,
                                         load_lr_scheduler_states=True, load_module_strict=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise ConversionError(f"DeepSpeed could not load the universal checkpoint in {tag_dir}")
    output.log0("universal_checkpoint_loaded", tag_dir=str(tag_dir),
                conversion_seconds=round(seconds, 2))
