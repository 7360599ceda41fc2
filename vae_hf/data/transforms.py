"""From a decoded image to training pixels: the square crop or an aspect-ratio bucket's, flips, the filters
(`data.min_side`, `data.max_aspect_ratio`), seeds mixed per sample, and the record of a file left out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from vae_hf.data.decode import DECODE_ERRORS, decode_image, describe
from vae_hf.data.loader import to_model_range


@dataclass
class ImageTransform:
    """Resize the short side to `resolution`, crop a square, maybe flip, scale to [-1, 1].

    With `uint8`, the pixels stay 0..255 bytes and `to_model_range` scales them where they are used: the
    training loader's workers then pass a quarter of the bytes to the training process, which copies a
    quarter to the GPU.
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    draft_jpeg: bool = False  # decode JPEGs at a reduced scale still >= resolution (see decode_image)
    uint8: bool = False
    min_side: int | None = None  # training filters: such images are not used (see `check`)
    max_aspect_ratio: float | None = None

    @property
    def draft_size(self) -> int | None:
        """The size a JPEG may be decoded down to: no smaller than the crop, nor than `min_side` (so that the
        filter sees a drafted image's sides on the same side of `min_side` as the file's)."""
        return max(self.resolution, self.min_side or 0) if self.draft_jpeg else None

    def check(self, image: Image.Image) -> Image.Image:
        """Refuse (`ImageFiltered`) an image the training filters leave out: a short side under `min_side`
        (it would be upscaled), or a long side over `max_aspect_ratio` times the short one (a crop would keep
        little of it)."""
        short, long = sorted(image.size)
        if self.min_side is not None and short < self.min_side:
            raise ImageFiltered(f"{image.width}x{image.height} is smaller than data.min_side={self.min_side}")
        if self.max_aspect_ratio is not None and long > self.max_aspect_ratio * short:
            raise ImageFiltered(
                f"{image.width}x{image.height} is more elongated than data.max_aspect_ratio={self.max_aspect_ratio:g}"
            )
        return image

    def __call__(
        self, image: Image.Image, generator: torch.Generator | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The image as pixels of the square crop, or with `size` (height, width: an aspect-ratio bucket)
        resized to cover that size, keeping its aspect ratio, and cropped to it."""
        crop_height, crop_width = size or (self.resolution, self.resolution)
        if size is None:
            image = TF.resize(image, self.resolution, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        else:
            scale = max(crop_height / image.height, crop_width / image.width)
            covering = [max(crop_height, round(image.height * scale)), max(crop_width, round(image.width * scale))]
            image = TF.resize(image, covering, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        width, height = image.size
        if self.center_crop:
            image = TF.center_crop(image, [crop_height, crop_width])
        else:
            top = int(torch.randint(0, height - crop_height + 1, (), generator=generator))
            left = int(torch.randint(0, width - crop_width + 1, (), generator=generator))
            image = TF.crop(image, top, left, crop_height, crop_width)
        pixels = TF.pil_to_tensor(image)  # (3, R, R) uint8
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            pixels = pixels.flip(-1)
        return pixels if self.uint8 else to_model_range(pixels)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (run seed, epoch, index, ...), the same in every process."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class ImageFiltered(ValueError):
    """An image that decodes but that the training filters (`data.min_side`, `data.max_aspect_ratio`) leave out."""


def unreadable_reason(error: BaseException) -> str:
    """What is wrong with a file, in words a person acts on (PIL's own messages name a BytesIO object)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file PIL can read (unknown format, or not an image at all)"
    if isinstance(error, Image.DecompressionBombError):
        return f"too many pixels to decode safely ({str(error).splitlines()[0]})"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "truncated" in text:
        return f"truncated or damaged file ({text})"
    return text


def try_transform(
    value: Any,
    transform: ImageTransform,
    generator: torch.Generator | None = None,
    max_pixels: int | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor | None, str | None]:
    """Decode and transform one stored image (to `size`, a bucket, when given): (pixels, None), or (None, why it
    is unreadable)."""
    try:
        image = transform.check(decode_image(value, max_pixels, transform.draft_size))
        return transform(image, generator, size), None
    except DECODE_ERRORS as error:
        return None, unreadable_reason(error)


def unreadable(value: Any, reason: str, row: int, shard: str | None = None, key: str | None = None) -> dict[str, str]:
    """The record of a file left out that travels with a batch: its name and why. The name is its path, else its
    key in its shard (WebDataset's `__url__` and `__key__`), else its row."""
    name = describe(value)
    if name == "<bytes>":
        name = f"{shard}: {key}" if shard and key else f"row {row}"
    return {"name": name, "reason": reason}
