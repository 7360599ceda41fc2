"""Reconstruction metrics and `vae-hf evaluate`: known values, batch-size and process-count invariance,
rFID that says why it is missing instead of inventing a number, and one-line errors on bad input."""

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import AutoencoderKL

from vae_hf.analysis import evaluation
from vae_hf.analysis.evaluation import (
    INCEPTION_WEIGHTS_URL,
    METRIC_NAMES,
    PSNR_CAP_DB,
    FeaturesUnavailable,
    ReconstructionMetrics,
    evaluate_vae,
    inception_features,
)
from vae_hf.cli import main

from conftest import tiny_vae, write_images

OFFLINE = "cannot reach github.com: offline for this test"


def toy_features() -> torch.nn.Module:
    """A small deterministic stand-in for Inception: pooled colours through a fixed projection."""
    generator = torch.Generator().manual_seed(0)
    projection = torch.nn.Linear(3 * 4 * 4, 8)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(projection.weight.shape, generator=generator))
        projection.bias.zero_()
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), projection)


@pytest.fixture(scope="module")
def every_metric() -> ReconstructionMetrics:
    """Every metric, built once (a random VGG16 takes seconds): seeded LPIPS trunk, toy rFID features.

    Reusing it is part of the contract: evaluate_vae resets it first, as the trainer will rely on.
    """
    torch.manual_seed(0)
    return ReconstructionMetrics(METRIC_NAMES, perceptual_pretrained=False, fid_features=toy_features())


