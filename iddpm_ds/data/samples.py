"""Worker-side sample handling: read planned shard pieces, decode, replace corrupt input.

Corrupt input never changes a batch's size: a sample that cannot be read (truncated
tar, unreadable shard), decoded (bad image bytes, no image field) or labelled (missing
or non-integer `cls`, or one outside [0, num_classes), with class_cond) is logged with shard and key, counted, and its
slot is filled with the last good sample this worker produced (before the first one:
the pre-flight probe sample; a worker resumed mid-epoch looks back over the samples it
skipped in that epoch). So batch counts stay equal on every rank and the data
position stays exact; the only duplicates an epoch can contain are these replacements.
The training process bounds them (CorruptWindow): past data.max_corrupt_fraction of a
rank's recent samples, training stops with an error naming the shards.
"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..dist import output
from .errors import TooManyCorruptError
from .http import HttpOptions
from .preprocess import DECODABLE_EXTENSIONS, IMAGE_EXTENSIONS, preprocess_bytes
from .sources import open_url
from .tario import TarReader

LABEL_FIELD = "cls"
"""Sample field holding the integer class label as text (the WebDataset convention)."""
LOG_EVERY_AFTER = 100
"""A worker logs its first 100 corrupt samples one by one, then every 100th (with a count)."""


class CorruptSample(Exception):
    """One sample cannot be used; the message is the reason."""


@dataclass
class RawSample:
    """One planned sample as read from its shard (fields None when it could not be read)."""

    shard: str
    index: int
    key: str | None
    fields: dict[str, bytes] | None
    problem: str = ""


def decode_sample(fields: dict[str, bytes], image_size: int, class_cond: bool,
                  num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """Fields of one sample -> (uint8 [H, W, 3], label); raises CorruptSample.

    With class_cond a label outside [0, num_classes) is corrupt: on a GPU it would index
    past the class embedding (a device-side assert, hours into a run)."""
    name = next((e for e in IMAGE_EXTENSIONS if e in fields), None)
    name = name or next((e for e in DECODABLE_EXTENSIONS if e in fields), None)
    if name is None:
        raise CorruptSample(f"no image field (fields: {sorted(fields)})")
    label = 0
    if class_cond:
        if LABEL_FIELD not in fields:
            raise CorruptSample("missing label (no 'cls' field)")
        try:
            label = int(fields[LABEL_FIELD].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise CorruptSample(f"label {fields[LABEL_FIELD][:20]!r} is not an integer") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise CorruptSample(f"label {label} outside [0, {num_classes}) "
                                "(model.num_classes)")
    try:
        return preprocess_bytes(fields[name], image_size, name), label
    except Exception as err:  # PIL raises many types for bad bytes; any of them means corrupt
        raise CorruptSample(f"undecodable image ({type(err).__name__}: {err})") from None


def read_pieces(pieces: Sequence[tuple[int, int, int]], urls: Sequence[str],
                names: Sequence[str], log: bool = True,
                http: HttpOptions = HttpOptions()) -> Iterator[RawSample]:
    """One RawSample per planned (shard, start, stop) sample, in order, whatever happens.

    Consecutive pieces of one shard are read in one pass over it (a resumed worker's pieces
    are scattered: its shuffle buffer's leftovers, then the rest). A shard that fails to
    open, ends early or is damaged yields placeholder samples for the rest of its pieces,
    so positions never shift; one log line per damaged piece (unless log is False). http(s)
    shards retry as `http` says (see http.py) before they count as damaged.
    """
    start = 0
    while start < len(pieces):
        stop = start + 1
        while stop < len(pieces) and pieces[stop][0] == pieces[start][0]:
            stop += 1
        ranges = [(first, end) for _, first, end in pieces[start:stop]]
        yield from _read_shard(pieces[start][0], ranges, urls, names, log, http)
        start = stop


def _read_shard(shard: int, ranges: list[tuple[int, int]], urls: Sequence[str],
                names: Sequence[str], log: bool, http: HttpOptions) -> Iterator[RawSample]:
    wanted = [i for first, end in ranges for i in range(first, end)]
    got, problem = 0, "shard ended early"
    try:
        fh, seekable = open_url(urls[shard], http)
        try:
            for (key, fields), index in zip(TarReader(fh, seekable).select(ranges), wanted):
                yield RawSample(names[shard], index, key, fields)
                got += 1
        finally:
            fh.close()
    except Exception as err:  # noqa: BLE001 - any read failure must not stop training
        problem = f"shard unreadable ({type(err).__name__}: {err})"
    lost = wanted[got] if got < len(wanted) else math.inf  # first sample not read
    for first, end in ranges:
        first = int(min(end, max(first, lost)))
        if first < end and log:
            output.log("data_shard_damaged", shard=names[shard], first_sample=first,
                       missing=end - first, reason=problem)
        for missing in range(first, end):
            yield RawSample(names[shard], missing, None, None, problem)


class BatchFiller:
    """Decodes planned samples into a batch, replacing corrupt ones (see module doc)."""

    def __init__(self, image_size: int, class_cond: bool, fallback: tuple[np.ndarray, int],
                 num_classes: int | None = None):
        self.image_size, self.class_cond, self.num_classes = image_size, class_cond, num_classes
        self.last_good = fallback
        self.corrupt_total = 0
        self.earlier: Iterator[RawSample] | None = None
        """Set by a resumed worker: the samples it skipped, latest first. The first corrupt
        sample before any good one is replaced by the latest good one of these, as in a run
        that never stopped (decoded only then, so a healthy resume decodes none of them)."""

    def _decode(self, fields: dict[str, bytes]) -> tuple[np.ndarray, int]:
        return decode_sample(fields, self.image_size, self.class_cond, self.num_classes)

    def _replacement(self) -> tuple[np.ndarray, int]:
        earlier, self.earlier = self.earlier, None
        for raw in earlier or ():
            try:
                if raw.fields is not None:
                    self.last_good = self._decode(raw.fields)
                    break
            except CorruptSample:
                continue
        return self.last_good

    def fill(self, raws: Sequence[RawSample], images: np.ndarray, labels: np.ndarray,
             valid: np.ndarray) -> tuple[tuple[str, int], ...]:
        """Decode raws into images[i] ([N, H, W, 3] uint8) and labels[i]; returns the
        corrupt samples' count per shard, ((shard, count), ...) (empty for a clean batch)."""
        corrupt: Counter[str] = Counter()
        for i, raw in enumerate(raws):
            try:
                if raw.fields is None:
                    raise CorruptSample(raw.problem or "sample missing")
                images[i], labels[i] = self.last_good = self._decode(raw.fields)
                valid[i], self.earlier = True, None
            except CorruptSample as err:
                self.corrupt_total += 1
                if raw.fields is not None:  # missing ones were logged once per shard piece
                    self._log(raw, str(err))
                images[i], labels[i] = self._replacement()
                valid[i] = False
                corrupt[raw.shard] += 1
        return tuple(corrupt.items())

    def _log(self, raw: RawSample, reason: str) -> None:
        """One line per corrupt sample, thinned out once a worker has seen many."""
        total = self.corrupt_total
        if total <= LOG_EVERY_AFTER or total % LOG_EVERY_AFTER == 0:
            output.log("data_corrupt_sample", shard=raw.shard, key=raw.key, sample=raw.index,
                       reason=reason, worker_corrupt_total=total)


class CorruptWindow:
    """Corrupt samples among a rank's most recent batches, per shard; raises
    TooManyCorruptError when they pass max_fraction of `window` samples (rounded up to whole
    batches). Runs in the training process, on the counts the loader workers send along."""

    def __init__(self, max_fraction: float, window: int, batch_size: int, rank: int):
        self.batches: deque[tuple[tuple[str, int], ...]] = deque(
            maxlen=max(1, math.ceil(window / batch_size)))
        self.max_fraction, self.window, self.rank = max_fraction, window, rank
        self.batch_size = batch_size
        self.limit = max_fraction * self.batches.maxlen * batch_size
        self.corrupt = 0

    def add(self, corrupt: tuple[tuple[str, int], ...]) -> None:
        """Count one batch's corrupt samples ((shard, count), ...)."""
        if len(self.batches) == self.batches.maxlen:
            self.corrupt -= sum(n for _, n in self.batches[0])
        self.batches.append(corrupt)
        self.corrupt += sum(n for _, n in corrupt)
        if self.corrupt > self.limit:
            raise TooManyCorruptError(self._message())

    def _message(self) -> str:
        by_shard: Counter[str] = Counter()
        for batch in self.batches:
            for shard, n in batch:
                by_shard[shard] += n
        named = ", ".join(f"{shard} ({n})" for shard, n in by_shard.most_common(3))
        more = f" and {len(by_shard) - 3} more" if len(by_shard) > 3 else ""
        return (f"data: {self.corrupt} of the last {len(self.batches) * self.batch_size} "
                f"training samples of rank {self.rank} were corrupt, more than "
                f"data.max_corrupt_fraction={self.max_fraction} of data.corrupt_window="
                f"{self.window} allows; corrupt samples by shard: {named}{more}; check that "
                "these shards are readable (a lost mount?) and their labels fit "
                "model.num_classes")
