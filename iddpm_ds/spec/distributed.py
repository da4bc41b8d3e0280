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
    long_wait_timeout_s: int = Field(3600, ge=1, le=7 * 86_400)
    """Seconds the other ranks wait while rank 0 alone does long work: writing a checkpoint's
    full-weight exports, drawing a sample grid, converting a checkpoint for a new world size.
    Such work can outlast collective_timeout_s on big models or slow disks, so it has its own
    bound; an hour still ends a job whose rank 0 hangs there."""
