"""Two processes on gloo (CPU) train as one: DDP as one process with the same global batch; FSDP2 and
DeepSpeed ZeRO-2, stopped and resumed, as DDP."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides, write_images

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

# The game the sharded runs play: the discriminator with the adaptive weight on from the start, the EMA,
# gradient accumulation, clipping (0.3 is below these gradients' norms) and a warm-up whose learning
# rate must carry over a resume.
GAME = {
    "loss.disc_weight": 0.5,
    "loss.disc_start_step": 0,
    "loss.adaptive_disc_weight": "true",
    "train.ema_decay": 0.9,
    "train.batch_size": 1,
    "train.gradient_accumulation_steps": 2,
    "train.max_steps": 3,
    "optim.max_grad_norm": 0.3,
    "optim.warmup_steps": 3,
}

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
DDP_LAUNCH = [
    *ACCELERATE,
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


FSDP_LAUNCH = [*ACCELERATE, "--config_file", "configs/accelerate/fsdp.yaml"]
DEEPSPEED_LAUNCH = [*ACCELERATE, "--config_file", "configs/accelerate/deepspeed_zero2.yaml"]
SHARDED_ON_CPU = "tests/sharded_on_cpu.py"  # Accelerate turns FSDP and DeepSpeed on only for GPU processes


def launch(
    args: list[str], output_dir: Path, images: Path, script: str = "train_autoencoder.py", **overrides
) -> subprocess.CompletedProcess:
    command = [*args, script, *tiny_overrides(images, output_dir, **{**RECIPE, **overrides})]
    # Accelerate's --cpu launcher starts several processes only through mpirun; torchrun (its
    # --multi_gpu launcher) with ACCELERATE_USE_CPU starts them on gloo without one.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def train(args: list[str], output_dir: Path, images: Path, **kwargs) -> dict[str, torch.Tensor]:
    result = launch(args, output_dir, images, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(output_dir / "vae" / "diffusion_pytorch_model.safetensors")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_two_processes_equal_one_process_with_the_same_global_batch(image_folder, tmp_path):
    two = train(DDP_LAUNCH, tmp_path / "two", image_folder, **{"train.batch_size": 2})
    one = train([sys.executable], tmp_path / "one", image_folder, **{"train.batch_size": 4})
    # Float32 rounding, not the trainer: the CPU's convolution kernels sum a batch of 2 and a batch of 4 in
    # different orders (oneDNN picks them by CPU and shape). Measured: 4.5e-6 on an AVX-512/AMX Xeon, less on
    # AMD EPYC. 5e-5 leaves a 10x margin and is still 30x below the control's difference below.
    assert largest_difference(two, one) < 5e-5
    # and the comparison can tell: one process on half that batch trains measurably different weights
    half = train([sys.executable], tmp_path / "half", image_folder, **{"train.batch_size": 2})
    assert largest_difference(two, half) > 1e-3  # measured: 1.4e-3


@pytest.fixture(scope="module")
def ddp_game(tmp_path_factory):
    """The images, and the VAE and EMA weights DDP ends the game with: what the sharded runs must end with."""
    folder = tmp_path_factory.mktemp("ddp_game")
    write_images(folder / "images", 8)
    weights = train(DDP_LAUNCH, folder / "ddp", folder / "images", **GAME)
    return folder / "images", weights, load_file(folder / "ddp" / "vae_ema" / "diffusion_pytorch_model.safetensors")


def test_fsdp_trains_both_players_as_ddp_does_and_resumes(ddp_game, tmp_path):
    """FSDP2 (fully_shard) on gloo, from configs/accelerate/fsdp.yaml (tests/sharded_on_cpu.py switches
    Accelerate's FSDP on for CPU processes). A sharded run of the game stopped after step 2 and resumed to
    step 3 ends with DDP's weights: no generator gradient reaches the discriminator, the EMA is gathered for
    export, and the checkpoint holds FSDP's gathered state (torch files loaded with weights_only=True)."""
    images, replicated, replicated_ema = ddp_game
    fsdp = tmp_path / "fsdp"
    train(FSDP_LAUNCH, fsdp, images, script=SHARDED_ON_CPU, **{**GAME, "train.max_steps": 2})
    checkpoint = fsdp / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and not (checkpoint / "model.safetensors").exists()
    sharded = train(FSDP_LAUNCH, fsdp, images, script=SHARDED_ON_CPU, **GAME, **{"train.resume_from": "latest"})
    assert largest_difference(sharded, replicated) < 1e-6  # the same kernels as DDP; measured: 7e-9
    ema = load_file(fsdp / "vae_ema" / "diffusion_pytorch_model.safetensors")
    assert largest_difference(ema, replicated_ema) < 1e-6
    assert largest_difference(sharded, ema) > 1e-6  # the EMA export is the average, not the weights


def test_deepspeed_zero2_trains_both_players_as_ddp_does_and_resumes(ddp_game, tmp_path):
    """DeepSpeed ZeRO-2 on gloo, from configs/accelerate/deepspeed_zero2.yaml, one engine per player: as the
    FSDP test. The engine clips where Accelerate does under DDP, and the checkpoint holds the gathered weights
    and Adam state as safetensors, not DeepSpeed's pickled files."""
    images, replicated, replicated_ema = ddp_game
    zero = tmp_path / "zero"
    train(DEEPSPEED_LAUNCH, zero, images, script=SHARDED_ON_CPU, **{**GAME, "train.max_steps": 2})
    checkpoint = zero / "checkpoints" / "checkpoint-2"
    saved = {path.name for path in checkpoint.iterdir()}
    assert {"model.safetensors", "model_1.safetensors", "optimizer.safetensors", "optimizer_1.safetensors"} <= saved
    assert not [name for name in saved if name.endswith((".pt", ".bin")) or (checkpoint / name).is_dir()]
    moments = load_file(checkpoint / "optimizer.safetensors")
    assert moments["step"].item() == 2 and "vae.decoder.conv_out.weight.exp_avg_sq" in moments
    resumed = {**GAME, "train.resume_from": "latest"}
    partitioned = train(DEEPSPEED_LAUNCH, zero, images, script=SHARDED_ON_CPU, **resumed)
    assert largest_difference(partitioned, replicated) < 1e-6  # the same kernels as DDP; measured: 1.2e-7
    ema = load_file(zero / "vae_ema" / "diffusion_pytorch_model.safetensors")
    assert largest_difference(ema, replicated_ema) < 1e-6
    # the checkpoint resumes only under DeepSpeed: a DDP launch is refused in one line
    refused = launch(DDP_LAUNCH, zero, images, **{**resumed, "train.max_steps": 4})
    assert refused.returncode != 0
    assert "was saved under DeepSpeed ZeRO-2, this run is DDP or one process" in refused.stderr


def test_deepspeed_skips_non_finite_updates_then_stops_the_run_saved(image_folder, tmp_path):
    """A learning rate of 1e38 blows the weights up at the first update; every gradient after it is NaN. The
    engines skip those updates, the trainer counts them and stops after `train.max_nonfinite_steps`, saving
    the state it had after step 1."""
    blow_up = {"optim.lr": 1e38, "train.max_steps": 10, "train.max_nonfinite_steps": 2, "train.log_every_steps": 1}
    result = launch(
        DEEPSPEED_LAUNCH,
        tmp_path,
        image_folder,
        script=SHARDED_ON_CPU,
        **blow_up,
        **{"train.checkpoint_every_steps": 1},
    )
    assert result.returncode != 0
    assert "2 optimizer steps in a row had non-finite gradients (step 3)" in result.stderr
    after_first, stopped = (
        load_file(tmp_path / "checkpoints" / f"checkpoint-{step}" / "model.safetensors") for step in (1, 3)
    )
    assert largest_difference(after_first, stopped) == 0.0
    assert all(torch.isfinite(value).all() for value in stopped.values())


def test_fsdp1_is_refused_before_anything_is_built(monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from vae_hf.config import ConfigError, load_config
    from vae_hf.train.trainer import require_supported_distribution

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    monkeypatch.setattr(Accelerator, "is_fsdp2", property(lambda self: False))
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        require_supported_distribution(Accelerator(cpu=True), load_config(None, []))


def test_stages_that_change_the_batch_are_refused_under_deepspeed(monkeypatch):
    """DeepSpeed's engines are built for one micro-batch size and accumulation: a stage may change the resolution
    only (checked before the engine config is read)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from vae_hf.config import ConfigError, load_config
    from vae_hf.train.trainer import require_supported_distribution

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    stages = "train.stages=[{until_step: 2}, {until_step: 4, resolution: 128, batch_size: 1}]"
    with pytest.raises(ConfigError, match=r"train.stages\[1\].batch_size: under DeepSpeed"):
        require_supported_distribution(Accelerator(cpu=True), load_config(None, [stages]))
