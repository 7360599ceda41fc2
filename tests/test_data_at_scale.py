"""Aspect-ratio buckets (`data.buckets`), resolution stages (`train.stages`) and the loader benchmark on them.

One folder of four shapes serves every test: 40x48, 48x80 (wide), 80x40 (tall) and 32x32 images. The tiny VAE
downsamples by 2, `data.bucket_step=8` at 32 px gives three buckets, 40x24 (tall), 32x32 and 24x40 (wide)."""

import io
import math
import os
import random
import signal
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vae_hf.config import ConfigError, DataConfig, load_config
from vae_hf.data import DataError
from vae_hf.data.buckets import BucketBatchSampler, bucket_sizes, default_bucket_step, nearest_bucket
from vae_hf.data.loader import bucket_list
from vae_hf.data.pipeline import stage_data
from vae_hf.perf.benchmark import benchmark, markdown
from vae_hf.train.trainer import Trainer

from conftest import tiny_overrides, write_images

SHAPES = [(40, 48), (48, 80), (80, 40), (32, 32)]  # (height, width)
BUCKETS_32 = [(40, 24), (32, 32), (24, 40)]
BUCKETS_48 = [(56, 40), (48, 48), (40, 56)]  # the same step at 48 px (stage 2)


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    for number, size in enumerate(SHAPES):
        write_images(root / f"shape_{number}", 6, size=size, seed=number)
    return root


def test_generated_buckets_follow_sdxl_and_respect_the_factor_area_and_ratio():
    assert default_bucket_step(1024, 8) == 64 and default_bucket_step(256, 8) == 16 and default_bucket_step(32, 2) == 2
    sdxl = bucket_sizes(1024, 64, 4.0)
    for size in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (768, 1344), (512, 2048)]:
        assert size in sdxl  # pairs of SDXL's published bucket list
    for resolution, step, ratio in [(1024, 64, 4.0), (256, 16, 2.0), (32, 8, 2.0)]:
        sizes = bucket_sizes(resolution, step, ratio)
        assert (resolution, resolution) in sizes
        for height, width in sizes:
            assert height % step == 0 and width % step == 0
            assert height * width <= resolution**2 and max(height, width) <= ratio * min(height, width)
            assert (width, height) in sizes
    assert bucket_sizes(32, 8, 2.0) == BUCKETS_32


def test_a_listed_bucket_set_scales_with_a_stage_and_must_fit_the_factor():
    data = DataConfig(resolution=256, bucket_sizes=[[192, 320], [256, 256], [320, 192]])
    assert bucket_list(data, 8) == [(192, 320), (256, 256), (320, 192)]
    assert bucket_list(data, 8, resolution=512) == [(384, 640), (512, 512), (640, 384)]
    assert bucket_list(data, 8, resolution=384) == [(288, 480), (384, 384), (480, 288)]
    with pytest.raises(DataError, match="bucket 192x320 is not a multiple of the VAE's downsampling factor 128"):
        bucket_list(data, 128)  # a pretrained VAE's factor is known only once it is loaded


def test_a_stage_at_another_resolution_trains_on_the_listed_buckets_scaled(shapes_folder, tmp_path):
    """`data.bucket_sizes` are listed at data.resolution: the trainer's 48 px stage takes them scaled by 1.5."""
    listed = {"data.buckets": "true", "data.bucket_sizes": "[[24, 40], [32, 32], [40, 24]]"}
    trainer = build(shapes_folder, tmp_path / "run", **listed, **{"train.stages": STAGES, "train.max_steps": "null"})
    assert trainer.dataloader.batch_sampler.buckets == [(24, 40), (32, 32), (40, 24)]
    trainer._enter_stage(trainer.stages[1])
    assert trainer.dataloader.batch_sampler.buckets == [(36, 60), (48, 48), (60, 36)]
    assert stage_data(trainer.config.data, 32, 2) is trainer.config.data  # the run's own resolution: as configured


