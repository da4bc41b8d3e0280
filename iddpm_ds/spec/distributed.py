"""DistributedSpec: how long ranks wait for each other before the job ends with an error."""
from __future__ import annotations

from pydantic import Field

from .base import Spec


class DistributedSpec(Spec):
    """Bounds on waiting for other ranks, so a dead or stopped rank ends the job with one clear
    error instead of a silent hang that burns the allocation."""

    collective_timeout_s: int = Field(600, ge=1, le=86_400)
    """Seconds any collective (all-reduce, barrier, ZeRO gathers, the preemption check, start-up
    rendezvous) may wait for the other ranks; past it the job exits with an error naming this
    field. 600 s: far above any healthy collective (milliseconds to seconds; a first NCCL
    connect on many nodes takes tens of seconds), yet a dead rank costs 10 minutes of the
    allocation, not torch's 30. Raise it if a slow file system makes the checkpoint barrier
    (every rank writes its shard, then waits for the slowest) take longer."""
