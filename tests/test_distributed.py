"""Two processes (DDP, and FSDP2, on gloo, CPU) train the same VAE as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


DDP_LAUNCH = [
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


def train(
    args: list[str], output_dir: Path, images: Path, script: str = "train_autoencoder.py", **overrides
) -> dict[str, torch.Tensor]:
    command = [*args, script, *tiny_overrides(images, output_dir, **{**RECIPE, **overrides})]
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
    two = train(DDP_LAUNCH, tmp_path / "two", image_folder, **{"train.batch_size": 2})
    one = train([sys.executable], tmp_path / "one", image_folder, **{"train.batch_size": 4})
    assert largest_difference(two, one) < 1e-5
    # and the comparison can tell: one process on half that batch trains measurably different weights
    half = train([sys.executable], tmp_path / "half", image_folder, **{"train.batch_size": 2})
    assert largest_difference(two, half) > 1e-4


def test_fsdp_trains_both_players_as_ddp_does_and_resumes(image_folder, tmp_path):
    """FSDP2 (fully_shard) on gloo, from configs/accelerate/fsdp.yaml (tests/fsdp_on_cpu.py switches
    Accelerate's FSDP on for CPU processes). With the discriminator on from the start, the EMA and
    gradient accumulation, a sharded run stopped after step 2 and resumed to step 3 ends with DDP's
    weights: no generator gradient reaches the discriminator, the EMA is gathered for export, and the
    checkpoint holds FSDP's gathered state (torch files loaded with weights_only=True)."""
    game = {
        "loss.disc_weight": 0.5,
        "loss.disc_start_step": 0,
        "loss.adaptive_disc_weight": "true",
        "train.ema_decay": 0.9,
        "train.batch_size": 1,
        "train.gradient_accumulation_steps": 2,
        "train.max_steps": 3,
    }
    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml"]
    script = "tests/fsdp_on_cpu.py"
    train(fsdp, tmp_path / "fsdp", image_folder, script=script, **{**game, "train.max_steps": 2})
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and not (checkpoint / "model.safetensors").exists()
    sharded = train(fsdp, tmp_path / "fsdp", image_folder, script=script, **game, **{"train.resume_from": "latest"})
    replicated = train(DDP_LAUNCH, tmp_path / "ddp", image_folder, **game)
    assert largest_difference(sharded, replicated) < 1e-6
    ema = {
        run: load_file(tmp_path / run / "vae_ema" / "diffusion_pytorch_model.safetensors") for run in ("fsdp", "ddp")
    }
    assert largest_difference(ema["fsdp"], ema["ddp"]) < 1e-6
    assert largest_difference(sharded, ema["fsdp"]) > 1e-6  # the EMA export is the average, not the weights


@pytest.mark.parametrize(
    ("distributed_type", "fsdp2", "message"),
    [("DEEPSPEED", False, "DeepSpeed is not supported"), ("FSDP", False, "fsdp_version: 2")],
)
def test_unsupported_launch_setups_are_refused_before_anything_is_built(distributed_type, fsdp2, message, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from vae_hf.config import ConfigError
    from vae_hf.trainer import require_supported_distribution

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType[distributed_type]))
    monkeypatch.setattr(Accelerator, "is_fsdp2", property(lambda self: fsdp2))
    with pytest.raises(ConfigError, match=message):
        require_supported_distribution(Accelerator(cpu=True))
