"""Preemption: a signal on any rank makes every rank stop after the same step.

SIGUSR1 (Slurm's `--signal`) and SIGTERM (scancel, node drain) only set a flag; the loop
all-reduces the flag every `check_interval` steps (a 1-element MAX all-reduce), so all
ranks agree on the step at which to checkpoint and exit with PREEMPTED_EXIT, which the
Slurm scripts requeue on. The flag travels on a CPU (gloo) side group: reading it never
waits for the GPU stream, so the check adds no device sync to the step. Slurm's SIGTERM
reaches the loader workers too; they ignore it (data/worker_signals.py).
"""
from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as torch_dist

from .. import exits
from ..dist import env, group, output

PREEMPTED_EXIT = exits.PREEMPTED


class PreemptionWatch:
    """Installs the signal handlers and answers `should_stop(step)` identically on all ranks."""

    def __init__(self, check_interval: int, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.check_interval = check_interval
        self.received: int | None = None
        self.group = None
        if env.world_size() > 1 and torch_dist.get_backend() != "gloo":
            self.group = torch_dist.new_group(  # collective: all ranks build it
                backend="gloo", timeout=group.collective_timeout())
        self._previous: dict[int, Any] = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            output.log("signal_received", signal=signal.Signals(signum).name)
        self.received = signum

    def should_stop(self, step: int, now: bool = False) -> bool:
        """Collective at every `check_interval`-th step, and wherever `now` (the same on every
        rank: a step followed by a grid or an eval, so a pending stop skips them)."""
        if step % self.check_interval and not now:
            return False
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)  # CPU
        if env.world_size() > 1:
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
