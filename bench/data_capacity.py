"""Data capacity on paper, from measurements: for each paper job (launch/jobs/paper/), the
images/s one H200 would consume, the decode images/s one CPU core reaches here at that
job's image size, and from both the loader cores and network bytes/s an 8-GPU node needs.

- GPU appetite: torch's FLOP count of one training step (forward + backward, meta
  tensors: nothing is allocated) per image, against the H200's dense bf16 peak at an
  assumed MFU (40% until bench/gpu_check reports one: --mfu).
- Decode: the shard reader itself (build_train_stream, num_workers 0: one process, so one
  core; OMP_NUM_THREADS=1) over shards of generated images stored at the job's size, as
  PNG (what `iddpm-shards --image-size` writes) and as JPEG quality 90 (stored originals
  already near the size, e.g. LSUN); bytes per sample are the shard bytes (tar headers
  included) over the samples.

    OMP_NUM_THREADS=1 python -m bench.data_capacity          # ~1-2 min on this VM
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from iddpm_ds.data import build_train_stream
from iddpm_ds.data.shards import WriteOptions, write_items
from iddpm_ds.spec.data import DataSpec
from iddpm_ds.spec.job import load_job
from iddpm_ds.train.flops import PEAK_FLOPS, train_flops_per_image

ROOT = Path(__file__).resolve().parents[1]
GPUS_PER_NODE = 8


def _images(size: int, count: int, fmt: str):
    """Smooth random images (coarse noise, bilinear up, a little grain), encoded as fmt."""
    rng = np.random.default_rng(size)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-6, 7, pixels.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=90)
        yield f"{i:06d}", {fmt: buf.getvalue(), "cls": str(i % 10).encode()}


def decode_rate(folder: Path, size: int, fmt: str, count: int) -> tuple[float, float]:
    """(images/s of one reader process, bytes per sample) over `count` images at `size`."""
    out = folder / f"{fmt}{size}"
    out.mkdir()
    from webdataset import TarWriter

    per_shard = 100
    items = list(_images(size, count, fmt))
    for s in range(0, count, per_shard):
        path = out / f"s-{s // per_shard:03d}.tar"
        with open(path, "wb") as fh, TarWriter(fh, encoder=False, mtime=0) as tar:
            for key, fields in items[s:s + per_shard]:
                tar.write({"__key__": key, **fields})
    nbytes = sum(p.stat().st_size for p in out.glob("*.tar"))
    shards = [str(p) for p in sorted(out.glob("*.tar"))]
    spec = DataSpec(shards=shards, num_workers=0, shuffle_buffer=0)
    stream = build_train_stream(spec, image_size=size, class_cond=True, batch_size=50, rank=0,
                                world_size=1, seed=0)
    batches = stream.batches_per_epoch
    start = time.perf_counter()
    seen = sum(x.shape[0] for _, (x, _) in zip(range(batches), stream))
    rate = seen / (time.perf_counter() - start)
    stream.close()
    return rate, nbytes / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mfu", type=float, default=0.40)
    parser.add_argument("--images", type=int, default=600, help="images per size (a third at 256 px)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    peak = PEAK_FLOPS["H200"]["bf16"]
    jobs = sorted((ROOT / "launch" / "jobs" / "paper").glob("*.yaml"))
    specs = {p.stem: load_job(p) for p in jobs}
    decode: dict[tuple[int, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sorted({j.model.image_size for j in specs.values()}):
            for fmt in ("png", "jpg"):
                count = args.images if size <= 64 else max(100, args.images // 3)
                decode[size, fmt] = decode_rate(Path(tmp), size, fmt, count)
                print(f"# decode {size} px {fmt}: {decode[size, fmt][0]:.0f} img/s per core, "
                      f"{decode[size, fmt][1] / 1e3:.1f} kB/sample", file=sys.stderr)
    print(f"| job | px | GFLOP/img (fwd+bwd) | img/s per H200 at {args.mfu:.0%} MFU | stored as | "
          "decode img/s per core | cores per 8-GPU node | kB/sample | network per node |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for name, job in specs.items():
        flops = train_flops_per_image(job)
        gpu_rate = args.mfu * peak / flops
        size = job.model.image_size
        for fmt in ("png", "jpg"):
            rate, per_sample = decode[size, fmt]
            cores = GPUS_PER_NODE * gpu_rate / rate
            net = GPUS_PER_NODE * gpu_rate * per_sample
            print(f"| {name} | {size} | {flops / 1e9:.0f} | {gpu_rate:.0f} | {fmt} | {rate:.0f} | "
                  f"{cores:.1f} | {per_sample / 1e3:.1f} | {net / 1e6:.1f} MB/s "
                  f"({net * 8 / 1e9:.2f} Gbit/s) |")


if __name__ == "__main__":
    main()