def test_every_image_keeps_its_aspect_ratio_within_the_bucket_lists_step():
    """An image goes to the bucket of nearest aspect ratio: the ratio changes by at most half the largest gap
    between neighbouring buckets (in log ratio). A list without that bucket fails the same bound."""
    sizes = bucket_sizes(256, 16, 2.0)
    logs = [math.log(width / height) for height, width in sizes]
    half_gap = max(b - a for a, b in zip(logs, logs[1:], strict=False)) / 2
    rng = random.Random(0)
    images = [(rng.randint(180, 360), rng.randint(180, 360)) for _ in range(2000)]
    images = [(w, h) for w, h in images if logs[0] <= math.log(w / h) <= logs[-1]]
    for width, height in images:
        bucket_height, bucket_width = sizes[nearest_bucket(width, height, sizes)]
        assert abs(math.log(width / height) - math.log(bucket_width / bucket_height)) <= half_gap + 1e-12
    squares_only = [(256, 256)]  # every image to the square: the bound fails
    assert max(abs(math.log(w / h) - 0.0) for w, h in images if nearest_bucket(w, h, squares_only) == 0) > half_gap


def test_every_process_takes_the_same_bucket_at_every_batch_and_buckets_mix():
    """The epoch plan of two processes: one bucket per batch, the same at every position on both, their rows
    disjoint, every row at most once, the epoch cut to whole optimizer steps; the next epoch is another plan, and
    `start` skips batches of the plan."""
    rng = random.Random(1)
    bucket_of_row = [rng.choice([0, 0, 1, 2]) for _ in range(203)]
    buckets = BUCKETS_32
    make = lambda rank: BucketBatchSampler(bucket_of_row, buckets, 4, seed=5, rank=rank, world_size=2,
                                           gradient_accumulation_steps=3)  # fmt: skip
    ranks = [make(0), make(1)]
    epochs = [[list(sampler) for sampler in ranks]]
    for sampler in ranks:
        sampler.set_epoch(1)
    epochs.append([list(sampler) for sampler in ranks])
    for first, second in epochs:
        assert len(first) == len(second) == len(ranks[0]) and len(first) % 3 == 0
        rows = []
        for mine, theirs in zip(first, second, strict=True):
            assert len({size for _, size in mine + theirs}) == 1 and len(mine) == len(theirs) == 4
            assert all(buckets[bucket_of_row[row]] == size for row, size in mine + theirs)
            rows += [row for row, _ in mine + theirs]
        assert len(rows) == len(set(rows))
        order = [batch[0][1] for batch in first]
        assert len(set(order)) == 3 and order != sorted(order, key=buckets.index)  # mixed, not grouped
    assert epochs[0][0] != epochs[1][0]
    ranks[0].set_epoch(1)
    ranks[0].start = 5
    assert list(ranks[0]) == epochs[1][0][5:]
    assert list(ranks[0]) == epochs[1][0]  # a skip applies once


def build(folder: Path, output_dir: Path, **overrides) -> Trainer:
    values = {
        "loss.perceptual_weight": 0,
        "loss.disc_weight": 0,
        "data.center_crop": "false",
        "data.random_flip": "true",
        "data.bucket_step": 8,
        **overrides,
    }
    return Trainer(load_config(None, tiny_overrides(folder, output_dir, **values)))


def recorded_run(
    folder: Path, output_dir: Path, sigterm_after: int | None = None, **overrides
) -> tuple[Trainer, list[tuple[int, torch.Tensor]]]:
    """Train (sent SIGTERM after optimizer step `sigterm_after`, when given); return the trainer and (optimizer
    step, images) of every micro-batch."""
    trainer = build(folder, output_dir, **overrides)
    seen, real_step = [], trainer.training_step

    def step(images):
        seen.append((trainer.progress.global_step + 1, images.clone()))
        return real_step(images)

    def stop(trainer):
        if trainer.progress.global_step == sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.training_step = step
    trainer.step_callbacks.append(stop)
    trainer.train()
    return trainer, seen


STAGES = "[{until_step: 3}, {until_step: 6, resolution: 48, batch_size: 1, gradient_accumulation_steps: 2}]"


