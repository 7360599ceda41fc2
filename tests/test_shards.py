"""Sharded data read through `datasets`' own builders: WebDataset tar shards and Parquet files, built here, load
(their image column found), train, stream and resume; the data filters leave out and count what they refuse."""

import io
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from vae_hf.config import DataConfig, load_config
from vae_hf.data.datasets import training_dataset
from vae_hf.data.sources import load_image_dataset, local_builder
from vae_hf.data.transforms import ImageTransform
from vae_hf.train.trainer import Trainer

from conftest import tiny_overrides, write_images

BROKEN = b"<html>a page saved as an image</html>"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """The same 8 images (one of them broken) as two WebDataset shards of unequal length, and as a Parquet file."""
    root = tmp_path_factory.mktemp("shards")
    payloads = [path.read_bytes() for path in write_images(root / "images", 8)]
    payloads[3] = BROKEN
    (root / "wds").mkdir()
    for shard, chunk in enumerate((range(0, 6), range(6, 8))):
        with tarfile.open(root / "wds" / f"train-{shard:05d}.tar", "w") as tar:
            for index in chunk:
                member = tarfile.TarInfo(f"sample_{index:02d}.png")
                member.size = len(payloads[index])
                tar.addfile(member, io.BytesIO(payloads[index]))
    (root / "parquet").mkdir()
    rows = {"image": [{"bytes": payload, "path": None} for payload in payloads], "label": list(range(8))}
    Dataset.from_dict(rows).cast_column("image", ImageFeature()).to_parquet(str(root / "parquet" / "train.parquet"))
    return {"wds": root / "wds", "parquet": root / "parquet"}


def build(data: Path, output_dir: Path, **overrides) -> Trainer:
    values = {"loss.perceptual_weight": 0, "loss.disc_weight": 0, "train.batch_size": 1, **overrides}
    return Trainer(load_config(None, tiny_overrides(data, output_dir, **values)))


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_shards_load_with_their_own_builder_and_train(shards, tmp_path, kind, caplog):
    folder = shards[kind]
    assert local_builder(folder) == {"wds": "webdataset", "parquet": "parquet"}[kind]
    with caplog.at_level(logging.WARNING, logger="vae_hf.data"):
        rows = load_image_dataset(DataConfig(dataset=str(folder)))
    assert len(rows) == 8 and "image" in rows.column_names
    if kind == "wds":  # WebDataset names its image column by extension: found, and said
        assert "using its image column 'png'" in caplog.text
    stream = load_image_dataset(DataConfig(dataset=str(folder), streaming=True))
    assert sum(1 for _ in stream) == 8

    trainer = build(folder, tmp_path / "run", **{"train.max_steps": 8})  # one epoch
    with caplog.at_level(logging.WARNING, logger="vae_hf.train"):
        trainer.train()
    assert trainer.progress.global_step == 8 and trainer.progress.images_skipped == 1
    broken = "sample_03.png" if kind == "wds" else "row 3"  # the member's name in its tar; a Parquet row's index
    assert f"skipping image {broken}: not an image file" in caplog.text


def test_a_stream_of_shards_resumes_where_it_stopped(shards, tmp_path):
    """Two WebDataset shards (6 and 2 samples) streamed with random crops and flips: stopped after step 3 and
    resumed to step 6, the run trains on what the uninterrupted run trains on and ends with its weights."""
    stream = {"data.streaming": "true", "data.center_crop": "false", "data.random_flip": "true"}
    seen: dict[str, list[torch.Tensor]] = {}

    def run(name: str, output_dir: Path, **overrides) -> Trainer:
        trainer = build(shards["wds"], output_dir, **stream, **overrides)
        real_step, batches = trainer.training_step, seen.setdefault(name, [])
        trainer.training_step = lambda images: batches.append(images.clone()) or real_step(images)
        trainer.train()
        return trainer

    whole = run("whole", tmp_path / "whole", **{"train.max_steps": 6})
    run("first", tmp_path / "run", **{"train.max_steps": 3, "train.checkpoint_every_steps": 3})
    resumed = run("second", tmp_path / "run", **{"train.max_steps": 6, "train.resume_from": "latest"})
    assert len(seen["first"]) == 3 and len(seen["second"]) == 3
    for expected, got in zip(seen["whole"], seen["first"] + seen["second"], strict=True):
        assert torch.equal(expected, got)
    for name, weight in whole.vae.state_dict().items():
        assert torch.equal(weight, resumed.vae.state_dict()[name]), name


def test_data_filters_leave_out_small_and_elongated_images_and_name_them(tmp_path):
    """`data.min_side` and `data.max_aspect_ratio`: a refused image is replaced like an unreadable one and its
    record says why. A large JPEG decoded at reduced scale (fast_jpeg_decode) is still judged by its own size."""
    folder = tmp_path / "images"
    write_images(folder, 2, size=(40, 48))
    Image.new("RGB", (12, 10), (1, 2, 3)).save(folder / "small.png")
    Image.new("RGB", (160, 40), (1, 2, 3)).save(folder / "wide.png")
    Image.new("RGB", (1024, 1024), (9, 9, 9)).save(folder / "large.jpg")
    config = DataConfig(dataset=str(folder), resolution=16, min_side=32, max_aspect_ratio=3, num_workers=0)
    dataset = training_dataset(config, seed=0)
    assert len(list(dataset)) == 5  # iterating by index ends (a substitute never wraps past the end)
    records = {name: record["reason"] for row in dataset for record in row["unreadable"] for name in [record["name"]]}
    assert {Path(name).name for name in records} == {"small.png", "wide.png"}
    reasons = {Path(name).name: reason for name, reason in records.items()}
    assert reasons["small.png"] == "12x10 is smaller than data.min_side=32"
    assert reasons["wide.png"] == "160x40 is more elongated than data.max_aspect_ratio=3"
    assert all(row["pixel_values"].shape == (3, 16, 16) for row in dataset)  # replaced, never missing
    drafted = ImageTransform(16, draft_jpeg=True, min_side=512)
    assert drafted.draft_size == 512  # so the 1024 px JPEG decodes to 512, not 128, and passes