def unit_images(count: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) in [0, 1]."""
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def model_images(count: int = 8, seed: int = 0) -> torch.Tensor:
    """What a loader gives evaluate_vae: (count, 3, 32, 32) in [-1, 1]."""
    return unit_images(count, seed=seed) * 2 - 1


def scores(names: list[str], images: torch.Tensor, reconstructions: torch.Tensor, **options) -> dict:
    metrics = ReconstructionMetrics(names, perceptual_pretrained=False, **options)
    metrics.update(images, reconstructions)
    return metrics.compute()


def assert_results_close(actual: dict, expected: dict, tolerance: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=tolerance, abs=tolerance), name


def test_psnr_of_identical_images_is_capped_at_the_documented_value():
    images = unit_images()
    assert PSNR_CAP_DB == 100.0
    assert scores(["psnr"], images, images)["psnr"] == PSNR_CAP_DB


def test_psnr_of_known_noise_is_10_log10_of_one_over_the_mse():
    images = unit_images() * 0.8 + 0.1  # room for the noise inside [0, 1]
    signs = torch.randint(0, 2, images.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noisy = images + 0.05 * signs  # every pixel off by exactly 0.05: MSE = 0.0025 in every image
    assert scores(["psnr"], images, noisy)["psnr"] == pytest.approx(10 * math.log10(1 / 0.0025), abs=1e-4)


def test_ssim_is_one_on_identical_images_and_less_on_different_ones():
    images = unit_images()
    assert scores(["ssim"], images, images)["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert scores(["ssim"], images, unit_images(seed=1))["ssim"] < 0.5


def test_lpips_is_zero_on_identical_images_and_positive_on_different_ones(every_metric):
    images = unit_images()
    every_metric.reset()
    every_metric.update(images, images)
    assert every_metric.compute()["lpips_random_trunk"] == 0.0
    every_metric.reset()
    every_metric.update(images, unit_images(seed=1))
    assert every_metric.compute()["lpips_random_trunk"] > 0.01


def test_lpips_is_stored_under_its_own_name_only_with_the_pretrained_trunk():
    assert ReconstructionMetrics(["psnr"], perceptual_pretrained=True).score_name("lpips") == "lpips"
    assert ReconstructionMetrics(["psnr"], perceptual_pretrained=False).score_name("lpips") == "lpips_random_trunk"
    assert ReconstructionMetrics(["psnr"], perceptual_pretrained=False).score_name("psnr") == "psnr"


def test_rfid_with_injected_features_is_zero_for_one_set_and_positive_for_two():
    images = unit_images(16)
    same = scores(["rfid"], images, images, fid_features=toy_features())
    assert same["rfid"] == pytest.approx(0.0, abs=1e-6) and "rfid_unavailable" not in same
    darker = scores(["rfid"], images, images * 0.5, fid_features=toy_features())
    assert darker["rfid"] > 0.01


def test_rfid_of_a_single_image_is_unavailable_with_the_reason():
    images = unit_images(1)
    result = scores(["psnr", "rfid"], images, images, fid_features=toy_features())
    assert result["rfid"] is None and "at least 2 images, got 1" in result["rfid_unavailable"]
    assert result["psnr"] == PSNR_CAP_DB


def test_accumulating_over_batches_equals_one_batch(every_metric):
    vae, images = tiny_vae(), model_images(8)
    one_batch = evaluate_vae(vae, [images], every_metric)
    uneven_batches = evaluate_vae(vae, images.split(3), every_metric)  # 3 + 3 + 2; evaluate_vae resets first
    assert one_batch["num_images"] == 8 and one_batch["rfid"] > 0
    assert_results_close(uneven_batches, one_batch)


def test_reconstructions_are_the_deterministic_posterior_mean_and_training_mode_is_restored(every_metric):
    vae, images = tiny_vae(), model_images(4)
    vae.train()
    first, second = evaluate_vae(vae, [images], every_metric), evaluate_vae(vae, [images], every_metric)
    assert first == second  # sampling the posterior would differ from call to call
    assert vae.training
    with torch.no_grad():
        mean = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    expected = scores(["psnr"], (images + 1) / 2, (mean + 1) / 2)["psnr"]
    assert first["psnr"] == pytest.approx(expected, rel=1e-6)


def test_max_images_stops_mid_batch_and_skipped_images_are_counted():
    batches = [{"pixel_values": chunk, "num_skipped": 1} for chunk in model_images(8).split(3)]
    result = evaluate_vae(tiny_vae(), batches, ReconstructionMetrics(["psnr"]), max_images=5)
    assert result["num_images"] == 5 and result["images_skipped"] == 2  # the third batch is never read


def test_real_rfid_offline_is_unavailable_with_the_reason_and_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    monkeypatch.setattr(evaluation, "unreachable_reason", lambda url, timeout_s=5.0: OFFLINE)
    started = time.monotonic()
    images = unit_images()
    result = scores(["psnr", "rfid"], images, images)
    assert result["rfid"] is None
    assert OFFLINE in result["rfid_unavailable"] and INCEPTION_WEIGHTS_URL in result["rfid_unavailable"]
    assert time.monotonic() - started < 30


class NotATensor:
    """Anything that only full unpickling could rebuild."""


def test_cached_inception_weights_load_as_tensors_only(tmp_path, monkeypatch):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as patch:  # a randomly initialised Inception, to have weights of the right shapes
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        state = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(evaluation, "unreachable_reason", lambda url, timeout_s=5.0: OFFLINE)  # no download
    weights = tmp_path / "checkpoints" / Path(INCEPTION_WEIGHTS_URL).name
    weights.parent.mkdir()
    torch.save(state, weights)
    assert inception_features()(unit_images(2)).shape == (2, 2048)
    torch.save({"Conv2d_1a_3x3.conv.weight": NotATensor()}, weights)
    with pytest.raises(FeaturesUnavailable, match="cannot load the Inception weights"):
        inception_features()


def _evaluate_shard(
    rank: int, world_size: int, folder: str, vae: AutoencoderKL, images: torch.Tensor, metrics: ReconstructionMetrics
) -> None:
    """One process of the 2-process run: its half of the images, then torchmetrics' gathered result."""
    torch.set_num_threads(1)  # two processes share the CPU
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
    try:
        shard = images.chunk(world_size)[rank]
        result = evaluate_vae(vae, shard.split(2), metrics)
        Path(f"{folder}/result-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_one_process_result(every_metric, tmp_path):
    vae, images = tiny_vae(), model_images(8)
    # fork: each process starts with the same VAE and metric networks, without re-importing everything
    arguments = (2, str(tmp_path), vae, images, every_metric)
    mp.start_processes(_evaluate_shard, args=arguments, nprocs=2, join=True, start_method="fork")
    one_process = evaluate_vae(vae, images.split(2), every_metric)
    for rank in range(2):
        assert_results_close(json.loads((tmp_path / f"result-{rank}.json").read_text()), one_process)
    # and the comparison can tell: one process on half the images scores differently
    half = evaluate_vae(vae, images.chunk(2)[0].split(2), every_metric)
    assert half["num_images"] == 4 and abs(half["psnr"] - one_process["psnr"]) > 1e-3


@pytest.fixture
def two_models(tmp_path) -> list[str]:
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"vae-{seed}"
        tiny_vae(seed).save_pretrained(folder)
        folders.append(str(folder))
    return folders


def test_evaluate_command_writes_json_and_prints_one_table_row_per_model(two_models, image_folder, tmp_path, capsys):
    out = tmp_path / "report" / "scores.json"
    models = [arg for folder in two_models for arg in ("--model", folder)]
    options = ["--resolution", "32", "--metrics", "psnr,ssim,lpips", "--perceptual-random", "--batch-size", "3"]
    status = main(["evaluate", *models, "--data", str(image_folder), *options, "--num-workers", "0", "--out", str(out)])
    assert status == 0
    result = SimpleNamespace(stdout=capsys.readouterr().out)
    report = json.loads(out.read_text())
    assert [row["model"] for row in report["results"]] == two_models
    for row in report["results"]:
        assert row["num_images"] == 8 and row["images_skipped"] == 0 and row["resolution"] == 32
        assert 0 < row["psnr"] < PSNR_CAP_DB and -1 <= row["ssim"] <= 1 and row["lpips_random_trunk"] > 0
        assert "lpips" not in row  # a random trunk's score is never stored as LPIPS
    assert report["metrics"] == ["psnr", "ssim", "lpips_random_trunk"]
    assert report["results"][0]["psnr"] != report["results"][1]["psnr"]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | PSNR (dB)") and len(rows) == 4  # header, separator, two models
    assert "| LPIPS, random VGG trunk ↓ |" in rows[0]
    assert rows[2].startswith(f"| {two_models[0]} | {report['results'][0]['psnr']:.2f} |")


def test_evaluate_command_offline_reports_rfid_as_not_available_and_counts_skipped_files(
    two_models, image_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.setattr(evaluation, "unreachable_reason", lambda url, timeout_s=5.0: OFFLINE)
    (image_folder / "broken.png").write_text("<html>not an image</html>")
    out = tmp_path / "scores.json"
    args = ["evaluate", "--model", two_models[0], "--data", str(image_folder), "--resolution", "32"]
    status = main([*args, "--metrics", "psnr,rfid", "--num-workers", "0", "--out", str(out)])
    assert status == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["rfid"] is None and OFFLINE in row["rfid_unavailable"] and row["psnr"] > 0
    assert row["num_images"] == 8 and row["images_skipped"] == 1
    table = capsys.readouterr().out
    assert "| n/a |" in table and f"rFID n/a: {row['rfid_unavailable']}" in table


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"--model": "/no/such/vae"}, "/no/such/vae"),
        ({"--metrics": "psnr,fid"}, "unknown metric(s) fid; choose from psnr,ssim,lpips,rfid"),
        ({"--resolution": "31"}, "--resolution 31 is not a multiple of 2"),
        ({"--data": "/no/such/images"}, "data.dataset"),
    ],
)
def test_bad_input_exits_2_with_one_line(two_models, image_folder, capsys, change, expected):
    options = {"--model": two_models[0], "--data": str(image_folder), "--resolution": "32", "--metrics": "psnr"}
    options.update(change)
    status = main(["evaluate", *[item for pair in options.items() for item in pair], "--num-workers", "0"])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vae-hf: error: ") and expected in lines[0], lines


