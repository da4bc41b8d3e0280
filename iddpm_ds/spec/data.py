"""DataSpec: where the training and held-out shards are and how they are streamed.

Image size, class conditioning, batch size and seed are not here: they come from the
model, train and run sections and are passed to the data builders as arguments.
"""
from __future__ import annotations

from typing import Optional, Union

from pydantic import Field, field_validator, model_validator

from .base import Spec
from .errors import FieldError

_PIPE_PREFIXES = ("pipe:", "s3://")

ShardSource = Union[str, list[str]]


class DataSpec(Spec):
    """WebDataset tar shards (written by `iddpm-shards`) and the streaming reader's settings."""

    shards: ShardSource = "data/digits/index.json"
    """Training shards: an index file written by iddpm-shards ("dir/index.json", or
    "dir/index.json#train" to name the split), a brace pattern ("dir/train-{000000..000099}.tar"),
    or a list of those. Local paths, file:, http(s):// (the index too, e.g.
    "http://storage:8080/digits/index.json#train"; read with retries, see http_retries),
    and with allow_pipe pipe: and s3://."""
    eval_shards: Optional[ShardSource] = None
    """Held-out shards, same forms as `shards`; an index file without "#split" gives its
    "eval" split."""
    shuffle_shards: bool = True
    """Shuffle the shard order each epoch (seeded by seed and epoch; the same on every rank)."""
    shuffle_buffer: int = Field(1000, ge=0)
    """Samples held by each loader worker's shuffle buffer (0 or 1: no sample shuffle)."""
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank (0: decode in the training process); raise it
    (4-8) on GPU nodes with many cores."""
    prefetch_factor: int = Field(2, ge=1)
    """Batches each worker prepares ahead."""
    random_flip: bool = False
    """Random horizontal flip (guided-diffusion's option; the reference has none)."""
    max_corrupt_fraction: float = Field(0.2, ge=0, le=1)
    """Stop training with an error naming the shards when more than this fraction of a
    rank's last `corrupt_window` samples were corrupt: unreadable, undecodable, or with a
    label missing or outside [0, model.num_classes). Corrupt samples are replaced by good
    ones to keep batches whole, so without a limit a lost mount would train on the same few
    images for hours. 1 turns the check off."""
    corrupt_window: int = Field(10_000, ge=1)
    """Most recent samples of a rank (rounded up to whole batches) that
    max_corrupt_fraction is measured over."""
    allow_pipe: bool = False
    """Allow shard urls that run shell commands: pipe:, and s3:// (run as
    `pipe:aws s3 cp --quiet URL -`, which needs the aws CLI). Off by default: a spec must not
    run commands unasked. http(s):// needs no opt-in (read in-process)."""
    http_retries: int = Field(5, ge=0)
    """Retries of an http(s) shard or index read after a refused or dropped connection, a
    read timeout or a transient answer (5xx, 429); each resumes at the byte where the read
    stopped, so no sample is lost or read twice. Counted per failure run: a retry that
    reads on starts the count again. Past it (and at once for 404 and other permanent
    answers) the shard's remaining samples are missing data under max_corrupt_fraction."""
    http_backoff_s: float = Field(1.0, gt=0)
    """Wait before the first retry; it doubles with each retry (at most 30 s). With the
    defaults, 5 retries ride out a server that is away for up to ~31 s."""
    http_connect_timeout_s: float = Field(10.0, gt=0)
    """Seconds to wait for an http(s) connection to open before that try fails."""
    http_read_timeout_s: float = Field(30.0, gt=0)
    """Seconds an open http(s) connection may stay silent (no answer, no bytes) before that
    try fails: what ends a stalled server's hold on a loader worker."""

    @field_validator("shards", "eval_shards", mode="before")
    @classmethod
    def _non_empty(cls, value: object) -> object:
        # before pydantic's union check, whose two-branch message names no usable form
        if value is None:
            return value
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items \
                or any(not isinstance(v, str) or not v.strip() for v in items):
            raise ValueError(f"a shard source must be a non-empty pattern, index path or "
                             f"list of them, got {value!r}")
        return list(items) if isinstance(items, tuple) else value

    @model_validator(mode="after")
    def _pipe_opt_in(self) -> "DataSpec":
        if not self.allow_pipe:
            for name in ("shards", "eval_shards"):
                source = getattr(self, name)
                items = [source] if isinstance(source, str) else (source or [])
                bad = [v for v in items if v.startswith(_PIPE_PREFIXES)]
                if bad:
                    raise FieldError(name, f"shard url {bad[0]!r} runs a shell command; set "
                                           "data.allow_pipe: true to allow it")
        return self
