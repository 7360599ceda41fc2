"""Images from any PIL mode become [-1, 1] RGB crops; unreadable files are skipped and counted."""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from vae_hf.config import DataConfig
from vae_hf.data.datasets import (
    DataError,
    ExampleProcessor,
    ImageDataset,
    ImageTransform,
    reference_images,
    training_dataset,
)
from vae_hf.data.decode import decode_image, to_rgb
from vae_hf.data.loader import collate, to_model_range


def _modes() -> dict[str, Image.Image]:
    rgb = Image.new("RGB", (20, 10), (200, 100, 50))
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # fully transparent black -> white
    palette = rgb.convert("P")
    sixteen = Image.fromarray(np.full((10, 20), 65535, dtype=np.uint16))
    return {
        "L": rgb.convert("L"),
        "P": palette,
        "RGBA": rgba,
        "CMYK": rgb.convert("CMYK"),
        "I;16": sixteen,
        "LA": rgb.convert("LA"),
        "1": rgb.convert("1"),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_becomes_8_bit_rgb(mode):
    image = to_rgb(_modes()[mode])
    assert image.mode == "RGB" and image.size == (20, 10)


def test_transparency_is_composited_on_white_and_16_bit_is_rescaled():
    modes = _modes()
    assert to_rgb(modes["RGBA"]).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(modes["I;16"]).getpixel((0, 0)) == (255, 255, 255)  # 65535 is white, not clipped garbage


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (30, 10), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    decoded = decode_image({"bytes": buffer.getvalue(), "path": None})
    assert decoded.size == (10, 30)


def test_transform_resizes_the_short_side_crops_and_scales_to_unit_range():
    image = Image.new("RGB", (64, 40), (255, 0, 128))
    pixels = ImageTransform(resolution=16, center_crop=True)(image)
    assert pixels.shape == (3, 16, 16)
    assert pixels[0].min().item() == pytest.approx(1.0) and pixels[1].max().item() == pytest.approx(-1.0)


def test_small_images_are_upscaled_to_the_crop():
    pixels = ImageTransform(resolution=32, center_crop=False)(Image.new("RGB", (8, 12)))
    assert pixels.shape == (3, 32, 32)


def test_random_flip_follows_the_torch_seed():
    image = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))
    transform = ImageTransform(resolution=16, center_crop=True, random_flip=True)
    torch.manual_seed(0)
    first = [transform(image) for _ in range(6)]
    torch.manual_seed(0)
    second = [transform(image) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    unflipped = ImageTransform(resolution=16, center_crop=True)(image)
    assert any(torch.equal(a, unflipped) for a in first)
    assert any(torch.equal(a, unflipped.flip(-1)) for a in first)


def test_unreadable_stream_rows_are_replaced_by_the_next_readable_one_and_named(tmp_path):
    """A stream's batch keeps its shape: an unreadable row becomes the next readable row of its map batch
    (cyclically), and its record says which file and why; a map batch with nothing readable is dropped."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(good)
    processor = ExampleProcessor("image", ImageTransform(8), seed=0)
    files = [{"path": str(path), "bytes": None} for path in (bad, good, empty)]
    rows = processor({"image": files}, [0, 1, 2])
    batch = collate(
        [{"pixel_values": p, "unreadable": u} for p, u in zip(rows["pixel_values"], rows["unreadable"], strict=True)]
    )
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["num_skipped"] == 0
    assert (batch["pixel_values"] == batch["pixel_values"][1]).all()  # both replaced by the good image
    assert [record["name"] for record in batch["unreadable"]] == [str(bad), str(empty)]
    reasons = " ".join(record["reason"] for record in batch["unreadable"])
    assert "not an image file" in reasons and "BytesIO" not in reasons
    assert processor({"image": [files[0], files[2]]}, [3, 4]) == {"pixel_values": [], "unreadable": []}


def test_an_unreadable_training_sample_is_replaced_but_evaluation_skips_it(tmp_path):
    from datasets import Dataset as HFDataset

    from vae_hf.data.datasets import ImageDataset

    (tmp_path / "bad.png").write_bytes(b"<html>")
    for name, colour in (("a.png", (255, 0, 0)), ("c.png", (0, 0, 255))):
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)
    rows = HFDataset.from_dict({"image": [str(tmp_path / name) for name in ("a.png", "bad.png", "c.png")]})
    training = ImageDataset(rows, "image", ImageTransform(8, uint8=True), seed=0, substitute=True)
    sample = training[1]
    assert (sample["pixel_values"] == training[2]["pixel_values"]).all()  # the next readable row, c.png
    assert sample["unreadable"] == [{"name": str(tmp_path / "bad.png"), "reason": sample["unreadable"][0]["reason"]}]
    evaluation = ImageDataset(rows, "image", ImageTransform(8), seed=0)
    assert evaluation[1]["pixel_values"] is None and evaluation[1]["unreadable"][0]["name"].endswith("bad.png")


def test_a_local_folder_loads_through_the_imagefolder_builder(image_folder):
    config = DataConfig(dataset=str(image_folder), resolution=16, num_workers=0)
    dataset = training_dataset(config, seed=0)
    assert len(dataset) == 8
    example = dataset[0]["pixel_values"]
    assert example.shape == (3, 16, 16) and example.dtype == torch.uint8  # scaled on the device
    # the same sample (crop, flip) transformed straight to floats
    floats = ImageDataset(dataset.dataset, config.image_column, replace(dataset.transform, uint8=False), seed=0)
    full = floats[0]["pixel_values"]
    assert torch.equal(to_model_range(example), full) and -1 <= full.min() and full.max() <= 1


@pytest.mark.parametrize("contents", [[], ["notes.txt", "metadata.json"], [".hidden/image.png", "__cache__/a.png"]])
def test_a_folder_without_image_files_is_named_with_the_extensions_read(tmp_path, contents):
    """The imagefolder builder said `Instruction "train" corresponds to no data!` or named neither folder nor why."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in contents:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):
            Image.new("RGB", (8, 8)).save(folder / name)
        else:
            (folder / name).write_text("{}")
    with pytest.raises(DataError) as error:
        training_dataset(DataConfig(dataset=str(folder), resolution=16), seed=0)
    message = str(error.value)
    assert message.startswith(f"data.dataset: no image files in {folder} (read recursively: .jpg, .jpeg, .png")
    assert "\n" not in message


def test_a_mistyped_local_folder_is_named_as_missing_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for typo in ("data/photso", "data/2024/photos", "./photos"):
        with pytest.raises(DataError, match=f"^data.dataset: no such folder {typo}$"):
            training_dataset(DataConfig(dataset=typo, resolution=16), seed=0)


def test_images_in_subfolders_count_whatever_the_case_of_their_extension(tmp_path):
    (tmp_path / "photos" / "day").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "photos" / "day" / "IMG_1.JPG", format="JPEG")
    assert len(training_dataset(DataConfig(dataset=str(tmp_path / "photos"), resolution=16), seed=0)) == 1


