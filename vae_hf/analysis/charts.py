"""PNG charts drawn with PIL: line charts (latent spectra, the probe's loss curve) and latent PCA images.

PIL and numpy are already dependencies; a plotting library would add more to install than these few charts need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
GREY = (120, 120, 120)
SIZE, MARGIN = (720, 440), (70, 52, 24, 56)  # left, top, right, bottom


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    colour: tuple[int, int, int] | None = None
    dashed: bool = False


def line_chart(series: Sequence[Series], title: str, x_label: str, y_label: str, log_y: bool = False) -> Image.Image:
    """Lines on shared axes, a legend top right; with `log_y` the y axis is log10 (non-positive values dropped)."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    points = [[(x, _y(y, log_y)) for x, y in zip(s.x, s.y, strict=True) if _y(y, log_y) is not None] for s in series]
    xs = [x for line in points for x, _ in line] or [0.0, 1.0]
    ys = [y for line in points for _, y in line] or [0.0, 1.0]
    x_range, y_range = _padded(min(xs), max(xs)), _padded(min(ys), max(ys))

    def place(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_range[0]) / (x_range[1] - x_range[0]) * (right - left),
            bottom - (y - y_range[0]) / (y_range[1] - y_range[0]) * (bottom - top),
        )

    draw.rectangle((left, top, right, bottom), outline="black")
    _ticks(draw, x_range, y_range, place, log_y, (left, top, right, bottom))
    for index, (line, spec) in enumerate(zip(points, series, strict=True)):
        colour = spec.colour or PALETTE[index % len(PALETTE)]
        placed = [place(x, y) for x, y in line]
        for segment, (start, end) in enumerate(zip(placed, placed[1:], strict=False)):
            if not spec.dashed or segment % 2 == 0:
                draw.line((start, end), fill=colour, width=2)
        if len(placed) == 1:
            draw.ellipse((placed[0][0] - 2, placed[0][1] - 2, placed[0][0] + 2, placed[0][1] + 2), fill=colour)
        draw.line((right - 190, top + 12 + 16 * index, right - 170, top + 12 + 16 * index), fill=colour, width=2)
        draw.text((right - 164, top + 6 + 16 * index), spec.label[:26], fill="black")
    draw.text((left, 12), title, fill="black")
    draw.text(((left + right) // 2 - 4 * len(x_label), SIZE[1] - 20), x_label, fill="black")
    draw.text((6, 12 + 14), y_label + (" (log scale)" if log_y else ""), fill="black")
    return image


def _y(value: float, log_y: bool) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    if log_y:
        return math.log10(value) if value > 0 else None
    return value


def _padded(low: float, high: float) -> tuple[float, float]:
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    pad = (high - low) * 0.05
    return low - pad, high + pad


def _ticks(draw: ImageDraw.ImageDraw, x_range, y_range, place, log_y: bool, box) -> None:
    left, top, right, bottom = box
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x_range[0] + fraction * (x_range[1] - x_range[0])
        px, _ = place(x, y_range[0])
        draw.line((px, bottom, px, bottom + 4), fill="black")
        draw.text((px - 12, bottom + 6), f"{x:.3g}", fill="black")
        y = y_range[0] + fraction * (y_range[1] - y_range[0])
        _, py = place(x_range[0], y)
        draw.line((left - 4, py, left, py), fill="black")
        draw.line((left + 1, py, right - 1, py), fill=(235, 235, 235))
        draw.text((6, py - 6), f"{10**y if log_y else y:.3g}", fill="black")  # log axes are labelled in values


def pca_image(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, 3, h, w) in [0, 1]: each latent vector projected on the first three principal
    components of these latents, each component stretched over its 1st-99th percentile (as EQ-VAE shows latents).
    Fewer than three channels leave the missing colours at 0.5."""
    count, channels, height, width = latents.shape
    vectors = latents.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, channels)  # (N*h*w, C)
    centred = vectors - vectors.mean(dim=0)
    _, _, components = torch.linalg.svd(centred, full_matrices=False)  # rows: principal directions
    projected = centred @ components[:3].T  # (N*h*w, k<=3)
    low = torch.quantile(projected, 0.01, dim=0)
    high = torch.quantile(projected, 0.99, dim=0)
    scaled = ((projected - low) / (high - low).clamp(min=1e-8)).clamp(0, 1)
    rgb = torch.full((len(vectors), 3), 0.5)
    rgb[:, : scaled.shape[1]] = scaled
    return rgb.reshape(count, height, width, 3).permute(0, 3, 1, 2)


def image_grid(rows: Sequence[torch.Tensor], labels: Sequence[str], cell: int = 96) -> Image.Image:
    """Rows of (N, 3, h, w) images in [0, 1], each scaled (nearest) to `cell` px high, a label left of each row."""
    label_width, gap = 140, 4
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (label_width + columns * (cell + gap), len(rows) * (cell + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for row_index, (row, label) in enumerate(zip(rows, labels, strict=True)):
        y = row_index * (cell + gap)
        draw.text((4, y + cell // 2 - 6), label[:22], fill="black")
        for column, picture in enumerate(row):
            pixels = (picture.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_width + column * (cell + gap), y))
    return grid
