"""Image preprocessing, numerically identical to the reference image loader.

Reference algorithm (improved-diffusion's image dataset): halve both sides with BOX
resampling while the shorter side is at least twice the target; resize with BICUBIC so
the shorter side equals the target (each side rounded with Python's round()); convert
to RGB; centre-crop with offset (side - size) // 2; x = uint8 / 127.5 - 1 in [C, H, W].

The uint8 part runs per sample in the loader workers; the float conversion runs once
per batch (`to_model_range`), with the same float32 operations as the reference so the
values are bit-identical.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "gif")
"""Sample fields (and file extensions) read as images, as the reference's file filter."""
RAW_FIELD = "npy"
"""Field of pre-sized raw pixels (uint8 [H, W, 3] in .npy format; `iddpm-shards --raw`)."""
DECODABLE_EXTENSIONS = IMAGE_EXTENSIONS + (RAW_FIELD, "webp", "bmp", "ppm", "tif", "tiff")
"""Fields the reader accepts as the image, in order of preference (reference ones first)."""


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully (lazy decoding would defer errors past the skip point)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """Reference resize + centre crop of one image -> uint8 [image_size, image_size, 3]."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*image.size)
    new_size = tuple(round(x * scale) for x in image.size)
    if new_size != image.size:  # PIL returns a plain copy for an equal size: skip it
        image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    # Cropping before the RGB conversion is exact (conversion is per pixel) and cheaper;
    # both are plain copies for an image already square at the target size (pre-sized shards).
    if image.size != (image_size, image_size):
        left = (image.size[0] - image_size) // 2
        top = (image.size[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)  # [H, W, 3] uint8


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1], the reference's x / 127.5 - 1."""
    x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(127.5).sub_(1)  # [N, 3, H, W]; same float32 ops as the reference, in place


def preprocess_bytes(data: bytes, image_size: int, field: str = "png") -> np.ndarray:
    """Encoded image -> uint8 [image_size, image_size, 3] (the per-sample worker step)."""
    if field == RAW_FIELD:
        return preprocess_array(decode_npy(data), image_size)
    return center_crop_arr(decode_image(data), image_size)


def preprocess_array(array: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 pixels -> [image_size, image_size, 3]; already-sized RGB needs no work at all."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"raw pixels must be uint8 [H, W(, C)], got {array.dtype} {array.shape}")
    if array.shape == (image_size, image_size, 3):
        return array
    return center_crop_arr(Image.fromarray(array), image_size)


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """.npy bytes -> array, through numpy's own reader with pickle refused (object arrays
    and pickles raise ValueError: a shard must never run code)."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(array, np.ndarray):  # np.load reads .npz archives too
        array.close()
        raise ValueError("not .npy data")
    return array
