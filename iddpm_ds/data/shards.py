"""Shard writer: image folders, .npz arrays and the bundled digits -> WebDataset tar shards.

Output folder layout::

    out/train-000000.tar ...   samples "00000000.png" (+ "00000000.cls" with labels)
    out/eval-000000.tar ...    the held-out split, when one is asked for
    out/index.json             {"format", "image_size", "raw", "class_names", "splits": {name:
                                {"samples", "shards": [{"url", "samples", "bytes"}]}}}

Shard urls in the index are relative to it, so the folder can be copied anywhere.
Samples are shuffled (seeded) before sharding: a class-sorted folder would otherwise give
class-sorted shards, which a streaming reader can only mix locally.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Literal, Sequence

import numpy as np
from PIL import Image
from webdataset import TarWriter

from .preprocess import IMAGE_EXTENSIONS, RAW_FIELD, center_crop_arr, decode_image, encode_npy
from .samples import LABEL_FIELD
from .sources import INDEX_FORMAT, INDEX_NAME, count_samples, expand, is_remote

LabelRule = Literal["filename", "folder", "none"]


class OutputExistsError(FileExistsError):
    """The output folder already holds shards or an index and overwrite was not asked."""


@dataclass(frozen=True)
class WriteOptions:
    """How samples are cut into shards and splits."""

    shard_size: int = 1000
    """Samples per shard (the last shard of a split holds the rest)."""
    max_shard_bytes: int | None = None
    """Also start a new shard before one would exceed this many bytes."""
    eval_count: int = 0
    """Samples held out into the "eval" split (stratified by class when labelled)."""
    image_size: int | None = None
    """Store images resized and centre-cropped (reference algorithm) to this side, as PNG."""
    raw: bool = False
    """With image_size: store the pixels uncompressed (.npy field) instead of PNG: no decoding
    at all when reading, shards about 1.5-2x larger than PNG for natural images."""
    seed: int = 0
    """Seed of the sample shuffle and of the held-out choice."""
    shuffle: bool = True
    """Shuffle samples before sharding."""
    overwrite: bool = False
    """Replace shards and index already in the output folder."""
    progress: bool = True
    """Show a tqdm progress bar."""


@dataclass(frozen=True)
class Item:
    """One sample to write: a loader of (field, bytes) and its class name."""

    load: Callable[[], tuple[str, bytes]]
    class_name: str | None
    source: str
    label: int | None = None
    """Fixed label id (arrays, digits); without it ids number the sorted class names."""


class SplitWriter:
    """Writes one split into {prefix}-{i:06d}.tar with webdataset's TarWriter, rolling over
    at a sample count or before a shard would pass max_bytes; records each shard's entry.

    Not webdataset's ShardWriter: its size limit is soft (a shard closes only after passing
    it, counting payload bytes only), it writes under the final name (a reader could pick up
    a half-written shard) and it reports neither samples nor bytes per shard, which the
    index needs. Each shard is written to "NAME.tmp" and renamed when complete.
    """

    def __init__(self, out_dir: Path, prefix: str, shard_size: int, max_bytes: int | None):
        self.out_dir, self.prefix = out_dir, prefix
        self.shard_size, self.max_bytes = shard_size, max_bytes
        self.shards: list[dict] = []
        self._file: BinaryIO | None = None
        self._tar: TarWriter | None = None
        self._count = self._bytes = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        size = sum(512 + -(-len(v) // 512) * 512 for v in fields.values())  # header + padded data
        too_big = self.max_bytes is not None and self._count and self._bytes + size > self.max_bytes
        if self._tar is not None and (self._count >= self.shard_size or too_big):
            self._finish()
        if self._tar is None:
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._file = open(self.out_dir / (name + ".tmp"), "wb")
            # mtime=0 and fixed owner/mode: the same input gives the same shard bytes
            self._tar = TarWriter(self._file, encoder=False, mtime=0, user="", group="",
                                  mode=0o444)
            self.shards.append({"url": name, "samples": 0, "bytes": 0})
        self._tar.write({"__key__": key, **fields})
        self._count += 1
        self._bytes += size

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()  # writes the end-of-archive blocks; the file is ours to close
        self._file.close()
        entry = self.shards[-1]
        tmp = self.out_dir / (entry["url"] + ".tmp")
        entry["samples"], entry["bytes"] = self._count, tmp.stat().st_size
        os.replace(tmp, self.out_dir / entry["url"])  # a shard appears only when complete
        self._tar, self._file, self._count, self._bytes = None, None, 0, 0

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards


def _check_output(out_dir: Path, overwrite: bool) -> None:
    old = sorted(out_dir.glob("*.tar")) + sorted(out_dir.glob(INDEX_NAME))
    if old and not overwrite:
        raise OutputExistsError(f"{out_dir} already holds {len(old)} shard/index files "
                                f"(e.g. {old[0].name}); pass --overwrite to replace them")
    for path in old:
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _split(items: Sequence[Item], options: WriteOptions) -> dict[str, list[Item]]:
    """Shuffle, then hold out eval_count items (the same share of every class when labelled)."""
    rng = np.random.default_rng(options.seed)
    order = rng.permutation(len(items)) if options.shuffle else np.arange(len(items))
    ordered = [items[i] for i in order]
    if options.eval_count <= 0:
        return {"train": ordered}
    if options.eval_count >= len(items):
        raise ValueError(f"eval_count={options.eval_count} leaves no training samples "
                         f"of {len(items)}")
    names = sorted({str(it.class_name) for it in ordered})
    held: set[int] = set()
    for rank, name in enumerate(names):  # stratified: eval_count spread evenly over classes
        share = options.eval_count // len(names) + (rank < options.eval_count % len(names))
        members = [i for i, it in enumerate(ordered) if str(it.class_name) == name]
        held.update(members[:share])
    return {"train": [it for i, it in enumerate(ordered) if i not in held],
            "eval": [it for i, it in enumerate(ordered) if i in held]}


def _labels(items: Sequence[Item]) -> tuple[list[str] | None, Callable[[Item], int] | None]:
    """(class names by id, item -> id); ids are given labels, else sorted-name order (reference)."""
    if any(it.class_name is None for it in items):
        return None, None
    if all(it.label is not None for it in items):
        names = {int(it.label): str(it.class_name) for it in items}
        return [names.get(i, str(i)) for i in range(max(names) + 1)], lambda it: int(it.label)
    ids = {name: i for i, name in enumerate(sorted({str(it.class_name) for it in items}))}
    return sorted(ids), lambda it: ids[str(it.class_name)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _loader(item: Item, options: WriteOptions) -> tuple[str, bytes]:
    field, data = item.load()
    if options.image_size is None:
        return field, data
    pixels = center_crop_arr(decode_image(data), options.image_size)  # [S, S, 3] uint8
    return (RAW_FIELD, encode_npy(pixels)) if options.raw else ("png", _png(pixels))


def write_items(items: Sequence[Item], out_dir: str | os.PathLike, options: WriteOptions,
                created_by: str) -> dict:
    """Write items into train (and eval) shards plus index.json; returns the index."""
    if not items:
        raise ValueError("nothing to write: no input samples found")
    if options.raw and options.image_size is None:
        raise ValueError("raw pixel storage needs image_size (pixels are stored pre-sized)")
    out = Path(out_dir)
    _check_output(out, options.overwrite)
    class_names, label_of = _labels(items)
    splits = _split(items, options)
    index = {"format": INDEX_FORMAT, "created_by": created_by, "image_size": options.image_size,
             "raw": options.raw, "class_names": class_names, "splits": {}}
    from tqdm import tqdm

    bar = tqdm(total=len(items), unit="img", disable=not options.progress, desc=f"shards -> {out}")
    key = 0
    for split, members in splits.items():
        writer = SplitWriter(out, split, options.shard_size, options.max_shard_bytes)
        for item in members:
            field, data = _loader(item, options)
            fields = {field: data}
            if label_of is not None:
                fields[LABEL_FIELD] = str(label_of(item)).encode()
            writer.write(f"{key:08d}", fields)
            key += 1
            bar.update()
        shards = writer.close()
        index["splits"][split] = {"samples": len(members), "shards": shards}
    bar.close()
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1))
    return index


# ----------------------------------------------------------------------------- sources


def _read_file(path: Path) -> Callable[[], tuple[str, bytes]]:
    return lambda: (path.suffix[1:].lower(), path.read_bytes())


def folder_items(src: str | os.PathLike, labels: LabelRule = "filename") -> list[Item]:
    """Every .jpg/.jpeg/.png/.gif under src, recursively, in sorted order (reference filter).

    labels: "filename" = the file name's part before the first underscore (reference
    convention), "folder" = the parent folder's name, "none" = unlabelled.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    paths = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.name.split(".")[-1].lower() in IMAGE_EXTENSIONS)
    rule: dict[str, Callable[[Path], str | None]] = {
        "filename": lambda p: p.name.split("_")[0], "folder": lambda p: p.parent.name,
        "none": lambda p: None}
    return [Item(_read_file(p), rule[labels](p), str(p.relative_to(root))) for p in paths]


