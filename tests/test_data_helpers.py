"""Helpers for the data tests (no tests here): real tar shards whose label is a unique sample id."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for field, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def id_shards(folder: Path, sizes: Sequence[int], side: int = 8, prefix: str = "s") -> list[str]:
    """Shards of tiny PNGs; sample i (over all shards) has cls = i, so labels identify samples."""
    rng = np.random.default_rng(len(sizes))
    paths, next_id = [], 0
    for number, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            fields = {"png": png_bytes(image), "cls": str(next_id).encode()}
            samples.append((f"{next_id:06d}", fields))
            next_id += 1
        paths.append(str(write_tar(folder / f"{prefix}-{number:03d}.tar", samples)))
    return paths
