"""Held-out evaluation while training: baseline, progress, final scores and latent statistics."""

import json

import pytest

from vae_hf.config import load_config
from vae_hf.data import DataError
from vae_hf.data.datasets import heldout_dataset
from vae_hf.io.model_card import read_run, render_card
from vae_hf.train.trainer import Trainer

from conftest import tiny_overrides


def build(image_folder, tmp_path, **overrides) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(image_folder, tmp_path / "run", **overrides)))


def test_a_held_out_fraction_never_reaches_training(image_folder, tmp_path):
    trainer = build(image_folder, tmp_path, **{"data.validation_fraction": 0.25})
    train_paths = {row["image"]["path"] for row in trainer.dataloader.dataset.dataset}
    heldout = heldout_dataset(trainer.config.data, trainer.config.seed)
    heldout_paths = {row["image"]["path"] for row in heldout.dataset}
    assert len(train_paths) == 6 and len(heldout_paths) == 2
    assert not train_paths & heldout_paths


def test_no_held_out_set_means_no_evaluation(image_folder, tmp_path):
    trainer = build(image_folder, tmp_path, **{"train.max_steps": 1, "loss.disc_weight": 0})
    assert not trainer.validator.enabled
    trainer.train()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_training_records_baseline_progress_final_scores_and_latent_stats(image_folder, tmp_path):
    overrides = {
        "data.validation_fraction": 0.25,
        "train.eval_every_steps": 2,
        "train.max_steps": 4,
        "train.ema_decay": 0.9,
        "loss.disc_weight": 0,
        "train.eval_metrics": "[psnr,ssim,lpips,rfid]",
    }
    trainer = build(image_folder, tmp_path, **overrides)
    trainer.train()
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["baseline"]["step"] == 0 and record["latest"]["step"] == 4 and record["final"]["step"] == 4
    for label in ("baseline", "final"):
        for model in ("eval", "eval_ema"):
            scores = record[label][model]
            assert scores["num_images"] == 2
            assert 0 < scores["psnr"] < 100 and 0 < scores["ssim"] <= 1 and scores["lpips_random_trunk"] >= 0
            assert "lpips" not in scores  # loss.perceptual_pretrained=false: never stored as plain LPIPS
            # offline, the Inception weights are unavailable: said, not faked
            assert scores["rfid"] is None and scores["rfid_unavailable"]
    assert record["final"]["eval"]["psnr"] > record["baseline"]["eval"]["psnr"]  # it learned something
    stats = record["latent_stats"]
    assert stats["scaling_factor"] == pytest.approx(1 / stats["std"])
    # the cheap diffusability measures ride along (vae-hf diffusability's measures 1-4), the probe does not
    measured = record["final"]["diffusability"]["eval"]
    assert 0 <= measured["latent_hf_energy"] <= 1 and 0 < measured["equivariance_psnr_x0.5"] < 100
    assert "probe_loss" not in measured and "equivariance_lpips_x0.5" not in measured  # no probe, no real LPIPS
    card = render_card(read_run(tmp_path / "run" / "vae"), "alice/tiny-vae", None)
    assert "| final.eval.lpips_random_trunk |" in card and "| final.eval.lpips |" not in card
    assert "## Diffusability" in card and "| eval, step 4 (final) |" in card and "| eval, step 0 (baseline) |" in card


def test_resumed_runs_keep_their_baseline(image_folder, tmp_path):
    overrides = {"data.validation_fraction": 0.25, "train.eval_metrics": "[psnr]", "loss.disc_weight": 0}
    build(image_folder, tmp_path, **overrides, **{"train.max_steps": 1}).train()
    baseline = json.loads((tmp_path / "run" / "metrics.json").read_text())["baseline"]
    resumed = build(image_folder, tmp_path, **overrides, **{"train.max_steps": 2, "train.resume_from": "latest"})
    resumed.train()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["baseline"] == baseline
    table = (tmp_path / "run" / "diffusability" / "table.md").read_text()  # the model card's diffusability rows
    assert "| eval, step 0 (baseline) |" in table and "| eval, step 2 (final) |" in table and "step 1" not in table
    # a new run (starting over in the same folder) measures its own baseline
    fresh = build(image_folder, tmp_path, **overrides, **{"train.max_steps": 1, "train.overwrite_output_dir": "true"})
    assert not fresh.validator.has_baseline and not (tmp_path / "run" / "diffusability").exists()


def test_too_small_a_dataset_to_hold_out_is_refused(tmp_path):
    from conftest import write_images

    write_images(tmp_path / "one", 1)
    with pytest.raises(DataError, match="data.validation_fraction"):
        build(tmp_path / "one", tmp_path, **{"data.validation_fraction": 0.5, "train.batch_size": 1})
