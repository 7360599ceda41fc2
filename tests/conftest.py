"""Shared fixtures: tiny image folders and tiny-VAE configs, all offline and on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

# Nothing in the tests may reach a network; the HF libraries then go straight to their caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def write_images(folder: Path, count: int, size=(40, 48), seed: int = 0) -> list[Path]:
    """Smooth colour gradients plus noise: varied enough for a VAE to have something to learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width]
    for index in range(count):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        channels = [np.sin(xs / (4 + index) + phase[c]) + np.cos(ys / (5 + c) + phase[c]) for c in range(3)]
        pixels = (np.stack(channels, -1) * 60 + 128 + rng.normal(0, 10, (height, width, 3))).clip(0, 255)
        path = folder / f"image_{index:02d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def run_cli(*args: str, timeout: int = 300) -> "subprocess.CompletedProcess":
    """`python -m vae_hf ARGS` in a fresh process, as a user runs it; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "vae_hf", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def tiny_vae(seed: int = 0, widths=(32, 64), norm_num_groups: int = 32, sample_size: int = 32):
    """A randomly initialised AutoencoderKL small enough for CPU tests (downsampling 2 for [32, 64])."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    levels = len(widths)
    return AutoencoderKL(
        block_out_channels=tuple(widths),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 8)
    return folder


def tiny_overrides(image_folder: Path, output_dir: Path, **extra) -> list[str]:
    """A [32, 64] AutoencoderKL at 32 px, random-trunk LPIPS, no trackers: seconds on a CPU."""
    values = {
        "output_dir": str(output_dir),
        "model.block_out_channels": "[32,64]",
        "model.layers_per_block": 1,
        "data.dataset": str(image_folder),
        "data.resolution": 32,
        "data.num_workers": 0,
        "data.center_crop": "true",
        "data.random_flip": "false",
        "loss.perceptual_pretrained": "false",
        "train.batch_size": 2,
        "train.gradient_accumulation_steps": 1,
        "train.max_steps": 2,
        "train.report_to": "none",
        "train.sample_every_steps": 1000,
        "train.checkpoint_every_minutes": 0,  # the full state at every epoch's end, as several tests expect
        "optim.lr": 1e-3,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
