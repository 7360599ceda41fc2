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
    """A tiny trainer; without LPIPS unless asked (building its VGG trunk costs seconds on a CPU)."""
    overrides = {"loss.perceptual_weight": 0, **overrides}
    return Trainer(load_config(None, tiny_overrides(image_folder, tmp_path / name, **overrides)))


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def first_images(trainer: Trainer) -> torch.Tensor:
    return batching.to_model_range(next(iter(trainer.dataloader))["pixel_values"])


# ------------------------------------------------------------------------------------------------------
# a discriminator that warms up before it plays


def test_the_discriminator_warms_up_on_detached_reconstructions_before_it_plays(image_folder, tmp_path):
    warm = {"loss.disc_update_start_step": 1, "loss.disc_start_step": 3, "train.max_steps": 3}
    common = {"model.sample_posterior": "false"}
    trainer = build(image_folder, tmp_path, **common, **warm)
    calls = count_calls(trainer.discriminator)
    disc_before = {name: p.detach().clone() for name, p in trainer.discriminator.named_parameters()}
    trainer.train()
    assert calls[0] == 2 * 2  # steps 2 and 3: real and fake in its own update; never frozen in the VAE's loss
    assert any(not torch.equal(disc_before[n], p) for n, p in trainer.discriminator.named_parameters())
    # none of its loss reached the VAE: the VAE trained exactly as without a discriminator
    reference = build(image_folder, tmp_path, "reference", **common, **{"loss.disc_weight": 0, "train.max_steps": 3})
    reference.train()
    for name, value in reference.vae.state_dict().items():
        assert torch.equal(value, trainer.vae.state_dict()[name]), name


def test_the_discriminators_schedule_starts_with_its_warm_up(image_folder, tmp_path, monkeypatch):
    from vae_hf.train.player import Player

    rates = []
    real_step = Player.step

    def recording_step(player, accelerator):
        if player.module is trainer.discriminator:
            rates.append(player.lr)
        return real_step(player, accelerator)

    monkeypatch.setattr(Player, "step", recording_step)
    overrides = {
        "loss.disc_update_start_step": 1,
        "loss.disc_start_step": 4,
        "optim.warmup_steps": 2,
        "optim.disc_lr": 2e-3,
        "train.max_steps": 4,
    }
    trainer = build(image_folder, tmp_path, **overrides)
    trainer.train()
    assert rates == pytest.approx([0.0, 1e-3, 2e-3])  # steps 2-4: its own warm-up from its first update
