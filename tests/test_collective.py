"""Several processes decide together (two processes on gloo, CPU, through `tests/multiprocess_probe.py`):
a rank whose micro-batch will not decode, a signal that reaches one rank, streams of unequal length. Each
run has a timeout: a decision taken by one process alone shows up as a hang."""

import json
import os
import subprocess
from pathlib import Path

from safetensors.torch import load_file
from test_distributed import DDP_LAUNCH, largest_difference

from conftest import ROOT, tiny_overrides, write_images

PROBE = "tests/multiprocess_probe.py"
QUICK = {"loss.perceptual_weight": 0, "model.sample_posterior": "false", "train.batch_size": 1}


def launch(images: Path, output_dir: Path, env: dict | None = None, **overrides) -> subprocess.CompletedProcess:
    command = [*DDP_LAUNCH, PROBE, *tiny_overrides(images, output_dir, **{**QUICK, **overrides})]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", **(env or {})}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment)


def probes(output_dir: Path) -> list[dict]:
    return [json.loads((output_dir / f"probe-{rank}.json").read_text()) for rank in (0, 1)]


def vae_weights(output_dir: Path):
    return load_file(output_dir / "vae" / "diffusion_pytorch_model.safetensors")


def test_a_rank_whose_micro_batch_will_not_decode_trains_in_step_with_no_host_sync(tmp_path):
    """batch_size=1 and one broken file: some rank's whole micro-batch is that file. It trains on the next
    readable image instead of skipping (which left the ranks a step apart, waiting for each other), the file is
    counted once, and between log steps no process reads a tensor on the host (the discriminator plays)."""
    images = tmp_path / "images"
    write_images(images, 11)
    (images / "image_05_broken.png").write_bytes(b"<html>not an image</html>")
    run = tmp_path / "run"
    overrides = {"train.max_steps": 6, "loss.disc_start_step": 0, "train.ema_decay": 0.9, "train.log_every_steps": 1000}
    result = launch(images, run, **overrides)  # 12 files, 6 micro-batches of 1 per rank: one epoch
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 images skipped (unreadable or filtered" in result.stdout
    assert result.stderr.count("skipping image") == 1 and "image_05_broken.png" in result.stderr
    state = json.loads((run / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["progress"]["images_skipped"] == 1
    for probe in probes(run):
        assert probe["host_reads"] == [] and probe["flag_reads"] >= 3  # steps 2-4 agreed, and were watched


def test_unequal_streams_end_epochs_together_and_a_signal_to_one_rank_stops_both(tmp_path):
    """A stream of 12 images, rank 1's share cut to 4 rows (rank 0 has 6), one image per micro-batch, two
    per optimizer step, random crops and flips on: every epoch ends after 2 steps on both ranks (rank 0's
    third window is dropped). Rank 1 alone is sent SIGTERM after step 3, mid-epoch: both ranks stop
    at step 3 with one checkpoint, and the resumed run ends with the uninterrupted run's weights."""
    images = tmp_path / "images"
    write_images(images, 12)
    stream = {
        "data.streaming": "true",
        "data.random_flip": "true",
        "data.center_crop": "false",
        "data.shuffle_buffer_size": 4,
        "train.gradient_accumulation_steps": 2,
        "train.max_steps": 5,
        "loss.disc_weight": 0,
    }
    short = {"PROBE_SHORT_STREAM": "1:4"}
    whole = launch(images, tmp_path / "whole", short, **stream)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert [probe["epoch_ends"] for probe in probes(tmp_path / "whole")] == [[2, 4], [2, 4]]

    run = tmp_path / "run"
    stopped = launch(images, run, {**short, "PROBE_SIGTERM": "1:3"}, **stream)
    assert stopped.returncode != 0  # each process exits with 143: stopped, not finished
    assert [probe["stopped_at"] for probe in probes(run)] == [3, 3]
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    resumed = launch(images, run, short, **stream, **{"train.resume_from": "latest"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    assert largest_difference(vae_weights(run), vae_weights(tmp_path / "whole")) < 1e-6


def test_two_processes_train_the_same_bucket_and_stage_at_every_step(tmp_path):
    """Aspect-ratio buckets and two stages under two processes: at every micro-batch both hold a batch of the
    same bucket (their own images), the stage changes at the same step on both, and the run ends (a rank
    waiting for the other shows up as the timeout)."""
    images = tmp_path / "images"
    for number, size in enumerate([(40, 48), (48, 80), (80, 40)]):
        write_images(images / f"shape_{number}", 8, size=size, seed=number)
    stages = "[{until_step: 2}, {until_step: 4, resolution: 48, gradient_accumulation_steps: 2}]"
    options = {"data.buckets": "true", "data.bucket_step": 8, "train.stages": stages, "train.max_steps": "null"}
    result = launch(images, tmp_path / "run", **options, **{"loss.disc_weight": 0, "data.random_flip": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (probe["batches"] for probe in probes(tmp_path / "run"))
    assert len(first) == len(second) == 2 + 2 * 2
    for mine, theirs in zip(first, second, strict=True):
        assert mine[:4] == theirs[:4]  # step, height, width, batch size
        assert mine[4] != theirs[4]  # each process trains its own slice of the global batch (checksums)
        step, height, width = mine[:3]
        area = 32 * 32 if step <= 2 else 48 * 48
        assert height * width <= area and (height * width > 0.8 * area)
    assert {(h, w) for _, h, w, *_ in first} != {(32, 32), (48, 48)}  # not only squares: buckets were used


def test_a_bucketed_stream_of_unequal_shares_keeps_both_ranks_on_one_bucket(tmp_path):
    """A bucketed stream in batches of 2, rank 1's share cut to 9 rows a pass while rank 0 has 12: before every
    step the ranks agree on a bucket each can fill, so at every micro-batch both hold a batch of the same shape
    (their own images), every epoch ends on the same step on both, and the run ends."""
    images = tmp_path / "images"
    for number, size in enumerate([(40, 48), (48, 80), (80, 40)]):
        write_images(images / f"shape_{number}", 8, size=size, seed=number)
    options = {
        "data.buckets": "true",
        "data.bucket_step": 8,
        "data.streaming": "true",
        "data.shuffle_buffer_size": 4,
        "data.random_flip": "true",
        "train.max_steps": 8,
        "train.batch_size": 2,
        "loss.disc_weight": 0,
    }
    result = launch(images, tmp_path / "run", {"PROBE_SHORT_STREAM": "1:9"}, **options)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = probes(tmp_path / "run")
    assert first["epoch_ends"] == second["epoch_ends"] != []
    assert len(first["batches"]) == len(second["batches"]) == 8
    shapes = set()
    for mine, theirs in zip(first["batches"], second["batches"], strict=True):
        assert mine[:4] == theirs[:4] and mine[4] != theirs[4]  # same step, bucket and batch; own images
        shapes.add(tuple(mine[1:3]))
    assert shapes <= {(40, 24), (32, 32), (24, 40)} and len(shapes) >= 2
