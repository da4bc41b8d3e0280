"""Epoch planning and the data position: who reads which samples, and what was consumed.

Everything here is a pure function of integers, so every rank computes the same plan
without communication, and a saved position (a few integers per rank) can be turned
back into the exact set of samples consumed.

Positions: an epoch orders the shards (seeded shuffle, identical on every rank) and
concatenates their samples; sample number p of that sequence has *position* p. A
*pool* is the set of positions still to be served in the epoch, kept as sorted disjoint
ranges `int64 [R, 2]` of [start, stop). A fresh epoch's pool is [[0, total]].

Plan of one pool for `world_size` ranks x `workers` loader workers, batch size B:
- n = len(pool) // (world_size * B) batches per rank; the last len(pool) mod
  (world_size * B) positions of the pool are not served this epoch (drop_last);
- rank r serves the r-th run of n * B positions of the pool;
- the rank's in-epoch batch i comes from worker (worker_offset + i) % workers (the
  DataLoader's round robin); worker w serves a contiguous run of its rank's positions,
  reordered by a seeded shuffle buffer (`buffer_order`).
After a rank yielded k batches, its consumed set is therefore known exactly: for each
worker, the first (its batch count among the first k) * B entries of that worker's order.

Resuming: with the saved layout (`same_plan`), each rank keeps the saved segment's plan
and each worker skips its first (its batch count among the first k) batches, so the
stream goes on exactly as if it had never stopped. With another layout the consumed sets
of all saved ranks are removed from the pool (`replay`) and the rest is planned afresh as
a new segment (with its own shuffle seeds).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

STATE_VERSION = 1


def full_pool(total: int) -> np.ndarray:
    return np.array([[0, total]], dtype=np.int64)


def pool_size(pool: np.ndarray) -> int:
    return int((pool[:, 1] - pool[:, 0]).sum())


def take(pool: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The flat slice [start, stop) of a pool, as ranges."""
    lens = pool[:, 1] - pool[:, 0]
    begin = np.cumsum(lens) - lens  # flat index of each range's start
    lo = np.clip(start - begin, 0, lens)
    hi = np.clip(stop - begin, 0, lens)
    keep = hi > lo
    return np.stack([pool[keep, 0] + lo[keep], pool[keep, 0] + hi[keep]], axis=1).astype(np.int64)


