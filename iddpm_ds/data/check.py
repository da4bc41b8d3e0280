"""The data part of `launch/train.py --check`: open every source the job names, before
any GPU time is spent on it."""
from __future__ import annotations

from ..spec.data import DataSpec
from .errors import DataError
from .reader import resolve_field
from .samples import CorruptSample, decode_sample, read_pieces


def check_sources(spec: DataSpec, *, image_size: int, class_cond: bool,
                  num_classes: int | None = None) -> list[str]:
    """Check data.shards (and data.eval_shards when set) as training will read them.

    Each source must resolve (its files exist and hold samples), its first sample must
    decode, and with class_cond its labels must fit [0, num_classes): the class names of
    its index and the first sample's label. Returns one summary line per source; raises a
    DataError whose one-line message names the field.
    """
    lines = []
    for field in ("shards", "eval_shards"):
        if getattr(spec, field) is None:
            continue
        shards = resolve_field(spec, field, class_cond, num_classes)
        first = next(i for i, n in enumerate(shards.counts) if n > 0)  # resolve: total > 0
        raw = next(read_pieces([(first, 0, 1)], shards.urls, shards.names, log=False))
        try:
            if raw.fields is None:
                raise CorruptSample(raw.problem)
            _, label = decode_sample(raw.fields, image_size, class_cond, num_classes)
        except CorruptSample as err:
            raise DataError(f"data.{field}: the first sample of {raw.shard} is unusable: "
                            f"{err}") from None
        label_text = f", label {label}" if class_cond else ""
        lines.append(f"data.{field}: {shards.total} samples in {len(shards.urls)} shards; "
                     f"first sample {raw.shard} key {raw.key} decodes{label_text}")
    return lines
