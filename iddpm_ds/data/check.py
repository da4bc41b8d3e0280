"""The data part of `launch/train.py --check`: open every source the job names, before
any GPU time is spent on it."""
from __future__ import annotations

import shutil

from ..spec.data import DataSpec
from .errors import DataError
from .http import HttpReader
from .reader import resolve_field
from .samples import CorruptSample, RawSample, decode_sample
from .sources import ShardList, open_url
from .tario import TarReader


def check_sources(spec: DataSpec, *, image_size: int, class_cond: bool,
                  num_classes: int | None = None) -> list[str]:
    """Check data.shards (and data.eval_shards when set) as training will read them.

    Each source must resolve (its files exist and hold samples; a remote index is fetched),
    its first sample must decode (read over the network for remote shards: the line names
    the server reached), and with class_cond its labels must fit [0, num_classes): the
    class names of its index and the first sample's label. s3:// urls need the aws CLI.
    Returns one summary line per source; raises a DataError whose one-line message names
    the field.
    """
    lines = []
    for field in ("shards", "eval_shards"):
        if getattr(spec, field) is None:
            continue
        shards = resolve_field(spec, field, class_cond, num_classes)
        first = next(i for i, n in enumerate(shards.counts) if n > 0)  # resolve: total > 0
        _need_aws(shards, field)
        raw, reached = _first_sample(shards, first)
        try:
            if raw.fields is None:
                raise CorruptSample(raw.problem)
            _, label = decode_sample(raw.fields, image_size, class_cond, num_classes)
        except CorruptSample as err:
            raise DataError(f"data.{field}: the first sample of {raw.shard} is unusable: "
                            f"{err}") from None
        label_text = f", label {label}" if class_cond else ""
        lines.append(f"data.{field}: {shards.total} samples in {len(shards.urls)} shards; "
                     f"first sample {raw.shard} key {raw.key} decodes{label_text}{reached}")
    return lines


def _need_aws(shards: ShardList, field: str) -> None:
    if any(u.startswith("pipe:aws ") for u in shards.urls) and shutil.which("aws") is None:
        raise DataError(f"data.{field}: s3:// shards are read with the aws CLI, which is not "
                        "on PATH (pip install awscli, or serve the shards over http)")


def _first_sample(shards: ShardList, shard: int) -> tuple[RawSample, str]:
    """The shard's first sample, and for http(s) " (over http from HOST:PORT = ADDR)"."""
    name = shards.names[shard] if shards.names else shards.urls[shard]
    try:
        fh, seekable = open_url(shards.urls[shard], shards.http)
        try:
            key, fields = next(iter(TarReader(fh, seekable).select([(0, 1)])))
            reached = ""
            if isinstance(fh, HttpReader) and fh.peer:
                host = fh.url.split("/")[2]
                reached = f" (over http from {host} = {fh.peer[0]}:{fh.peer[1]})"
        finally:
            try:
                fh.close()
            except Exception:  # noqa: BLE001 - a pipe cut short after one sample may complain
                pass
    except Exception as err:  # noqa: BLE001 - any read failure is the user's to see
        return RawSample(name, 0, None, None, f"shard unreadable ({type(err).__name__}: "
                                               f"{err})"), ""
    return RawSample(name, 0, key, fields), reached
