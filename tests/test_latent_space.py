"""The latent-space options (docs/latent-space.md): each off by default and then the step is today's; each, when
on, does what its source describes, in the trainer, the benchmark's floor and checkpoints alike."""

from __future__ import annotations

import pytest
import torch

from vae_hf.config import load_config
from vae_hf.data import loader as batching
from vae_hf.train.trainer import Trainer

from conftest import tiny_overrides


def build(image_folder, tmp_path, name="run", **overrides) -> Trainer:
    """A tiny trainer; without LPIPS unless asked (building its VGG trunk costs seconds on a CPU), and with a fixed
    scaling_factor (exports then measure no latents)."""
    overrides = {"loss.perceptual_weight": 0, "model.scaling_factor": 1.0, **overrides}
    return Trainer(load_config(None, tiny_overrides(image_folder, tmp_path / name, **overrides)))


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def first_images(trainer: Trainer) -> torch.Tensor:
    return batching.to_model_range(next(iter(trainer.dataloader))["pixel_values"])


# ------------------------------------------------------------------------------------------------------
# a discriminator that warms up before it plays


def test_the_discriminator_warms_up_on_detached_reconstructions_before_it_plays(image_folder, tmp_path, monkeypatch):
    from vae_hf.train.player import Player

    disc_rates = []
    real_step = Player.step

    def recording_step(player, accelerator):
        if player.module is trainer.discriminator:
            disc_rates.append(player.lr)
        return real_step(player, accelerator)

    monkeypatch.setattr(Player, "step", recording_step)
    common = {"model.sample_posterior": "false", "optim.warmup_steps": 2, "optim.disc_lr": 2e-3, "train.max_steps": 3}
    trainer = build(image_folder, tmp_path, **common, **{"loss.disc_update_start_step": 1, "loss.disc_start_step": 3})
    calls = count_calls(trainer.discriminator)
    trainer.train()
    assert calls[0] == 2 * 2  # steps 2 and 3: real and fake in its own update; never frozen in the VAE's loss
    assert disc_rates == pytest.approx([0.0, 1e-3])  # its schedule's warm-up starts with its first update
    # none of its loss reached the VAE: the VAE trained exactly as without a discriminator
    reference = build(image_folder, tmp_path, "reference", **common, **{"loss.disc_weight": 0})
    reference.train()
    for name, value in reference.vae.state_dict().items():
        assert torch.equal(value, trainer.vae.state_dict()[name]), name


# ------------------------------------------------------------------------------------------------------
# with every option off, the step is today's


def test_with_every_new_option_off_the_step_is_todays(image_folder, tmp_path):
    """No transform drawn, no noise: the training view decodes exactly the posterior's sample, with the same
    random numbers, as AutoencoderKL's own encode/decode do."""
    from vae_hf.models.latents import PLAIN

    trainer = build(image_folder, tmp_path)
    images = first_images(trainer)
    assert trainer.batch_transform(images) == PLAIN
    assert trainer._augment() is None and trainer.vf_backbone is None
    assert not hasattr(trainer.discriminator, "lecam")
    output = trainer.vae_player.wrapped(images, generator=trainer._noise_generator())
    posterior = trainer.vae.encode(images).latent_dist
    reconstructions = trainer.vae.decode(posterior.sample(trainer._noise_generator())).sample
    assert torch.equal(output.reconstructions, reconstructions)
    assert output.targets is images and output.projected is None
    _, breakdown = trainer.generator_loss(images, output.reconstructions, output.posterior, disc_active=True)
    assert set(breakdown) == {"rec", "kl", "perceptual", "g_adv", "disc_weight", "g_loss"}
    d_breakdown = trainer.discriminator_step(images, output.reconstructions.detach())
    assert set(d_breakdown) == {"d_loss", "d_real", "d_fake", "disc_grad_norm"}


# ------------------------------------------------------------------------------------------------------
# latent noise for the decoder (RAE's noise_tau)


