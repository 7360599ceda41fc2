"""`vae-hf reconstruct` and `vae-hf interpolate`, and latents stored as safetensors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from vae_hf.analysis.inference import (
    InferenceError,
    configure_tiling,
    decode,
    diffusion_latents,
    interpolation_grid,
    lerp,
    load_latents,
    output_names,
    prepare,
    read_square,
    reconstruct_images,
    save_latents,
    slerp,
    to_image,
)
from vae_hf.cli import main

from conftest import tiny_vae as conftest_tiny_vae
from conftest import write_images


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A [32, 64] AutoencoderKL: downsampling factor 2, trained size (sample_size) 32."""
    return prepare(conftest_tiny_vae(seed))


@pytest.fixture
def vae_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(folder)
    return folder


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_reconstruct_writes_each_image_at_its_own_size_under_the_same_relative_name(tmp_path):
    source = tmp_path / "in"
    write_images(source, 2, size=(40, 48))
    write_images(source / "nested", 1, size=(33, 35))  # odd sides: cropped to a multiple of 2
    (source / "notes.txt").write_text("not an image, not an input")
    (source / "broken.png").write_bytes(b"\x89PNG not really")
    summary = reconstruct_images(tiny_vae(), source, tmp_path / "out")
    assert (summary.written, summary.cropped, summary.skipped) == (3, 1, 1)
    assert size_of(tmp_path / "out" / "image_00.png") == (48, 40)
    assert size_of(tmp_path / "out" / "image_01.png") == (48, 40)
    assert size_of(tmp_path / "out" / "nested" / "image_00.png") == (34, 32)
    assert not (tmp_path / "out" / "broken.png").exists()


def counted(method, calls: dict[str, int], name: str):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return method(*args, **kwargs)

    return wrapper


def test_a_large_image_is_reconstructed_in_tiles_at_its_own_size(tmp_path, monkeypatch):
    write_images(tmp_path / "in", 1, size=(81, 100))  # larger than the 32 px tiles on both sides
    vae = tiny_vae()
    configure_tiling(vae, 32)
    calls = {"_tiled_encode": 0, "tiled_decode": 0}
    for name in calls:
        monkeypatch.setattr(vae, name, counted(getattr(vae, name), calls, name))
    reconstruct_images(vae, tmp_path / "in" / "image_00.png", tmp_path / "out")
    assert calls == {"_tiled_encode": 1, "tiled_decode": 1}
    assert size_of(tmp_path / "out" / "image_00.png") == (100, 80)


def test_a_tile_size_whose_quarter_is_not_whole_latent_pixels_is_refused():
    # 20 px tiles on an f2 VAE would come back 89 px tall for an 80 px image (checked by hand)
    with pytest.raises(InferenceError, match="multiple of 8"):
        configure_tiling(tiny_vae(), 20)


def test_colliding_output_names_keep_their_suffix():
    names = output_names([Path("a/b.jpg"), Path("a/b.png"), Path("c.webp")])
    assert names == [Path("a/b.jpg.png"), Path("a/b.png.png"), Path("c.png")]


def test_latents_round_trip_through_safetensors_with_metadata(tmp_path):
    latents = {"mean": torch.randn(4, 5, 6), "logvar": torch.randn(4, 5, 6)}
    path = save_latents(tmp_path / "x.safetensors", latents, {"scaling_factor": "0.5", "model": "m"})
    loaded, metadata = load_latents(path)
    assert set(loaded) == {"mean", "logvar"}
    assert all(torch.equal(loaded[name], latents[name]) for name in latents)
    assert metadata == {"scaling_factor": "0.5", "model": "m"}


def test_saved_latents_are_the_posterior_that_decodes_to_the_written_reconstruction(tmp_path):
    write_images(tmp_path / "in", 1, size=(40, 48))
    vae = tiny_vae()
    reconstruct_images(vae, tmp_path / "in", tmp_path / "out", save_latents=True, model_name="tiny")
    latents, metadata = load_latents(tmp_path / "out" / "image_00.safetensors")
    assert latents["mean"].shape == latents["logvar"].shape == (4, 20, 24)
    assert float(metadata["scaling_factor"]) == vae.config.scaling_factor
    assert float(metadata["shift_factor"]) == 0.0 and metadata["model"] == "tiny"
    decoded = np.asarray(to_image(decode(vae, latents["mean"][None])[0]), dtype=np.int16)
    written = np.asarray(Image.open(tmp_path / "out" / "image_00.png"), dtype=np.int16)
    assert np.abs(decoded - written).max() <= 1