def flat_to_positions(pool: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Positions of flat indices into a pool."""
    ends = np.cumsum(pool[:, 1] - pool[:, 0])
    k = np.searchsorted(ends, flat, side="right")
    return pool[k, 0] + flat - (ends[k] - (pool[k, 1] - pool[k, 0]))


def to_ranges(positions: np.ndarray) -> np.ndarray:
    """Sorted distinct positions -> ranges."""
    if positions.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = positions[np.concatenate([[0], breaks])]
    stops = positions[np.concatenate([breaks - 1, [positions.size - 1]])] + 1
    return np.stack([starts, stops], axis=1).astype(np.int64)


def subtract(pool: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """pool minus removed; every removed range lies inside one pool range."""
    removed = removed[np.argsort(removed[:, 0], kind="stable")] if len(removed) else removed
    out, i = [], 0
    for start, stop in pool.tolist():
        cur = start
        while i < len(removed) and removed[i, 0] < stop:
            if removed[i, 0] > cur:
                out.append((cur, int(removed[i, 0])))
            cur = max(cur, int(removed[i, 1]))
            i += 1
        if cur < stop:
            out.append((cur, stop))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k % (1 << 63) for k in key])


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's shard order: a seeded permutation, the same on every rank."""
    if not shuffle:
        return np.arange(num_shards)
    return _rng(seed, epoch, 0).permutation(num_shards)


def buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a shuffle buffer of `buffer` slots fed 0..n-1 in order.

    Output t is always < buffer + t, so a reader that reads ahead while it waits holds
    at most `buffer` + 1 samples.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    slots = list(range(min(buffer, n)))
    nxt = len(slots)
    out = []
    for u in rng.random(n).tolist():
        j = int(u * len(slots))
        out.append(slots[j])
        if nxt < n:
            slots[j] = nxt
            nxt += 1
        else:
            slots[j] = slots[-1]
            slots.pop()
    return np.array(out, dtype=np.int64)


@dataclass(frozen=True)
class Layout:
    """How one stream lifetime split an epoch: the integers that determine its plan."""

    world_size: int
    workers: int
    batch_size: int
    shuffle_buffer: int
    worker_offset: int = 0
    """Loader worker that served the epoch's first batch (the round robin runs across epochs)."""
    segment: int = 0
    """Number of earlier stream lifetimes (resumes) within this epoch; seeds the shuffles."""


def same_plan(segment: dict, layout: Layout) -> bool:
    """Whether a saved segment split its pool exactly as `layout` would (offset and segment
    number aside): then a resume can continue that plan instead of re-splitting the rest."""
    keys = ("world_size", "workers", "batch_size", "shuffle_buffer")
    return all(segment[k] == getattr(layout, k) for k in keys)


def worker_batches(batches: int, workers: int, offset: int, done: int | None = None) -> list[int]:
    """Per worker: how many of the rank's first `done` (default all) batches it serves."""
    done = batches if done is None else done
    first = [(w - offset) % workers for w in range(workers)]
    return [max(0, (done - f + workers - 1) // workers) for f in first]


class RankPlan:
    """One rank's share of one pool under one layout."""

    def __init__(self, pool: np.ndarray, layout: Layout, rank: int, seed: int, epoch: int):
        self.layout, self.rank, self.seed, self.epoch = layout, rank, seed, epoch
        bsz = layout.batch_size
        self.batches = pool_size(pool) // (layout.world_size * bsz)
        self.part = take(pool, rank * self.batches * bsz, (rank + 1) * self.batches * bsz)
        self.counts = worker_batches(self.batches, layout.workers, layout.worker_offset)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]) * bsz

    def worker_ranges(self, worker: int) -> np.ndarray:
        return take(self.part, int(self.starts[worker]), int(self.starts[worker + 1]))

    def worker_order(self, worker: int) -> np.ndarray:
        """Serving order of the worker's positions, as flat indices into worker_ranges."""
        lay = self.layout
        rng = _rng(self.seed, self.epoch, lay.segment + 1, self.rank, worker, 1)
        return buffer_order(self.counts[worker] * lay.batch_size, lay.shuffle_buffer, rng)

    def consumed(self, batches_done: int) -> np.ndarray:
        """Ranges of positions this rank served in its first `batches_done` batches."""
        lay = self.layout
        done = worker_batches(self.batches, lay.workers, lay.worker_offset, batches_done)
        taken = [flat_to_positions(self.worker_ranges(w), self.worker_order(w)[:k * lay.batch_size])
                 for w, k in enumerate(done) if k]
        if not taken:
            return np.zeros((0, 2), dtype=np.int64)
        return to_ranges(np.sort(np.concatenate(taken)))


def shard_pieces(ranges: np.ndarray, order: np.ndarray,
                 counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """Position ranges -> (shard, first sample, stop sample) reads, in position order."""
    ordered = np.asarray(counts, dtype=np.int64)[order]
    cum = np.concatenate([[0], np.cumsum(ordered)])
    pieces = []
    for start, stop in ranges.tolist():
        k = int(np.searchsorted(cum, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(cum[k + 1]))
            if end > start:
                pieces.append((int(order[k]), start - int(cum[k]), end - int(cum[k])))
            start, k = end, k + 1
    return pieces


# ----------------------------------------------------------------------------------------
# Saved state: per rank {epoch, history of earlier segments, current segment, batches done}


def make_state(fingerprint: str, seed: int, epoch: int, history: list[dict], layout: Layout,
               rank: int, batches_done: int) -> dict[str, Any]:
    return {"version": STATE_VERSION, "fingerprint": fingerprint, "seed": seed, "epoch": epoch,
            "history": history, "layout": asdict(layout), "rank": rank,
            "batches_done": batches_done}


def merge_states(states: Sequence[dict], fingerprint: str, seed: int) -> tuple[int, list[dict]]:
    """All ranks' saved states -> (epoch, history including the saved segment).

    Checks that the states come from one run on the same shards and seed, one per rank.
    """
    if not states:
        raise ValueError("load_state_dict got no states")
    first = states[0]
    if any(s.get("version") != STATE_VERSION for s in states):
        raise ValueError(f"data position version {first.get('version')} is not {STATE_VERSION}")
    if first["fingerprint"] != fingerprint or first["seed"] != seed:
        raise ValueError("the saved data position belongs to other shards or another seed; "
                         "start a fresh data position instead of loading it")
    world = first["layout"]["world_size"]
    ranks = sorted(s["rank"] for s in states)
    if ranks != list(range(world)):
        raise ValueError(f"need the data state of each of the {world} saving ranks once, "
                         f"got ranks {ranks}")
    same = ("epoch", "history", "layout", "fingerprint", "seed")
    if any(s[k] != first[k] for s in states for k in same):
        raise ValueError("the ranks' data states disagree (saved at different steps?)")
    by_rank = {s["rank"]: s["batches_done"] for s in states}
    segment = {**first["layout"], "batches_done": [by_rank[r] for r in range(world)]}
    return first["epoch"], [*first["history"], segment]


def replay(total: int, history: Sequence[dict], seed: int, epoch: int) -> np.ndarray:
    """The pool left in `epoch` after the saved segments consumed their batches."""
    pool = full_pool(total)
    for segment in history:
        fields = {k: v for k, v in segment.items() if k != "batches_done"}
        layout = Layout(**fields)
        consumed = [RankPlan(pool, layout, r, seed, epoch).consumed(done)
                    for r, done in enumerate(segment["batches_done"])]
        pool = subtract(pool, np.concatenate(consumed) if consumed else np.zeros((0, 2), np.int64))
    return pool
