"""The real entry points, run as a user runs them: `train_autoencoder.py` and `vae-hf train`."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, tiny_overrides


def run(args: list[str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """Three steps of the demo recipe on a tiny VAE, the discriminator switched on at step 1."""
    from conftest import write_images

    base = tmp_path_factory.mktemp("e2e")
    images = base / "images"
    write_images(images, 8)
    output_dir = base / "run"
    overrides = tiny_overrides(
        images,
        output_dir,
        **{
            "train.max_steps": 3,
            "train.sample_every_steps": 2,
            "loss.disc_start_step": 1,
            "train.report_to": "tensorboard",
        },
    )
    result = run([sys.executable, "train_autoencoder.py", "--config", "configs/demo.yaml", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "VAE saved to" in result.stdout
    return output_dir


def test_training_writes_config_samples_logs_and_vae(trained_run):
    assert (trained_run / "config.yaml").is_file()
    samples = sorted(p.name for p in (trained_run / "samples").glob("*.png"))
    assert samples == ["step-0000001.png", "step-0000002.png"]
    with Image.open(trained_run / "samples" / "step-0000001.png") as sample:
        assert sample.size == (2 * 32, 32)  # original | reconstruction
    events = sorted((trained_run / "logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for folder in {path.parent for path in events}:  # the hyper-parameters go to a folder of their own
        logged = EventAccumulator(str(folder))
        logged.Reload()
        scalars |= set(logged.Tags()["scalars"])
        images |= set(logged.Tags()["images"])
    assert {"rec", "kl", "perceptual", "g_adv", "d_real", "d_fake", "disc_weight", "lr", "images_per_s"} <= scalars
    assert "samples" in images
    assert sorted(p.name for p in (trained_run / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert not list(trained_run.glob(".vae.*"))  # no staging folder left behind


def test_saved_config_reloads_to_the_same_run(trained_run):
    from vae_hf.config import load_config

    config = load_config(trained_run / "config.yaml")
    assert config.train.max_steps == 3 and config.model.block_out_channels == [32, 64]


def test_exported_vae_loads_and_reconstructs(trained_run):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(trained_run / "vae")
    assert vae.config.block_out_channels == [32, 64] and vae.config.latent_channels == 4
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        reconstruction = vae(images).sample
    assert reconstruction.shape == images.shape and torch.isfinite(reconstruction).all()


def test_exported_vae_decodes_inside_a_stable_diffusion_pipeline(trained_run):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(trained_run / "vae")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        unet=unet,
        scheduler=DDIMScheduler(),
        text_encoder=None,
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    assert pipe.vae is vae and pipe.vae_scale_factor == 2
    prompt_embeds = torch.randn(1, 4, 32)  # stands in for a text encoder: nothing to download
    image = pipe(
        prompt_embeds=prompt_embeds, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="np"
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_console_script_trains(tmp_path, image_folder):
    script = shutil.which("vae-hf")
    assert script, "the vae-hf console script is not installed (pip install -e .)"
    result = run([script, "train", *tiny_overrides(image_folder, tmp_path / "run", **{"train.max_steps": 1})])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(
    "override, key",
    [("train.max_stepz=3", "train.max_stepz"), ("optim.lr=-1", "optim.lr"), ("data.resolution=30", "data.resolution")],
)
def test_bad_config_is_refused_before_any_compute(tmp_path, override, key):
    output_dir = tmp_path / "run"
    result = run([sys.executable, "train_autoencoder.py", f"output_dir={output_dir}", override])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr
    assert not output_dir.exists()


def test_missing_dataset_folder_is_one_line(tmp_path, capsys):
    from vae_hf.cli import train_main

    status = train_main(
        [f"output_dir={tmp_path / 'run'}", f"data.dataset={tmp_path / 'missing'}", "loss.perceptual_pretrained=false"]
    )
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("vae-hf: error: data.dataset")


def test_a_real_recipe_without_vgg_weights_stops_at_once_naming_the_override(tmp_path, capsys, monkeypatch):
    """Offline (as here and in CI) the pretrained LPIPS trunk cannot be fetched: a real recipe
    (loss.perceptual_pretrained: true) says so, instantly."""
    import vae_hf.models.perceptual as perceptual
    from vae_hf.cli import train_main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty cache, whatever this machine has
    monkeypatch.setattr(perceptual, "unreachable_reason", lambda url, timeout_s=5.0: "cannot reach it: offline")
    started = time.monotonic()
    status = train_main(["--config", "configs/celebahq_256.yaml", f"output_dir={tmp_path / 'run'}"])
    assert status == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss.perceptual_pretrained=false" in message and "VGG16" in message
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()


def test_the_demo_keeps_a_bounded_number_of_checkpoints_and_resumes_from_the_newest(tmp_path, capsys):
    """The demo's epochs are 2 steps long: a full state at every epoch's end filled the disk (150 checkpoints).
    By default the state is saved at an epoch's end only every train.checkpoint_every_minutes, and only the
    newest train.checkpoints_total_limit are kept; the VAE is still exported at every epoch's end."""
    from vae_hf.config import load_config
    from vae_hf.train.trainer import Trainer

    demo = ["loss.perceptual_pretrained=false", "train.report_to=none", "data.resolution=32", "train.max_steps=8"]
    default = Trainer(load_config(None, [*demo, f"output_dir={tmp_path / 'default'}"]))
    default.train()
    assert [path.name for path in default.checkpointer.complete()] == ["checkpoint-8"]  # the run's end only
    assert "checkpoints: " in capsys.readouterr().out

    every_epoch = [*demo, f"output_dir={tmp_path / 'every'}", "train.checkpoint_every_minutes=0"]
    trainer = Trainer(load_config(None, every_epoch))
    trainer.train()
    kept = [path.name for path in trainer.checkpointer.complete()]
    assert kept == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]  # epoch ends at 2, 4, 6, 8; newest 3 kept
    resumed = Trainer(load_config(None, [*every_epoch, "train.max_steps=10", "train.resume_from=latest"]))
    assert resumed.progress.global_step == 8


def test_the_readmes_first_command_trains_the_demo_offline_from_a_fresh_clone(tmp_path):
    """The README's first command, as printed, in a fresh clone, with no network and no cached VGG weights:
    the demo trains with a random LPIPS trunk, says so, and records the choice. VAE_HF_OVERRIDES caps the
    run at 2 steps (the command itself is unchanged); `pip install -e .` already ran for this environment."""
    readme = (ROOT / "README.md").read_text()
    first = readme.split("```bash\n", 1)[1].splitlines()[0]
    install, command = (part.strip() for part in first.split("&&"))
    assert install == "pip install -e ."
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--local", str(ROOT), str(clone)], check=True, timeout=120)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(tmp_path / "torch_home"),  # no cached VGG16 weights, whatever this machine has
        "VAE_HF_OVERRIDES": "train.max_steps=2",
    }
    result = subprocess.run(shlex.split(command), cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "overrides from VAE_HF_OVERRIDES: train.max_steps=2" in result.stderr
    assert "LPIPS uses a RANDOM VGG16 trunk" in result.stderr and "offline mode is on" in result.stderr
    run = clone / "outputs" / "demo"
    assert (run / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run / "samples").is_dir()
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["perceptual_pretrained"] is False
    trunk = json.loads((run / "metrics.json").read_text())["perceptual_trunk"]
    assert trunk["requested"] == "auto" and trunk["pretrained"] is False and "HF_HUB_OFFLINE" in trunk["reason"]
