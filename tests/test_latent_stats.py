"""`vae-hf latent-stats`: latent mean/std over a dataset, and scaling_factor / shift_factor written to config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from vae_hf.analysis.latent_stats import (
    ChannelMoments,
    LatentStatsError,
    config_to_write,
    latent_statistics,
    write_factors,
)
from vae_hf.cli import main
from vae_hf.cli.latent_stats import latent_stats_command
from vae_hf.data.decode import decode_image
from vae_hf.data.transforms import ImageTransform

from conftest import tiny_vae as conftest_tiny_vae

RESOLUTION = 32


def tiny_vae() -> AutoencoderKL:
    return conftest_tiny_vae(sample_size=RESOLUTION).eval()


@pytest.fixture
def vae_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(folder)
    return folder


def images_of(folder: Path) -> torch.Tensor:
    transform = ImageTransform(RESOLUTION, center_crop=True)
    return torch.stack([transform(decode_image(path)) for path in sorted(folder.glob("*.png"))])


@torch.no_grad()
def scaled_latents(model: Path, folder: Path, seed: int) -> torch.Tensor:
    """(z - shift) * scale of posterior samples, as a diffusion trainer would compute it from the config."""
    vae = AutoencoderKL.from_pretrained(model).eval()
    posterior = vae.encode(images_of(folder)).latent_dist
    samples = posterior.sample(torch.Generator().manual_seed(seed))
    return (samples - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def test_channel_moments_merged_over_uneven_batches_match_one_pass_in_float64():
    latents = 1000.0 + 0.01 * torch.randn(13, 3, 5, 5, dtype=torch.float64)  # a large mean, a small spread
    moments = ChannelMoments()
    for batch in latents.split([1, 7, 5]):
        moments.add(batch.float())
    stats = moments.summary()
    reference = latents.float().double()
    assert stats["mean"] == pytest.approx(float(reference.mean()), rel=1e-12)
    assert stats["std"] == pytest.approx(float(reference.std()), rel=1e-9)
    expected_channel_std = reference.transpose(0, 1).flatten(1).std(dim=1)
    assert stats["channel_std"] == pytest.approx(expected_channel_std.tolist(), rel=1e-9)
    assert stats["latent_values"] == 13 * 3 * 5 * 5


def test_statistics_of_posterior_means_equal_those_of_one_big_batch(image_folder):
    vae, images = tiny_vae(), images_of(image_folder)
    stats = latent_statistics(vae, images.split(3), sample_posterior=False)
    with torch.no_grad():
        means = vae.encode(images).latent_dist.mean.double()
    assert stats["images"] == len(images)
    assert stats["mean"] == pytest.approx(float(means.mean()), rel=1e-5)
    assert stats["std"] == pytest.approx(float(means.std()), rel=1e-5)
    assert stats["scaling_factor"] == pytest.approx(1 / float(means.std()), rel=1e-5)


def test_posterior_samples_spread_wider_than_the_means(image_folder):
    vae, images = tiny_vae(), images_of(image_folder)
    sampled = latent_statistics(vae, [images], sample_posterior=True)
    means_only = latent_statistics(vae, [images], sample_posterior=False)
    assert sampled["std"] > means_only["std"]  # Var(sample) = Var(mean) + E[posterior variance]
    assert latent_statistics(vae, [images], seed=7)["std"] != sampled["std"]  # a real draw, seeded


def test_write_gives_unit_std_latents_and_keeps_the_shift(vae_folder, image_folder):
    before = json.loads((vae_folder / "config.json").read_text())
    latent_stats_command(str(vae_folder), str(image_folder), RESOLUTION, batch_size=3, write=True)
    after = json.loads((vae_folder / "config.json").read_text())
    assert after["scaling_factor"] != before["scaling_factor"]
    assert after["shift_factor"] == before["shift_factor"] is None
    written = ("scaling_factor", "_latent_factors_source")
    assert {k: v for k, v in after.items() if k not in written} == {k: v for k, v in before.items() if k not in written}
    assert after["_latent_factors_source"]["scaling_factor"] == (
        f"vae-hf latent-stats --write, measured on 8 images of {image_folder} at {RESOLUTION} px"
    )
    assert "shift_factor" not in after["_latent_factors_source"]
    latents = scaled_latents(vae_folder, image_folder, seed=1234)  # other draws than the tool's
    assert float(latents.std()) == pytest.approx(1.0, rel=0.02)


def test_write_with_shift_centres_the_latents_too(vae_folder, image_folder):
    latent_stats_command(str(vae_folder), str(image_folder), RESOLUTION, write=True, shift=True)
    config = AutoencoderKL.from_pretrained(vae_folder).config
    assert config.shift_factor is not None
    latents = scaled_latents(vae_folder, image_folder, seed=99)
    assert float(latents.std()) == pytest.approx(1.0, rel=0.02)
    assert abs(float(latents.mean())) < 0.03


def test_write_with_channels_stores_per_channel_statistics_diffusers_loads(vae_folder, image_folder):
    latent_stats_command(str(vae_folder), str(image_folder), RESOLUTION, write=True, channels=True)
    config = AutoencoderKL.from_pretrained(vae_folder).config  # diffusers' own keys: it loads them
    assert config.shift_factor is None  # --channels writes the per-channel keys only
    measured = latent_statistics(tiny_vae(), [images_of(image_folder)])  # the tool's draws: one batch, seed 0
    assert list(config.latents_mean) == pytest.approx(measured["channel_mean"], rel=1e-6)
    assert list(config.latents_std) == pytest.approx(measured["channel_std"], rel=1e-6)
    assert len(set(config.latents_std)) == 4  # one value per channel, not the overall std repeated
    # and they normalise those latents per channel, as SD3/Wan-style pipelines apply them
    with torch.no_grad():
        posterior = tiny_vae().encode(images_of(image_folder)).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=torch.Generator().manual_seed(0)
        )
    mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in (config.latents_mean, config.latents_std))
    normalised = ((latents - mean) / std).transpose(0, 1).flatten(1)  # (C, values)
    torch.testing.assert_close(normalised.std(dim=1), torch.ones(4), rtol=1e-4, atol=0)


def test_channels_without_write_is_refused():
    with pytest.raises(LatentStatsError, match="^--channels chooses what --write stores; add --write$"):
        latent_stats_command("unused", "unused", channels=True)


def test_write_replaces_the_config_in_one_rename_and_keeps_other_keys(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": "AutoencoderKL", "scaling_factor": 0.18215, "custom": [1, 2]}))
    write_factors(config, 0.5, shift_factor=0.25, measured_on="8 images of D at 64 px")
    source = "vae-hf latent-stats --write, measured on 8 images of D at 64 px"
    assert json.loads(config.read_text()) == {
        "_class_name": "AutoencoderKL",
        "scaling_factor": 0.5,
        "shift_factor": 0.25,
        "custom": [1, 2],
        "_latent_factors_source": {"scaling_factor": source, "shift_factor": source},
    }
    assert [path.name for path in tmp_path.iterdir()] == ["config.json"]  # no temporary file left


def test_write_keeps_the_mode_of_the_config_it_replaces(tmp_path):
    """The temporary file (mkstemp: owner only) used to leave config.json at mode 0600."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"scaling_factor": 0.18215}))
    config.chmod(0o644)
    write_factors(config, 0.5)
    assert config.stat().st_mode & 0o777 == 0o644


