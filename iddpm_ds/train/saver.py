"""Writing one complete checkpoint of every registered piece (all ranks take part): the
writing half of the CheckpointManager (checkpointer.py), which is its only caller.

A write that fails on any rank (disk full, quota, I/O error) is agreed by all ranks in
one collective after every piece's writes: each rank keeps its first OSError instead of
raising it (a rank that raised would skip the collectives of the later pieces and of
DeepSpeed's own save, and leave the others waiting until the collective timeout). Then
rank 0 removes the failed tag directory, `latest` stays where it was, and every rank
raises CheckpointWriteError with the same message (exit CHECKPOINT_WRITE_FAILED_EXIT).
"""
from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .. import exits
from ..dist import env, group, output
from . import checkpoint as ckpt
from .registry import Policy, StateRegistry

TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_WRITE_FAILED_EXIT = exits.CHECKPOINT_WRITE_FAILED


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written on some rank; the message names the path and
    the errno. Raised on every rank alike, after the failed tag directory is removed."""


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
    if env.is_main() and tag_dir.is_dir() and not ckpt.is_complete(tag_dir):
        # a killed save of this step, maybe at another world size: its stray shards
        # (zero_pp_rank_N of a rank that no longer exists) would poison conversion
        shutil.rmtree(tag_dir)
    group.wait_for_main("clearing a partial checkpoint")
    mine = _write_pieces(registry, tag_dir, step, meta)
    # the agreement: every rank's files are on disk (or one failed) before it counts
    failures = group.gather_after_long_work(_describe(mine), "writing the checkpoint")
    if not any(failures):
        marked = None
        if env.is_main():
            mark = {"step": step, "world_size": env.world_size(), "time": time.time()}
            marked = _describe(_attempt(lambda: ckpt.mark_complete(ckpt_dir, tag, mark, keep)))
        failures = group.gather_after_long_work(marked, "marking the checkpoint complete")
    if any(failures):
        if env.is_main():
            shutil.rmtree(tag_dir, ignore_errors=True)  # no partial directory is left
        group.wait_for_main("removing the failed checkpoint")
        raise CheckpointWriteError(_message(tag, ckpt_dir, failures))
    output.log0("checkpoint_saved", step=step, tag=tag, seconds=round(time.perf_counter() - start, 2))


def _write_pieces(registry: StateRegistry, tag_dir: Path, step: int,
                  meta: dict[str, Any]) -> OSError | None:
    """This rank's files; returns its first failed write. Later pieces still run after a
    failure: SHARDED ones hold collectives (and raise OSError only after them)."""
    failed = _attempt(lambda: tag_dir.mkdir(parents=True, exist_ok=True))
    replicated: dict[str, Any] = {"meta": {**meta, "step": step}}
    mine: dict[str, Any] = {}
    for entry in registry:
        if entry.policy is Policy.SHARDED:
            shards = _attempt(lambda: entry.obj.save_shards(tag_dir, step))  # collective: always
            failed = failed or shards
        elif entry.policy is Policy.REPLICATED:
            if env.is_main():
                replicated[entry.name] = entry.obj.state_dict()
        else:
            mine[entry.name] = entry.obj.state_dict()
    if env.is_main():
        failed = failed or _attempt(lambda: ckpt.atomic_torch_save(replicated, tag_dir / TRAINER_STATE))
    return failed or _attempt(lambda: ckpt.atomic_torch_save(mine, tag_dir / rank_file(env.rank())))


def _attempt(write: Callable[[], Any]) -> OSError | None:
    try:
        write()
    except OSError as err:
        return err
    return None


def _describe(err: OSError | None) -> str | None:
    """'rank 1: /runs/x/checkpoints/step0000008/rank00001.pt: errno 28 ENOSPC (No space left
    on device)' -- one rank's failure, for the agreement and the error line."""
    if err is None:
        return None
    code = f"errno {err.errno} {errno.errorcode.get(err.errno, '')}".rstrip() if err.errno else "no errno"
    return f"rank {env.rank()}: {err.filename or '?'}: {code} ({err.strerror or err})"


def _message(tag: str, ckpt_dir: Path, failures: list[str | None]) -> str:
    failed = [f for f in failures if f]
    more = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
    latest = ckpt_dir / "latest"
    kept = f"latest still names {latest.read_text().strip()}" if latest.is_file() else "no checkpoint yet"
    return (f"checkpoint {tag} not written: {failed[0]}{more}; removed it, {kept}; "
            f"free space and rerun the same command to resume")
