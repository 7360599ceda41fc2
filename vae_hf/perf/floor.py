"""The floor: one training step's unavoidable work, without the trainer around it.

VAE encode, posterior sample and decode; the generator's loss from the same `Game` the trainer plays
(reconstruction, KL, LPIPS, the adversarial term through the frozen discriminator, the adaptive weight when
the recipe has it); backward and the VAE's optimizer step; then the discriminator's loss on real and
detached reconstructed images, its backward and optimizer step. The benchmark times it as the floor the
trainer is compared with, and the memory estimate runs it on fake tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from diffusers import AutoencoderKL
from torch import nn

from vae_hf.game import Game
from vae_hf.models.vae import decoder_last_layer


def floor_step(
    vae: AutoencoderKL,
    game: Game,
    discriminator: nn.Module | None,
    vae_optimizer: torch.optim.Optimizer,
    disc_optimizer: torch.optim.Optimizer | None,
    images: torch.Tensor,
    autocast: Callable[[], AbstractContextManager],
    update: bool = True,
    sample_posterior: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One micro-batch as the trainer computes it; `discriminator=None` is a step before
    `loss.disc_start_step`. With `update=False` the gradients accumulate and no optimizer steps. Returns the
    generator's and the discriminator's loss breakdowns (detached; the second empty before the start)."""
    with autocast():
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample() if sample_posterior else posterior.mode()
        reconstructions = vae.decode(latents).sample
        g_loss, g_breakdown = game.generator_loss(
            images, reconstructions, posterior, discriminator, decoder_last_layer(vae)
        )
    g_loss.backward()
    if update:
        vae_optimizer.step()
        vae_optimizer.zero_grad(set_to_none=True)
    if discriminator is None:
        return g_breakdown, {}
    with autocast():
        d_loss, d_breakdown = game.discriminator_loss(discriminator, images, reconstructions.detach())
    d_loss.backward()
    if update:
        disc_optimizer.step()
        disc_optimizer.zero_grad(set_to_none=True)
    return g_breakdown, d_breakdown
