"""DiffAugment (Zhao et al., NeurIPS 2020): differentiable colour, translation and cutout augmentations, applied to
what the discriminator sees, real and reconstructed alike, so it cannot memorise the training images.

Each augmentation is a pure function of the images and of its drawn parameters; `diff_augment` draws them from a
generator (seeded per micro-batch by the trainer, so a resumed run draws what it would have).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adjust_colour(
    images: torch.Tensor, brightness: torch.Tensor, saturation: torch.Tensor, contrast: torch.Tensor
) -> torch.Tensor:
    """Per image: add `brightness` (in [-0.5, 0.5)), scale the deviation from the pixel's channel mean by
    `saturation` (in [0, 2)), then the deviation from the image's mean by `contrast` (in [0.5, 1.5)); each (N,)."""
    images = images + brightness.view(-1, 1, 1, 1)
    mean = images.mean(dim=1, keepdim=True)
    images = (images - mean) * saturation.view(-1, 1, 1, 1) + mean
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * contrast.view(-1, 1, 1, 1) + mean


def translate(images: torch.Tensor, shifts: torch.Tensor, max_shift: tuple[int, int]) -> torch.Tensor:
    """Shift each image by (dy, dx) whole pixels (`shifts`: (N, 2) integers, each within `max_shift`), filling
    with zeros. The padding is the fixed `max_shift`, so nothing is read back from the device."""
    _, _, height, width = images.shape
    pad_y, pad_x = max_shift
    padded = F.pad(images, (pad_x, pad_x, pad_y, pad_y))
    rows = torch.arange(height, device=images.device).view(1, -1) - shifts[:, :1] + pad_y  # (N, H)
    cols = torch.arange(width, device=images.device).view(1, -1) - shifts[:, 1:] + pad_x  # (N, W)
    batch = torch.arange(images.shape[0], device=images.device).view(-1, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cutout(images: torch.Tensor, corners: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero a `size` rectangle of each image whose top-left corner is `corners` (N, 2), clipped at the borders."""
    _, _, height, width = images.shape
    rows = torch.arange(height, device=images.device).view(1, -1)
    cols = torch.arange(width, device=images.device).view(1, -1)
    inside_rows = (rows >= corners[:, :1]) & (rows < corners[:, :1] + size[0])  # (N, H)
    inside_cols = (cols >= corners[:, 1:]) & (cols < corners[:, 1:] + size[1])  # (N, W)
    keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])
    return images * keep[:, None].to(images.dtype)


def diff_augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment's colour, translation (up to 1/8 of a side) and cutout (half a side) policy, drawn per image."""
    count, device = images.shape[0], images.device
    _, _, height, width = images.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator, device=device)

    images = adjust_colour(images, uniform(-0.5, 0.5), uniform(0.0, 2.0), uniform(0.5, 1.5))
    max_shift = (height // 8, width // 8)
    limit = torch.tensor(max_shift, device=device)
    shifts = (torch.rand(count, 2, generator=generator, device=device) * (2 * limit + 1)).long() - limit
    images = translate(images, shifts, max_shift)
    size = (height // 2, width // 2)
    extent = torch.tensor([height - size[0] // 2, width - size[1] // 2], device=device)
    corners = (torch.rand(count, 2, generator=generator, device=device) * extent).long() - torch.tensor(
        [size[0] // 2, size[1] // 2], device=device
    )
    return cutout(images, corners, size)
