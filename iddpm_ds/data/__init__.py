"""Streaming WebDataset shards: writer, reader, reference preprocessing, data position.

Public API::

    from iddpm_ds.data import build_train_stream, build_eval_stream, check_sources
    stream = build_train_stream(spec.data, image_size=32, class_cond=True, batch_size=64,
                                rank=env.rank(), world_size=env.world_size(), seed=0,
                                num_classes=10)
    stream.load_state_dict(all_ranks_states)      # optional, before iterating
    for x, cond in stream: ...                    # endless; x [N, 3, H, W] in [-1, 1]
    state = stream.state_dict()                   # this rank's data position
    check_sources(spec.data, image_size=32, class_cond=True, num_classes=10)  # --check

The shards are plain WebDataset tars, written by webdataset's own TarWriter
(`iddpm-shards`) and readable by `webdataset.WebDataset`. The reader is ours because a
64-rank job needs two things webdataset's pipeline does not give:

- exact resume: a checkpoint stores the data position as integers (epoch, plan, batches
  done per rank), and a restart yields exactly the batches the stopped run would have
  yielded next, at the same world size, or the rest of the epoch at another one, without
  reading the skipped samples (position.py, tario.py seek past them);
- equal batches per rank: every rank and loader worker plans its share of an epoch from
  exact per-shard sample counts, so all ranks take the same number of batches (a rank
  that ran out first would hang the others in a collective), and a corrupt sample is
  replaced in place rather than dropped, which would shift every later position.
"""
from .check import check_sources
from .errors import (AllCorruptError, DataError, EmptySourceError, PipeNotAllowedError,
                     ShardNotFoundError, TooManyCorruptError)
from .reader import EvalStream, TrainStream, build_eval_stream, build_train_stream

__all__ = ["build_train_stream", "build_eval_stream", "check_sources", "TrainStream",
           "EvalStream", "DataError", "EmptySourceError", "ShardNotFoundError",
           "PipeNotAllowedError", "AllCorruptError", "TooManyCorruptError"]
