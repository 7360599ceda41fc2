"""The "original | reconstruction" PNGs written while training (the reference recipe's visual check)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean, in eval mode: a deterministic picture of what the VAE has learned."""
    was_training = vae.training
    vae.eval()
    try:
        latents = vae.encode(images).latent_dist.mode()
        return vae.decode(latents).sample
    finally:
        vae.train(was_training)


def side_by_side(images, reconstructions) -> Image.Image:
    """One row per image, original left and reconstruction right; inputs in [-1, 1], (N, 3, H, W) or lists of
    (3, H, W) of different sizes (aspect-ratio buckets: each row is as wide as its image, on a black canvas)."""
    rows = [torch.cat(pair, dim=2) for pair in zip(images, reconstructions, strict=True)]
    width = max(row.shape[-1] for row in rows)
    rows = [torch.nn.functional.pad(row, (0, width - row.shape[-1]), value=-1.0) for row in rows]
    grid = torch.cat(rows, dim=1)  # (3, sum of H, max 2W)
    pixels = ((grid.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def save_sample(vae: AutoencoderKL, images, folder: Path, step: int) -> Path:
    """Write `samples/step-XXXXXXX.png` and return its path; `images` is a batch, or a list of images of
    different sizes (each reconstructed alone)."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(images, torch.Tensor):
        reconstructions = reconstruct(vae, images)
    else:
        reconstructions = [reconstruct(vae, image[None])[0] for image in images]
    path = folder / f"step-{step:07d}.png"
    side_by_side(images, reconstructions).save(path)
    return path