def test_buckets_and_stages_switch_at_the_step_and_resume_mid_epoch_in_stage_two(shapes_folder, tmp_path):
    """Buckets with random crops and flips, and two stages: steps 1-3 train batches of 2 at 32 px's buckets, steps
    4-6 two micro-batches of 1 at 48 px's. Every micro-batch has one shape, of its stage's list. Sent SIGTERM
    after step 5 (mid-epoch, in stage 2) and resumed, the run trains on the uninterrupted run's images and ends with
    its weights. Samples and held-out scores see each image in its own bucket."""
    wide = sorted((shapes_folder / "shape_1").iterdir())[0]  # 48x80: the 24x40 bucket
    options = {
        "data.buckets": "true",
        "train.stages": STAGES,
        "train.max_steps": "null",
        "data.validation_fraction": 0.2,
        "train.eval_diffusability": "false",
        "data.reference_images": f"[{wide}]",
        "train.sample_every_steps": 6,
    }
    whole, seen = recorded_run(shapes_folder, tmp_path / "whole", **options)
    assert whole.progress.global_step == 6
    per_step = [(step, tuple(images.shape)) for step, images in seen]
    assert [step for step, _ in per_step] == [1, 2, 3, 4, 4, 5, 5, 6, 6]
    for step, (batch, _, height, width) in per_step:
        assert (batch, (height, width) in (BUCKETS_32 if step <= 3 else BUCKETS_48)) == (2 if step <= 3 else 1, True)
    assert len({shape for _, shape in per_step}) >= 3  # buckets mixed within the stages
    with Image.open(tmp_path / "whole" / "samples" / "step-0000006.png") as sample:
        assert sample.size == (2 * 40, 24)  # original | reconstruction of the wide image, in its bucket
    shapes = {tuple(batch["pixel_values"].shape[-2:]) for batch in whole.validator.loader}
    assert shapes <= set(BUCKETS_32) and len(shapes) >= 2

    run = tmp_path / "run"
    stopped, first = recorded_run(shapes_folder, run, sigterm_after=5, **options)
    assert stopped.stop_signal == "SIGTERM" and stopped.progress.global_step == 5
    resumed, second = recorded_run(shapes_folder, run, **options, **{"train.resume_from": "latest"})
    assert [step for step, _ in second] == [6, 6]
    for (step, expected), (_, got) in zip(seen, first + second, strict=True):
        assert torch.equal(expected, got), step
    for name, weight in whole.vae.state_dict().items():
        assert torch.equal(weight, resumed.vae.state_dict()[name]), name


def test_a_bucketed_stream_trains_one_bucket_per_batch_and_resumes_with_its_waiting_rows(shapes_folder, tmp_path):
    """A stream's rows wait in their buckets until a window of one fills: every micro-batch has one shape of the
    list, the shapes mix, and epochs end when the rows run out. Stopped by SIGTERM mid-epoch (rows waiting in
    their buckets, saved with the checkpoint) and resumed, the run trains the uninterrupted run's images."""
    options = {
        "data.buckets": "true",
        "data.streaming": "true",
        "data.shuffle_buffer_size": 8,
        "train.max_steps": 10,
        "train.gradient_accumulation_steps": 2,
    }
    whole, seen = recorded_run(shapes_folder, tmp_path / "whole", **options)
    shapes = [tuple(images.shape) for _, images in seen]
    assert len(shapes) == 20 and all(shape[0] == 2 and shape[2:] in BUCKETS_32 for shape in shapes)
    assert len(set(shapes)) == 3 and [step for step, _ in seen] == [step for step in range(1, 11) for _ in (0, 1)]
    assert all(shapes[2 * k] == shapes[2 * k + 1] for k in range(10))  # one bucket per optimizer step
    assert whole.progress.epoch >= 1  # 24 rows give fewer than 10 steps of 4 images: epochs ended and restarted
    run = tmp_path / "run"
    stopped, first = recorded_run(shapes_folder, run, sigterm_after=3, **options)
    assert stopped.progress.global_step == 3 and stopped.bucket_buffers is not None
    saved = run / "checkpoints" / "checkpoint-3" / "process_0.safetensors"
    assert saved.is_file()  # the rows waiting in their buckets
    resumed, second = recorded_run(shapes_folder, run, **options, **{"train.resume_from": "latest"})
    for (step, expected), (_, got) in zip(seen, first + second, strict=True):
        assert torch.equal(expected, got), step
    for name, weight in whole.vae.state_dict().items():
        assert torch.equal(weight, resumed.vae.state_dict()[name]), name