def test_write_refuses_a_hub_id_and_a_single_file_before_any_work(tmp_path):
    with pytest.raises(LatentStatsError, match="download it first"):
        config_to_write("someone/some-vae")
    single_file = tmp_path / "vae.safetensors"
    single_file.write_bytes(b"")
    with pytest.raises(LatentStatsError, match=r"vae-hf export --model .*vae.safetensors --diffusers DIR, offline"):
        config_to_write(str(single_file))


def test_write_finds_the_vae_of_a_pipeline_folder(tmp_path, vae_folder):
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    vae_folder.rename(pipeline / "vae")
    assert config_to_write(str(pipeline)) == pipeline / "vae" / "config.json"


def test_latent_stats_command_runs_and_writes_the_config(vae_folder, image_folder, capsys):
    status = main([
        "latent-stats", "--model", str(vae_folder), "--data", str(image_folder),
        "--max-images", "6", "--batch-size", "4", "--write", "--shift",
    ])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "latents of 6 images" in printed and "scaling_factor" in printed
    config = AutoencoderKL.from_pretrained(vae_folder).config
    assert config.scaling_factor != 0.18215 and config.shift_factor is not None


def one_error_line(capsys) -> str:
    """The error is one line, the last; warnings about skipped files may come before it, a traceback not."""
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("vae-hf: error: ")] == err[-1:], err
    assert not any("Traceback" in line for line in err)
    return err[-1]


@pytest.mark.parametrize("files", [["notes.txt"], ["notes.txt", "fake.png", "empty.jpg"]], ids=["no-images", "broken"])
def test_latent_stats_on_a_folder_without_usable_images_exits_2_with_one_line(tmp_path, vae_folder, capsys, files):
    (tmp_path / "data").mkdir()
    for name in files:
        (tmp_path / "data" / name).write_text("<html>not an image</html>" if name != "empty.jpg" else "")
    status = main(["latent-stats", "--model", str(vae_folder), "--data", str(tmp_path / "data")])
    assert status == 2
    assert str(tmp_path / "data") in one_error_line(capsys)


def test_latent_stats_write_to_a_hub_id_exits_2_with_one_line(capsys, image_folder):
    status = main(["latent-stats", "--model", "someone/some-vae", "--data", str(image_folder), "--write"])
    assert status == 2
    assert "download it first" in one_error_line(capsys)