def test_latent_noise_is_sigma_times_each_latents_std_times_eps():
    from vae_hf.models.latents import add_latent_noise

    latents = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 4.0]]]])  # (2, 1, 1, 2): stds sqrt(2) and sqrt(8)
    sigmas = torch.tensor([0.5, 0.25])
    noise = torch.tensor([[[[1.0, -1.0]]], [[[2.0, 0.0]]]])
    expected = torch.tensor([[[[1 + 0.5 * 2**0.5, 3 - 0.5 * 2**0.5]]], [[[0.25 * 8**0.5 * 2, 4.0]]]])
    torch.testing.assert_close(add_latent_noise(latents, sigmas, noise), expected)


def test_the_decoder_sees_noisy_latents_drawn_per_sample_within_tau(image_folder, tmp_path):
    from vae_hf.models.latents import add_latent_noise

    trainer = build(image_folder, tmp_path, **{"model.decoder_noise_tau": 0.8})
    images = first_images(trainer)
    decoded = []
    trainer.vae.decoder.register_forward_pre_hook(lambda _, args: decoded.append(args[0]))
    output = trainer.vae_player.wrapped(images, generator=trainer._noise_generator())
    # the posterior's noise first, then sigma ~ U(0, tau) per sample and eps, from the same seeded generator
    generator = trainer._noise_generator()
    latents = output.posterior.sample(generator)
    sigmas = 0.8 * torch.rand(images.shape[0], generator=generator)
    noisy = add_latent_noise(latents, sigmas, torch.randn(latents.shape, generator=generator))
    assert torch.equal(output.latents, latents) and not torch.equal(noisy, latents)
    torch.testing.assert_close(decoded[0], trainer.vae.post_quant_conv(noisy), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# equivariance regularisation (EQ-VAE)


def pointwise_vae_loss(images: torch.Tensor, transform, image_turns: int | None = None) -> torch.Tensor:
    """A VAE equivariant by construction: encoder and decoder are inverse 1x1 convolutions (downsampling 1).
    `image_turns` turns the target otherwise than the latent (a broken transform, as a control)."""
    from vae_hf.models.latents import BatchTransform

    mixing = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, -1.0], [0.3, 0.0, 1.5]], dtype=torch.float64)
    latents = torch.einsum("oc,nchw->nohw", mixing, images)
    decoded = torch.einsum("oc,nchw->nohw", torch.linalg.inv(mixing), transform.apply(latents))
    target_transform = transform if image_turns is None else BatchTransform(transform.kind, transform.size, image_turns)
    return torch.nn.functional.mse_loss(decoded, target_transform.apply(images, factor=1))


@pytest.mark.parametrize(("size", "turns"), [((5, 5), 0), (None, 1), ((6, 6), 3), ((3, 3), 2)])
def test_a_pointwise_vae_gets_no_extra_loss_from_equivariance(size, turns):
    from vae_hf.models.latents import EQUIVARIANCE, BatchTransform

    images = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    transform = BatchTransform(EQUIVARIANCE, size, turns)
    assert pointwise_vae_loss(images, transform) < 1e-20
    if turns:  # control: the image turned the other way is not the latent's transform
        assert pointwise_vae_loss(images, transform, image_turns=(turns + 1) % 4) > 1e-2


def test_the_image_transform_is_the_latent_transform_at_the_vaes_scale():
    from vae_hf.models.latents import EQUIVARIANCE, BatchTransform

    transform = BatchTransform(EQUIVARIANCE, (5, 6), 1)
    assert transform.apply(torch.zeros(1, 4, 8, 10)).shape == (1, 4, 6, 5)
    assert transform.apply(torch.zeros(1, 3, 64, 80), factor=8).shape == (1, 3, 48, 40)
    constant = torch.full((1, 3, 64, 80), 0.25)
    torch.testing.assert_close(transform.apply(constant, factor=8), torch.full((1, 3, 48, 40), 0.25))


