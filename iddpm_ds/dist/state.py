"""The one piece of distributed state: what init() learned and made, as one object.

Why a module-level slot and not an object passed around: the readers are everywhere (a
data worker's log line, the metrics all-reduce, the engine builder) and many run before or
without a Trainer, so threading a handle through them would touch every signature for a
value that is per process anyway; torch.distributed keeps its default group the same way.
What keeps it honest: the state is one frozen dataclass, replaced whole, and `SLOT.state`
is assigned in two places only, group.init() and group.shutdown() (tests may monkeypatch
it). Nothing else in the package keeps distributed state, and no function rebinds a module
global.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..spec.distributed import DistributedSpec


@dataclass(frozen=True)
class DistState:
    """What init() fixed for the life of the process group."""

    spec: DistributedSpec
    """The job's timeouts, for the waits and for the failure lines that name them."""
    launcher_local_rank: int
    """LOCAL_RANK as the launcher set it; init then points LOCAL_RANK at the device index,
    which DeepSpeed reads, so the node-local index must be remembered here."""
    device: torch.device
    """This rank's device, chosen once (placement.rank_device)."""
    long_wait_group: Optional[Any] = None
    """gloo group with the long timeout, for waits on rank 0's solo work; None with one rank."""


class Slot:
    """Holds the current DistState, or None outside init() ... shutdown()."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: Optional[DistState] = None


SLOT = Slot()


def current() -> Optional[DistState]:
    """The state init() made, or None (before init, after shutdown, or a group made elsewhere)."""
    return SLOT.state


def job_spec() -> DistributedSpec:
    """The job's distributed spec once init() ran, else the defaults."""
    state = SLOT.state
    return state.spec if state is not None else DistributedSpec()
