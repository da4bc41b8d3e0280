"""Images/s of the shard reader vs a per-file folder loader written the reference way, like for
like (same workers, stored bytes and preprocessing) and against the per-file loader on the
original JPEGs with 1 worker, per way of storing the images; docs/data.md explains it.

--capacity: per paper job, what one H200 eats at an assumed MFU against the reader's decode
rate on one core and the bytes per sample (docs/benchmarks.md).

    python -m bench.data_throughput [--images 10000] [--repeats 3]   # ~3 min on 2 cores
    OMP_NUM_THREADS=1 python -m bench.data_throughput --capacity [--mfu 0.4]
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

from bench.common import ROOT, alternate, cli, paired_ratio, table
from iddpm_ds.data import build_train_stream
from iddpm_ds.data.shards import WriteOptions, folder_items, write_items
from iddpm_ds.spec.data import DataSpec
from iddpm_ds.spec.job import load_job
from iddpm_ds.testing import reference_preprocess, reference_scale
from iddpm_ds.train.flops import PEAK_FLOPS, train_flops_per_image

KINDS = {"original": "original JPEGs, decode + resize per read",
         "sized": "pre-sized PNGs, decode per read",
         "raw": "pre-sized raw pixels, no decode"}
GPUS_PER_NODE = 8


def make_images(folder: Path, count: int, sides: tuple[int, int] = (40, 96)) -> None:
    """Smooth random JPEGs q90 (coarse noise, bilinear up, a little grain: realistic
    compression), sides drawn from `sides`, files part{i % 7}/cls{i % 10}_{i}.jpg."""
    rng = np.random.default_rng(0)
    for i in range(count):
        (sub := folder / f"part{i % 7}").mkdir(parents=True, exist_ok=True)
        size = tuple(int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-6, 7, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(sub / f"cls{i % 10}_{i:06d}.jpg", quality=90)


class _PerFileDataset(Dataset):
    """The reference's design: list the whole folder (one rank: its slice is all of it), class
    ids from the sorted file-name prefixes, open + preprocess per read."""

    def __init__(self, folder: Path, resolution: int):
        self.paths = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png", ".npy"))
        names = [p.name.split("_")[0] for p in self.paths]
        ids = {n: i for i, n in enumerate(sorted(set(names)))}
        self.classes, self.resolution = [ids[n] for n in names], resolution

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
        return reference_scale(arr), {"y": np.array(self.classes[idx], dtype=np.int64)}


def epoch(reader: str, path: Path, resolution: int, batch: int, workers: int) -> float:
    """Seconds per image of one epoch, start-up included: the per-file loader over a folder
    ("files") or build_train_stream over a shard index ("shards")."""
    start = time.perf_counter()
    if reader == "files":
        seen = sum(x.shape[0] for x, _ in DataLoader(_PerFileDataset(path, resolution), batch_size=batch,
                                                     shuffle=True, num_workers=workers, drop_last=True))
    else:
        stream = build_train_stream(DataSpec(shards=str(path), num_workers=workers, shuffle_buffer=1000),
                                    image_size=resolution, class_cond=True, batch_size=batch, rank=0,
                                    world_size=1, seed=0)
        seen = sum(x.shape[0] for _, (x, _) in zip(range(stream.batches_per_epoch), stream))
        stream.close()
    return (time.perf_counter() - start) / seen


def decode_rates(folder: Path, size: int, images: int) -> dict[str, tuple[float, float]]:
    """Per way of storing (png: iddpm-shards --image-size, jpg: the originals): images/s of
    one reader process (one core; the index read, about 1 ms, included) and shard bytes per
    sample, at `size` (a third of the images above 64 px)."""
    count = images if size <= 64 else max(100, images // 3)
    make_images(folder / "originals", count, (size, size))
    out = {}
    for fmt, options in (("png", {"image_size": size}), ("jpg", {})):
        index = write_items(folder_items(folder / "originals"), folder / fmt,
                            WriteOptions(shard_size=100, progress=False, **options), "bench")
        stored = sum(s["bytes"] for s in index["splits"]["train"]["shards"]) / count
        out[fmt] = 1 / epoch("shards", folder / fmt / "index.json", size, 50, 0), stored
    return out


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


def capacity(images: int, mfu: float) -> None:
    """The capacity table: GPU appetite per paper job against one core's decode rate."""
    specs = {p.stem: load_job(p) for p in sorted((ROOT / "launch/jobs/paper").glob("*.yaml"))}
    with tempfile.TemporaryDirectory() as tmp:
        decode = {size: decode_rates(Path(tmp) / str(size), size, images)
                  for size in sorted({j.model.image_size for j in specs.values()})}
    rows = []
    for name, job in specs.items():
        flops, size = train_flops_per_image(job), job.model.image_size
        gpu_rate = mfu * PEAK_FLOPS["H200"]["bf16"] / flops
        for fmt, (rate, per_sample) in decode[size].items():
            net = GPUS_PER_NODE * gpu_rate * per_sample
            rows.append([name, size, f"{flops / 1e9:.0f}", f"{gpu_rate:.0f}", fmt, f"{rate:.0f}",
                         f"{GPUS_PER_NODE * gpu_rate / rate:.1f}", f"{per_sample / 1e3:.1f}",
                         f"{net / 1e6:.1f} MB/s ({net * 8 / 1e9:.2f} Gbit/s)"])
    print(table(f"job | px: | GFLOP/img (fwd+bwd): | img/s per H200 at {mfu:.0%} MFU: | "
                "stored as | decode img/s per core: | cores per 8-GPU node: | kB/sample: | "
                "network per node:", rows))


def main() -> None:
    parser = cli(__doc__, threads=None)
    parser.add_argument("--images", type=int, help="10,000 (--capacity: 600 per size, a third at 256 px)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="passes per reader per row")
    parser.add_argument("--capacity", action="store_true", help="the capacity table of the paper jobs instead")
    parser.add_argument("--mfu", type=float, default=0.40, help="--capacity: assumed MFU (no GPU run logged one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.capacity:
        return capacity(args.images or 600, args.mfu)
    res, batch, count = 32, args.batch, args.images or 10_000
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        data = prepare(Path(tmp), count, res)
        print(f"{count} images: generated, pre-sized and sharded in {time.perf_counter() - began:.0f} s; "
              f"{args.repeats} pass(es) per reader per row, median of per-pair ratios")
        rows = []
        for (kind, (folder, index)), workers in ((item, w) for item in data.items() for w in (1, 2)):
            secs = alternate({"files": lambda: epoch("files", folder, res, batch, workers),
                              "shards": lambda: epoch("shards", index, res, batch, workers)},
                             args.repeats)
            rates = {k: 1 / statistics.median(v) for k, v in secs.items()}
            base = rates["files"] if (kind, workers) == ("original", 1) else base
            rows.append([KINDS[kind], workers, f"{rates['files']:.0f}", f"{rates['shards']:.0f}",
                         f"{paired_ratio(secs['shards'], secs['files']):.2f}x",
                         f"{rates['shards'] / base:.2f}x"])
    print(table("stored as | workers: | per-file img/s: | shards img/s: | ratio: | "
                "shards vs per-file originals, 1 worker:", rows))


if __name__ == "__main__":
    main()
