"""Streaming readers: the endless training stream and the finite evaluation stream.

The main process plans nothing per step: each loader worker computes its own share of
each epoch from the integers in `_Config` (see position.py), reads its shard pieces
front to back, shuffles through a bounded buffer and yields whole batches. The DataLoader
takes batches from the workers in round robin, which is exactly the order the plan
assigns, so the main process only checks and counts.
"""
from __future__ import annotations

import math
import multiprocessing as mp
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import placement
from ..dist import output
from ..spec.data import DataSpec
from .errors import AllCorruptError, DataError
from .http import HttpOptions
from .position import (Layout, RankPlan, flat_to_positions, full_pool, make_state,
                       merge_states, pool_size, replay, same_plan, shard_order, shard_pieces,
                       to_ranges, worker_batches, _rng)
from .preprocess import to_model_range
from .samples import (BatchFiller, CorruptSample, CorruptWindow, RawSample, decode_sample,
                      read_pieces)
from .sources import ShardList, resolve
from .worker_signals import shield_from_outside_sigterm

PROBE_SAMPLES_PER_SHARD = 16
PROBE_SHARDS = 64
# Loader workers are forked where the OS allows, whatever the start method of this
# process: a process started by `spawn` would otherwise spawn its workers too and pay a
# full interpreter + torch import per worker (seconds) at every loader start. Workers
# never touch CUDA, so forking after CUDA/NCCL initialisation is safe (torch's default).
WORKER_START = "fork" if "fork" in mp.get_all_start_methods() else None


@dataclass(frozen=True)
class _Config:
    """Everything a loader worker needs (pickled into each worker)."""

    shards: ShardList
    image_size: int
    class_cond: bool
    batch_size: int
    rank: int
    world_size: int
    workers: int
    seed: int
    shuffle_shards: bool
    shuffle_buffer: int
    random_flip: bool
    fallback: tuple[np.ndarray, int]
    num_classes: int | None = None

    def layout(self, worker_offset: int, segment: int) -> Layout:
        return Layout(self.world_size, self.workers, self.batch_size, self.shuffle_buffer,
                      worker_offset, segment)


def _private_generator(seed: int) -> torch.Generator:
    """Each DataLoader iterator draws a base seed from its generator; with the default
    (the global RNG) starting an epoch would shift the training noise stream, and a
    resumed run would diverge from one that never stopped."""
    return torch.Generator().manual_seed(seed)


def _loader(dataset: IterableDataset, workers: int, prefetch_factor: int, seed: int) -> DataLoader:
    """The one way both streams start their workers: forked (WORKER_START), shielded from
    an outside SIGTERM (worker_signals.py), whole batches as the workers made them."""
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      prefetch_factor=prefetch_factor if workers else None,
                      pin_memory=placement.has_gpu(), collate_fn=_as_is,
                      multiprocessing_context=WORKER_START if workers else None,
                      worker_init_fn=shield_from_outside_sigterm,
                      generator=_private_generator(seed))


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _pack(images: np.ndarray, labels: np.ndarray, meta: tuple, valid: np.ndarray) -> tuple:
    """A worker's batch: only x travels as a (shared-memory) tensor; the small parts are
    pickled, which is cheaper than one shared-memory segment each."""
    return to_model_range(torch.from_numpy(images)), labels, meta, valid  # x [N, 3, H, W]


def _as_is(batch: Any) -> Any:
    """collate_fn: batches arrive ready-made (the default would turn numpy into tensors)."""
    return batch


@dataclass(frozen=True)
class _Start:
    """Where a stream lifetime starts: an epoch segment's plan and how far this rank got."""

    epoch: int
    pool: np.ndarray
    segment: int
    offset: int
    """Plan worker serving the segment's first batch."""
    done: int
    """Batches of the segment this rank yielded in an earlier lifetime (exact resume)."""