def test_diffusion_latents_shift_then_scale_a_posterior_sample():
    mean = torch.randn(4, 3, 3)
    latents = {"mean": mean, "logvar": torch.full_like(mean, -30.0)}  # std 3e-7: the sample is the mean
    scaled = diffusion_latents(latents, {"scaling_factor": "0.25", "shift_factor": "1.5"})
    torch.testing.assert_close(scaled, (mean - 1.5) * 0.25, atol=1e-5, rtol=0)


def test_slerp_ends_at_its_inputs():
    start, end = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    torch.testing.assert_close(slerp(start, end, 0.0), start)
    torch.testing.assert_close(slerp(start, end, 1.0), end)


def test_slerp_keeps_orthogonal_unit_vectors_on_the_unit_circle():
    start, end = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    for t in (0.1, 0.25, 0.5, 0.9):
        assert float(slerp(start, end, t).norm()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(slerp(start, end, 0.5), torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    assert float(lerp(start, end, 0.5).norm()) == pytest.approx(1 / math.sqrt(2))  # the chord dips


@pytest.mark.parametrize("end_scale", [2.0, -1.0, 0.0], ids=["parallel", "opposite", "zero"])
def test_slerp_falls_back_to_lerp_where_the_angle_is_degenerate(end_scale):
    start = torch.randn(16)
    end = start * end_scale
    for t in (0.0, 0.3, 1.0):
        result = slerp(start, end, t)
        assert torch.isfinite(result).all()
        torch.testing.assert_close(result, lerp(start, end, t))


def test_interpolation_grid_holds_a_linear_and_a_spherical_row_of_steps(tmp_path):
    paths = write_images(tmp_path, 2, size=(40, 48))
    vae, steps, resolution = tiny_vae(), 5, 16
    grid = interpolation_grid(vae, read_square(paths[0], resolution), read_square(paths[1], resolution), steps)
    assert grid.size == (steps * resolution, 2 * resolution)
    pixels = np.asarray(grid, dtype=np.int16)
    tiles = [[pixels[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] for c in range(steps)] for r in range(2)]
    for column in (0, steps - 1):  # both paths start at image A's latents and end at image B's
        assert np.abs(tiles[0][column] - tiles[1][column]).max() <= 2
    assert np.abs(tiles[0][0] - tiles[0][steps // 2]).max() > 2  # the middle is neither end


def test_reconstruct_and_interpolate_commands_write_their_images(tmp_path, vae_folder):
    paths = write_images(tmp_path / "in", 2, size=(40, 48))
    status = main(["reconstruct", "--model", str(vae_folder), "--input", str(tmp_path / "in"), "--out",
                   str(tmp_path / "out"), "--save-latents"])  # fmt: skip
    assert status == 0
    assert size_of(tmp_path / "out" / "image_01.png") == (48, 40)
    assert (tmp_path / "out" / "image_01.safetensors").is_file()
    grid = tmp_path / "grid.png"
    status = main(["interpolate", "--model", str(vae_folder), str(paths[0]), str(paths[1]), "--steps", "3",
                   "--out", str(grid)])  # fmt: skip
    assert status == 0
    assert size_of(grid) == (3 * 32, 2 * 32)  # the model's sample_size is the default resolution


def one_error_line(capsys) -> str:
    """The error is one line, the last; warnings about skipped files may come before it, a traceback not."""
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("vae-hf: error: ")] == err[-1:], err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_reconstruct_of_a_missing_input_exits_2_with_one_line(tmp_path, vae_folder, capsys):
    status = main(
        ["reconstruct", "--model", str(vae_folder), "--input", str(tmp_path / "nope"), "--out", str(tmp_path)]
    )
    assert status == 2
    assert "no such file or folder" in one_error_line(capsys)


def test_reconstruct_of_a_folder_without_usable_images_exits_2_with_one_line(tmp_path, vae_folder, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("hello")
    (tmp_path / "in" / "fake.jpg").write_text("<html>")
    status = main(
        ["reconstruct", "--model", str(vae_folder), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")]
    )
    assert status == 2
    assert "no usable image" in one_error_line(capsys)


def test_interpolate_of_a_missing_image_exits_2_with_one_line(tmp_path, vae_folder, capsys):
    paths = write_images(tmp_path, 1)
    status = main(["interpolate", "--model", str(vae_folder), str(paths[0]), str(tmp_path / "missing.png"), "--out",
                   str(tmp_path / "g.png")])  # fmt: skip
    assert status == 2
    assert "missing.png" in one_error_line(capsys)


def tiled_calls(vae, monkeypatch) -> dict[str, int]:
    calls = {"_tiled_encode": 0, "tiled_decode": 0}
    for name in calls:
        monkeypatch.setattr(vae, name, counted(getattr(vae, name), calls, name))
    return calls


def test_without_tile_flags_only_large_images_are_tiled(tmp_path, monkeypatch):
    """A 2560 x 1600 photograph ran for minutes untiled (attention over every latent position); by default an
    image above the bound (1 megapixel; 3000 px here) is tiled, a smaller one is not, both at their own size."""
    import vae_hf.analysis.inference as inference

    monkeypatch.setattr(inference, "AUTO_TILE_PIXELS", 3000)
    write_images(tmp_path / "in", 1, size=(81, 100), seed=1)  # 8100 px: tiled
    write_images(tmp_path / "small", 1, size=(40, 48))  # 1920 px: whole
    vae = tiny_vae()
    configure_tiling(vae, 32)
    calls = tiled_calls(vae, monkeypatch)
    summary = reconstruct_images(vae, tmp_path / "in" / "image_00.png", tmp_path / "out", auto_tile=True)
    assert calls == {"_tiled_encode": 1, "tiled_decode": 1} and summary.tiled == 1
    summary = reconstruct_images(vae, tmp_path / "small" / "image_00.png", tmp_path / "out2", auto_tile=True)
    assert calls == {"_tiled_encode": 1, "tiled_decode": 1} and summary.tiled == 0
    assert size_of(tmp_path / "out" / "image_00.png") == (100, 80)


def test_tile_flags_force_tiling_on_or_off_and_resolution_needs_tiling(tmp_path):
    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(folder)
    write_images(tmp_path / "in", 1, size=(81, 100))

    def reconstruct(out: str, *flags: str) -> int:
        return main(["reconstruct", "--model", str(folder), "--input", str(tmp_path / "in"), "--out", out, *flags])

    assert reconstruct(str(tmp_path / "a"), "--tile", "--resolution", "32") == 0
    assert reconstruct(str(tmp_path / "b"), "--no-tile", "--resolution", "32") == 2  # silently ignored before
    assert not (tmp_path / "b").exists()
    assert reconstruct(str(tmp_path / "c"), "--no-tile") == 0
    assert size_of(tmp_path / "a" / "image_00.png") == size_of(tmp_path / "c" / "image_00.png") == (100, 80)


def test_a_resolution_without_tile_says_that_small_images_were_reconstructed_whole(tmp_path, vae_folder, capsys):
    """`--resolution 32` without `--tile` was silently ignored for images under 1 megapixel."""
    write_images(tmp_path / "in", 2, size=(40, 48))
    arguments = ["reconstruct", "--model", str(vae_folder), "--input", str(tmp_path / "in")]
    assert main([*arguments, "--out", str(tmp_path / "out"), "--resolution", "32"]) == 0
    note = capsys.readouterr().out.strip().splitlines()[-1]
    assert note.startswith("note: --resolution 32 is the tile size of images over 1 megapixel; 2 of the 2 image(s)")
    assert "--tile tiles every image larger than a tile" in note
    assert size_of(tmp_path / "out" / "image_00.png") == (48, 40)
    assert main([*arguments, "--out", str(tmp_path / "tiled"), "--resolution", "32", "--tile"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_the_input_folder_as_output_is_refused_and_an_input_file_is_never_overwritten(tmp_path, vae_folder, capsys):
    """The same folder for --input and --out said "no image files in ..." although it held the images."""
    write_images(tmp_path / "in", 2)
    arguments = ["reconstruct", "--model", str(vae_folder), "--input"]
    assert main([*arguments, str(tmp_path / "in"), "--out", str(tmp_path / "in")]) == 2
    assert f"--out: {tmp_path / 'in'} is the --input folder" in one_error_line(capsys)
    assert main([*arguments, str(tmp_path / "in" / "image_00.png"), "--out", str(tmp_path / "in")]) == 2
    assert "would overwrite it" in one_error_line(capsys)
    assert sorted(path.name for path in (tmp_path / "in").iterdir()) == ["image_00.png", "image_01.png"]
    assert main([*arguments, str(tmp_path / "in"), "--out", str(tmp_path / "in" / "recon")]) == 0  # inside: fine
