"""Errors the data module raises (one clear line each): before training starts, and
TooManyCorruptError while it runs."""
from __future__ import annotations


class DataError(ValueError):
    """The data source cannot be used; the message says why and what to do."""


class EmptySourceError(DataError):
    """The shard pattern, list or index resolves to no shards, or to no samples."""


class ShardNotFoundError(DataError, FileNotFoundError):
    """Local shard or index files are missing (a FileNotFoundError too)."""


class PipeNotAllowedError(DataError):
    """A `pipe:`, http(s) or s3 url was given but the spec does not set allow_pipe."""


class AllCorruptError(DataError):
    """No shard yields a single decodable sample."""


class TooManyCorruptError(DataError):
    """During training, more than data.max_corrupt_fraction of a rank's recent samples
    were corrupt (raised by the stream in the training process, not in a loader worker)."""
