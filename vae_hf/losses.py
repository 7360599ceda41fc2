"""Loss terms of the KL-VAE recipe, as small pure functions.

The trainer composes them; each is unit-tested against its closed form. Discriminator logits are
whatever the PatchGAN outputs (one score per patch); every adversarial loss averages over patches and
the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (autocast) are reduced in fp32; fp32 and fp64 stay as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def reconstruction_loss(reconstructions: torch.Tensor, images: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean pixel loss: MSE (the reference recipe's ``nn.MSELoss``) or L1 (LDM's ``|x - x_rec|``)."""
    if kind == "l2":
        return F.mse_loss(at_least_fp32(reconstructions), at_least_fp32(images))
    if kind == "l1":
        return F.l1_loss(at_least_fp32(reconstructions), at_least_fp32(images))
    raise ValueError(f"unknown reconstruction loss {kind!r}")


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) = -0.5 * (1 + logvar - mean^2 - exp(logvar)) per element.

    ``mean`` averages over every latent element (the reference recipe's formula); ``sum`` sums over each
    sample's latent elements and averages over the batch (LDM's ``DiagonalGaussianDistribution.kl``). LDM sums
    its reconstruction per sample too, so its KL weight (1e-6) weighs a summed KL against a summed
    reconstruction. A summed KL against a mean reconstruction is C x H x W (2e5 at 256 px) times stronger:
    express LDM with both ``loss.kl_reduction`` and ``loss.reconstruction_reduction`` set to ``sum``.
    """
    mean, logvar = at_least_fp32(mean), at_least_fp32(logvar)
    per_element = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp())
    if reduction == "mean":
        return per_element.mean()
    if reduction == "sum":
        return per_element.flatten(1).sum(dim=1).mean()
    raise ValueError(f"unknown KL reduction {reduction!r}")


def generator_adversarial_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The VAE's adversarial term: make the discriminator call reconstructions real."""
    logits_fake = at_least_fp32(logits_fake)
    if kind == "lsgan":  # least squares towards the "real" target 1 (Mao et al. 2017; the reference recipe)
        return F.mse_loss(logits_fake, torch.ones_like(logits_fake))
    if kind == "hinge":  # LDM/taming: -E[D(x_rec)]
        return -logits_fake.mean()
    if kind == "vanilla":  # non-saturating GAN loss: -log sigmoid(D(x_rec))
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}")


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss, the mean of its real and fake halves (the reference recipe and LDM both halve)."""
    logits_real, logits_fake = at_least_fp32(logits_real), at_least_fp32(logits_fake)
    if kind == "lsgan":
        real = F.mse_loss(logits_real, torch.ones_like(logits_real))
        fake = F.mse_loss(logits_fake, torch.zeros_like(logits_fake))
    elif kind == "hinge":
        real = F.relu(1.0 - logits_real).mean()
        fake = F.relu(1.0 + logits_fake).mean()
    elif kind == "vanilla":
        real = F.softplus(-logits_real).mean()
        fake = F.softplus(logits_fake).mean()
    else:
        raise ValueError(f"unknown adversarial loss {kind!r}")
    return 0.5 * (real + fake)


def adaptive_disc_weight(
    nll_loss: torch.Tensor,
    g_adv_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    loss_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """LDM's adaptive weight (Esser et al. 2021, eq. 7): ||grad nll|| / (||grad adv|| + 1e-4).

    Both gradients are taken with respect to the decoder's last layer only, so the adversarial term
    is scaled to pull on the decoder as hard as the reconstruction terms do. The weight is detached:
    it scales the loss, it is not itself optimised.

    `loss_scale` is fp16's gradient scaling (`GradScaler.scale`): per-pixel gradients of 1e-6..1e-7 are fp16
    subnormals or zero, so both losses are scaled before differentiating, and the 1e-4 with them; the ratio
    is the same, without the underflow.
    """
    scale = loss_scale if loss_scale is not None else (lambda loss: loss)
    nll_grads = torch.autograd.grad(scale(nll_loss), last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(scale(g_adv_loss), last_layer, retain_graph=True)[0]
    epsilon = 1e-4 * scale(torch.ones((), device=nll_grads.device))
    weight = at_least_fp32(nll_grads).norm() / (at_least_fp32(g_grads).norm() + epsilon)
    return weight.clamp(0.0, max_weight).detach()


def vf_loss(
    projected: torch.Tensor, features: torch.Tensor, cos_margin: float = 0.5, distmat_margin: float = 0.25
) -> torch.Tensor:
    """VA-VAE's vision-foundation alignment loss (Yao et al., arXiv 2501.01423, eq. 2-4), its two terms summed.

    `projected` is the projected latent P(z) (N, D, h, w), resized bilinearly to the feature grid of `features`
    (N, D, h', w'). Marginal cosine: the mean over positions i of relu(1 - m1 - cos(P(z)_i, f_i)). Marginal
    distance matrix: the mean over position pairs (i, j) of relu(|cos(P(z)_i, P(z)_j) - cos(f_i, f_j)| - m2). The
    margins leave alignment that is good enough alone. The features are taken as fixed (detached).
    """
    projected = at_least_fp32(projected)
    if projected.shape[-2:] != features.shape[-2:]:
        projected = F.interpolate(projected, size=features.shape[-2:], mode="bilinear", align_corners=False)
    latent = F.normalize(projected.flatten(2), dim=1)  # (N, D, L), unit vectors per position
    feature = F.normalize(at_least_fp32(features).detach().flatten(2), dim=1)
    cos = (latent * feature).sum(dim=1)  # (N, L)
    cos_term = F.relu(1 - cos_margin - cos).mean()
    latent_similarity = latent.transpose(1, 2) @ latent  # (N, L, L)
    feature_similarity = feature.transpose(1, 2) @ feature
    distmat_term = F.relu((latent_similarity - feature_similarity).abs() - distmat_margin).mean()
    return cos_term + distmat_term


def lecam_penalty(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, anchor_real: torch.Tensor, anchor_fake: torch.Tensor
) -> torch.Tensor:
    """LeCam regularisation (Tseng et al., CVPR 2021, eq. 3, in its official form): mean(relu(D(x) - a_fake)^2) +
    mean(relu(a_real - D(x_rec))^2), with a_real, a_fake moving averages of the discriminator's mean real and fake
    logits. It keeps the discriminator's predictions from drifting apart on limited data."""
    logits_real, logits_fake = at_least_fp32(logits_real), at_least_fp32(logits_fake)
    real = F.relu(logits_real - anchor_fake).pow(2).mean()
    fake = F.relu(anchor_real - logits_fake).pow(2).mean()
    return real + fake


def r1_penalty(logits_real: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al., ICML 2018): the batch mean of ||grad_x D(x)||^2 on real images (which must require
    grad), with a graph so that the discriminator trains on it. The logits are summed: each image's gradient is
    that of its own logits."""
    (gradients,) = torch.autograd.grad(at_least_fp32(logits_real).sum(), images, create_graph=True)
    return gradients.float().pow(2).flatten(1).sum(dim=1).mean()
