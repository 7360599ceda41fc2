"""Loss terms against their closed forms."""

import math

import pytest
import torch

from vae_hf.losses import (
    adaptive_disc_weight,
    discriminator_loss,
    generator_adversarial_loss,
    kl_loss,
    reconstruction_loss,
)


def test_kl_is_zero_for_the_standard_normal():
    mean, logvar = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    assert kl_loss(mean, logvar, "mean").item() == 0.0
    assert kl_loss(mean, logvar, "sum").item() == 0.0


def test_kl_matches_the_closed_form_per_element():
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 * (mu^2 + s^2 - 1 - log s^2)
    mu, var = 0.7, 2.5
    mean = torch.full((3, 4, 2, 2), mu)
    logvar = torch.full((3, 4, 2, 2), math.log(var))
    expected = 0.5 * (mu**2 + var - 1 - math.log(var))
    assert kl_loss(mean, logvar, "mean").item() == pytest.approx(expected, rel=1e-6)
    # sum: over each sample's 4*2*2 = 16 latent elements, then the batch mean
    assert kl_loss(mean, logvar, "sum").item() == pytest.approx(16 * expected, rel=1e-6)


def test_kl_mean_is_the_seed_formula():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    seed = -0.5 * torch.mean(1 + logvar - mean.pow(2) - logvar.exp())
    torch.testing.assert_close(kl_loss(mean, logvar, "mean"), seed)


def test_reconstruction_losses():
    images = torch.zeros(2, 3, 4, 4)
    reconstructions = torch.full((2, 3, 4, 4), 0.5)
    assert reconstruction_loss(reconstructions, images, "l2").item() == pytest.approx(0.25)
    assert reconstruction_loss(reconstructions, images, "l1").item() == pytest.approx(0.5)


LOGITS_REAL = torch.tensor([2.0, 0.5, -1.0])
LOGITS_FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_lsgan_values_on_known_logits():
    # generator: mean (D(x_rec) - 1)^2
    assert generator_adversarial_loss(LOGITS_FAKE, "lsgan").item() == pytest.approx((9 + 1 + 0.25) / 3)
    # discriminator: 0.5 * (mean (D(x) - 1)^2 + mean D(x_rec)^2)
    real = (1 + 0.25 + 4) / 3
    fake = (4 + 0 + 2.25) / 3
    assert discriminator_loss(LOGITS_REAL, LOGITS_FAKE, "lsgan").item() == pytest.approx(0.5 * (real + fake))


def test_hinge_values_on_known_logits():
    assert generator_adversarial_loss(LOGITS_FAKE, "hinge").item() == pytest.approx(-(-2 + 0 + 1.5) / 3)
    real = (0 + 0.5 + 2) / 3  # relu(1 - D(x))
    fake = (0 + 1 + 2.5) / 3  # relu(1 + D(x_rec))
    assert discriminator_loss(LOGITS_REAL, LOGITS_FAKE, "hinge").item() == pytest.approx(0.5 * (real + fake))


def test_vanilla_values_on_known_logits():
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected_g = sum(softplus(-x) for x in LOGITS_FAKE.tolist()) / 3
    assert generator_adversarial_loss(LOGITS_FAKE, "vanilla").item() == pytest.approx(expected_g, rel=1e-6)
    real = sum(softplus(-x) for x in LOGITS_REAL.tolist()) / 3
    fake = sum(softplus(x) for x in LOGITS_FAKE.tolist()) / 3
    assert discriminator_loss(LOGITS_REAL, LOGITS_FAKE, "vanilla").item() == pytest.approx(
        0.5 * (real + fake), rel=1e-6
    )


def test_adaptive_weight_is_the_ratio_of_gradient_norms_on_the_last_layer():
    weight = torch.tensor([1.0, 2.0], requires_grad=True)
    nll = (3.0 * weight).sum()  # gradient (3, 3), norm 3*sqrt(2)
    g_adv = (weight**2).sum()  # gradient (2, 4), norm sqrt(20)
    result = adaptive_disc_weight(nll, g_adv, weight, max_weight=1e4)
    assert result.item() == pytest.approx(3 * math.sqrt(2) / (math.sqrt(20) + 1e-4), rel=1e-6)
    assert not result.requires_grad
    assert adaptive_disc_weight((3.0 * weight).sum(), (weight**2).sum(), weight, max_weight=0.5).item() == 0.5


def test_unknown_kinds_are_refused():
    with pytest.raises(ValueError):
        generator_adversarial_loss(LOGITS_FAKE, "wgan")
    with pytest.raises(ValueError):
        kl_loss(torch.zeros(1), torch.zeros(1), "max")


def test_perceptual_auto_is_decided_by_the_cache_the_offline_switch_and_the_network(tmp_path, monkeypatch):
    import vae_hf.models.perceptual as perceptual

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setattr(perceptual, "unreachable_reason", lambda url, timeout_s=5.0: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert perceptual.resolve_pretrained(True) == (True, None) and perceptual.resolve_pretrained(False) == (False, None)
    assert perceptual.resolve_pretrained(None) == (True, None)  # downloadable
    monkeypatch.setattr(perceptual, "unreachable_reason", lambda url, timeout_s=5.0: "cannot reach it: offline")
    pretrained, reason = perceptual.resolve_pretrained(None)
    assert not pretrained and "cannot be downloaded (cannot reach it: offline)" in reason
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pretrained, reason = perceptual.resolve_pretrained(None)
    assert not pretrained and "offline mode is on" in reason
    cached = perceptual.vgg_weights_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert perceptual.resolve_pretrained(None) == (True, None)  # cached wins, offline or not


def test_the_adaptive_weight_in_fp16_is_taken_on_scaled_losses():
    """Per-pixel gradients of ~1e-8 are zero in fp16: unscaled, the weight is noise or 0. Taken on the losses
    as fp16's GradScaler scales them, it equals the fp32 weight within 1%."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 3, 3, padding=1)
    features, target = torch.randn(2, 8, 16, 16), torch.randn(2, 3, 16, 16)

    def weight(half: bool, loss_scale=None) -> float:
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            out = conv(features)
        nll = 1e-5 * reconstruction_loss(out, target)  # d/d(out) ~ 1e-8 per element
        g_adv = 1e-5 * -out.float().mean()
        return adaptive_disc_weight(nll, g_adv, conv.weight, max_weight=1e4, loss_scale=loss_scale).item()

    exact = weight(half=False)
    assert 1e-3 < exact < 1e4  # a real ratio, not the clamp
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    assert weight(half=True, loss_scale=scaler.scale) == pytest.approx(exact, rel=0.01)
    unscaled = weight(half=True)  # control: what it was before
    assert unscaled != pytest.approx(exact, rel=0.01)
