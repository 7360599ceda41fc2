"""The unavoidable work of one training step, without the trainer around it.

VAE encode, posterior sample and decode; reconstruction + KL + LPIPS (+ the PatchGAN's generator loss, the
discriminator frozen); backward and the VAE's optimizer step; then the discriminator on real and detached
reconstructed images, its backward and optimizer step. The benchmark times it as the floor the trainer is
compared with, and the memory estimate runs it on fake tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from diffusers import AutoencoderKL
from torch import nn

from vae_hf.config import LossConfig
from vae_hf.losses import discriminator_loss, generator_adversarial_loss, kl_loss, reconstruction_loss
from vae_hf.perceptual import perceptual_loss
from vae_hf.trainer import frozen


def unavoidable_step(
    vae: AutoencoderKL,
    lpips: nn.Module | None,
    discriminator: nn.Module | None,
    vae_optimizer: torch.optim.Optimizer,
    disc_optimizer: torch.optim.Optimizer | None,
    images: torch.Tensor,
    loss: LossConfig,
    autocast: Callable[[], AbstractContextManager],
    update: bool = True,
) -> None:
    """One micro-batch as the trainer computes it; `discriminator=None` is a step before
    `loss.disc_start_step`. With `update=False` the gradients accumulate and no optimizer steps."""
    with autocast():
        posterior = vae.encode(images).latent_dist
        reconstructions = vae.decode(posterior.sample()).sample
        g_loss = loss.reconstruction_weight * reconstruction_loss(reconstructions, images, loss.reconstruction)
        g_loss = g_loss + loss.kl_weight * kl_loss(posterior.mean, posterior.logvar, loss.kl_reduction)
        if lpips is not None:
            g_loss = g_loss + loss.perceptual_weight * perceptual_loss(lpips, reconstructions, images).float()
        if discriminator is not None:
            with frozen(discriminator):
                g_loss = g_loss + loss.disc_weight * generator_adversarial_loss(
                    discriminator(reconstructions), loss.disc_loss
                )
    g_loss.backward()
    if update:
        vae_optimizer.step()
        vae_optimizer.zero_grad(set_to_none=True)
    if discriminator is None:
        return
    with autocast():
        d_loss = loss.disc_loss_weight * discriminator_loss(
            discriminator(images), discriminator(reconstructions.detach()), loss.disc_loss
        )
    d_loss.backward()
    if update:
        disc_optimizer.step()
        disc_optimizer.zero_grad(set_to_none=True)