def test_equivariance_batches_are_drawn_as_eq_vae_draws_them():
    import random

    from vae_hf.models.latents import EQUIVARIANCE, LOW_RESOLUTION, PLAIN, draw_batch_transform

    rng = random.Random(0)
    draws = [draw_batch_transform(rng, (32, 32), 0.5, 0.25, 0.25, True) for _ in range(4000)]
    kinds = [draw.kind for draw in draws]
    assert kinds.count(EQUIVARIANCE) / 4000 == pytest.approx(0.5, abs=0.03)
    assert kinds.count(LOW_RESOLUTION) / 4000 == pytest.approx(0.5 * 0.25, abs=0.03)
    equivariance = [draw for draw in draws if draw.kind == EQUIVARIANCE]
    assert {draw.size[0] for draw in equivariance} == set(range(8, 32))  # EQ-VAE's scales 8/32 .. 31/32
    assert {draw.quarter_turns for draw in equivariance} == {1, 2, 3}
    assert all(draw.size[0] == draw.size[1] for draw in equivariance)
    # off: plain, and nothing drawn
    state = rng.getstate()
    assert draw_batch_transform(rng, (32, 32), 0.0, 0.0, 0.25, True) == PLAIN
    assert rng.getstate() == state


def test_an_equivariance_batch_trains_every_loss_on_the_transformed_images(image_folder, tmp_path):
    overrides = {"loss.eq_probability": 1, "loss.eq_scale_min": 0.5, "loss.disc_start_step": 0}
    trainer = build(image_folder, tmp_path, **overrides)
    images = first_images(trainer)
    transform = trainer.batch_transform(images)
    assert transform.kind == "equivariance" and transform.size[0] < 16
    seen = []
    trainer.discriminator.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-2:]))
    breakdown = trainer.training_step(images)
    expected = transform.apply(images, factor=2)
    assert seen == [expected.shape[-2:]] * 3  # frozen in the VAE's loss, then real and fake in its own step
    output = trainer.vae_player.wrapped(images, transform=transform)
    assert torch.equal(output.targets, expected)
    assert breakdown["g_adv"] != 0


def test_downscaled_batches_too_small_for_lpips_are_refused_at_start():
    from vae_hf.config import ConfigError

    with pytest.raises(ConfigError, match=r"^loss.eq_scale_min: .* raise loss.eq_scale_min to 0.0625$"):
        load_config(None, ["loss.eq_probability=0.5", "loss.eq_scale_min=0.01", "data.resolution=256"])
    load_config(None, ["loss.eq_probability=0.5", "loss.eq_scale_min=0.0625", "data.resolution=256"])


# ------------------------------------------------------------------------------------------------------
# vision-foundation alignment (VA-VAE's VF loss)