def test_square_stages_carry_the_epoch_position_and_resume_in_stage_two(shapes_folder, tmp_path):
    """Without buckets: square crops of 32 px in batches of 2, then 48 px in batches of 1, two per step; the
    epoch goes on at the same image in the new stage (6 images taken, batch 7 of 1 next), and a resume at
    step 4 (stage 2) trains what the uninterrupted run trains."""
    options = {"train.stages": STAGES, "train.max_steps": "null", "data.center_crop": "true"}
    whole, seen = recorded_run(shapes_folder, tmp_path / "whole", **options)
    assert [tuple(images.shape) for _, images in seen] == [(2, 3, 32, 32)] * 3 + [(1, 3, 48, 48)] * 6
    assert whole.progress.batches_in_epoch == 6 + 6 and whole.progress.epoch == 0
    run = tmp_path / "run"
    recorded_run(shapes_folder, run, **{**options, "train.max_steps": 4, "train.checkpoint_every_steps": 4})
    resumed, second = recorded_run(shapes_folder, run, **options, **{"train.resume_from": "latest"})
    for (step, expected), (_, got) in zip(seen[-4:], second, strict=True):
        assert torch.equal(expected, got), step
    for name, weight in whole.vae.state_dict().items():
        assert torch.equal(weight, resumed.vae.state_dict()[name]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.stages": "[{until_step: 4}, {until_step: 2}]"}, "train.stages[1].until_step: must be after"),
        ({"train.stages": "[{until_step: 4, batch_size: 0}]"}, "train.stages[0].batch_size: must be >= 1"),
        ({"train.stages": "[{until_step: 4, resolution: 33}]"}, "train.stages[0].resolution: 33 is not divisible"),
        ({"data.bucket_sizes": "[[32, 33]]"}, "data.bucket_sizes: [32, 33]: both sides must be multiples"),
        ({"data.bucket_step": 3}, "data.bucket_step: 3 is not a multiple"),
        ({"data.streaming": "true", "train.stages": "[{until_step: 4}]"}, "train.stages: need map-style data"),
    ],
)
def test_bad_bucket_and_stage_settings_are_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as refused:
        load_config(None, tiny_overrides(tmp_path, tmp_path / "run", **overrides))
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_loader_benchmark_reports_bucketed_sharded_and_mixed_data(shapes_folder, tmp_path):
    """`vae-hf bench --loader` on WebDataset shards of the four shapes with and without buckets, and on a mixture
    of those shards and the image folder, in buckets."""
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "train-00000.tar", "w") as tar:
        for number, path in enumerate(sorted(shapes_folder.rglob("*.png"))):
            member = tarfile.TarInfo(f"{number:04d}.png")
            member.size = path.stat().st_size
            tar.addfile(member, io.BytesIO(path.read_bytes()))
    cases = {
        "webdataset, aspect-ratio buckets": (shards, "true"),
        "webdataset, square": (shards, "false"),
        "mixture of webdataset + imagefolder, aspect-ratio buckets": (f"[{shards}, {shapes_folder}]", "true"),
    }
    for shown, (dataset, buckets) in cases.items():
        overrides = {"data.buckets": buckets, "data.bucket_step": 8}
        config = load_config(None, tiny_overrides(dataset, tmp_path / "run", **overrides))
        report = benchmark(config, steps=2, speed=False, loader=True)
        loader = report["data_loader"]
        assert loader["images_per_s"] > 0 and loader["batches_timed"] >= 2
        source, crops = shown.rsplit(", ", 1)
        assert loader["data"] == {"source": source, "streaming": False, "crops": crops, "resolution": 32}
        assert f"data loader ({shown} at 32 px)" in markdown(report)


def test_the_speed_benchmark_times_the_first_stage_only(tmp_path):
    """A stage change inside the timed steps would time a loader being rebuilt and two batch shapes: `vae-hf bench`
    times the first stage's resolution, batch and accumulation, without stages."""
    from vae_hf.perf.benchmark import _benchmark_config

    stages = "[{until_step: 3, batch_size: 3, gradient_accumulation_steps: 2}, {until_step: 9, resolution: 64}]"
    config = load_config(None, tiny_overrides(tmp_path, tmp_path / "run", **{"train.stages": stages}))
    timed = _benchmark_config(config, tmp_path / "scratch", total_steps=8)
    assert timed.train.stages == [] and timed.train.max_steps == 8
    assert (timed.data.resolution, timed.train.batch_size, timed.train.gradient_accumulation_steps) == (32, 3, 2)
