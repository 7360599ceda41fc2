"""The scaling_factor (and shift_factor) an exported VAE carries: measured for an encoder that trained, the
starting model's for a decoder-only fine-tune, and a factor written by `vae-hf latent-stats` kept."""

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL

from vae_hf.analysis.latent_stats import ImageBatches, latent_statistics
from vae_hf.cli import main
from vae_hf.config import load_config
from vae_hf.data.sources import load_image_dataset
from vae_hf.train.latent_factors import LatentFactors

from conftest import tiny_overrides, tiny_vae

DEFAULT = 0.18215  # diffusers' AutoencoderKL default: right for SD's VAE only


def exported_config(run: Path, folder: str = "vae") -> dict:
    return json.loads((run / folder / "config.json").read_text())


def train(image_folder: Path, run: Path, **overrides) -> SimpleNamespace:
    """`vae-hf train` in this process (a fresh one costs seconds of imports), its printed lines kept."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["train", *tiny_overrides(image_folder, run, **{"loss.disc_weight": 0, **overrides})])
    assert status == 0, printed.getvalue()[-3000:]
    return SimpleNamespace(stdout=printed.getvalue())


def test_a_vae_trained_from_scratch_is_exported_with_its_measured_scaling_factor(image_folder, tmp_path):
    result = train(image_folder, tmp_path / "run", **{"train.max_steps": 2})
    config = exported_config(tmp_path / "run")
    vae = AutoencoderKL.from_pretrained(tmp_path / "run" / "vae")
    first = load_image_dataset(load_config(None, tiny_overrides(image_folder, tmp_path / "run")).data)
    stats = latent_statistics(vae, ImageBatches(first, "image", 32, batch_size=2))  # as the trainer measures
    assert config["scaling_factor"] == pytest.approx(1 / stats["std"], rel=1e-6)
    assert config["scaling_factor"] != pytest.approx(DEFAULT, rel=0.05)
    assert config["shift_factor"] is None  # not asked for
    source = config["_latent_factors_source"]["scaling_factor"]
    assert source.startswith("measured at step 2 on the first 8 images of the training split at 32 px")
    assert f"vae/ carries scaling_factor {config['scaling_factor']:.5g} (measured at step 2" in result.stdout


def test_the_export_carries_the_factors_metrics_json_reports(image_folder, tmp_path):
    """With held-out images, the export is measured on them, as the end-of-run latent statistics are."""
    train(
        image_folder,
        tmp_path / "run",
        **{
            "train.max_steps": 2,
            "data.validation_fraction": 0.25,
            "train.eval_metrics": "[psnr]",
            "model.measure_shift_factor": "true",
        },
    )
    config = exported_config(tmp_path / "run")
    stats = json.loads((tmp_path / "run" / "metrics.json").read_text())["latent_stats"]
    assert config["scaling_factor"] == pytest.approx(stats["scaling_factor"], rel=1e-9)
    assert config["shift_factor"] == pytest.approx(stats["shift_factor"], rel=1e-9)
    assert "2 held-out images" in config["_latent_factors_source"]["shift_factor"]


def test_a_decoder_only_run_keeps_the_starting_factor_and_then_the_one_latent_stats_wrote(image_folder, tmp_path):
    starting = tmp_path / "start"
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.77)
    vae.save_pretrained(starting)
    run = tmp_path / "run"
    decoder_only = {
        "model.pretrained": str(starting),
        "model.block_out_channels": "[128,256,512,512]",  # the defaults: the architecture is the pretrained one's
        "model.layers_per_block": 2,
        "model.train_decoder_only": "true",
    }
    train(image_folder, run, **decoder_only, **{"train.max_steps": 2})
    assert exported_config(run)["scaling_factor"] == 0.77
    assert str(starting) in exported_config(run)["_latent_factors_source"]["scaling_factor"]

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["latent-stats", "--model", str(run / "vae"), "--data", str(image_folder), "--write"]) == 0
    measured = exported_config(run)["scaling_factor"]
    assert measured != 0.77

    resumed = train(image_folder, run, **decoder_only, **{"train.max_steps": 4, "train.resume_from": "latest"})
    config = exported_config(run)
    assert config["scaling_factor"] == measured  # the later exports keep it
    assert config["_latent_factors_source"]["scaling_factor"].startswith("vae-hf latent-stats --write")
    assert f"vae/ carries scaling_factor {measured:.5g} (vae-hf latent-stats --write" in resumed.stdout


def test_model_scaling_factor_wins_and_a_decoder_only_run_measures_nothing(image_folder, tmp_path):
    def factors(**overrides):
        config = load_config(None, tiny_overrides(image_folder, tmp_path / "run", **overrides))
        vae = tiny_vae()
        chooser = LatentFactors(config, vae, resumed=False)
        return chooser.for_export(vae, tmp_path / "run" / "vae", step=1)

    explicit = factors(**{"model.scaling_factor": 0.5})
    assert (explicit.scaling_factor, explicit.sources["scaling_factor"]) == (0.5, "model.scaling_factor")
    kept = factors(**{"model.train_decoder_only": "true"})
    assert kept.scaling_factor == DEFAULT and kept.sources["scaling_factor"].startswith("diffusers' default")
    both = factors(**{"model.scaling_factor": 0.5, "model.measure_shift_factor": "true"})
    assert both.scaling_factor == 0.5 and both.sources["shift_factor"].startswith("measured at step 1")


def test_measuring_does_not_move_the_global_random_generator(image_folder, tmp_path):
    config = load_config(None, tiny_overrides(image_folder, tmp_path / "run"))
    vae = tiny_vae()
    torch.manual_seed(3)
    LatentFactors(config, vae, resumed=False).for_export(vae, tmp_path / "run" / "vae", step=1)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(1), after)
