"""The trainer's parts, each built alone with explicit arguments: the run's checkpoints and the reporter."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from torch import nn

from vae_hf.config import load_config
from vae_hf.models.vae import encoder_fingerprint
from vae_hf.train.checkpoint import Checkpointer, RunCheckpoints
from vae_hf.train.ema import EMA
from vae_hf.train.player import Player
from vae_hf.train.progress import TrainProgress
from vae_hf.train.reporting import Reporter

from conftest import tiny_overrides, tiny_vae


def linear_player(accelerator: Accelerator) -> tuple[Player, nn.Linear]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    return Player(prepared, model, optimizer, scheduler), model


def test_run_checkpoints_save_and_restore_a_runs_state(tmp_path):
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path)))
    player, model = linear_player(accelerator)
    progress = TrainProgress(global_step=3, micro_step=12, epoch=1, batches_in_epoch=2)
    ema = EMA(model, decay=0.9)
    model(torch.ones(1, 3)).sum().backward()
    player.step(accelerator)
    player.advance_schedule()
    ema.update(model)
    saved_weights, saved_ema = model.weight.detach().clone(), ema.shadow["weight"].clone()
    checkpoints = RunCheckpoints(
        Checkpointer(accelerator, tmp_path / "checkpoints"), progress, {"vae": player, "discriminator": None}, {"k": 1}
    )
    path = checkpoints.save(ema)
    assert path.name == "checkpoint-3"

    with torch.no_grad():
        model.weight.zero_()
    progress.global_step = progress.epoch = 0
    player.advance_schedule()
    ema.update(model)
    resumed = checkpoints.resume("latest", ema, model)

    assert resumed.path == path and resumed.stream_position is None
    assert (progress.global_step, progress.micro_step, progress.epoch, progress.batches_in_epoch) == (3, 12, 1, 2)
    assert torch.equal(model.weight, saved_weights)
    assert torch.equal(ema.shadow["weight"], saved_ema) and ema.updates == 1
    assert player.lr == pytest.approx(0.1 * 9 / 10)  # the schedule is back at its first step


def test_run_checkpoints_start_an_ema_the_checkpoint_did_not_have(tmp_path):
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path)))
    player, model = linear_player(accelerator)
    checkpoints = RunCheckpoints(
        Checkpointer(accelerator, tmp_path / "checkpoints"), TrainProgress(global_step=1), {"vae": player}, {}
    )
    checkpoints.save(ema=None)
    ema = EMA(nn.Linear(3, 2), decay=0.9)  # built from other weights, as at a fresh start
    checkpoints.resume("latest", ema, model)
    assert torch.equal(ema.shadow["weight"], model.weight.detach())  # restarted from the resumed weights


def test_the_reporter_writes_config_samples_and_exports_alone(image_folder, tmp_path):
    config = load_config(None, tiny_overrides(image_folder, tmp_path / "run"))
    accelerator = Accelerator(cpu=True)
    vae = tiny_vae()
    reporter = Reporter(accelerator, config, tmp_path / "run", encoder_fingerprint(vae))

    reporter.write_config()
    assert load_config(str(tmp_path / "run" / "config.yaml"), []) == config
    sample = reporter.write_sample(vae, torch.rand(2, 3, 32, 32) * 2 - 1, step=7)
    assert sample.name.endswith(".png") and "7" in sample.name and sample.is_file()
    reporter.export({tmp_path / "run" / "vae": vae})
    assert (tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors").is_file()

    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(1.0)  # a decoder-only run whose encoder moved must not be exported
    with pytest.raises(RuntimeError, match="the encoder of vae_changed changed"):
        reporter.export({tmp_path / "run" / "vae_changed": vae})
    assert not (tmp_path / "run" / "vae_changed").exists()
