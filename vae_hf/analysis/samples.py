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


def side_by_side(images: torch.Tensor, reconstructions: torch.Tensor) -> Image.Image:
    """One row per image, original left and reconstruction right; inputs in [-1, 1], (N, 3, H, W)."""
    pairs = torch.cat([images, reconstructions], dim=3)  # (N, 3, H, 2W)
    grid = torch.cat(list(pairs), dim=1)  # (3, N*H, 2W)
    pixels = ((grid.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def save_sample(vae: AutoencoderKL, images: torch.Tensor, folder: Path, step: int) -> Path:
    """Write `samples/step-XXXXXXX.png` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    reconstructions = reconstruct(vae, images)
    path = folder / f"step-{step:07d}.png"
    side_by_side(images, reconstructions).save(path)
    return path
