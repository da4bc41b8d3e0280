"""Images/s of the shard reader vs a per-file folder loader written the reference way.

Both read the same generated images (JPEGs of mixed sizes, 40-96 px, 10 classes in
sub-folders) and deliver identical tensors (x float32 [B, 3, 32, 32] in [-1, 1], y):
- baseline: the reference's design: every rank lists the whole folder, keeps a strided
  slice (rank::world), opens each file with PIL, preprocesses one sample at a time and
  collates, in a DataLoader with one worker, shuffle and drop_last;
- ours: build_train_stream over tar shards written by iddpm-shards, 1 and 2 workers,
  once over shards of the original files (the same decode + resize work per image as the
  baseline) and once over shards written with --image-size (resize + crop done once at
  writing time; the tensors are bit-identical to the reference preprocessing of the
  originals, see tests/test_data.py), and once more with --raw (uncompressed pixels).
Each number is one full pass over the images including loader start-up, one rank.

    python bench/data_throughput.py                 # 10,000 images, ~1 min on 2 cores
    python bench/data_throughput.py --images 2000   # quick check
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from iddpm_ds.data import build_train_stream
from iddpm_ds.data.shards import WriteOptions, folder_items, write_items
from iddpm_ds.spec.data import DataSpec


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Smooth random JPEGs (realistic compression), sizes 40-96 px, files cls{k}_{i}.jpg."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = i % 10
        sub = folder / f"part{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        width, height = (int(v) for v in rng.integers(40, 97, size=2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        image = coarse.resize((width, height), Image.Resampling.BILINEAR)
        image.save(sub / f"cls{label}_{i:06d}.jpg", quality=90)


# ------------------------------------------------------- the reference-style baseline


def _list_image_files(folder: str) -> list[str]:
    """Recursive listing as the reference does it (every rank lists everything)."""
    found = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if os.path.isdir(path):
            found.extend(_list_image_files(path))
        elif entry.split(".")[-1].lower() in ("jpg", "jpeg", "png", "gif"):
            found.append(path)
    return found


class _PerFileDataset(Dataset):
    def __init__(self, resolution: int, paths: list[str], classes: list[int], rank: int,
                 world: int):
        self.resolution = resolution
        self.paths, self.classes = paths[rank::world], classes[rank::world]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int):
        with open(self.paths[idx], "rb") as fh:
            image = Image.open(fh)
            image.load()
        while min(*image.size) >= 2 * self.resolution:
            image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
        scale = self.resolution / min(*image.size)
        image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
        arr = np.array(image.convert("RGB"))
        top, left = (arr.shape[0] - self.resolution) // 2, (arr.shape[1] - self.resolution) // 2
        arr = arr[top:top + self.resolution, left:left + self.resolution]
        arr = arr.astype(np.float32) / 127.5 - 1
        return np.transpose(arr, [2, 0, 1]), {"y": np.array(self.classes[idx], dtype=np.int64)}


def baseline_pass(folder: Path, resolution: int, batch: int) -> float:
    start = time.perf_counter()
    paths = _list_image_files(str(folder))
    names = [os.path.basename(p).split("_")[0] for p in paths]
    ids = {n: i for i, n in enumerate(sorted(set(names)))}
    dataset = _PerFileDataset(resolution, paths, [ids[n] for n in names], rank=0, world=1)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=1, drop_last=True)
    seen = sum(x.shape[0] for x, _ in loader)
    return seen / (time.perf_counter() - start)


def shard_pass(index: Path, resolution: int, batch: int, workers: int) -> float:
    start = time.perf_counter()
    spec = DataSpec(shards=str(index), num_workers=workers, shuffle_buffer=1000)
    stream = build_train_stream(spec, image_size=resolution, class_cond=True, batch_size=batch,
                                rank=0, world_size=1, seed=0)
    seen = sum(x.shape[0] for _, (x, _) in zip(range(stream.batches_per_epoch), stream))
    rate = seen / (time.perf_counter() - start)
    stream.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "images", Path(tmp) / "shards"
        t0 = time.perf_counter()
        make_images(folder, args.images)
        t1 = time.perf_counter()
        write_items(folder_items(folder), out / "original", WriteOptions(progress=False), "bench")
        t2 = time.perf_counter()
        for kind, raw in (("sized", False), ("raw", True)):
            write_items(folder_items(folder), out / kind,
                        WriteOptions(image_size=args.resolution, raw=raw, progress=False), "bench")
        t3 = time.perf_counter()
        print(f"{args.images} images generated in {t1 - t0:.1f}s; sharded as originals in "
              f"{t2 - t1:.1f}s, pre-sized PNG + raw (--image-size {args.resolution} [--raw]) in "
              f"{t3 - t2:.1f}s")
        base = baseline_pass(folder, args.resolution, args.batch)
        print(f"{'baseline: per-file loader, 1 worker':44s}: {base:8.0f} img/s")
        for kind, label in (("original", "original files"), ("sized", "pre-sized PNG"),
                            ("raw", "pre-sized raw")):
            for workers in (1, 2):
                rate = shard_pass(out / kind / "index.json", args.resolution, args.batch, workers)
                name = f"shard stream, {label}, {workers} worker(s)"
                print(f"{name:44s}: {rate:8.0f} img/s   ratio {rate / base:.2f}x")


if __name__ == "__main__":
    main()
