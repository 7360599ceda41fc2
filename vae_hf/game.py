"""The two-player objective: what the VAE (the generator) and the PatchGAN discriminator each minimise.

The generator's loss is pixel reconstruction + KL + LPIPS, plus, once the discriminator plays, the
adversarial term through a frozen discriminator (gradient reaches the reconstructions, none reaches the
discriminator's weights), scaled by a fixed weight or by LDM's adaptive weight. The discriminator's loss
scores real images against detached reconstructions, so none of it reaches the VAE.

One `Game` serves the trainer, the benchmark's floor (`vae_hf.perf.floor`) and the memory estimate, so all
three compute the same thing.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
from torch import nn

from vae_hf.config import CHOICES, WEIGHT_DTYPES, LossConfig
from vae_hf.losses import (
    adaptive_disc_weight,
    at_least_fp32,
    discriminator_loss,
    generator_adversarial_loss,
    kl_loss,
    lecam_penalty,
    r1_penalty,
    reconstruction_loss,
    vf_loss,
)
from vae_hf.models.latents import BatchTransform, draw_batch_transform
from vae_hf.models.perceptual import perceptual_loss

# train.mixed_precision -> the forward's autocast dtype ("no" runs in full precision)
AUTOCAST_DTYPES = {
    name: getattr(torch, WEIGHT_DTYPES[name]) for name in CHOICES["train.mixed_precision"] if name != "no"
}


def autocast(device_type: str, mixed_precision: str) -> AbstractContextManager:
    """The forward's precision for `train.mixed_precision` (`no`: full precision)."""
    dtype = AUTOCAST_DTYPES.get(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Use a module as a fixed function: gradient reaches its input, none reaches its parameters.

    The flags are restored on the parameters that were switched off, not on whatever `parameters()`
    yields at the end: under FSDP2 the module holds its all-gathered (unsharded) parameters from the
    forward until the backward, and those are rebuilt from the sharded ones' flags at the next gather.
    """
    parameters = list(module.parameters())
    flags = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)


def no_side_effects(_output: torch.Tensor) -> AbstractContextManager:
    return contextlib.nullcontext()


class Alignment(NamedTuple):
    """What VA-VAE's VF loss needs from a forward: the projected latents, the images they encode, and the encoder
    weight its adaptive weight is measured on."""

    projected: torch.Tensor
    inputs: torch.Tensor
    last_layer: torch.Tensor | None


class Game:
    """The losses of both players for one recipe (`loss.*`), a frozen LPIPS network (or None) and the frozen vision
    backbone of the VF loss (or None)."""

    def __init__(self, loss: LossConfig, lpips: nn.Module | None, backbone: nn.Module | None = None):
        self.loss = loss
        self.lpips = lpips
        self.backbone = backbone

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
        side_gradients: Callable[[torch.Tensor], AbstractContextManager] = no_side_effects,
        loss_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
        logvar: torch.Tensor | None = None,
        alignment: Alignment | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The VAE's loss and its detached breakdown.

        `discriminator=None` is a step before `loss.disc_start_step`: the discriminator is not even run.
        `last_layer` is the decoder weight the adaptive weight measures gradients on; `side_gradients`
        wraps that measurement for a launch setup that hooks the reconstructions (DeepSpeed); `loss_scale` is
        fp16's gradient scaling, applied to that measurement so that its gradients do not underflow. `logvar` is
        the learnable log-variance of `loss.learn_logvar` (None without it); `alignment` what the VF loss needs
        (None without it); `augment` DiffAugment, applied to what the discriminator sees (None without it).
        """
        loss = self.loss
        zero = images.new_zeros((), dtype=torch.float32)
        rec = reconstruction_loss(reconstructions, images, loss.reconstruction)
        kl = kl_loss(posterior.mean, posterior.logvar, loss.kl_reduction)
        perceptual = zero
        if self.lpips is not None:
            perceptual = at_least_fp32(perceptual_loss(self.lpips, reconstructions, images))
        nll = self.nll(loss.reconstruction_weight * rec + loss.perceptual_weight * perceptual, images, logvar)
        g_loss = nll + loss.kl_weight * kl
        alignment_terms = {}
        if alignment is not None:
            vf, vf_weight = self.alignment_loss(alignment, nll, loss_scale)
            g_loss = g_loss + vf_weight * vf
            alignment_terms = {"vf": vf, "vf_weight": vf_weight}
        g_adv, disc_weight = zero, zero
        if discriminator is not None:
            with frozen(discriminator):
                seen = augment(reconstructions) if augment is not None else reconstructions
                g_adv = generator_adversarial_loss(discriminator(seen), loss.disc_loss)
            disc_weight = zero + loss.disc_weight
            if loss.adaptive_disc_weight:
                with side_gradients(reconstructions):
                    disc_weight = disc_weight * adaptive_disc_weight(
                        nll, g_adv, last_layer, loss.adaptive_weight_max, loss_scale
                    )
            g_loss = g_loss + disc_weight * g_adv
        breakdown = {
            "rec": rec,
            "kl": kl,
            "perceptual": perceptual,
            "g_adv": g_adv,
            "disc_weight": disc_weight,
            "g_loss": g_loss,
            **alignment_terms,
        }
        if logvar is not None:
            breakdown["logvar"] = logvar
        return g_loss, {name: value.detach() for name, value in breakdown.items()}

    def alignment_loss(
        self, alignment: Alignment, nll: torch.Tensor, loss_scale: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VA-VAE's VF loss and its weight: `loss.vf_weight`, times (`loss.vf_adaptive_weight`) the ratio of the
        reconstruction's and the VF loss's gradient norms on the encoder's last layer, as the adversarial weight is
        measured on the decoder's (VA-VAE, section 3.2). The backbone's features carry no graph: the loss reaches
        only the encoder and the projection."""
        loss = self.loss
        features = self.backbone(alignment.inputs)
        vf = vf_loss(alignment.projected, features, loss.vf_cos_margin, loss.vf_distmat_margin)
        weight = vf.new_tensor(loss.vf_weight)
        if loss.vf_adaptive_weight:
            weight = weight * adaptive_disc_weight(nll, vf, alignment.last_layer, loss.adaptive_weight_max, loss_scale)
        return vf, weight

    def draw_transform(self, rng: random.Random, latent_size: tuple[int, int]) -> BatchTransform:
        """One batch's spatial transform (`loss.eq_*`; plain when they are off, drawing nothing)."""
        loss = self.loss
        return draw_batch_transform(
            rng, latent_size, loss.eq_probability, loss.eq_low_res_probability, loss.eq_scale_min, loss.eq_rotate
        )

    def nll(self, per_pixel_mean: torch.Tensor, images: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
        """The reconstruction side of the loss from its per-pixel mean: as it is (`reconstruction_reduction:
        mean`), or summed over each image's C x H x W elements (`sum`, LDM), and with a learnable log-variance,
        per element: value / exp(logvar) + logvar."""
        elements = images[0].numel() if self.loss.reconstruction_reduction == "sum" else 1
        nll = per_pixel_mean * elements
        if logvar is not None:
            nll = nll / torch.exp(logvar) + logvar * elements
        return nll

    def discriminator_loss(
        self,
        discriminator: nn.Module,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        anchors: nn.Module | None = None,
        r1_scale: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real images and (detached) reconstructions, and its breakdown.

        `augment` (DiffAugment) transforms both sides; `anchors` are LeCam's moving averages (`LeCamAnchors`,
        updated here); `r1_scale` > 0 adds that times the R1 penalty on the real images (a lazy R1 step: their
        forward then runs in full precision, so that the penalty's second-order gradients do not underflow)."""
        see = augment if augment is not None else (lambda pixels: pixels)
        if r1_scale > 0:
            images = images.detach().float().requires_grad_(True)
            with torch.autocast(images.device.type, enabled=False):
                logits_real = discriminator(see(images))
        else:
            logits_real = discriminator(see(images))
        logits_fake = discriminator(see(reconstructions))
        d_loss = self.loss.disc_loss_weight * discriminator_loss(logits_real, logits_fake, self.loss.disc_loss)
        breakdown = {
            "d_real": logits_real.detach().float().mean(),
            "d_fake": logits_fake.detach().float().mean(),
        }
        if anchors is not None:
            lecam = lecam_penalty(logits_real, logits_fake, anchors.real, anchors.fake)
            anchors.update(logits_real, logits_fake, self.loss.disc_lecam_decay)
            d_loss = d_loss + self.loss.disc_lecam_weight * lecam
            breakdown["lecam"] = lecam.detach()
        if r1_scale > 0:
            r1 = r1_penalty(logits_real, images)
            d_loss = d_loss + r1_scale * r1
            breakdown["r1"] = r1.detach()
        return d_loss, {"d_loss": d_loss.detach(), **breakdown}
