"""Bad input loses nothing: broken images are skipped and counted, non-finite steps are skipped,
and nothing is ever unpickled."""

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_hf.config import load_config
from vae_hf.data import DataError
from vae_hf.train.checkpoint import TrainingDiverged
from vae_hf.train.trainer import Trainer

from conftest import ROOT, tiny_overrides, write_images

BAD_FILES = ("truncated.jpg", "zero_bytes.jpg", "not_an_image.png", "too_many_pixels.png")


def seed_bad_files(folder: Path) -> None:
    """One file of each kind that must be skipped, and three awkward ones that must decode."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "not_an_image.png").write_text("<html>a web page saved with an image name</html>")
    Image.new("RGB", (300, 300), (9, 9, 9)).save(folder / "too_many_pixels.png")  # over the test cap below
    Image.new("RGB", (4, 4), (200, 10, 10)).save(folder / "tiny.png")  # smaller than the crop: upscaled
    frames = [Image.new("P", (40, 40), color) for color in (1, 2, 3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])  # first frame used
    rotated = Image.new("RGB", (48, 32), (10, 200, 10))
    exif = rotated.getexif()
    exif[0x0112] = 8
    rotated.save(folder / "rotated.jpg", exif=exif)


def build(images: Path, tmp_path: Path, **overrides) -> Trainer:
    values = {"data.max_image_pixels": 50_000, **overrides}
    return Trainer(load_config(None, tiny_overrides(images, tmp_path / "run", **values)))


def test_a_folder_with_every_kind_of_bad_file_trains_and_reports_the_skips(tmp_path, caplog, capsys):
    """Every batch keeps its shape (a broken file's place is taken by the next readable image), and each
    broken file is named once with its reason and counted once, however many epochs meet it."""
    images = tmp_path / "images"
    write_images(images, 7)
    seed_bad_files(images)  # 7 good + 3 awkward-but-fine + 4 bad = 14 files, 7 batches of 2
    quick = {"loss.perceptual_weight": 0, "loss.disc_weight": 0}
    trainer = build(images, tmp_path, **{"train.max_steps": 14, **quick})  # two epochs
    one_epoch = list(trainer.dataloader)
    assert [len(batch["pixel_values"]) for batch in one_epoch] == [2] * 7
    records = [record for batch in one_epoch for record in batch["unreadable"]]
    # (a broken file can be met twice: as itself, and while looking past a broken neighbour)
    assert {Path(record["name"]).name for record in records} == set(BAD_FILES)
    reasons = {Path(record["name"]).name: record["reason"] for record in records}
    assert "data.max_image_pixels" in reasons["too_many_pixels.png"]
    assert "not an image file" in reasons["not_an_image.png"] and "truncated" in reasons["truncated.jpg"]
    assert not any("BytesIO" in reason for reason in reasons.values())

    with caplog.at_level(logging.WARNING, logger="vae_hf.train"):
        trainer.train()
    assert trainer.progress.epoch == 1 and trainer.progress.batches_in_epoch == 7  # the second epoch, whole
    assert trainer.progress.images_skipped == len(BAD_FILES)  # not 8: files, not meetings
    warnings = [record.getMessage() for record in caplog.records if "skipping image" in record.getMessage()]
    named = sorted(message.split()[2].rstrip(":") for message in warnings)
    assert named == sorted(str(images / name) for name in BAD_FILES)
    assert f"{len(BAD_FILES)} images skipped (unreadable or filtered" in capsys.readouterr().out


def test_a_folder_of_only_bad_files_stops_before_training(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    seed_bad_files(images)
    for name in ("tiny.png", "animated.gif", "rotated.jpg"):
        (images / name).unlink()
    with pytest.raises(DataError, match="no usable image.*none of its 4 files decodes"):
        build(images, tmp_path)


def test_an_unreadable_reference_image_falls_forward_to_the_next_readable_one(tmp_path, caplog):
    images = tmp_path / "images"
    write_images(images, 4)
    (images / "a_first_and_broken.png").write_bytes(b"broken")
    with caplog.at_level(logging.WARNING, logger="vae_hf.data"):
        trainer = build(images, tmp_path)
    assert trainer.reference_images.shape == (1, 3, 32, 32)
    assert "a_first_and_broken.png" in caplog.text


@pytest.mark.parametrize("fused", ["true", "false"])
def test_non_finite_gradients_skip_the_update_then_stop_the_run_saved(tmp_path, monkeypatch, fused):
    """Fused Adam skips on the device (found_inf), the foreach implementation on the host: the same outcome."""
    images = tmp_path / "images"
    write_images(images, 8)
    trainer = build(
        images,
        tmp_path,
        **{
            "train.max_steps": 20,
            "train.max_nonfinite_steps": 3,
            "train.log_every_steps": 1,
            "loss.disc_weight": 0,
            "optim.fused": fused,
        },
    )
    real_loss = trainer.generator_loss
    poisoned_from = 2  # steps 1 and 2 are fine; from the third on the loss is NaN

    def generator_loss(*args, **kwargs):
        g_loss, breakdown = real_loss(*args, **kwargs)
        return (g_loss * float("nan") if trainer.progress.global_step >= poisoned_from else g_loss), breakdown

    monkeypatch.setattr(trainer, "generator_loss", generator_loss)
    weights = {}
    real_after = trainer._after_optimizer_step

    def after_step(progress, meter):
        real_after(progress, meter)
        weights[trainer.progress.global_step] = trainer.vae.decoder.conv_out.weight.detach().clone()

    monkeypatch.setattr(trainer, "_after_optimizer_step", after_step)
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row"):
        trainer.train()
    assert trainer.progress.steps_skipped == 3 and trainer.progress.global_step == 5
    assert torch.isfinite(trainer.vae.decoder.conv_out.weight).all()
    assert torch.equal(trainer.vae.decoder.conv_out.weight, weights[2])  # nothing changed after step 2
    assert trainer.checkpointer.latest().name == "checkpoint-5"


def test_nothing_is_unpickled_and_no_remote_code_is_trusted():
    sources = "\n".join(path.read_text() for path in (ROOT / "vae_hf").rglob("*.py"))
    loads = re.findall(r"torch\.load\((.*)\)", sources)
    assert loads and all("weights_only=True" in call for call in loads)
    assert not re.search(r"^\s*(import|from) (pickle|dill|cloudpickle)\b|\bpickle\.loads?\(", sources, re.M)
    assert "trust_remote_code=True" not in sources
