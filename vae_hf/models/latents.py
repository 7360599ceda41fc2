"""What the decoder is trained on besides the posterior's sample of the image: a spatially transformed latent
(equivariance, EQ-VAE) or a noisy one (latent noise, RAE and l-DeTok).

The transforms are pure functions of their tensors and of a `BatchTransform` decided on the host beforehand
(shapes must be known before the step, and a host decision costs no device sync). One transform is applied
alike to latents and images, so a VAE that is equivariant by construction gets zero extra loss.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vae_hf.losses import at_least_fp32

EQUIVARIANCE, LOW_RESOLUTION = "equivariance", "low_resolution"


@dataclass(frozen=True)
class BatchTransform:
    """One micro-batch's spatial transform. `kind` None is a plain reconstruction; `equivariance` decodes T(z)
    against T(x) (EQ-VAE); `low_resolution` encodes and reconstructs the downscaled image (EQ-VAE's prior
    preservation at low resolution). `size` is the latent grid's (height, width) after a bilinear resize (None:
    kept); `quarter_turns` turns by that many 90° steps."""

    kind: str | None = None
    size: tuple[int, int] | None = None
    quarter_turns: int = 0

    def apply(self, tensor: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """The transform of an (N, C, H, W) tensor whose grid is `factor` times the latent grid (the images:
        the VAE's downsampling factor; the latents: 1)."""
        if self.size is not None:
            size = (self.size[0] * factor, self.size[1] * factor)
            # antialiased, as a downscaled photograph is; the same filter for latents and images. The antialiased
            # kernel has no half-precision CPU implementation: autocast's latents are resized in fp32
            resized = F.interpolate(
                at_least_fp32(tensor), size=size, mode="bilinear", align_corners=False, antialias=True
            )
            tensor = resized.to(tensor.dtype)
        if self.quarter_turns:
            tensor = torch.rot90(tensor, k=self.quarter_turns, dims=(-2, -1))
        return tensor


PLAIN = BatchTransform()


def draw_batch_transform(
    rng: random.Random,
    latent_size: tuple[int, int],
    eq_probability: float,
    low_res_probability: float,
    scale_min: float,
    rotate: bool,
) -> BatchTransform:
    """EQ-VAE's draw (arXiv 2502.09509, section 3): with `eq_probability` an equivariance batch, resized to a
    latent side drawn uniformly from ceil(scale_min x h) .. h - 1 (8 .. 31 of 32 in EQ-VAE) and turned by 1-3
    quarter turns; otherwise, with `low_res_probability`, a low-resolution reconstruction; else plain."""
    if eq_probability > 0 and rng.random() < eq_probability:
        turns = rng.randint(1, 3) if rotate else 0
        return BatchTransform(EQUIVARIANCE, _draw_size(rng, latent_size, scale_min), turns)
    if low_res_probability > 0 and rng.random() < low_res_probability:
        return BatchTransform(LOW_RESOLUTION, _draw_size(rng, latent_size, scale_min))
    return PLAIN


def _draw_size(rng: random.Random, latent_size: tuple[int, int], scale_min: float) -> tuple[int, int] | None:
    """A smaller latent grid with the aspect ratio kept (None when scale_min leaves no smaller side)."""
    height, width = latent_size
    smallest = max(1, math.ceil(scale_min * height))
    if smallest > height - 1:
        return None
    side = rng.randint(smallest, height - 1)
    return side, max(1, round(width * side / height))


def add_latent_noise(latents: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z + sigma_i x std(z_i) x eps per sample i: the noise is measured in each latent's own (detached) standard
    deviation, so it means the same whatever the latents' scale."""
    std = latents.detach().flatten(1).float().std(dim=1).to(latents.dtype)
    return latents + (sigmas * std).view(-1, 1, 1, 1) * noise


def noisy_latents(latents: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """RAE's decoder noise (arXiv 2510.11690, `noise_tau`): sigma drawn per sample from U(0, tau)."""
    sigmas = tau * torch.rand(latents.shape[0], generator=generator, device=latents.device, dtype=latents.dtype)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return add_latent_noise(latents, sigmas, noise)
