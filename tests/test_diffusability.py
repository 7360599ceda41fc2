"""The diffusability measures can tell a latent space that diffuses well from one that does not.

The VAEs here are toys whose answer is known: a pooling autoencoder (smooth latents, good reconstructions), the
same with its latents multiplied by a fixed checkerboard (identical reconstructions, harsher latents), and an
autoencoder that is equivariant by construction."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vae_hf.analysis import diffusability_report
from vae_hf.analysis.charts import pca_image
from vae_hf.analysis.diffusability import TRANSFORMS, ChannelCovariance, Spectrum, measure_latents, transform
from vae_hf.analysis.diffusion_probe import ProbeConfig, run_probe
from vae_hf.analysis.evaluation import FeaturesUnavailable
from vae_hf.cli import main
from vae_hf.config import ConfigError, load_config
from vae_hf.io.model_card import write_model_card
from vae_hf.train.trainer import Trainer

from conftest import tiny_overrides, tiny_vae, write_images


class PoolingAutoencoder(torch.nn.Module):
    """Latents: 2x2 means of the image; decoding: bilinear upsampling. `checkerboard` multiplies the latents by a
    fixed +-1 pattern in `encode` and again in `decode`, which undoes it: the same reconstructions."""

    def __init__(self, checkerboard: bool = False):
        super().__init__()
        self.checkerboard = checkerboard
        self.gain = torch.nn.Parameter(torch.ones(()))  # gives the toy a device and a dtype

    def pattern(self, latents: torch.Tensor) -> torch.Tensor:
        rows, columns = torch.meshgrid(*(torch.arange(side) for side in latents.shape[2:]), indexing="ij")
        signs = 1 - 2 * ((rows + columns) % 2) if self.checkerboard else torch.ones_like(rows)
        return signs.to(latents)

    def encode(self, images: torch.Tensor):
        latents = F.avg_pool2d(images, 2) * self.gain
        latents = latents * self.pattern(latents)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=latents, std=torch.full_like(latents, 0.05)))

    def decode(self, latents: torch.Tensor):
        latents = latents * self.pattern(latents)
        return SimpleNamespace(sample=F.interpolate(latents, scale_factor=2, mode="bilinear", align_corners=False))


class OffsetAutoencoder(torch.nn.Module):
    """Latent = image (f = 1); decoding adds 0.1 everywhere. Decoding T(z) therefore gives T(x) + 0.1 for any T
    that keeps constants, so its equivariance error is exactly its reconstruction error."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def encode(self, images: torch.Tensor):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=images * self.gain, std=torch.zeros_like(images)))

    def decode(self, latents: torch.Tensor):
        return SimpleNamespace(sample=latents + 0.1)