def test_pretrained_lpips_offline_stops_at_once_naming_the_switch(
    two_models, image_folder, tmp_path, monkeypatch, capsys
):
    import vae_hf.models.perceptual as perceptual

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.setattr(perceptual, "unreachable_reason", lambda url, timeout_s=5.0: "cannot reach it: offline")
    status = main(["evaluate", "--model", two_models[0], "--data", str(image_folder), "--metrics", "lpips"])
    assert status == 2
    message = capsys.readouterr().err.strip()
    assert "VGG16" in message and "--perceptual-random" in message and len(message.splitlines()) == 1


def test_evaluate_says_how_many_images_it_enlarged_to_the_crop(two_models, image_folder, tmp_path, capsys):
    """The default 256 px crop silently upscaled 96 px images; the scores then measure the enlargement too."""
    write_images(image_folder / "large", 2, size=(64, 80))  # 8 images of 40 x 48 px and 2 of 64 x 80 px
    out = tmp_path / "scores.json"
    args = ["evaluate", "--model", two_models[0], "--data", str(image_folder), "--metrics", "psnr", "--num-workers"]
    assert main([*args, "0", "--resolution", "64", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images_upscaled"] == 8
    assert "upscaled: 8 image(s) have a short side under 64 px and were enlarged to it" in capsys.readouterr().out
    assert main([*args, "0", "--resolution", "32", "--max-images", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images_upscaled"] == 0 and "upscaled" not in capsys.readouterr().out


def test_evaluate_with_buckets_scores_each_image_at_its_own_aspect_ratio(two_models, tmp_path, capsys):
    """`--buckets`: the same images as the square crops (the first --max-images rows), each cropped to its
    aspect-ratio bucket, batched by bucket; the report says so."""
    data = tmp_path / "shapes"
    for number, size in enumerate([(40, 48), (48, 80), (80, 40)]):
        write_images(data / f"shape_{number}", 3, size=size, seed=number)
    request = evaluation.EvaluationRequest(
        models=two_models[:1], data=str(data), resolution=32, max_images=7, metrics="psnr", num_workers=0,
        buckets=True,
    )  # fmt: skip
    shapes = {tuple(batch["pixel_values"].shape[-2:]) for batch in evaluation.image_loader(request, factor=2)}
    assert (32, 32) not in shapes and len(shapes) == 3  # three shapes, none square: three buckets
    assert all(height * width <= 32 * 32 for height, width in shapes)
    options = ["--resolution", "32", "--max-images", "7", "--metrics", "psnr", "--num-workers", "0", "--buckets"]
    assert (
        main(["evaluate", "--model", two_models[0], "--data", str(data), *options, "--out", str(tmp_path / "s.json")])
        == 0
    )
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["crops"] == "aspect-ratio buckets" and report["results"][0]["num_images"] == 7
    assert "crops: each image in its aspect-ratio bucket" in capsys.readouterr().out
