"""The run's checkpoints behind two verbs: `save(step, last=...)` and `load()`.

The CheckpointManager owns the state registry (what a checkpoint holds, registry.py), the
checkpoint directory, the save schedule (a step interval and a wall-time interval),
retention and the run meta written with every save. The Trainer only says which step it
is at; whether a save is due is decided here. Writing (complete-or-absent, agreed across
ranks on a failed write) is saver.py's, loading (the compatibility check, world-size
conversion through the registry's pieces) is resume.py's; both are used only from here.

The time interval is decided on rank 0's clock and broadcast, because the ranks' clocks
(start-up skew) differ: a rank that decided alone could enter the collective save on a
step the others train through. The decision is taken at log steps only, where the host
already waits for the device to read the metrics, so it adds no host sync to the other
steps; a time save therefore lands on a multiple of train.log_interval.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as torch_dist

from .. import placement
from ..dist import env
from ..spec.job import JobSpec
from .ds_config import BatchSizes
from .registry import StateRegistry
from .resume import Restored, load_newest
from .saver import save_checkpoint


class SaveSchedule:
    """When a save is due on one rank's view: every `every_steps` steps, and once
    `minutes` of wall time have passed since the last save (checked at steps that are a
    multiple of `check_every`). `clock` returns seconds (monotonic)."""

    def __init__(self, every_steps: int, minutes: Optional[float], check_every: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_steps = every_steps
        self.minutes = minutes
        self.check_every = check_every
        self.clock = clock
        self.since = clock()

    def step_due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def checks_time_at(self, step: int) -> bool:
        """Whether the time interval is asked at this step (identical on every rank)."""
        return self.minutes is not None and step % self.check_every == 0

    def time_elapsed(self) -> bool:
        """This rank's clock: has the time interval passed since the last save?"""
        return self.minutes is not None and self.clock() - self.since >= self.minutes * 60.0

    def restart(self) -> None:
        """A save finished (or the run resumed): the next interval starts now."""
        self.since = self.clock()


def rank0_decides(flag: bool) -> bool:
    """Rank 0's `flag` on every rank (a one-element broadcast; collective)."""
    if env.world_size() == 1:
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=placement.device())
    torch_dist.broadcast(tensor, src=0)
    return bool(tensor.item())  # called at log steps only: the host waits there already


class CheckpointManager:
    """Saves and restores every registered piece of a run (all ranks call both verbs)."""

    def __init__(self, registry: StateRegistry, job: JobSpec, sizes: BatchSizes,
                 before_save: Callable[[], None] = lambda: None) -> None:
        """`before_save` runs on every rank before each save and refuses it by raising
        (the divergence guard: `latest` only ever names finite checkpoints)."""
        self.registry = registry
        self.job = job
        self.sizes = sizes
        self.before_save = before_save
        self.ckpt_dir = Path(job.output.run_dir) / "checkpoints"
        self.keep = job.output.keep_checkpoints
        self.schedule = SaveSchedule(job.train.save_interval, job.train.save_interval_minutes,
                                     job.train.log_interval)
        # facts about the saving run, stored with every checkpoint: resume compares them
        self.meta = {"world_size": env.world_size(), "global_batch": sizes.global_batch,
                     "per_rank_batch": sizes.per_rank, "spec": job.model_dump(mode="json")}
        self.last_saved = -1

    def load(self) -> Optional[Restored]:
        """Restore the newest complete checkpoint into every registered piece, if there is
        one (collective): its tag and step, or None for a fresh run. A checkpoint of
        another model raises ResumeError before anything is written."""
        restored = load_newest(self.registry, self.ckpt_dir, self.job, self.sizes)
        if env.is_main():  # only once the checkpoint was accepted
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if restored is not None:
            self.last_saved = restored.step
        self.schedule.restart()  # start-up and conversion time is no training to lose
        return restored

    def save(self, step: int, last: bool = False) -> bool:
        """Save at `step` if the step or time interval is due, or always with `last` (the
        final or preemption save) unless this step is saved already. Returns whether it
        saved. Every rank calls it at every step with the same `step`."""
        if last:
            due = step != self.last_saved
        else:  # step_due is the same on every rank; the clock only counts on rank 0
            due = self.schedule.step_due(step) or (
                self.schedule.checks_time_at(step) and rank0_decides(self.schedule.time_elapsed()))
        if not due:
            return False
        self.before_save()
        save_checkpoint(self.registry, self.ckpt_dir, step, self.meta, self.keep)
        self.last_saved = step
        self.schedule.restart()
        return True

    @property
    def latest(self) -> Optional[str]:
        """The tag `latest` names, or None (for messages)."""
        path = self.ckpt_dir / "latest"
        return path.read_text().strip() if path.is_file() else None