@pytest.fixture
def tiny_backbone(tmp_path) -> str:
    """A 2-layer DINOv2 with random weights, saved as a local transformers folder (patch 4: a 4 x 4 grid at 16 px)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=16
    )
    folder = tmp_path / "backbone"
    Dinov2Model(config).save_pretrained(folder)
    return str(folder)


def vf_overrides(backbone: str, **extra) -> dict:
    return {"loss.vf_weight": 0.1, "loss.vf_backbone": backbone, "loss.vf_image_size": 16, **extra}


def test_vf_loss_is_the_marginal_cosine_plus_the_marginal_distance_matrix_term():
    from vae_hf.losses import vf_loss

    # two positions (1 x 2 grid), width 2: P(z) = (1, 0), (0, 1); f = (1, 0), (1, 0)
    projected = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    features = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    # cos = (1, 0): mean(relu(0.5 - 1), relu(0.5 - 0)) = 0.25
    # similarities [[1, 0], [0, 1]] against [[1, 1], [1, 1]]: mean(relu(|diff| - 0.25)) = (0.75 + 0.75) / 4
    torch.testing.assert_close(vf_loss(projected, features, 0.5, 0.25), torch.tensor(0.25 + 0.375))
    torch.testing.assert_close(vf_loss(projected, features, 0.0, 0.0), torch.tensor(0.5 + 0.5))
    # P(z) on a finer grid is resized to the features' grid first
    torch.testing.assert_close(vf_loss(projected.repeat_interleave(2, dim=-1), features), torch.tensor(0.625))


def test_the_vf_loss_reaches_only_the_encoder_and_the_projection(image_folder, tmp_path, tiny_backbone):
    overrides = {"loss.reconstruction_weight": 0, "loss.kl_weight": 0, "loss.disc_weight": 0}
    trainer = build(image_folder, tmp_path, **overrides, **vf_overrides(tiny_backbone, **{"loss.vf_weight": 1}))
    trainer.config.loss.vf_adaptive_weight = False  # the VF term alone (the adaptive weight's nll is 0 here)
    images = first_images(trainer)
    output = trainer.vae_player.wrapped(images)
    g_loss, breakdown = trainer.generator_loss(
        images, output.reconstructions, output.posterior, disc_active=False, alignment=trainer.alignment(output)
    )
    assert breakdown["vf"] > 0 and g_loss.item() == pytest.approx(breakdown["vf"].item())
    g_loss.backward()
    module = trainer.vae_player.module
    assert module.vf_projection.weight.grad.abs().sum() > 0
    assert module.vae.encoder.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in module.vae.decoder.parameters())
    assert all(p.grad is None for p in trainer.vf_backbone.parameters())


def test_the_vf_weight_is_adaptive_on_the_encoders_last_layer(image_folder, tmp_path, tiny_backbone, monkeypatch):
    import vae_hf.game as game_module

    layers = []
    real = game_module.adaptive_disc_weight
    monkeypatch.setattr(game_module, "adaptive_disc_weight", lambda *a, **k: layers.append(a[2]) or real(*a, **k))
    trainer = build(image_folder, tmp_path, **{"loss.disc_weight": 0}, **vf_overrides(tiny_backbone))
    images = first_images(trainer)
    breakdown = trainer.training_step(images)
    assert layers == [trainer.vae.encoder.conv_out.weight]
    assert breakdown["vf_weight"] != 0.1 and breakdown["vf_weight"] > 0


def test_the_vf_projection_is_checkpointed_and_not_exported(image_folder, tmp_path, tiny_backbone):
    from safetensors import safe_open

    overrides = {"loss.disc_weight": 0, **vf_overrides(tiny_backbone)}
    trainer = build(image_folder, tmp_path, **overrides)
    trainer.train()
    projection = trainer.vae_player.module.vf_projection.weight.detach().clone()
    with safe_open(tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "vf_projection" in name]
    resumed = build(image_folder, tmp_path, **overrides, **{"train.resume_from": "latest", "train.max_steps": 3})
    assert torch.equal(resumed.vae_player.module.vf_projection.weight, projection)
    assert any(p is resumed.vae_player.module.vf_projection.weight for p in resumed.vae_player.parameters)


def test_the_benchmark_floor_computes_the_vf_loss_the_trainer_does(image_folder, tmp_path, tiny_backbone):
    import contextlib
    import copy

    from vae_hf.perf.floor import floor_step

    overrides = {"loss.disc_weight": 0, "model.sample_posterior": "false", **vf_overrides(tiny_backbone)}
    trainer = build(image_folder, tmp_path, **overrides)
    images = first_images(trainer)
    module = copy.deepcopy(trainer.vae_player.module)
    breakdown = trainer.training_step(images)
    floor, _ = floor_step(module, trainer.game, None, None, None, images, contextlib.nullcontext, update=False)
    for name in ("rec", "vf", "vf_weight", "g_loss"):
        torch.testing.assert_close(floor[name], breakdown[name], rtol=1e-5, atol=0, msg=name)


def test_an_offline_hub_backbone_fails_at_once_in_one_line(image_folder, tmp_path):
    from vae_hf.offline import OfflineError

    with pytest.raises(OfflineError) as error:
        build(image_folder, tmp_path, **vf_overrides("some-owner/not-cached-backbone"))
    message = str(error.value)
    assert message.startswith("loss.vf_backbone=some-owner/not-cached-backbone: ") and "\n" not in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # before any model or data was built


# ------------------------------------------------------------------------------------------------------
# stronger discriminators: DINO heads, DiffAugment, LeCam, lazy R1


def test_lecam_penalty_pulls_each_side_towards_the_other_sides_anchor():
    from vae_hf.losses import lecam_penalty

    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    # mean(relu(real + 0.5)^2) = (2.25 + 12.25) / 2; mean(relu(0.5 - fake)^2) = (2.25 + 0.25) / 2
    expected = torch.tensor(7.25 + 1.25)
    torch.testing.assert_close(lecam_penalty(real, fake, torch.tensor(0.5), torch.tensor(-0.5)), expected)
    assert lecam_penalty(real, fake, torch.tensor(-5.0), torch.tensor(5.0)) == 0  # both inside their anchors


def test_lecam_anchors_are_moving_averages_of_the_mean_logits():
    from vae_hf.models.discriminator import LeCamAnchors

    anchors = LeCamAnchors()
    anchors.update(torch.tensor([1.0, 3.0]), torch.tensor([-4.0]), decay=0.9)
    anchors.update(torch.tensor([2.0]), torch.tensor([0.0]), decay=0.9)
    torch.testing.assert_close(anchors.real, torch.tensor(0.9 * 0.2 + 0.1 * 2.0))
    torch.testing.assert_close(anchors.fake, torch.tensor(0.9 * -0.4))
    assert set(anchors.state_dict()) == {"real", "fake"}  # saved with the discriminator


def test_r1_penalty_is_the_squared_gradient_norm_of_a_linear_discriminator():
    from vae_hf.losses import r1_penalty

    weight = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 0.0]]]]).view(1, 2, 1, 2)
    images = torch.randn(3, 2, 1, 2, requires_grad=True)
    logits = (images * weight).flatten(1).sum(dim=1)
    torch.testing.assert_close(r1_penalty(logits, images), weight.pow(2).sum())


def test_diffaugment_parts_do_what_they_say():
    from vae_hf.models.diffaug import adjust_colour, cutout, diff_augment, translate

    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4) / 100
    ones, zeros = torch.ones(2), torch.zeros(2)
    torch.testing.assert_close(adjust_colour(images, ones * 0.1, ones, ones), images + 0.1)
    grey = adjust_colour(images, zeros, zeros, ones)
    torch.testing.assert_close(grey, images.mean(dim=1, keepdim=True).expand_as(images))
    shifted = translate(images, torch.tensor([[1, 0], [0, -1]]), (1, 1))
    torch.testing.assert_close(shifted[0, :, 1:], images[0, :, :-1])
    assert not shifted[0, :, 0].any()
    torch.testing.assert_close(shifted[1, :, :, :-1], images[1, :, :, 1:])
    cut = cutout(images + 1, torch.tensor([[0, 0], [3, 3]]), (2, 2))
    assert not cut[0, :, :2, :2].any() and cut[0, :, 2:].all() and not cut[1, :, 3, 3].any() and cut[1, :, :3].all()
    # drawn from a generator: the same seed the same augmentation, and gradient passes through
    pixels = images.clone().requires_grad_(True)
    first = diff_augment(pixels, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, diff_augment(images, torch.Generator().manual_seed(3)))
    first.sum().backward()
    assert pixels.grad.abs().sum() > 0


def dino_overrides(backbone: str, **extra) -> dict:
    return {
        "loss.disc_type": "dino",
        "loss.disc_backbone": backbone,
        "loss.disc_image_size": 16,
        "loss.disc_channels": 8,
        "loss.disc_loss": "hinge",
        "loss.disc_diffaug": "true",
        "loss.disc_start_step": 0,
        **extra,
    }


def test_the_dino_discriminator_trains_its_heads_and_never_its_backbone(image_folder, tmp_path, tiny_backbone):
    trainer = build(image_folder, tmp_path, **dino_overrides(tiny_backbone))
    discriminator = trainer.discriminator
    heads = {id(p) for p in discriminator.heads.parameters()}
    assert {id(p) for p in trainer.disc_player.parameters} == heads  # the optimizer holds the heads only
    assert not any(p.requires_grad for p in discriminator.backbone.parameters())
    images = first_images(trainer)
    reconstructions = trainer.vae_player.wrapped(images).reconstructions
    g_loss, breakdown = trainer.generator_loss(
        images, reconstructions, trainer.vae_player.wrapped(images).posterior, True, augment=trainer._augment()
    )
    g_loss.backward()  # through the frozen discriminator, into the decoder
    assert breakdown["g_adv"] != 0 and trainer.vae.decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in discriminator.parameters())
    before = {name: p.detach().clone() for name, p in discriminator.named_parameters()}
    trainer.discriminator_step(images, reconstructions.detach(), trainer._augment())
    moved = {name for name, p in discriminator.named_parameters() if not torch.equal(before[name], p)}
    assert moved and all(name.startswith("heads.") for name in moved)
    assert all(p.grad is None for p in discriminator.backbone.parameters())


def test_lecam_and_lazy_r1_join_the_discriminators_loss_and_lecam_resumes(image_folder, tmp_path):
    overrides = {
        "loss.disc_start_step": 0,
        "loss.disc_lecam_weight": 0.1,
        "loss.disc_r1_weight": 1.0,
        "loss.disc_r1_every_steps": 2,
        "train.log_every_steps": 1,
    }
    trainer = build(image_folder, tmp_path, **overrides)
    images = first_images(trainer)
    trainer.progress.global_step = 2  # an R1 step (every 2nd)
    breakdown = trainer.training_step(images)
    assert breakdown["lecam"] >= 0 and breakdown["r1"] > 0
    trainer.progress.global_step = 3
    assert "r1" not in trainer.training_step(images)
    anchors = trainer.discriminator.lecam
    assert anchors.real != 0 and anchors.fake != 0
    trainer.progress.global_step = 0
    trainer.train()
    saved = anchors.real.clone(), anchors.fake.clone()
    resumed = build(image_folder, tmp_path, **overrides, **{"train.resume_from": "latest", "train.max_steps": 3})
    assert (resumed.discriminator.lecam.real, resumed.discriminator.lecam.fake) == saved


# ------------------------------------------------------------------------------------------------------
# all together


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_option_at_once_trains_under_autocast_with_fp32_master_weights(
    image_folder, tmp_path, tiny_backbone, precision
):
    overrides = {
        **vf_overrides(tiny_backbone),
        **dino_overrides(tiny_backbone, **{"loss.disc_update_start_step": 0}),
        "loss.eq_probability": 1,
        "loss.eq_scale_min": 0.5,
        "model.decoder_noise_tau": 0.8,
        "loss.disc_lecam_weight": 0.01,
        "loss.disc_r1_weight": 1.0,
        "loss.disc_r1_every_steps": 1,
        "train.mixed_precision": precision,
    }
    trainer = build(image_folder, tmp_path, **overrides)
    images = first_images(trainer)
    # fp16's first step overflows at the GradScaler's starting scale (as the adaptive weights always have) and is
    # skipped; the scaler backs off and the next one is finite
    breakdown = trainer.training_step(images)
    breakdown = trainer.training_step(images)
    assert {"vf", "vf_weight", "g_adv", "lecam", "r1"} <= set(breakdown)
    assert all(torch.isfinite(value).all() for value in breakdown.values()), breakdown
    trained = [*trainer.vae_player.parameters, *trainer.disc_player.parameters]
    assert all(p.dtype == torch.float32 for p in trained)


def test_a_resumed_run_with_every_option_matches_the_uninterrupted_one(image_folder, tmp_path, tiny_backbone):
    """Transforms, latent noise and DiffAugment are drawn from (seed, micro-batch, process); the VF projection and
    LeCam's anchors are in the checkpoint: resuming changes nothing, to the bit."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    overrides = {
        **vf_overrides(tiny_backbone),
        **dino_overrides(tiny_backbone, **{"loss.disc_update_start_step": 0, "loss.disc_start_step": 1}),
        "loss.eq_probability": 0.5,
        "loss.eq_low_res_probability": 0.5,
        "loss.eq_scale_min": 0.5,
        "model.decoder_noise_tau": 0.8,
        "loss.disc_lecam_weight": 0.01,
    }

    def run(name: str, **extra) -> dict[str, torch.Tensor]:
        AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator at a time
        GradientState._reset_state()
        PartialState._reset_state()
        trainer = build(image_folder, tmp_path, name, **overrides, **extra)
        trainer.train()
        return {**trainer.vae_player.module.state_dict(), **trainer.discriminator.state_dict()}

    uninterrupted = run("uninterrupted", **{"train.max_steps": 3})
    run("interrupted", **{"train.max_steps": 2})
    resumed = run("interrupted", **{"train.max_steps": 3, "train.resume_from": "latest"})
    assert [name for name in uninterrupted if not torch.equal(uninterrupted[name], resumed[name])] == []
    assert "lecam.real" in resumed and "vf_projection.weight" in resumed
