"""Latent statistics of a VAE over a dataset, and the scaling_factor / shift_factor they give.

A diffusion model's noise schedule assumes data of unit variance. Stable Diffusion therefore scales
its latents by `scaling_factor` = 1 / std of the latents (LDM, Rombach et al. 2022, sec. 4.3.2 and
appendix G: "rescale the latent space ... by the component-wise standard deviation"), and SD3 / Flux
also subtract a `shift_factor`. This module measures both for a VAE we trained.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from datasets import Dataset
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader

from vae_hf.data.datasets import ImageDataset
from vae_hf.data.loader import collate
from vae_hf.data.transforms import ImageTransform
from vae_hf.errors import UserError
from vae_hf.io.export import FACTORS_SOURCE_KEY
from vae_hf.io.files import plain_permissions


class LatentStatsError(UserError, RuntimeError):
    """The statistics cannot be computed or written; the message says why in one line."""


@dataclass
class ChannelMoments:
    """Count, mean and summed squared deviations per latent channel, in float64, merged batch by batch.

    Chan et al.'s pairwise update keeps the variance exact over millions of values, where summing
    x and x^2 would cancel catastrophically once the mean is large against the spread.
    """

    count: int = 0
    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    m2: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def add(self, latents: torch.Tensor) -> None:
        values = latents.detach().to("cpu", torch.float64).transpose(0, 1).flatten(1)  # (C, B*h*w)
        batch_count = values.shape[1]
        batch_mean = values.mean(dim=1)
        batch_m2 = ((values - batch_mean[:, None]) ** 2).sum(dim=1)
        if self.count == 0:
            self.count, self.mean, self.m2 = batch_count, batch_mean, batch_m2
            return
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (batch_count / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * batch_count / total)
        self.count = total

    def summary(self) -> dict:
        """Per-channel and overall mean and (unbiased) std; every channel holds the same count."""
        channels = self.mean.numel()
        overall_mean = self.mean.mean()
        overall_m2 = self.m2.sum() + self.count * ((self.mean - overall_mean) ** 2).sum()
        values = self.count * channels
        std = float((overall_m2 / max(values - 1, 1)).sqrt())
        return {
            "latent_values": values,
            "mean": float(overall_mean),
            "std": std,
            "channel_mean": self.mean.tolist(),
            "channel_std": (self.m2 / max(self.count - 1, 1)).sqrt().tolist(),
        }


@torch.no_grad()
def latent_statistics(
    vae: AutoencoderKL, image_batches: Iterable[torch.Tensor], sample_posterior: bool = True, seed: int = 0
) -> dict:
    """Mean and std of the latents of `image_batches` ((B, 3, H, W) in [-1, 1]), with the factors they give.

    The latents are posterior *samples* by default, as Stable Diffusion measured its 0.18215: the
    diffusion model is trained on samples (LDM's `get_first_stage_encoding`), whose variance is that of
    the means plus the posterior's own variance. The std is taken about the mean, as SD did, so
    `scaling_factor` = 1 / std is the same with or without a shift. Nothing is printed.
    """
    was_training = vae.training
    vae.eval()
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on any device
    moments, images = ChannelMoments(), 0
    try:
        for pixels in image_batches:
            if len(pixels) == 0:
                continue
            posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
            moments.add(posterior.mean + posterior.std * noise if sample_posterior else posterior.mean)
            images += len(pixels)
    finally:
        vae.train(was_training)
    if images == 0:
        raise LatentStatsError("no images to measure latents on")
    stats = moments.summary()
    stats.update(images=images, sampled=sample_posterior, scaling_factor=1.0 / stats["std"], shift_factor=stats["mean"])
    return stats


@dataclass
class ImageBatches:
    """Batches of centre-cropped images of a `datasets` split; unreadable ones are skipped and counted."""

    dataset: Dataset
    image_column: str
    resolution: int
    batch_size: int
    num_workers: int = 0
    max_pixels: int | None = None
    skipped: int = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        transform = ImageTransform(self.resolution, center_crop=True)
        images = ImageDataset(self.dataset, self.image_column, transform, seed=0, max_pixels=self.max_pixels)
        loader = DataLoader(images, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate)
        for batch in loader:
            self.skipped += batch["num_skipped"]
            yield batch["pixel_values"]


def config_to_write(model: str) -> Path:
    """The config.json that `--write` will change; checked before any compute is spent."""
    path = Path(model).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        raise LatentStatsError(
            f"--write: {model} is a single file; write it as a diffusers folder first "
            f"(vae-hf export --model {model} --diffusers DIR, offline) and pass --model DIR"
        )
    if path.is_dir():
        for config in (path / "config.json", path / "vae" / "config.json"):
            if config.is_file():
                if not os.access(config.parent, os.W_OK):
                    raise LatentStatsError(f"--write: cannot write to {config.parent}")
                return config
        raise LatentStatsError(f"--write: {path} holds no config.json (not a diffusers folder)")
    if path.exists() or model.startswith((".", "/", "~")):
        raise LatentStatsError(f"--write: {model} is not a diffusers folder")
    raise LatentStatsError(
        f"--write: {model} is a Hub id; download it first (huggingface-cli download {model} --local-dir DIR) "
        "and pass --model DIR"
    )


def write_factors(
    config_path: Path,
    scaling_factor: float,
    shift_factor: float | None = None,
    measured_on: str = "data",
    channel_stats: tuple[list[float], list[float]] | None = None,
) -> None:
    """Set scaling_factor (and shift_factor, when given) in config.json, keeping every other key, and say where
    they came from (`measured_on`, e.g. "64 images of DIR at 256 px") under FACTORS_SOURCE_KEY. `channel_stats`
    (per-channel means and stds) are written as `latents_mean` / `latents_std`, diffusers' keys for the per-channel
    normalisation SD3- and Wan-style pipelines apply.

    Written to a temporary file beside it and renamed over it: a crash never leaves half a config.
    """
    config = json.loads(Path(config_path).read_text())
    source = f"vae-hf latent-stats --write, measured on {measured_on}"
    config["scaling_factor"] = scaling_factor
    sources = {**config.get(FACTORS_SOURCE_KEY, {}), "scaling_factor": source}
    if shift_factor is not None:
        config["shift_factor"] = shift_factor
        sources["shift_factor"] = source
    if channel_stats is not None:
        config["latents_mean"], config["latents_std"] = (list(values) for values in channel_stats)
        sources["latents_mean"] = sources["latents_std"] = source
    config[FACTORS_SOURCE_KEY] = sources
    handle, temporary = tempfile.mkstemp(dir=Path(config_path).parent, prefix=".config.json.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(plain_permissions(Path(temporary), config_path), config_path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise LatentStatsError(f"--write: cannot write {config_path}: {error.strerror or error}") from None


def report(stats: dict, vae: AutoencoderKL, skipped: int, resolution: int) -> str:
    kind = "posterior samples" if stats["sampled"] else "posterior means"
    lines = [f"latents of {stats['images']} images at {resolution} px ({stats['latent_values']} values, {kind})"]
    if skipped:
        lines.append(f"  {skipped} unreadable images skipped")
    for channel, (mean, std) in enumerate(zip(stats["channel_mean"], stats["channel_std"], strict=True)):
        lines.append(f"  channel {channel}: mean {mean:+.6f}  std {std:.6f}")
    lines.append(f"  all:       mean {stats['mean']:+.6f}  std {stats['std']:.6f}")
    lines.append(
        f"scaling_factor = 1 / std = {stats['scaling_factor']:.6f} (model config: {vae.config.scaling_factor})"
    )
    lines.append(f"shift_factor   = mean    = {stats['shift_factor']:.6f} (model config: {vae.config.shift_factor})")
    return "\n".join(lines)
