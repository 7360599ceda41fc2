"""Decoding one image file (any mode, EXIF rotation, JPEG draft scaling) to RGB; what an unreadable file raises."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What a broken, truncated, mislabelled or oversized file raises while being opened and decoded.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError)


def decode_image(value: Any, max_pixels: int | None = None, draft_size: int | None = None) -> Image.Image:
    """An RGB PIL image from what `datasets` stores: a dict of bytes/path, a path, or a PIL image.

    Multi-frame files (GIF, APNG, multi-page TIFF) give their first frame; EXIF rotation is applied.
    The pixel count is checked from the header, before anything is decoded. With `draft_size`, a JPEG is
    decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale whose sides are still at least `draft_size`
    (libjpeg's scaled inverse DCT: a 1024 px photo wanted at 256 px decodes about 7x faster).
    """
    if isinstance(value, (dict, str, Path)) and not (isinstance(value, dict) and value.get("bytes")):
        path = value.get("path") if isinstance(value, dict) else value
        image = Image.open(io.BytesIO(Path(path).read_bytes()))  # no file handle outlives the call
    else:
        image = open_image(value)
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ValueError(f"{image.width}x{image.height} is more than data.max_image_pixels={max_pixels} pixels")
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def open_image(value: Any) -> Image.Image:
    """A stored image opened lazily (its header read, its pixels not): from bytes, a path or a PIL image. Use it
    as a context manager when it may hold a file open."""
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, (dict, str, Path)):
        return Image.open(value.get("path") if isinstance(value, dict) else value)
    if isinstance(value, Image.Image):
        return value
    raise TypeError(f"not an image: {type(value).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white, 16-bit is rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def describe(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("path") or "<bytes>")
    return str(value)
