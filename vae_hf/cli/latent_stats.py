"""`vae-hf latent-stats`: latent mean and std over data, the scaling and shift factors, optionally stored."""

from __future__ import annotations

from vae_hf.analysis.inference import InferenceError, default_resolution, downsampling_factor, prepare
from vae_hf.analysis.latent_stats import (
    ImageBatches,
    LatentStatsError,
    config_to_write,
    latent_statistics,
    report,
    write_factors,
)
from vae_hf.config import DataConfig
from vae_hf.data import DataError
from vae_hf.data.sources import load_image_dataset
from vae_hf.models.vae import load_vae


def latent_stats_command(
    model: str,
    data: str,
    resolution: int | None = None,
    max_images: int | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    write: bool = False,
    shift: bool = False,
    channels: bool = False,
) -> int:
    """`vae-hf latent-stats`: measure, print, and with `--write` store the factors in config.json."""
    if (shift or channels) and not write:
        raise LatentStatsError(f"{'--shift' if shift else '--channels'} chooses what --write stores; add --write")
    if batch_size < 1 or num_workers < 0 or (max_images is not None and max_images < 1):
        raise LatentStatsError("--batch-size and --max-images must be >= 1, --num-workers >= 0")
    config_path = config_to_write(model) if write else None
    vae = prepare(load_vae(model, option="--model"))
    resolution = resolution or default_resolution(vae)
    if resolution <= 0 or resolution % downsampling_factor(vae):
        raise InferenceError(
            f"--resolution: must be a positive multiple of {downsampling_factor(vae)}, got {resolution}"
        )
    data_config = DataConfig(dataset=data, resolution=resolution)
    dataset = load_image_dataset(data_config)
    if max_images is not None:
        dataset = dataset.select(range(min(max_images, len(dataset))))
    batches = ImageBatches(
        dataset, data_config.image_column, resolution, batch_size, num_workers, data_config.max_image_pixels
    )
    try:
        stats = latent_statistics(vae, batches)
    except LatentStatsError:
        raise DataError(f"--data: no usable image in {data} ({batches.skipped} unreadable)") from None
    print(report(stats, vae, batches.skipped, resolution))
    if config_path is not None:
        measured_on = f"{stats['images']} images of {data} at {resolution} px"
        channel_stats = (stats["channel_mean"], stats["channel_std"]) if channels else None
        shift_factor = stats["shift_factor"] if shift else None
        write_factors(config_path, stats["scaling_factor"], shift_factor, measured_on, channel_stats)
        written = ", ".join(
            ["scaling_factor"] + ["shift_factor"] * shift + ["latents_mean and latents_std (per channel)"] * channels
        )
        print(f"wrote {written} to {config_path}")
    return 0
