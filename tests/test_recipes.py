"""Golden tests: each shipped recipe computes what its source computes. On fixed small tensors and weights,
vae-hf's generator loss, discriminator loss and adaptive weight equal an independent transcription of the
source's formula, written out here from the source (not from vae-hf's code)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from vae_hf.config import load_config
from vae_hf.game import Game
from vae_hf.models.discriminator import PatchDiscriminator
from vae_hf.models.perceptual import build_lpips

from conftest import ROOT


class Case:
    """Images, a 'last layer' that makes the reconstructions (so the adaptive weight has a gradient to
    measure), a posterior, a discriminator and a random-trunk LPIPS: fixed by the seed, in float64."""

    def __init__(self):
        torch.manual_seed(0)
        self.images = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
        self.features = torch.randn(2, 8, 32, 32, dtype=torch.float64)
        self.last_layer = torch.nn.Conv2d(8, 3, 3, padding=1).double()
        moments = torch.randn(2, 8, 4, 4, dtype=torch.float64)
        self.posterior = DiagonalGaussianDistribution(moments)
        self.discriminator = PatchDiscriminator(3, 8, 2, "none").double()
        self.lpips = build_lpips(pretrained=False).double()

    def reconstructions(self) -> torch.Tensor:
        return torch.tanh(self.last_layer(self.features))

    def lpips_per_image(self, reconstructions: torch.Tensor) -> torch.Tensor:
        return self.lpips(self.images, reconstructions)  # (B, 1, 1, 1)


def adaptive(nll: torch.Tensor, g: torch.Tensor, layer: torch.Tensor, clamp: float = 1e4) -> torch.Tensor:
    """Esser et al. 2021 / taming's calculate_adaptive_weight."""
    nll_grads = torch.autograd.grad(nll, layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g, layer, retain_graph=True)[0]
    return torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, clamp).detach()


def vae_hf_losses(recipe: str, case: Case, discriminator_on: bool):
    loss = load_config(ROOT / "configs" / recipe).loss
    game = Game(loss, case.lpips)
    reconstructions = case.reconstructions()
    discriminator = case.discriminator if discriminator_on else None
    g_loss, g_parts = game.generator_loss(
        case.images, reconstructions, case.posterior, discriminator, case.last_layer.weight
    )
    d_loss = None
    if discriminator_on:
        d_loss, _ = game.discriminator_loss(case.discriminator, case.images, reconstructions.detach())
    return g_loss, g_parts["disc_weight"], d_loss


def test_celebahq_256_is_the_studys_loop():
    """The study's loop (recon MSELoss, KL as -0.5 * mean(...), LSGAN through MSELoss, LPIPS mean)."""
    case = Case()
    g_loss, weight, d_loss = vae_hf_losses("celebahq_256.yaml", case, discriminator_on=True)

    x, output = case.images, case.reconstructions()
    mean, logvar = case.posterior.mean, case.posterior.logvar
    recon_loss = torch.nn.MSELoss()(output, x)
    kl_loss = -0.5 * torch.mean(1 + logvar - mean.pow(2) - logvar.exp())
    g = recon_loss + 5e-6 * kl_loss
    disc_fake_pred = case.discriminator(output)
    g = g + 0.5 * torch.nn.MSELoss()(disc_fake_pred, torch.ones_like(disc_fake_pred))
    g = g + 1.0 * torch.mean(case.lpips(output, x))
    fake, real = case.discriminator(output.detach()), case.discriminator(x)
    d = 0.5 * (torch.nn.MSELoss()(fake, torch.zeros_like(fake)) + torch.nn.MSELoss()(real, torch.ones_like(real))) / 2

    torch.testing.assert_close(g_loss, g, rtol=1e-12, atol=0)
    torch.testing.assert_close(d_loss, d, rtol=1e-12, atol=0)
    assert weight.item() == 0.5  # fixed, no adaptive weight


def test_ldm_kl_f8_is_ldms_lpips_with_discriminator():
    """LDM's LPIPSWithDiscriminator: per-pixel L1 + LPIPS broadcast, nll with logvar (0: not optimised),
    both nll and KL summed per image and averaged over the batch, hinge GAN with the adaptive weight."""
    case = Case()
    g_loss, weight, d_loss = vae_hf_losses("ldm_kl_f8.yaml", case, discriminator_on=True)

    inputs, reconstructions = case.images, case.reconstructions()
    batch = inputs.shape[0]
    rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
    rec_loss = rec_loss + 1.0 * case.lpips(inputs.contiguous(), reconstructions.contiguous())
    logvar = torch.zeros(())
    nll_loss = rec_loss / torch.exp(logvar) + logvar
    nll_loss = torch.sum(nll_loss) / batch
    posterior = case.posterior
    kl = 0.5 * torch.sum(torch.pow(posterior.mean, 2) + posterior.var - 1.0 - posterior.logvar, dim=[1, 2, 3])
    kl_loss = torch.sum(kl) / batch
    logits_fake = case.discriminator(reconstructions.contiguous())
    gen = -torch.mean(logits_fake)
    d_weight = adaptive(nll_loss, gen, case.last_layer.weight) * 0.5
    loss = nll_loss + 1e-6 * kl_loss + d_weight * 1.0 * gen
    real = case.discriminator(inputs.contiguous().detach())
    fake = case.discriminator(reconstructions.contiguous().detach())
    d = 1.0 * 0.5 * (torch.mean(F.relu(1.0 - real)) + torch.mean(F.relu(1.0 + fake)))

    torch.testing.assert_close(weight, d_weight, rtol=1e-9, atol=0)
    torch.testing.assert_close(g_loss, loss, rtol=1e-9, atol=0)
    torch.testing.assert_close(d_loss, d, rtol=1e-12, atol=0)


def test_sd_vae_ft_mse_is_mse_plus_a_tenth_of_lpips_on_the_decoder():
    """stabilityai's ft-MSE: MSE + 0.1 x LPIPS, no GAN, the encoder frozen (so no KL gradient)."""
    config = load_config(ROOT / "configs" / "sd_vae_ft_mse.yaml")
    assert config.model.train_decoder_only and config.loss.disc_weight == 0 and config.loss.kl_weight == 0
    case = Case()
    g_loss, weight, _ = vae_hf_losses("sd_vae_ft_mse.yaml", case, discriminator_on=False)

    output = case.reconstructions()
    expected = F.mse_loss(output, case.images) + 0.1 * case.lpips_per_image(output).mean()
    torch.testing.assert_close(g_loss, expected, rtol=1e-12, atol=0)
    assert weight.item() == 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_learnable_logvar_enters_per_element(reduction):
    """nll = value / exp(logvar) + logvar per element, reduced as the recipe reduces the reconstruction."""
    case = Case()
    loss = load_config(None, [f"loss.reconstruction_reduction={reduction}", "loss.learn_logvar=true"]).loss
    logvar = torch.tensor(0.3, dtype=torch.float64)
    per_pixel = torch.tensor(0.25, dtype=torch.float64)
    nll = Game(loss, None).nll(per_pixel, case.images, logvar)
    elements = 3 * 32 * 32 if reduction == "sum" else 1
    assert nll.item() == pytest.approx(elements * (0.25 / torch.exp(logvar).item() + 0.3))
