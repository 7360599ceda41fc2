"""Two processes (DDP on gloo, CPU) train the same VAE as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides

# eps=1 makes Adam's update about lr * grad for these small gradients, so weights compare gradients
# linearly: at the default eps, Adam's first update is lr * sign(grad), which would blow float
# rounding in gradients that are really zero up to 2 * lr.
RECIPE = {
    "loss.disc_weight": 0,
    "model.sample_posterior": "false",
    "optim.lr": 1e-2,
    "optim.eps": 1.0,
    "train.max_steps": 2,
}


def train(args: list[str], output_dir: Path, images: Path, **overrides) -> dict[str, torch.Tensor]:
    command = [*args, "train_autoencoder.py", *tiny_overrides(images, output_dir, **{**RECIPE, **overrides})]
    # Accelerate's --cpu launcher starts several processes only through mpirun; torchrun (its
    # --multi_gpu launcher) with ACCELERATE_USE_CPU starts them on gloo without one.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(output_dir / "vae" / "diffusion_pytorch_model.safetensors")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_two_processes_equal_one_process_with_the_same_global_batch(image_folder, tmp_path):
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    two = train(launch, tmp_path / "two", image_folder, **{"train.batch_size": 2})
    one = train([sys.executable], tmp_path / "one", image_folder, **{"train.batch_size": 4})
    assert largest_difference(two, one) < 1e-5
    # and the comparison can tell: one process on half that batch trains measurably different weights
    half = train([sys.executable], tmp_path / "half", image_folder, **{"train.batch_size": 2})
    assert largest_difference(two, half) > 1e-4
