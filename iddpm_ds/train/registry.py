"""The registry of checkpointed state: what a checkpoint holds, and on which ranks.

Every part of a run that must survive a restart registers once, under a name, with a
rank policy. Saving, resuming and world-size conversion iterate over the registry; none
of them knows the Trainer. A new piece of checkpointed state is one `register` call.

Policies, and where each lands in a checkpoint's tag directory:

  REPLICATED  identical on every rank (sampler history, counters): rank 0 writes
              `state_dict()` into trainer_state.pt[name]; every rank loads it, at any
              world size.
  PER_RANK    one per rank (data position, RNG streams): every rank writes
              `state_dict()` into rank{r:05d}.pt[name]; `load_state_dict` receives the
              list of EVERY saved rank's state in rank order, so a piece can continue its
              own stream at the same world size and re-split (or reseed) at another.
  SHARDED     partitioned by ZeRO (engine, EMA): the piece writes and reads its own files,
              collectively on all ranks: `save_shards(tag_dir, step)` and
              `load_shards(tag_dir, step, saved_world_size)`.

Entries load in registration order: register what others read on load first (the engine
before the EMA, which starts new rates from the restored weights; the counters before the
RNG streams, which reseed from the step at a new world size).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable


class Policy(enum.Enum):
    REPLICATED = "replicated"
    PER_RANK = "per_rank"
    SHARDED = "sharded"


@runtime_checkable
class Stateful(Protocol):
    """REPLICATED and PER_RANK pieces (PER_RANK: load_state_dict gets a list per saved rank)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


@runtime_checkable
class Sharded(Protocol):
    """SHARDED pieces: their own files in the tag directory; both calls are collective."""

    def save_shards(self, tag_dir: Path, step: int) -> None: ...

    def load_shards(self, tag_dir: Path, step: int, saved_world_size: int) -> None: ...


# Keys of trainer_state.pt that are not registered states: facts about the saving run.
RESERVED = ("meta",)


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    policy: Policy


class StateRegistry:
    """Named checkpointed pieces in registration order."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, obj: Any, policy: Policy) -> None:
        if name in self._entries or name in RESERVED:
            raise ValueError(f"state {name!r} is already registered (or reserved)")
        protocol = Sharded if policy is Policy.SHARDED else Stateful
        if not isinstance(obj, protocol):
            raise TypeError(f"state {name!r} ({type(obj).__name__}) lacks the {policy.value} "
                            f"methods of {protocol.__name__}")
        self._entries[name] = Entry(name, obj, policy)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def __getitem__(self, name: str) -> Any:
        return self._entries[name].obj

    def names(self, policy: Policy | None = None) -> list[str]:
        return [e.name for e in self if policy is None or e.policy is policy]
