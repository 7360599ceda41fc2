"""The floor: one training step's unavoidable work, without the trainer around it.

VAE encode, posterior sample, the batch's latent transform and noise when the recipe has them, and decode; the
generator's loss from the same `Game` the trainer plays (reconstruction, KL, LPIPS, the VF loss through the frozen
backbone, the adversarial term through the frozen discriminator, the adaptive weights when the recipe has them);
backward and the VAE's optimizer step; then the discriminator's loss on real and detached reconstructed images,
its backward and optimizer step. The benchmark times it as the floor the trainer is compared with, and the memory
estimate runs it on fake tensors.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from diffusers import AutoencoderKL
from torch import nn

from vae_hf.game import Alignment, Game
from vae_hf.models.latents import BatchTransform
from vae_hf.models.vae import VAETrainingModule, decoder_last_layer, encoder_last_layer


def floor_step(
    vae: AutoencoderKL | VAETrainingModule,
    game: Game,
    discriminator: nn.Module | None,
    vae_optimizer: torch.optim.Optimizer,
    disc_optimizer: torch.optim.Optimizer | None,
    images: torch.Tensor,
    autocast: Callable[[], AbstractContextManager],
    update: bool = True,
    sample_posterior: bool = True,
    transform: BatchTransform | None = None,
    generator: torch.Generator | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One micro-batch as the trainer computes it; `discriminator=None` is a step before
    `loss.disc_start_step`. With `update=False` the gradients accumulate and no optimizer steps. `vae` is the bare
    AutoencoderKL (then `sample_posterior` applies) or the trainer's training view of it, which carries the recipe's
    posterior sampling and latent noise; `transform` is
    the batch's spatial transform (None: drawn as the trainer draws one), and `generator` the posterior's and the
    latent noise's source (None: the global one); `augment` DiffAugment (the benchmark passes the recipe's; lazy R1
    is left out, being every k-th step's work). Returns the generator's and the
    discriminator's loss breakdowns (detached; the second empty before the start)."""
    model = vae if isinstance(vae, VAETrainingModule) else VAETrainingModule(vae, sample_posterior)
    if transform is None:
        factor = model.downsample_factor
        transform = game.draw_transform(random.Random(), (images.shape[-2] // factor, images.shape[-1] // factor))
    with autocast():
        output = model(images, generator=generator, transform=transform)
        reconstructions, targets = output.reconstructions, output.targets
        alignment = None
        if output.projected is not None:
            alignment = Alignment(output.projected, output.inputs, encoder_last_layer(model.vae))
        last_layer = decoder_last_layer(model.vae)
        g_loss, g_breakdown = game.generator_loss(
            targets, reconstructions, output.posterior, discriminator, last_layer, alignment=alignment, augment=augment
        )
    g_loss.backward()
    if update:
        vae_optimizer.step()
        vae_optimizer.zero_grad(set_to_none=True)
    if discriminator is None:
        return g_breakdown, {}
    with autocast():
        anchors = getattr(discriminator, "lecam", None)  # LeCam's, when the recipe has them
        detached = reconstructions.detach()
        d_loss, d_breakdown = game.discriminator_loss(discriminator, targets, detached, augment, anchors)
    d_loss.backward()
    if update:
        disc_optimizer.step()
        disc_optimizer.zero_grad(set_to_none=True)
    return g_breakdown, d_breakdown