class _TrainDataset(IterableDataset):
    """Endless batches of one rank; each worker serves its planned share of each epoch.

    Loader worker w plays plan worker (w + start.offset + start.done) % K: the DataLoader's
    round robin begins at loader worker 0, and the segment's batch `done` (the next one
    the rank yields) belongs to plan worker (offset + done) % K.
    """

    def __init__(self, cfg: _Config, start: _Start):
        super().__init__()
        self.cfg, self.start = cfg, start

    def __iter__(self) -> Iterator[tuple]:
        cfg, at = self.cfg, self.start
        role = (_worker_id() + at.offset + at.done) % cfg.workers
        filler = BatchFiller(cfg.image_size, cfg.class_cond, cfg.fallback, cfg.num_classes)
        epoch, pool, segment, offset, done = at.epoch, at.pool, at.segment, at.offset, at.done
        while True:
            plan = RankPlan(pool, cfg.layout(offset, segment), cfg.rank, cfg.seed, epoch)
            skip = worker_batches(plan.batches, cfg.workers, offset, done)[role]
            yield from self._serve(plan, role, filler, skip)
            offset = (offset + plan.batches) % cfg.workers
            epoch, pool, segment, done = epoch + 1, full_pool(cfg.shards.total), 0, 0

    def _serve(self, plan: RankPlan, worker: int, filler: BatchFiller,
               skip: int) -> Iterator[tuple]:
        """The worker's batches of one plan, from its batch `skip` on; the samples of the
        skipped batches are neither read nor decoded (only the index arithmetic replays)."""
        cfg, bsz = self.cfg, self.cfg.batch_size
        order = shard_order(len(cfg.shards.urls), cfg.seed, plan.epoch, cfg.shuffle_shards)
        ranges, serve_order = plan.worker_ranges(worker), plan.worker_order(worker)
        unread = np.sort(serve_order[skip * bsz:])  # flat indices still to serve, in read order
        pieces = shard_pieces(to_ranges(flat_to_positions(ranges, unread)), order,
                              cfg.shards.counts)
        raws = read_pieces(pieces, cfg.shards.urls, cfg.shards.names, http=cfg.shards.http)
        ahead = _Lookahead(raws, unread)
        if skip:
            filler.earlier = self._skipped(ranges, serve_order[:skip * bsz][::-1], order)
        flips = _rng(cfg.seed, plan.epoch, plan.layout.segment + 1, cfg.rank, worker, 2).random(
            serve_order.size) < 0.5
        first = (worker - plan.layout.worker_offset) % cfg.workers
        for j in range(skip, plan.counts[worker]):
            picked = [ahead.get(t) for t in serve_order[j * bsz:(j + 1) * bsz].tolist()]
            images = np.empty((bsz, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
            labels = np.zeros(bsz, dtype=np.int64)
            valid = np.zeros(bsz, dtype=bool)
            corrupt = filler.fill(picked, images, labels, valid)
            if cfg.random_flip:
                flip = flips[j * bsz:(j + 1) * bsz]
                images[flip] = images[flip, :, ::-1]
            yield _pack(images, labels, (plan.epoch, first + j * cfg.workers, corrupt), valid)

    def _skipped(self, ranges: np.ndarray, flats: np.ndarray,
                 order: np.ndarray) -> Iterator[RawSample]:
        """The given samples one by one (read lazily, for BatchFiller.earlier)."""
        cfg = self.cfg
        for position in flat_to_positions(ranges, flats).tolist():
            piece = shard_pieces(np.array([[position, position + 1]]), order, cfg.shards.counts)
            yield from read_pieces(piece, cfg.shards.urls, cfg.shards.names, log=False,
                                   http=cfg.shards.http)


class _Lookahead:
    """Samples read in order, handed out in any order; holds only those read ahead."""

    def __init__(self, raws: Iterator[RawSample], ids: np.ndarray):
        self.raws, self.ids, self.held, self.read = raws, ids.tolist(), {}, 0

    def get(self, wanted: int) -> RawSample:
        while wanted not in self.held:
            self.held[self.ids[self.read]] = next(self.raws)
            self.read += 1
        return self.held.pop(wanted)


class TrainStream:
    """Endless training batches of one rank; see `build_train_stream`."""

    def __init__(self, cfg: _Config, spec: DataSpec):
        self._cfg, self._spec = cfg, spec
        self.batches_per_epoch = cfg.shards.total // (cfg.world_size * cfg.batch_size)
        """Batches each rank yields in a full epoch (identical on every rank)."""
        self.class_names = cfg.shards.class_names
        self._epoch, self._history, self._pool = 0, [], full_pool(cfg.shards.total)
        self._done, self._offset, self._corrupt, self._samples = 0, 0, 0, 0
        self._epoch_batches = self.batches_per_epoch
        self._loader_iter: Any = None
        self._gen: Iterator | None = None
        self._window = CorruptWindow(spec.max_corrupt_fraction, spec.corrupt_window,
                                     cfg.batch_size, cfg.rank)

    @property
    def batches_left_in_epoch(self) -> int:
        return self._epoch_batches - self._done

    def load_state_dict(self, rank_states: Sequence[dict]) -> None:
        """Resume from the data states of ALL ranks of a checkpoint (any world size).

        Saved with this stream's layout (world size, batch size, loader workers, shuffle
        buffer): every rank continues the saved plan, so the batches are exactly those
        the saving run would have yielded next. Otherwise the samples those ranks had
        consumed in the saved epoch are removed from it and the rest of the epoch is
        re-split over this run's ranks. Call before iterating.
        """
        if self._gen is not None:
            raise RuntimeError("load_state_dict must be called before iterating the stream")
        cfg = self._cfg
        epoch, history = merge_states(rank_states, self._fingerprint(), cfg.seed)
        saved, exact = history[-1], same_plan(history[-1], cfg.layout(0, 0))
        if exact:  # continue the saved segment where this rank stopped
            history = history[:-1]
            self._offset, self._done = saved["worker_offset"], saved["batches_done"][cfg.rank]
        else:  # a new segment over what is left
            self._offset, self._done = 0, 0
        self._epoch, self._history = epoch, history
        self._pool = replay(cfg.shards.total, history, cfg.seed, epoch)
        self._epoch_batches = pool_size(self._pool) // (cfg.world_size * cfg.batch_size)
        output.log0("data_resume", epoch=epoch, segments=len(history), exact=exact,
                    batches_left=self.batches_left_in_epoch,
                    samples_left=self.batches_left_in_epoch * cfg.batch_size * cfg.world_size)
        self._skip_empty_epoch()

    def state_dict(self) -> dict:
        """This rank's position after the last batch it yielded (plain JSON types)."""
        cfg = self._cfg
        layout = cfg.layout(self._offset, len(self._history))
        return make_state(self._fingerprint(), cfg.seed, self._epoch, list(self._history),
                          layout, cfg.rank, self._done)

    def _fingerprint(self) -> str:
        """Shard list + shard shuffle: what maps saved positions to the same samples."""
        return f"{self._cfg.shards.fingerprint()}-{'s' if self._cfg.shuffle_shards else 'o'}"

    def stats(self) -> dict:
        return {"epoch": self._epoch, "batches_in_epoch": self._done,
                "batches_per_epoch": self.batches_per_epoch, "samples": self._samples,
                "corrupt_samples": self._corrupt}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        if self._gen is None:
            self._gen = self._batches()
        return self._gen

    def _batches(self) -> Iterator[tuple[torch.Tensor, dict]]:
        cfg, spec = self._cfg, self._spec
        start = _Start(self._epoch, self._pool, len(self._history), self._offset, self._done)
        dataset = _TrainDataset(cfg, start)
        loader = _loader(dataset, spec.num_workers, spec.prefetch_factor, cfg.seed)
        self._loader_iter = iter(loader)
        for x, y, meta, _ in self._loader_iter:
            self._advance(meta, x.shape[0])
            yield x, ({"y": torch.from_numpy(y)} if cfg.class_cond else {})

    def _advance(self, meta: tuple[int, int, tuple[tuple[str, int], ...]], size: int) -> None:
        epoch, index, corrupt = meta
        if (epoch, index) != (self._epoch, self._done):  # would break the data position
            raise RuntimeError(f"data batches out of order: got epoch {epoch} batch {index}, "
                               f"expected epoch {self._epoch} batch {self._done}")
        self._done += 1
        self._corrupt += sum(n for _, n in corrupt)
        self._samples += size
        self._window.add(corrupt)  # raises TooManyCorruptError (here, not in a worker)
        if self._done == self._epoch_batches:
            self._end_epoch()

    def _end_epoch(self) -> None:
        self._offset = (self._offset + self._epoch_batches) % self._cfg.workers
        self._epoch, self._history, self._done = self._epoch + 1, [], 0
        self._pool = full_pool(self._cfg.shards.total)
        self._epoch_batches = self.batches_per_epoch

    def _skip_empty_epoch(self) -> None:
        """A resumed epoch with less than one global batch left is over (drop_last)."""
        if self._done >= self._epoch_batches:
            self._end_epoch()

    def close(self) -> None:
        """Stop the loader workers."""
        if self._loader_iter is not None and hasattr(self._loader_iter, "_shutdown_workers"):
            self._loader_iter._shutdown_workers()
        self._loader_iter = None
        if self._gen is not None:
            self._gen.close()


def _probe(shards: ShardList, image_size: int, class_cond: bool,
           num_classes: int | None) -> tuple[np.ndarray, int]:
    """First usable sample of the source; raises AllCorruptError when none is found.

    Tries up to PROBE_SAMPLES_PER_SHARD samples in each of the first PROBE_SHARDS
    non-empty shards, so a healthy source costs one decode.
    """
    reasons = []
    tried = [i for i, n in enumerate(shards.counts) if n > 0][:PROBE_SHARDS]
    for shard in tried:
        pieces = [(shard, 0, min(shards.counts[shard], PROBE_SAMPLES_PER_SHARD))]
        for raw in read_pieces(pieces, shards.urls, shards.names, http=shards.http):
            try:
                if raw.fields is None:
                    raise CorruptSample(raw.problem)
                return decode_sample(raw.fields, image_size, class_cond, num_classes)
            except CorruptSample as err:
                reasons.append(f"{raw.shard} #{raw.index}: {err}")
    raise AllCorruptError(f"no usable sample in the first samples of {len(tried)} shards "
                          f"(e.g. {reasons[0] if reasons else 'none'}); check the shards and "
                          f"their format (image field png/jpg/jpeg/gif, label field cls)")


def http_options(spec: DataSpec) -> HttpOptions:
    """The spec's http_* fields, as the readers take them."""
    return HttpOptions(spec.http_retries, spec.http_backoff_s, spec.http_connect_timeout_s,
                       spec.http_read_timeout_s)


def resolve_field(spec: DataSpec, field: str, class_cond: bool = False,
                  num_classes: int | None = None) -> ShardList:
    """The shards of spec.shards (field "shards", train split) or spec.eval_shards ("eval"
    split); every DataError names the field. With class_cond, an index that names more
    classes than num_classes is refused: its labels would not fit the model."""
    try:
        shards = resolve(getattr(spec, field), spec.allow_pipe,
                         split="train" if field == "shards" else "eval", http=http_options(spec))
    except DataError as err:
        raise type(err)(f"data.{field}: {err}") from None
    names = shards.class_names
    if class_cond and num_classes is not None and names and len(names) > num_classes:
        raise DataError(f"data.{field}: the shard index names {len(names)} classes (labels "
                        f"0..{len(names) - 1}) but model.num_classes is {num_classes}")
    return shards


def build_train_stream(spec: DataSpec, *, image_size: int, class_cond: bool, batch_size: int,
                       rank: int, world_size: int, seed: int,
                       num_classes: int | None = None) -> TrainStream:
    """The endless training stream of this rank; raises a DataError before training starts
    when the source is empty, missing, all corrupt or smaller than one global batch, and
    TooManyCorruptError while iterating (see DataSpec.max_corrupt_fraction).

    num_classes (model.num_classes): with class_cond, labels outside [0, num_classes) are
    corrupt samples (None: any integer label)."""
    shards = resolve_field(spec, "shards", class_cond, num_classes)
    if shards.total < world_size * batch_size:
        raise DataError(f"data.shards: {shards.total} training samples cannot fill one global "
                        f"batch of {world_size} ranks x {batch_size}")
    _warn_size(shards, image_size)
    cfg = _Config(shards, image_size, class_cond, batch_size, rank, world_size,
                  max(1, spec.num_workers), seed, spec.shuffle_shards, spec.shuffle_buffer,
                  spec.random_flip, _probe(shards, image_size, class_cond, num_classes),
                  num_classes)
    output.log0("data_train", shards=len(shards.urls), samples=shards.total,
                batches_per_epoch=shards.total // (world_size * batch_size))
    return TrainStream(cfg, spec)


def _warn_size(shards: ShardList, image_size: int) -> None:
    if shards.image_size is not None and shards.image_size != image_size:
        output.log0("data_image_size_mismatch", stored=shards.image_size, wanted=image_size,
                    note="the shards were resized at writing time; resizing again is not the "
                         "reference preprocessing of the originals")


class _EvalDataset(IterableDataset):
    """One pass over samples [start, stop) of the canonical order, in batches of B."""

    def __init__(self, cfg: _Config, start: int, stop: int):
        super().__init__()
        self.cfg, self.start, self.stop = cfg, start, stop

    def __iter__(self) -> Iterator[tuple]:
        cfg, worker, bsz = self.cfg, _worker_id(), self.cfg.batch_size
        counts = _eval_worker_counts(self.stop - self.start, bsz, cfg.workers)
        first = self.start + sum(counts[:worker]) * bsz
        last = min(first + counts[worker] * bsz, self.stop)
        order = np.arange(len(cfg.shards.urls))
        pieces = shard_pieces(np.array([[first, last]], dtype=np.int64), order, cfg.shards.counts)
        raws = read_pieces(pieces, cfg.shards.urls, cfg.shards.names, http=cfg.shards.http)
        filler = BatchFiller(cfg.image_size, cfg.class_cond, cfg.fallback, cfg.num_classes)
        for j, begin in enumerate(range(first, last, bsz)):
            picked = [next(raws) for _ in range(min(bsz, last - begin))]
            images = np.empty((len(picked), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
            labels = np.zeros(len(picked), dtype=np.int64)
            valid = np.zeros(len(picked), dtype=bool)
            corrupt = filler.fill(picked, images, labels, valid)
            yield _pack(images, labels, (0, worker + j * cfg.workers, corrupt), valid)


def _eval_worker_counts(samples: int, batch_size: int, workers: int) -> list[int]:
    batches = math.ceil(samples / batch_size)
    return [max(0, (batches - w + workers - 1) // workers) for w in range(workers)]


class EvalStream:
    """One finite pass over the held-out shards; see `build_eval_stream`."""

    def __init__(self, cfg: _Config, spec: DataSpec, start: int, stop: int, total: int):
        self._cfg, self._spec, self._start, self._stop = cfg, spec, start, stop
        bsz, world = cfg.batch_size, cfg.world_size
        self.total = total
        """Held-out samples served across all ranks."""
        self.num_samples = stop - start
        """Samples this rank serves."""
        self.batches = math.ceil(self.num_samples / bsz)
        """Batches this rank yields (ranks may differ by one)."""
        self.max_batches = max(math.ceil(((r + 1) * total // world - r * total // world) / bsz)
                               for r in range(world))
        """The largest per-rank batch count: the same on every rank (see `padded`)."""
        self.corrupt_samples = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for x, cond, _ in self._iterate():
            yield x, cond

    def padded(self) -> Iterator[tuple[torch.Tensor, dict, torch.Tensor]]:
        """Exactly `max_batches` batches (x, cond, mask) on every rank, for loops that run a
        collective per batch: mask [N] bool is False for padding and for corrupt samples'
        replacements; padding batches repeat the probe sample with mask all False."""
        done = 0
        for batch in self._iterate():
            done += 1
            yield batch
        image, label = self._cfg.fallback
        for _ in range(self.max_batches - done):
            x, _, _, _ = _pack(image[None].copy(), np.zeros(1, dtype=np.int64), (0, 0, ()),
                               np.zeros(1, dtype=bool))
            yield x, self._cond(np.array([label], dtype=np.int64)), torch.zeros(1, dtype=torch.bool)

    def _cond(self, y: np.ndarray) -> dict:
        return {"y": torch.from_numpy(y)} if self._cfg.class_cond else {}

    def _iterate(self) -> Iterator[tuple[torch.Tensor, dict, torch.Tensor]]:
        if self.num_samples == 0:
            return
        spec = self._spec
        workers = min(self._cfg.workers, self.batches) if spec.num_workers else 0
        cfg = _Config(**{**self._cfg.__dict__, "workers": max(1, workers)})
        loader = _loader(_EvalDataset(cfg, self._start, self._stop), workers, spec.prefetch_factor,
                         cfg.seed)
        for x, y, meta, valid in loader:
            self.corrupt_samples += sum(n for _, n in meta[2])
            yield x, self._cond(y), torch.from_numpy(valid)


def build_eval_stream(spec: DataSpec, *, image_size: int, class_cond: bool, batch_size: int,
                      rank: int, world_size: int, num_samples: int | None = None,
                      num_classes: int | None = None) -> EvalStream:
    """One pass over spec.eval_shards (the first num_samples of them in canonical order);
    each held-out sample is served by exactly one rank (contiguous rank ranges). Corrupt
    samples (labels outside [0, num_classes) included) are masked out of `padded`."""
    if spec.eval_shards is None:
        raise DataError("data.eval_shards is not set")
    shards = resolve_field(spec, "eval_shards", class_cond, num_classes)
    total = shards.total if num_samples is None else min(num_samples, shards.total)
    if num_samples is not None and num_samples > shards.total:
        output.log0("data_eval_short", asked=num_samples, available=shards.total)
    cfg = _Config(shards, image_size, class_cond, batch_size, rank, world_size,
                  max(1, spec.num_workers), 0, False, 0, False,
                  _probe(shards, image_size, class_cond, num_classes), num_classes)
    start, stop = rank * total // world_size, (rank + 1) * total // world_size
    return EvalStream(cfg, spec, start, stop, total)