def smooth_images(count: int = 12, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth colour fields in [-1, 1], each channel around its own level (-0.5, 0, 0.5 for R, G, B)."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    fields = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return 0.4 * fields + torch.tensor([0.5, 0.0, -0.5])[:, None, None]


# one probe budget for every comparison: 30 steps of a width-8 UNet on 8x8 latents, a few seconds on a CPU
PROBE = ProbeConfig(steps=30, width=8, batch_size=4, lr=2e-3, curve_points=3, seed=0)


def probe(vae: torch.nn.Module, images: torch.Tensor, config: ProbeConfig = PROBE, **kwargs) -> dict:
    return run_probe(vae, [images[:8]], [images[8:]], config, **kwargs)


def toy_features() -> torch.nn.Module:
    """A small deterministic stand-in for Inception (the tests never need its weights)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 4))


@pytest.fixture(scope="module")
def plain_probe() -> dict:
    return probe(PoolingAutoencoder(), smooth_images())


def test_white_noise_has_a_flat_spectrum_and_smooth_latents_fall_off():
    generator = torch.Generator().manual_seed(0)
    noise = Spectrum()
    noise.add(torch.randn(16, 4, 32, 32, generator=generator))
    power = noise.radial()["power"]
    assert all(0.8 < value < 1.25 for value in power[1:])  # flat around the white-noise level 1
    assert noise.high_frequency_energy() == pytest.approx(1 - torch.pi / 16, abs=0.03)  # its share of the plane

    smooth = Spectrum()
    smooth.add(F.interpolate(torch.randn(16, 4, 4, 4, generator=generator), size=32, mode="bicubic"))
    power = smooth.radial()["power"]
    assert power[0] > 10 * power[len(power) // 2] > 10 * power[-1]
    assert smooth.high_frequency_energy() < 0.05


def test_checkerboard_latents_are_worse_on_every_measure_with_the_same_reconstructions(plain_probe):
    images = smooth_images()
    plain = measure_latents(PoolingAutoencoder(), [images[:6], images[6:]])["scalars"]
    harsh = measure_latents(PoolingAutoencoder(checkerboard=True), [images[:6], images[6:]])["scalars"]
    assert harsh["reconstruction_psnr"] == pytest.approx(plain["reconstruction_psnr"], abs=1e-3)
    assert harsh["latent_hf_energy"] > 0.5 > 0.05 > plain["latent_hf_energy"]
    for name in TRANSFORMS:
        assert harsh[f"equivariance_psnr_{name}"] < plain[f"equivariance_psnr_{name}"] - 5
    harsh_probe = probe(PoolingAutoencoder(checkerboard=True), images)
    assert harsh_probe["probe_loss"] > plain_probe["probe_loss"] * 1.05  # the same budget, data and seed


def test_an_equivariant_autoencoder_has_equivariance_error_equal_to_its_reconstruction_error():
    images = smooth_images(4, size=24) * 0.5  # kept clear of the [-1, 1] clamp after the offset
    scores = measure_latents(OffsetAutoencoder(), [images])["scalars"]
    for name in TRANSFORMS:
        assert scores[f"equivariance_psnr_{name}"] == pytest.approx(scores["reconstruction_psnr"], abs=1e-3)
    # with f = 2: pooling and bilinear upsampling commute with a rotation, so the rotated image is the target
    pooled = measure_latents(PoolingAutoencoder(), [smooth_images(4)])["scalars"]
    assert pooled["equivariance_psnr_rot90"] == pytest.approx(pooled["reconstruction_psnr"], abs=1e-3)
    # and the measure compares with T(x), not with x: a decoder that ignores the latent is caught
    blind = OffsetAutoencoder()
    blind.decode = lambda latents: SimpleNamespace(sample=torch.zeros_like(latents))
    assert measure_latents(blind, [images])["scalars"]["equivariance_psnr_rot90"] < scores["reconstruction_psnr"] - 5


def test_noisier_latents_decode_worse_and_a_copied_channel_shows_in_the_channel_statistics():
    scores = measure_latents(PoolingAutoencoder(), [smooth_images(4)])["scalars"]
    psnrs = [scores["reconstruction_psnr"]] + [scores[f"noise_psnr_{sigma}"] for sigma in (0.1, 0.2, 0.5)]
    assert psnrs == sorted(psnrs, reverse=True) and psnrs[0] > psnrs[-1] + 3
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents[:, 3] = 2 * latents[:, 0] + 1  # a channel that carries nothing new
    channels = ChannelCovariance()
    channels.add(latents)
    summary = channels.summary()
    assert summary["latent_max_abs_correlation"] == pytest.approx(1.0, abs=1e-9)
    assert summary["pca_variance_share"][-1] == pytest.approx(0.0, abs=1e-9)
    assert summary["channel_mean"][3] == pytest.approx(1.0 + 2 * summary["channel_mean"][0])


def test_the_pca_image_colours_the_latents_main_direction():
    columns = torch.arange(8.0).expand(8, 8)  # a left-to-right ramp
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.01
    latents[:, 1] += columns  # the ramp is the first principal component, in channel 1
    rgb = pca_image(latents)
    assert rgb.shape == (2, 3, 8, 8) and 0 <= rgb.min() and rgb.max() <= 1
    red = rgb[:, 0].mean(dim=(0, 1))  # by column
    assert abs(torch.corrcoef(torch.stack([red, torch.arange(8.0)]))[0, 1]) > 0.99  # its sign is arbitrary


def test_transforms_give_images_the_latent_grid_times_the_factor():
    latents, images = torch.zeros(1, 4, 12, 12), torch.zeros(1, 3, 96, 96)
    assert transform(latents, "x0.75", (12, 12), 1).shape[2:] == (9, 9)
    assert transform(images, "x0.75", (12, 12), 8).shape[2:] == (72, 72)
    assert transform(images, "rot90", (12, 12), 8).shape[2:] == (96, 96)


def test_the_probe_learns_and_repeats_itself_with_the_same_seed(plain_probe):
    curve = plain_probe["probe_curve"]["heldout_loss"]
    assert curve[-1] < 0.8 * curve[0]
    assert set(plain_probe["probe_loss_by_sigma"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}
    again = probe(PoolingAutoencoder(), smooth_images())
    assert again["probe_curve"] == plain_probe["probe_curve"] and again["probe_loss"] == plain_probe["probe_loss"]
    other_seed = ProbeConfig(**{**PROBE.__dict__, "seed": 1, "steps": 2})
    same_seed = ProbeConfig(**{**PROBE.__dict__, "steps": 2})
    assert (
        probe(PoolingAutoencoder(), smooth_images(), other_seed)["probe_curve"]
        != (probe(PoolingAutoencoder(), smooth_images(), same_seed)["probe_curve"])
    )


def test_the_probe_reports_fid_of_its_samples_or_why_not():
    images = smooth_images()
    config = ProbeConfig(**{**PROBE.__dict__, "steps": 2, "fid_samples": 4, "sampling_steps": 2})
    scored = probe(PoolingAutoencoder(), images, config, fid_features=toy_features())
    assert scored["probe_fid"] >= 0 and "probe_fid_unavailable" not in scored


def test_diffusability_command_prints_a_row_per_model_and_writes_json_and_plots(tmp_path, capsys, monkeypatch):
    def no_inception():
        raise FeaturesUnavailable("the Inception weights are not cached")

    monkeypatch.setattr("vae_hf.analysis.diffusion_probe.inception_features", no_inception)
    tiny_vae().save_pretrained(tmp_path / "vae")
    write_images(tmp_path / "images", 10, size=(32, 32))
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    args = ["diffusability", "--model", str(tmp_path / "vae"), "--model", str(tmp_path / "vae")]
    args += ["--data", str(tmp_path / "images"), "--resolution", "32", "--probe-steps", "2", "--probe-width", "8"]
    args += ["--num-workers", "0", "--perceptual-random", "--out", str(out), "--plots", str(plots)]
    assert main(args) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith(f"| {tmp_path / 'vae'} |")]
    assert len(rows) == 2 and "probe FID n/a: the Inception weights are not cached" in table
    report = json.loads(out.read_text())
    result = report["results"][0]
    assert report["images"] == 10 and result["probe"]["probe"]["heldout_images"] == 2
    assert result["probe"]["probe_fid"] is None and result["probe"]["probe_fid_unavailable"]
    assert "equivariance_lpips_random_trunk_x0.5" in result["scalars"]  # never stored as real LPIPS
    assert len(result["channels"]["pca_variance_share"]) == 4
    for name in ("spectra", "latent_pca", "probe_loss"):
        with Image.open(plots / f"{name}.png") as image:
            assert image.size[0] > 100


def test_diffusability_refuses_what_it_cannot_measure_in_one_line(tmp_path):
    with pytest.raises(diffusability_report.EvaluationError, match="--max-images: must be >= 2"):
        diffusability_report.DiffusabilityRequest(models=["m"], data="d", max_images=1)
    tiny_vae().save_pretrained(tmp_path / "vae")  # f = 2: 34 px give a 17 x 17 grid, which the probe cannot halve
    odd = diffusability_report.DiffusabilityRequest(
        models=[str(tmp_path / "vae")], data=str(tmp_path), resolution=34, perceptual_pretrained=False
    )
    with pytest.raises(diffusability_report.EvaluationError, match="odd latent grid"):
        diffusability_report.compare_models(odd)


def test_training_logs_the_measures_and_with_probe_steps_the_probe(image_folder, tmp_path):
    overrides = {
        "data.validation_fraction": 0.25,
        "train.max_steps": 1,
        "train.eval_metrics": "[psnr]",
        "loss.disc_weight": 0,
        "loss.perceptual_weight": 0,
        "train.diffusability_probe_steps": 2,
        "train.diffusability_probe_width": 8,
    }
    trainer = Trainer(load_config(None, tiny_overrides(image_folder, tmp_path / "run", **overrides)))
    logged = []
    trainer.accelerator.log = lambda values, step=None: logged.append(values)
    trainer.train()
    final = next(values for values in reversed(logged) if "eval/psnr" in values)
    for name in ("latent_hf_energy", "equivariance_psnr_x0.5", "equivariance_psnr_rot90", "noise_psnr_0.5"):
        assert isinstance(final[f"eval/{name}"], float)
    assert final["eval/probe_loss"] > 0
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["final"]["diffusability"]["eval"]["probe_loss"] == final["eval/probe_loss"]
    card = write_model_card(tmp_path / "run" / "vae", tmp_path / "staging", "alice/tiny-vae").read_text()
    assert "![latent spectra](diffusability/spectra.png)" in card
    assert (tmp_path / "staging" / "diffusability" / "spectra.png").is_file()
    assert "probe loss" in card.split("## Diffusability")[1]


def test_the_probe_during_training_needs_held_out_images_and_the_measures(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="train.diffusability_probe_steps: needs held-out images"):
        load_config(None, tiny_overrides(image_folder, tmp_path, **{"train.diffusability_probe_steps": 10}))
    with pytest.raises(ConfigError, match="train.eval_diffusability=true"):
        overrides = {"train.diffusability_probe_steps": 10, "train.eval_diffusability": "false"}
        load_config(None, tiny_overrides(image_folder, tmp_path, **{"data.validation_fraction": 0.25, **overrides}))
