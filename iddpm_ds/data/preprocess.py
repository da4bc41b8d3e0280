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
DECODABLE_EXTENSIONS = IMAGE_EXTENSIONS + ("webp", "bmp", "ppm", "tif", "tiff")
"""Fields the reader also accepts as the image when none of the reference ones is present."""


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
    # Cropping before the RGB conversion is exact (conversion is per pixel) and cheaper.
    left = (image.size[0] - image_size) // 2
    top = (image.size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image.convert("RGB"))  # [H, W, 3] uint8


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1], the reference's x / 127.5 - 1."""
    x = images.permute(0, 3, 1, 2).to(torch.float32)  # [N, 3, H, W]
    return (x / 127.5 - 1).contiguous(memory_format=torch.contiguous_format)


def preprocess_bytes(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image -> uint8 [image_size, image_size, 3] (the per-sample worker step)."""
    return center_crop_arr(decode_image(data), image_size)