def array_items(images: np.ndarray, labels: np.ndarray | None) -> list[Item]:
    """uint8 [N, H, W, 3] (or [N, H, W]) images (+ integer labels [N]) as PNG samples."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"need uint8 images [N, H, W(, C)], got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")

    def load(i: int) -> Callable[[], tuple[str, bytes]]:
        return lambda: ("png", _png(images[i]))

    if labels is None:
        return [Item(load(i), None, f"#{i}") for i in range(len(images))]
    return [Item(load(i), str(int(v)), f"#{i}", int(v)) for i, v in enumerate(labels)]


def npz_items(path: str | os.PathLike, images_key: str = "arr_0",
              labels_key: str | None = "arr_1") -> list[Item]:
    """Images (and labels, when labels_key is present) from an .npz file."""
    with np.load(path) as data:
        if images_key not in data:
            raise KeyError(f"{path} has no array {images_key!r} (arrays: {sorted(data.files)})")
        labels = data[labels_key] if labels_key and labels_key in data else None
        return array_items(data[images_key], labels)


def digits_items(size: int = 32) -> list[Item]:
    """scikit-learn's 1,797 8x8 handwritten digits, upscaled (BICUBIC) to size px RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8], 0..16 -> 0..255

    def load(i: int) -> Callable[[], tuple[str, bytes]]:
        def encode() -> tuple[str, bytes]:
            image = Image.fromarray(gray[i]).resize((size, size), Image.Resampling.BICUBIC)
            return "png", _png(np.asarray(image.convert("RGB")))
        return encode

    return [Item(load(i), str(int(t)), f"digits#{i}", int(t)) for i, t in enumerate(digits.target)]


def index_existing(sources: Iterable[str], out: str | os.PathLike, split: str = "train",
                   class_names: Sequence[str] | None = None) -> dict:
    """Write an index for existing local shards (counts read from their tar headers)."""
    out_path = Path(out)
    urls = expand(list(sources))
    if not urls or any(is_remote(u) for u in urls):
        raise ValueError("index needs local shard paths")
    shards = []
    for url in urls:
        with open(url, "rb") as fh:
            shards.append({"url": os.path.relpath(url, out_path.parent),
                           "samples": count_samples(fh, seekable=True),
                           "bytes": os.path.getsize(url)})
    index = {"format": INDEX_FORMAT, "created_by": "iddpm-shards index", "image_size": None,
             "class_names": list(class_names) if class_names else None,
             "splits": {split: {"samples": sum(s["samples"] for s in shards), "shards": shards}}}
    out_path.write_text(json.dumps(index, indent=1))
    return index
