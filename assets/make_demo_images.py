"""Regenerate the small photo set in ``assets/demo_images/`` for the CPU demo.

The pictures are taken from the sample images that are bundled inside the
installed scikit-image package (the ``skimage/data`` folder in
site-packages), so nothing is downloaded. Only images whose scikit-image
docstring states that they are public domain / CC0 (or have no known
copyright restrictions) are used; see ``demo_images/LICENSES.md``.

Each image is converted to RGB, resized with Lanczos filtering so that its
short side is exactly 256 px (aspect ratio kept), and written as a JPEG at
quality 90.

Usage::

    python assets/make_demo_images.py [--out DIR] [--size 256]

Requires only scikit-image (as the source of the files) and Pillow.
"""

from __future__ import annotations

import argparse
import os
import sys

import skimage
from PIL import Image

# output name -> file name inside skimage/data (the file bundled on disk).
# Order: colour photographs first, then at most two grayscale ones.
SOURCES = {
    "astronaut.jpg": "astronaut.png",
    "chelsea.jpg": "chelsea.png",
    "coffee.jpg": "coffee.png",
    "rocket.jpg": "rocket.jpg",
    "hubble_deep_field.jpg": "hubble_deep_field.jpg",
    "retina.jpg": "retina.jpg",
    "immunohistochemistry.jpg": "ihc.png",
    "camera.jpg": "camera.png",  # grayscale
    "brick.jpg": "brick.png",  # grayscale
}

JPEG_QUALITY = 90


def resize_short_side(img: Image.Image, short: int) -> Image.Image:
    """Resize ``img`` so its shorter side equals ``short``, keeping aspect."""
    w, h = img.size
    if w <= h:
        new_w, new_h = short, max(1, round(h * short / w))
    else:
        new_w, new_h = max(1, round(w * short / h)), short
    return img.resize((new_w, new_h), Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(here, "demo_images"))
    parser.add_argument("--size", type=int, default=256, help="short side in px")
    args = parser.parse_args(argv)

    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    os.makedirs(args.out, exist_ok=True)

    total = 0
    for out_name, src_name in SOURCES.items():
        src = os.path.join(data_dir, src_name)
        if not os.path.isfile(src):
            print(f"error: {src} is not bundled with this scikit-image", file=sys.stderr)
            return 1
        with Image.open(src) as im:
            rgb = im.convert("RGB")
        small = resize_short_side(rgb, args.size)
        dst = os.path.join(args.out, out_name)
        small.save(dst, "JPEG", quality=JPEG_QUALITY, optimize=True)
        size = os.path.getsize(dst)
        total += size
        print(f"{out_name:26s} {small.size[0]}x{small.size[1]}  {size / 1024:6.1f} KiB")
    print(f"total: {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
