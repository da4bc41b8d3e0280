"""Helpers for the data tests (no tests here): real tar shards whose label is a unique sample
id, and a resume chain that compares a resumed stream with one that never stopped."""
from __future__ import annotations

import io
from pathlib import Path
import json
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from webdataset import TarWriter

from iddpm_ds.data import build_train_stream
from iddpm_ds.spec.data import DataSpec


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> Path:
    with open(path, "wb") as fh, TarWriter(fh, encoder=False, mtime=0) as tar:
        for key, fields in samples:
            tar.write({"__key__": key, **fields})
    return path


def id_shards(folder: Path, sizes: Sequence[int], side: int = 8, prefix: str = "s",
              corrupt: Sequence[int] = ()) -> list[str]:
    """Shards of tiny PNGs; sample i (over all shards) has cls = i, so labels identify samples.
    The samples numbered in `corrupt` hold bytes that are no image."""
    rng = np.random.default_rng(len(sizes))
    paths, next_id = [], 0
    for number, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            data = b"no image" if next_id in corrupt else png_bytes(image)
            fields = {"png": data, "cls": str(next_id).encode()}
            samples.append((f"{next_id:06d}", fields))
            next_id += 1
        paths.append(str(write_tar(folder / f"{prefix}-{number:03d}.tar", samples)))
    return paths


def resume_chain(spec: DataSpec, cuts: Sequence[int], end: int,
                 gather: Callable[[dict], list[dict]], start: list[dict] | None = None,
                 **stream_args) -> dict:
    """Batches 0..end-1 (x, y) of a stream that never stops ("straight"), and of a chain of
    new streams, each resumed from all ranks' states (`gather`, JSON round trip) that the
    previous one saved after the batch counts in `cuts` ("resumed"); plus both final
    states of all ranks ("states"). Both begin from the states `start` when given."""
    stream = build_train_stream(spec, **stream_args)
    if start is not None:
        stream.load_state_dict(start)
    straight = [(x, c["y"]) for _, (x, c) in zip(range(end), stream)]
    states = [json.loads(json.dumps(gather(stream.state_dict())))]
    stream.close()
    resumed, saved = [], start
    for first, stop in zip([0, *cuts], [*cuts, end]):
        stream = build_train_stream(spec, **stream_args)
        if saved is not None:
            stream.load_state_dict(saved)
        resumed += [(x, c["y"]) for _, (x, c) in zip(range(stop - first), stream)]
        saved = json.loads(json.dumps(gather(stream.state_dict())))
        stream.close()
    return {"straight": straight, "resumed": resumed, "states": states + [saved]}


def first_difference(chain: dict) -> int | None:
    """Number of the first batch that differs between "straight" and "resumed" (None: equal)."""
    pairs = zip(chain["straight"], chain["resumed"], strict=True)
    return next((i for i, ((x, y), (x2, y2)) in enumerate(pairs)
                 if not (torch.equal(x, x2) and torch.equal(y, y2))), None)
