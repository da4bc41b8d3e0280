"""Images/s of the shard reader vs a per-file folder loader written the reference way, like
for like: both get the same worker count, stored bytes and preprocessing per image, so the
ratio is the container and reader alone. Generated JPEGs (40-96 px, 10 classes in
sub-folders) are stored as `original` JPEGs (both decode + resize + crop), `sized` 32 px
PNGs and `raw` 32 px pixels (.npy / raw shards: no decode), each as a folder of files and as
tar shards. Each pass is one epoch on one rank, loader start-up included; passes alternate
in order and the median of per-pair ratios is printed, then what moving the resize offline
and a second worker give within the shard reader (not like for like; docs/data.md).

    python -m bench.data_throughput                 # 10,000 images, ~3 min on 2 cores
    python -m bench.data_throughput --images 2000 --repeats 1   # quick check
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bench.common import alternate, cli, paired_ratio
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
        (sub := folder / f"part{i % 7}").mkdir(parents=True, exist_ok=True)
        size = tuple(int(v) for v in rng.integers(40, 97, size=2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        coarse.resize(size, Image.Resampling.BILINEAR).save(sub / f"cls{i % 10}_{i:06d}.jpg", quality=90)


def reference_preprocess(image: Image.Image, resolution: int) -> np.ndarray:
    """The reference's resize (BOX halvings, then BICUBIC) + centre crop -> uint8 [H, W, 3]."""
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image.convert("RGB"))
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


class _PerFileDataset(Dataset):
    """The reference's design: every rank lists the whole folder and keeps a strided slice."""

    def __init__(self, folder: Path, resolution: int, rank: int = 0, world: int = 1):
        paths = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png", ".npy"))
        names = [p.name.split("_")[0] for p in paths]
        ids = {n: i for i, n in enumerate(sorted(set(names)))}
        self.paths, self.classes = paths[rank::world], [ids[n] for n in names][rank::world]
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int):
        path = self.paths[idx]
        if path.suffix == ".npy":  # pre-sized raw pixels: nothing to decode or resize
            arr = np.load(path, allow_pickle=False)
        else:
            with open(path, "rb") as fh:
                image = Image.open(fh)
                image.load()
            arr = reference_preprocess(image, self.resolution)
        arr = arr.astype(np.float32) / 127.5 - 1
        return np.transpose(arr, [2, 0, 1]), {"y": np.array(self.classes[idx], dtype=np.int64)}


def baseline_pass(folder: Path, resolution: int, batch: int, workers: int) -> float:
    """Seconds per image of one epoch of the per-file loader, listing included."""
    start = time.perf_counter()
    loader = DataLoader(_PerFileDataset(folder, resolution), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True)
    seen = sum(x.shape[0] for x, _ in loader)
    return (time.perf_counter() - start) / seen


def shard_pass(index: Path, resolution: int, batch: int, workers: int) -> float:
    """Seconds per image of one epoch of build_train_stream, start-up included."""
    start = time.perf_counter()
    spec = DataSpec(shards=str(index), num_workers=workers, shuffle_buffer=1000)
    stream = build_train_stream(spec, image_size=resolution, class_cond=True, batch_size=batch,
                                rank=0, world_size=1, seed=0)
    seen = sum(x.shape[0] for _, (x, _) in zip(range(stream.batches_per_epoch), stream))
    stream.close()
    return (time.perf_counter() - start) / seen


def prepare(tmp: Path, count: int, resolution: int) -> dict[str, tuple[Path, Path]]:
    """Per kind: (folder of files, shard index); the same bytes in both."""
    folders = {kind: tmp / "files" / kind for kind in KINDS}
    make_images(folders["original"], count)
    for path in sorted(folders["original"].rglob("*.jpg")):
        arr = reference_preprocess(Image.open(path), resolution)  # once, offline
        rel = path.relative_to(folders["original"]).with_suffix("")
        for kind in ("sized", "raw"):
            (folders[kind] / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save((folders["sized"] / rel).with_suffix(".png"))
        np.save((folders["raw"] / rel).with_suffix(".npy"), arr)
    for kind in KINDS:  # raw shards: the sized PNGs stored as pixels (iddpm-shards --raw)
        options = WriteOptions(progress=False, **({"image_size": resolution, "raw": True} if kind == "raw" else {}))
        write_items(folder_items(folders["sized" if kind == "raw" else kind]), tmp / "shards" / kind, options, "bench")
    return {kind: (folders[kind], tmp / "shards" / kind / "index.json") for kind in KINDS}


def main() -> None:
    parser = cli(__doc__, threads=None)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="passes per reader per row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    res, batch = 32, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        data = prepare(Path(tmp), args.images, res)
        print(f"{args.images} images: generated, pre-sized and sharded in {time.perf_counter() - began:.0f} s; "
              f"{args.repeats} pass(es) per reader per row, median of per-pair ratios")
        print(f"{'stored as':<44} {'workers':>7} {'per-file img/s':>14} {'shards img/s':>12} {'ratio':>6}")
        shard_rates = {}
        for (kind, (folder, index)), workers in ((item, w) for item in data.items() for w in (1, 2)):
            secs = alternate({"files": lambda: baseline_pass(folder, res, batch, workers),
                              "shards": lambda: shard_pass(index, res, batch, workers)}, args.repeats)
            shard_rates[kind, workers] = 1 / statistics.median(secs["shards"])
            print(f"{KINDS[kind]:<44} {workers:>7} {1 / statistics.median(secs['files']):14.0f} "
                  f"{shard_rates[kind, workers]:12.0f} {paired_ratio(secs['shards'], secs['files']):5.2f}x")
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
