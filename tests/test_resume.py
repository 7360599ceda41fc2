"""Never lose a run: kill it, resume it, and end where an uninterrupted run ends."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from vae_hf.cli import main
from vae_hf.config import ConfigError, load_config
from vae_hf.train.checkpoint import STATE_FILE, Checkpointer, CheckpointError
from vae_hf.train.trainer import Trainer

from conftest import ROOT, tiny_overrides, write_images

# 8 images, batches of 2, 2 micro-batches a step: 2 steps an epoch, so 6 steps cross two epoch ends,
# and a checkpoint every 3 steps falls mid-epoch. Random crops, flips, posterior noise and the
# discriminator (from step 2) are all on: each must continue exactly after a resume.
RECIPE = {
    "train.max_steps": 6,
    "train.gradient_accumulation_steps": 2,
    "train.checkpoint_every_steps": 3,
    "loss.disc_start_step": 2,
    "data.center_crop": "false",
    "data.random_flip": "true",
    "data.num_workers": 1,
}


def command(images: Path, output_dir: Path, **extra) -> list[str]:
    return [
        sys.executable,
        "train_autoencoder.py",
        "--config",
        "configs/demo.yaml",
        *tiny_overrides(images, output_dir, **{**RECIPE, **extra}),
    ]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpointer(None, output_dir / "checkpoints").latest()
    weights = {f"vae.{k}": v for k, v in load_file(checkpoint / "model.safetensors").items()}
    weights.update({f"disc.{k}": v for k, v in load_file(checkpoint / "model_1.safetensors").items()})
    return weights


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "images"
    write_images(folder, 8)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = subprocess.run(command(images, output_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_resume_after_sigkill_matches_the_uninterrupted_run(images, uninterrupted, tmp_path):
    output_dir = tmp_path / "run"
    process = subprocess.Popen(
        command(images, output_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(output_dir / "checkpoints" / "checkpoint-3" / STATE_FILE, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    killed_at = Checkpointer(None, output_dir / "checkpoints").latest()
    assert killed_at is not None and not (output_dir / "checkpoints" / "checkpoint-6").exists()

    resumed = subprocess.run(
        command(images, output_dir, **{"train.resume_from": "latest"}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed_at}" in resumed.stdout
    expected, actual = final_weights(uninterrupted), final_weights(output_dir)
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-6, msg=name)
    # the exported VAE is the same too
    exported = load_file(output_dir / "vae" / "diffusion_pytorch_model.safetensors")
    reference = load_file(uninterrupted / "vae" / "diffusion_pytorch_model.safetensors")
    for name, value in reference.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_resumable_checkpoint_and_says_how_to_resume(images, tmp_path, stop):
    output_dir = tmp_path / "run"
    process = subprocess.Popen(
        command(images, output_dir, **{"train.max_steps": 200, "train.sample_every_steps": 1}),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(output_dir / "samples" / "step-0000002.png", process)
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + stop, stderr[-3000:]
    assert "train.resume_from=latest" in stdout
    saved = Checkpointer(None, output_dir / "checkpoints").latest()
    step = int(saved.name.split("-")[1])
    assert 2 <= step < 200
    if stop == signal.SIGINT:
        return  # its checkpoint is saved as SIGTERM's is: the resume below is run once

    resumed = subprocess.run(
        command(images, output_dir, **{"train.resume_from": "latest", "train.max_steps": step + 2}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert Checkpointer(None, output_dir / "checkpoints").latest().name == f"checkpoint-{step + 2}"


def build(images: Path, output_dir: Path, **overrides) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(images, output_dir, **overrides)))


def test_rotation_keeps_the_newest_checkpoints(images, tmp_path):
    trainer = build(
        images,
        tmp_path / "run",
        **{"train.max_steps": 4, "train.checkpoint_every_steps": 1, "train.checkpoints_total_limit": 2},
    )
    previous = os.umask(0o022)
    try:
        trainer.train()
    finally:
        os.umask(previous)
    names = [path.name for path in trainer.checkpointer.complete()]
    assert names == ["checkpoint-3", "checkpoint-4"]
    # its files get what a plain write gives under the umask, not safetensors' owner-only 0600
    modes = {oct(path.stat().st_mode & 0o777) for path in trainer.checkpointer.latest().rglob("*") if path.is_file()}
    assert modes == {"0o644"}


def test_a_crash_while_writing_leaves_latest_on_the_previous_checkpoint(images, tmp_path, monkeypatch):
    trainer = build(images, tmp_path / "run", **{"train.max_steps": 1})
    trainer.train()
    previous = trainer.checkpointer.latest()
    assert previous.name == "checkpoint-1"

    def crash_midway(output_dir, **kwargs):
        Path(output_dir, "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(trainer.accelerator, "save_state", crash_midway)
    trainer.progress.global_step = 2
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    assert trainer.checkpointer.latest() == previous
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint-2").exists()


def test_a_full_disk_is_a_clear_error_that_keeps_the_previous_checkpoint(images, tmp_path, monkeypatch):
    trainer = build(images, tmp_path / "run", **{"train.max_steps": 1})
    trainer.train()

    def disk_full(output_dir, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.accelerator, "save_state", disk_full)
    trainer.progress.global_step = 2
    with pytest.raises(CheckpointError, match="No space left on device.*checkpoint-1 is intact"):
        trainer.save_checkpoint()
    assert trainer.checkpointer.latest().name == "checkpoint-1"
    assert not list((tmp_path / "run" / "checkpoints").glob(".checkpoint-*"))


def test_resuming_with_another_model_shape_is_refused(images, tmp_path):
    build(images, tmp_path / "run", **{"train.max_steps": 1}).train()
    with pytest.raises(CheckpointError, match="layers_per_block 1 -> 2"):
        build(images, tmp_path / "run", **{"train.resume_from": "latest", "model.layers_per_block": 2})


def test_resume_latest_without_checkpoints_starts_fresh_and_a_bad_path_is_refused(images, tmp_path):
    trainer = build(images, tmp_path / "run", **{"train.resume_from": "latest"})
    assert trainer.progress.global_step == 0
    with pytest.raises(CheckpointError, match="no such checkpoint folder .*nowhere$"):
        build(images, tmp_path / "other", **{"train.resume_from": str(tmp_path / "nowhere")})


def test_a_resume_path_that_is_not_a_checkpoint_says_what_it_is(tmp_path):
    """`latests`, a missing path and the run folder itself all used to read "not a complete checkpoint folder"."""
    from vae_hf.train.checkpoint import Checkpointer

    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    checkpointer = Checkpointer(None, run / "checkpoints")
    expected = {
        "latests": "no such checkpoint folder latests; did you mean latest?",
        "lastest": "no such checkpoint folder lastest; did you mean latest?",
        str(tmp_path / "gone"): f"no such checkpoint folder {tmp_path / 'gone'}",
        str(run): f"{run} holds checkpoints but is not one; give one of {run / 'checkpoints'}/checkpoint-<step>",
        str(run / "checkpoints"): f"{run / 'checkpoints'} holds checkpoints but is not one",
        str(tmp_path / "empty"): "is not a complete checkpoint folder (no trainer_state.json)",
    }
    for resume_from, message in expected.items():
        with pytest.raises(CheckpointError) as error:
            checkpointer.resolve(resume_from)
        assert message in str(error.value) and str(error.value).startswith("train.resume_from: ")
    assert checkpointer.resolve(str(run / "checkpoints" / "checkpoint-4")) == run / "checkpoints" / "checkpoint-4"


def test_resume_can_extend_max_steps(images, tmp_path):
    build(images, tmp_path / "run", **{"train.max_steps": 2}).train()
    trainer = build(images, tmp_path / "run", **{"train.max_steps": 3, "train.resume_from": "latest"})
    assert trainer.progress.global_step == 2
    trainer.train()
    assert trainer.progress.global_step == 3 and trainer.checkpointer.latest().name == "checkpoint-3"


@pytest.mark.parametrize("buffer", [1, 4])
def test_a_resumed_stream_continues_at_the_right_sample(images, tmp_path, monkeypatch, buffer):
    """Streaming data (here a local folder read as a stream) resumes mid-epoch where it stopped."""
    seen: dict[str, list[torch.Tensor]] = {}

    def run(name: str, **overrides) -> Trainer:
        trainer = build(
            images,
            tmp_path / name,
            **{
                "data.streaming": "true",
                "data.shuffle_buffer_size": buffer,
                "data.random_flip": "false",
                "loss.disc_weight": 0,
                "train.batch_size": 1,
                **overrides,
            },
        )
        real_step = trainer.training_step
        batches = seen.setdefault(name, [])
        monkeypatch.setattr(
            trainer, "training_step", lambda images: batches.append(images.clone()) or real_step(images)
        )
        trainer.train()
        return trainer

    run("uninterrupted", **{"train.max_steps": 6})
    run("first_half", **{"train.max_steps": 3})
    # the same output folder: resume from the first half's checkpoint at step 3 and go on to 6
    monkeypatch.setitem(seen, "second_half", [])
    resumed = build(
        images,
        tmp_path / "first_half",
        **{
            "data.streaming": "true",
            "data.shuffle_buffer_size": buffer,
            "data.random_flip": "false",
            "loss.disc_weight": 0,
            "train.batch_size": 1,
            "train.max_steps": 6,
            "train.resume_from": "latest",
        },
    )
    real_step = resumed.training_step
    monkeypatch.setattr(
        resumed, "training_step", lambda images: seen["second_half"].append(images.clone()) or real_step(images)
    )
    resumed.train()
    assert resumed.progress.global_step == 6
    expected = seen["uninterrupted"]
    actual = seen["first_half"] + seen["second_half"]
    assert len(actual) == len(expected) == 6
    for step, (a, b) in enumerate(zip(actual, expected, strict=True), start=1):
        assert torch.equal(a, b), f"step {step} trained on another sample"


# ---------------------------------------------------------------------------------------------------------------
# one run per output_dir


def train_cli(images: Path, output_dir: Path, **overrides) -> SimpleNamespace:
    """`vae-hf train` on the tiny VAE (2 steps an epoch, the full state at every epoch's end), run in this process
    (a fresh one costs seconds of imports); its status and what it printed."""
    args = tiny_overrides(images, output_dir, **{"loss.disc_weight": 0, **overrides})
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["train", *args])
    return SimpleNamespace(returncode=status, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def run_id(checkpoint: Path) -> str:
    return json.loads((checkpoint / STATE_FILE).read_text())["run"]["id"]


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory) -> Path:
    """A finished 2-step run at optim.lr 1e-3: its folder holds checkpoint-2, vae/, samples/ and config.yaml."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    result = train_cli(images, output_dir, **{"train.max_steps": 2, "optim.lr": 1e-3})
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_a_new_run_in_a_folder_holding_checkpoints_is_refused_and_latest_continues_the_same_run(
    images, finished_run, tmp_path
):
    output_dir = copy_of(finished_run, tmp_path)
    before = sorted(path.name for path in output_dir.rglob("*"))
    refused = train_cli(images, output_dir, **{"train.max_steps": 1, "optim.lr": 5e-4})
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert f"output_dir: {output_dir} already holds the checkpoints of a run (checkpoint-2)" in lines[0]
    assert "train.resume_from=latest" in lines[0] and "train.overwrite_output_dir=true" in lines[0]
    assert sorted(path.name for path in output_dir.rglob("*")) == before  # nothing written, nothing deleted

    resumed = train_cli(images, output_dir, **{"train.max_steps": 3, "optim.lr": 5e-4, "train.resume_from": "latest"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpoints = output_dir / "checkpoints"
    old_run = run_id(checkpoints / "checkpoint-2")
    assert f"resumed from {checkpoints / 'checkpoint-2'} at step 2" in resumed.stdout
    assert f"run {old_run}; settings changed since: optim.lr 0.001 -> 0.0005, train.max_steps 2 -> 3" in resumed.stdout
    assert run_id(checkpoints / "checkpoint-3") == old_run


def test_overwrite_output_dir_deletes_the_previous_runs_outputs_and_starts_a_new_run(images, finished_run, tmp_path):
    output_dir = copy_of(finished_run, tmp_path)
    (output_dir / "notes.txt").write_text("mine")
    old_run = run_id(output_dir / "checkpoints" / "checkpoint-2")
    result = train_cli(images, output_dir, **{"train.max_steps": 1, "train.overwrite_output_dir": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"deleted checkpoints, vae, samples, config.yaml in {output_dir}" in result.stdout
    assert [path.name for path in Checkpointer(None, output_dir / "checkpoints").complete()] == ["checkpoint-1"]
    assert run_id(output_dir / "checkpoints" / "checkpoint-1") != old_run
    assert (output_dir / "notes.txt").read_text() == "mine"  # only what a run writes is deleted
    assert not [path for path in output_dir.iterdir() if path.name.startswith(".")]


def test_overwriting_the_folder_a_run_resumes_from_is_refused_in_one_line(images, tmp_path):
    for resume_from in ("latest", str(tmp_path / "run" / "checkpoints" / "checkpoint-2")):
        with pytest.raises(ConfigError, match="train.overwrite_output_dir: .*choose one"):
            load_config(
                None,
                tiny_overrides(
                    images, tmp_path / "run", **{"train.overwrite_output_dir": "true", "train.resume_from": resume_from}
                ),
            )


def test_latest_refuses_a_folder_holding_the_checkpoints_of_two_runs(images, tmp_path):
    for name in ("one", "two"):
        build(images, tmp_path / name, **{"train.max_steps": 1 if name == "one" else 2}).train()
    copied = tmp_path / "one" / "checkpoints" / "checkpoint-2"  # a folder copied in by hand
    shutil.copytree(tmp_path / "two" / "checkpoints" / "checkpoint-2", copied)
    with pytest.raises(CheckpointError, match="holds the checkpoints of 2 runs"):
        build(images, tmp_path / "one", **{"train.resume_from": "latest", "train.max_steps": 3})