def test_reference_images_come_from_the_chosen_indices(image_folder):
    config = DataConfig(dataset=str(image_folder), resolution=16, reference_indices=[0, 3])
    images = reference_images(config)
    assert images.shape == (2, 3, 16, 16)
    with pytest.raises(DataError, match="data.reference_indices"):
        reference_images(DataConfig(dataset=str(image_folder), resolution=16, reference_indices=[99]))


def test_a_wrong_image_column_is_named(image_folder):
    with pytest.raises(DataError, match="data.image_column"):
        training_dataset(DataConfig(dataset=str(image_folder), image_column="picture"), seed=0)


def test_a_hub_dataset_offline_fails_at_once_with_a_clear_message(monkeypatch):
    import vae_hf.offline as offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(
        offline, "unreachable_reason", lambda url, timeout_s=5.0: "cannot reach huggingface.co: offline"
    )
    with pytest.raises(offline.OfflineError, match="data.dataset=someone/some-dataset"):
        training_dataset(DataConfig(dataset="someone/some-dataset"), seed=0)


def test_fast_jpeg_decode_decodes_at_reduced_scale_and_matches_a_full_decode(tmp_path):
    """A 1024 px photo wanted at 256 px is decoded at 1/4 scale by libjpeg; the training crop differs from a
    full decode + bicubic resize only far below what a VAE resolves (> 40 dB PSNR). PNGs are untouched."""
    from vae_hf.data.transforms import try_transform

    from conftest import write_images

    (png,) = write_images(tmp_path / "png", 1, size=(1024, 1024))
    jpeg = tmp_path / "photo.jpg"
    Image.open(png).save(jpeg, quality=95)
    assert decode_image(str(jpeg), draft_size=256).size == (256, 256)
    assert decode_image(str(jpeg), draft_size=300).size == (512, 512)  # never below the requested size
    assert decode_image(str(jpeg)).size == (1024, 1024)
    assert decode_image(str(png), draft_size=256).size == (1024, 1024)
    fast, _ = try_transform(str(jpeg), ImageTransform(256, draft_jpeg=True))
    full, _ = try_transform(str(jpeg), ImageTransform(256))
    assert fast.shape == full.shape == (3, 256, 256) and not torch.equal(fast, full)
    psnr = 10 * torch.log10(1 / ((fast - full) / 2).pow(2).mean())
    assert psnr > 40
