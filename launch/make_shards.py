"""iddpm-shards: write WebDataset tar shards and their index.json.

    iddpm-shards digits                                   # bundled demo -> data/digits/
    iddpm-shards folder ~/images -o data/mine --eval-count 1000
    iddpm-shards folder ~/imagenet/train -o data/in64 --labels folder --image-size 64
    iddpm-shards npz samples.npz -o data/samples
    iddpm-shards index "data/old/shard-{000..099}.tar" -o data/old/index.json

Shards hold the original file bytes (the reader applies the reference preprocessing);
--image-size stores them already resized + centre-cropped as PNG instead (bit-identical
reader output, no resize per epoch); add --raw to store the pixels uncompressed.
"""
from __future__ import annotations

import argparse
import re
import sys

from iddpm_ds.data.shards import (OutputExistsError, WriteOptions, digits_items, folder_items,
                                  index_existing, npz_items, write_items)

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def byte_size(text: str) -> int:
    """"500MB", "1GiB", "123456" -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _common(parser: argparse.ArgumentParser, out_default: str | None, eval_default: int) -> None:
    parser.add_argument("-o", "--out", default=out_default, required=out_default is None,
                        help="output folder (shards + index.json)")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="samples per shard (default 1000)")
    parser.add_argument("--max-shard-bytes", type=byte_size, default=None,
                        help="also cap each shard's size, e.g. 500MB")
    parser.add_argument("--eval-count", type=int, default=eval_default,
                        help=f"samples held out into the eval split (default {eval_default})")
    parser.add_argument("--image-size", type=int, default=None,
                        help="store images resized + centre-cropped to this size (PNG)")
    parser.add_argument("--raw", action="store_true",
                        help="with --image-size: store uncompressed pixels (.npy), "
                             "no decoding when reading")
    parser.add_argument("--seed", type=int, default=0, help="seed of shuffle and hold-out")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards/index")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iddpm-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    folder = sub.add_parser("folder", help="image folder (recursive .jpg/.jpeg/.png/.gif)")
    folder.add_argument("src")
    folder.add_argument("--labels", choices=["filename", "folder", "none"], default="filename",
                        help="class = name part before the first '_' (reference), "
                             "parent folder, or none")
    _common(folder, None, 0)
    npz = sub.add_parser("npz", help="uint8 image array in an .npz (+ labels)")
    npz.add_argument("src")
    npz.add_argument("--images-key", default="arr_0")
    npz.add_argument("--labels-key", default="arr_1", help="labels array, used when present")
    _common(npz, None, 0)
    digits = sub.add_parser("digits",
                            help="scikit-learn's 8x8 digits upscaled to 32 px (demo data)")
    _common(digits, "data/digits", 200)
    digits.set_defaults(shard_size=200)
    index = sub.add_parser("index", help="write an index.json for existing local shards")
    index.add_argument("shards", nargs="+", help="shard paths or brace patterns")
    index.add_argument("-o", "--out", required=True, help="index file to write")
    index.add_argument("--split", default="train")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "index":
        index = index_existing(args.shards, args.out, split=args.split)
        print(f"{args.out}: {index['splits'][args.split]['samples']} samples in "
              f"{len(index['splits'][args.split]['shards'])} shards")
        return 0
    # digits are drawn at 32 px; recording that size lets the reader check it
    image_size = args.image_size or (32 if args.command == "digits" else None)
    options = WriteOptions(shard_size=args.shard_size, max_shard_bytes=args.max_shard_bytes,
                           eval_count=args.eval_count, image_size=image_size, raw=args.raw,
                           seed=args.seed,
                           shuffle=not args.no_shuffle, overwrite=args.overwrite,
                           progress=not args.quiet)
    if args.command == "folder":
        items = folder_items(args.src, labels=args.labels)
    elif args.command == "npz":
        items = npz_items(args.src, args.images_key, args.labels_key)
    else:
        items = digits_items()
    try:
        index = write_items(items, args.out, options, created_by=f"iddpm-shards {args.command}")
    except OutputExistsError as err:
        print(f"iddpm-shards: {err}", file=sys.stderr)
        return 2
    for split, part in index["splits"].items():
        print(f"{args.out}: {split} {part['samples']} samples in {len(part['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
