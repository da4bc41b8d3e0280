"""Streaming WebDataset shards: writer, reader, reference preprocessing, data position.

Public API::

    from iddpm_ds.data import build_train_stream, build_eval_stream
    stream = build_train_stream(spec.data, image_size=32, class_cond=True, batch_size=64,
                                rank=dist.rank(), world_size=dist.world_size(), seed=0)
    stream.load_state_dict(all_ranks_states)      # optional, before iterating
    for x, cond in stream: ...                    # endless; x [N, 3, H, W] in [-1, 1]
    state = stream.state_dict()                   # this rank's data position
"""
from .errors import (AllCorruptError, DataError, EmptySourceError, PipeNotAllowedError,
                     ShardNotFoundError)
from .reader import EvalStream, TrainStream, build_eval_stream, build_train_stream

__all__ = ["build_train_stream", "build_eval_stream", "TrainStream", "EvalStream", "DataError",
           "EmptySourceError", "ShardNotFoundError", "PipeNotAllowedError", "AllCorruptError"]
