"""Resuming a run from its newest complete checkpoint (automatic on restart): the loading
half of the CheckpointManager (checkpointer.py), which is its only caller."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as torch_dist

from ..dist import env, output
from ..spec.job import JobSpec
from . import checkpoint as ckpt
from .ds_config import BatchSizes
from .registry import Entry, Policy, StateRegistry
from .saver import TRAINER_STATE, rank_file

# Sections whose change is fine on resume (logged field by field); a different model or
# diffusion is refused.
MAY_CHANGE = ("train", "data", "precision", "deepspeed")
_ABSENT = "<absent>"


class ResumeError(RuntimeError):
    """The run dir's checkpoint cannot continue this job (e.g. a different model)."""


@dataclass(frozen=True)
class Restored:
    """What a resume restored: the checkpoint's tag, its step and the world size that saved it."""
    tag: str
    step: int
    saved_world_size: int


def load_newest(registry: StateRegistry, ckpt_dir: Path, job: JobSpec,
                sizes: BatchSizes) -> Restored | None:
    """Load the newest complete checkpoint into every registered piece, if there is one
    (collective)."""
    start = time.perf_counter()
    tag, why = _choose_tag(ckpt_dir)
    output.log0("resume_check", decision=why)
    if tag is None:
        return None
    tag_dir = ckpt_dir / tag
    saved = ckpt.load_plain(tag_dir / TRAINER_STATE)
    meta = saved["meta"]
    check_compatible(job, meta["spec"])
    step, old_world = int(meta["step"]), int(meta["world_size"])
    ranks: list[dict[str, Any]] | None = None
    for entry in registry:
        if entry.policy is Policy.SHARDED:
            entry.obj.load_shards(tag_dir, step, old_world)   # collective
        elif entry.policy is Policy.REPLICATED:
            _load(entry, saved.get(entry.name), tag)
        else:
            ranks = ranks or [ckpt.load_plain(tag_dir / rank_file(r)) for r in range(old_world)]
            states = [r.get(entry.name) for r in ranks]
            _load(entry, None if any(s is None for s in states) else states, tag)
    if old_world != env.world_size():
        _log_batch_change(meta, job, sizes)
    output.log0("resumed", tag=tag, step=step, saved_world_size=old_world,
              world_size=env.world_size(), seconds=round(time.perf_counter() - start, 2))
    return Restored(tag, step, old_world)


def _load(entry: Entry, state: Any, tag: str) -> None:
    if state is None:  # registered after this checkpoint was written: keeps its fresh state
        output.log0("state_not_in_checkpoint", name=entry.name, tag=tag)
        return
    entry.obj.load_state_dict(state)


def _choose_tag(ckpt_dir: Path) -> tuple[str | None, str]:
    # rank 0 decides so that all ranks load the same tag even on a flaky shared FS, and
    # its refusal reaches every rank (a raise on rank 0 alone would hang the others here)
    choice: list[Any] = [None]
    if env.is_main():
        try:
            choice = [(*ckpt.find_resume_tag(ckpt_dir), None)]
        except ckpt.DamagedCheckpoints as err:
            choice = [(None, "", str(err))]
    if env.world_size() > 1:
        torch_dist.broadcast_object_list(choice, src=0)
    tag, why, refused = choice[0]
    if refused:
        raise ResumeError(refused)
    return tag, why


def spec_diff(old: Any, new: Any, path: str = "") -> dict[str, tuple[Any, Any]]:
    """Changed leaves between two spec dumps, by dotted path: {"train.lr": (old, new)}."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            out.update(spec_diff(old.get(key, _ABSENT), new.get(key, _ABSENT), sub))
        return out
    return {} if old == new else {path: (old, new)}


def check_compatible(job: JobSpec, saved: dict[str, Any]) -> None:
    """Refuse a checkpoint of another model or diffusion; log every other changed field."""
    now = job.model_dump(mode="json")
    for section in ("model", "diffusion"):
        diff = spec_diff(saved.get(section), now[section], section)
        if diff:
            fields = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ResumeError(f"{job.output.run_dir} holds a checkpoint of a different {section} "
                              f"({fields}); use another output.run_dir or restore the spec")
    changed: dict[str, dict[str, Any]] = {}
    for section in MAY_CHANGE:
        for key, (old, new) in spec_diff(saved.get(section), now[section], section).items():
            changed[key] = {"old": old, "new": new}
    if changed:
        output.log0("resume_spec_changed", fields=changed)


def _log_batch_change(meta: dict[str, Any], job: JobSpec, sizes: BatchSizes) -> None:
    policy = "global_batch_size fixed" if job.train.global_batch_size else "per-rank batch_size fixed"
    output.log0("resume_world_size_changed", saved_world_size=int(meta["world_size"]),
              world_size=sizes.world_size, policy=policy,
              global_batch=f"{meta['global_batch']} -> {sizes.global_batch}",
              per_rank_batch=f"{meta['per_rank_batch']} -> {sizes.per_rank}")
