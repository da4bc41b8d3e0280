"""Images/s of the shard reader vs a per-file folder loader written the reference way, like
for like: every row gives both the same worker count, the same stored bytes and the same
preprocessing work per image, so the ratio is the container and reader alone.

Generated JPEGs (mixed sizes 40-96 px, 10 classes in sub-folders) are stored three ways,
each once as a folder of files (for the per-file loader) and once as tar shards:
  original  the JPEGs as generated; both readers decode + resize + crop every image
  sized     pre-sized 32 px PNGs (resize done once, offline, for both readers)
  raw       pre-sized 32 px uncompressed pixels (.npy; no decode for either reader)
The per-file loader is the reference's design: list the whole folder, keep a strided rank
slice, open each file, preprocess one sample at a time, collate, in a DataLoader with
shuffle and drop_last. The shard reader is build_train_stream. Both deliver identical
tensors (x float32 [B, 3, 32, 32] in [-1, 1], y). Each pass is one full epoch on one rank,
loader start-up included; each pair is repeated (order alternating) and the median of the
per-pair ratios is printed. A second table then attributes what is NOT like for like:
moving the resize offline, and adding a worker, each within one reader.

    python -m bench.data_throughput                 # 10,000 images, ~3 min on 2 cores
    python -m bench.data_throughput --images 2000 --repeats 1   # quick check
"""
from __future__ import annotations

import argparse
import os
import statistics
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

KINDS = {"original": "original JPEGs, decode + resize per read",
         "sized": "pre-sized PNGs, decode per read",
         "raw": "pre-sized raw pixels, no decode"}


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


def reference_preprocess(image: Image.Image, resolution: int) -> np.ndarray:
    """The reference's resize (BOX halvings, then BICUBIC) + centre crop -> uint8 [H, W, 3]."""
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image.convert("RGB"))
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def _list_files(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Recursive listing as the reference does it (every rank lists everything)."""
    found = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if os.path.isdir(path):
            found.extend(_list_files(path, extensions))
        elif entry.split(".")[-1].lower() in extensions:
            found.append(path)
    return found


class _PerFileDataset(Dataset):
    def __init__(self, resolution: int, paths: list[str], classes: list[int], rank: int, world: int):
        self.resolution = resolution
        self.paths, self.classes = paths[rank::world], classes[rank::world]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int):
        path = self.paths[idx]
        if path.endswith(".npy"):  # pre-sized raw pixels: nothing to decode or resize
            arr = np.load(path, allow_pickle=False)
        else:
            with open(path, "rb") as fh:
                image = Image.open(fh)
                image.load()
            arr = reference_preprocess(image, self.resolution)
        arr = arr.astype(np.float32) / 127.5 - 1
        return np.transpose(arr, [2, 0, 1]), {"y": np.array(self.classes[idx], dtype=np.int64)}


def baseline_pass(folder: Path, resolution: int, batch: int, workers: int) -> float:
    start = time.perf_counter()
    paths = _list_files(str(folder), ("jpg", "jpeg", "png", "gif", "npy"))
    names = [os.path.basename(p).split("_")[0] for p in paths]
    ids = {n: i for i, n in enumerate(sorted(set(names)))}
    dataset = _PerFileDataset(resolution, paths, [ids[n] for n in names], rank=0, world=1)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
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


# ------------------------------------------------------------------------- the setup


def prepare(tmp: Path, count: int, resolution: int) -> dict[str, tuple[Path, Path]]:
    """Per kind: (folder of files, shard index); the same bytes in both."""
    folders = {kind: tmp / "files" / kind for kind in KINDS}
    make_images(folders["original"], count)
    for path in sorted(folders["original"].rglob("*.jpg")):
        arr = reference_preprocess(Image.open(path), resolution)  # once, offline
        rel = path.relative_to(folders["original"]).with_suffix("")
        for kind, suffix in (("sized", ".png"), ("raw", ".npy")):
            target = (folders[kind] / rel).with_suffix(suffix)
            target.parent.mkdir(parents=True, exist_ok=True)
            if kind == "sized":
                Image.fromarray(arr).save(target)
            else:
                np.save(target, arr)
    out = {}
    for kind, folder in folders.items():
        items = folder_items(folder) if kind != "raw" else folder_items(folders["sized"])
        options = WriteOptions(progress=False, **({"image_size": resolution, "raw": True} if kind == "raw" else {}))
        write_items(items, tmp / "shards" / kind, options, "bench")
        out[kind] = (folder, tmp / "shards" / kind / "index.json")
    return out


def measure(pair: dict, repeats: int) -> dict[str, list[float]]:
    """Alternate the order inside each repeat so drift hits both sides alike."""
    rates: dict[str, list[float]] = {name: [] for name in pair}
    for r in range(repeats):
        for name in (list(pair) if r % 2 == 0 else list(pair)[::-1]):
            rates[name].append(pair[name]())
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="passes per reader per row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    res, batch = args.resolution, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        data = prepare(Path(tmp), args.images, res)
        print(f"{args.images} images: generated, pre-sized and sharded in {time.perf_counter() - began:.0f} s; "
              f"{args.repeats} pass(es) per reader per row, median of per-pair ratios")
        print(f"{'stored as':<44} {'workers':>7} {'per-file img/s':>14} {'shards img/s':>12} {'ratio':>6}")
        shard_rates = {}
        for kind, (folder, index) in data.items():
            for workers in (1, 2):
                rates = measure({
                    "files": lambda: baseline_pass(folder, res, batch, workers),
                    "shards": lambda: shard_pass(index, res, batch, workers)}, args.repeats)
                ratio = statistics.median(s / f for s, f in zip(rates["shards"], rates["files"]))
                shard_rates[kind, workers] = statistics.median(rates["shards"])
                print(f"{KINDS[kind]:<44} {workers:>7} {statistics.median(rates['files']):14.0f} "
                      f"{shard_rates[kind, workers]:12.0f} {ratio:5.2f}x")
        attribute(shard_rates)


def attribute(rates: dict[tuple[str, int], float]) -> None:
    """Not like for like on purpose: what each setup change gives within the shard reader."""
    print("\nwithin the shard reader (medians above; not a reader comparison):")
    for workers in (1, 2):
        print(f"  resize moved offline (sized / original), {workers} worker(s): "
              f"{rates['sized', workers] / rates['original', workers]:.2f}x")
        print(f"  decode removed too (raw / original), {workers} worker(s): "
              f"{rates['raw', workers] / rates['original', workers]:.2f}x")
    for kind in KINDS:
        print(f"  second worker ({kind}): {rates[kind, 2] / rates[kind, 1]:.2f}x")


if __name__ == "__main__":
    main()
