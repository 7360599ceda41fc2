"""The scaling_factor (and shift_factor) that each exported VAE carries in its config.json.

A diffusion pipeline multiplies the latents by `scaling_factor` so that they have unit variance (LDM, Rombach
et al. 2022, sec. 4.3.2), so the factor belongs to the encoder: one that trained needs its own. For each export
(`vae/` and `vae_ema/` alike, each for its own weights), the first of these that applies wins:

1. `model.scaling_factor`, when set;
2. measured on the exported weights, when the encoder trains: 1 / std of the latents of the held-out images
   when the run has some (the images metrics.json's latent statistics use), else of the first
   `MEASURED_IMAGES` images of the training split, centre-cropped (as `vae-hf latent-stats` measures);
3. when the run was resumed, the factor in that export's config.json (an earlier export's, or one that
   `vae-hf latent-stats --write` wrote there since): a decoder-only run's encoder has not changed since;
4. the starting model's (`model.pretrained`'s; diffusers' default 0.18215 for a VAE trained from scratch).

`shift_factor` is measured (the latent mean) only with `model.measure_shift_factor`; otherwise 3, then 4. The
config.json of every export says where its factors came from (`FACTORS_SOURCE_KEY`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, IterableDataset
from diffusers import AutoencoderKL

from vae_hf.analysis.latent_stats import ImageBatches, LatentStatsError, latent_statistics
from vae_hf.config import Config
from vae_hf.data.sources import load_image_dataset
from vae_hf.io.export import FACTORS_SOURCE_KEY

logger = logging.getLogger(__name__)

MEASURED_IMAGES = 64  # without held-out images: enough latents for a std to 3 digits, seconds to encode


@dataclass
class ExportFactors:
    scaling_factor: float
    shift_factor: float | None
    sources: dict[str, str]
    """Where each factor came from, in words: {"scaling_factor": ..., "shift_factor": ...}."""

    def config_updates(self) -> dict:
        """What the export's config.json gets."""
        return {
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            FACTORS_SOURCE_KEY: self.sources,
        }

    def describe(self) -> str:
        text = f"scaling_factor {self.scaling_factor:.5g} ({self.sources['scaling_factor']})"
        if self.shift_factor is not None:
            text += f", shift_factor {self.shift_factor:.5g} ({self.sources['shift_factor']})"
        return text


class LatentFactors:
    """Chooses each export's factors (main process only: it reads images and measures on its own)."""

    def __init__(
        self,
        config: Config,
        starting_vae: AutoencoderKL,
        resumed: bool,
        heldout_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ):
        self.model = config.model
        self.data = config.data
        self.seed = config.seed
        self.batch_size = config.train.batch_size
        self.encoder_trains = not config.model.train_decoder_only
        self.resumed = resumed
        origin = (
            f"the starting model's, {config.model.pretrained}"
            if config.model.pretrained
            else "diffusers' default for a new AutoencoderKL"
        )
        self.starting = ExportFactors(
            float(starting_vae.config.scaling_factor),
            starting_vae.config.shift_factor,
            {"scaling_factor": origin, "shift_factor": origin},
        )
        self._heldout_batches = heldout_batches
        self._images = "{} held-out images" if heldout_batches else "the first {} images of the training split"
        self._first_images: Dataset | None = None  # without held-out images: loaded at the first measurement

    def for_export(self, vae: AutoencoderKL, folder: Path, step: int) -> ExportFactors:
        kept = (self._in_export(folder) if self.resumed else None) or self.starting
        explicit = self.model.scaling_factor
        measure = self.encoder_trains and (explicit is None or self.model.measure_shift_factor)
        stats = self._measure(vae) if measure else None
        if stats is None:
            measured_scale = measured_shift = None
        else:
            images = self._images.format(stats["images"])
            where = f"measured at step {step} on {images} at {self.data.resolution} px"
            measured_scale = (stats["scaling_factor"], f"{where}: latent std {stats['std']:.5g}")
            measured_shift = (stats["shift_factor"], f"{where}: latent mean {stats['mean']:.5g}")
        if explicit is not None:
            scale = (explicit, "model.scaling_factor")
        else:
            scale = measured_scale or (kept.scaling_factor, kept.sources["scaling_factor"])
        shift = (measured_shift if self.model.measure_shift_factor else None) or (
            kept.shift_factor,
            kept.sources["shift_factor"],
        )
        return ExportFactors(scale[0], shift[0], {"scaling_factor": scale[1], "shift_factor": shift[1]})

    def _measure(self, vae: AutoencoderKL) -> dict | None:
        """Latent statistics of posterior samples (as `vae-hf latent-stats`); None when no image is readable."""
        with torch.random.fork_rng(devices=[]):  # loaders draw seeds from the global generator: not training's
            try:
                return latent_statistics(vae, self._batches())
            except LatentStatsError:
                logger.warning("no readable image to measure the latents on; the export keeps its previous factors")
                return None

    def _batches(self) -> Iterable[torch.Tensor]:
        if self._heldout_batches is not None:
            return self._heldout_batches()
        if self._first_images is None:
            self._first_images = first_images(self.data, MEASURED_IMAGES, self.seed)
        data = self.data
        return ImageBatches(
            self._first_images, data.image_column, data.resolution, self.batch_size, 0, data.max_image_pixels
        )

    @staticmethod
    def _in_export(folder: Path) -> ExportFactors | None:
        """The factors in an existing export's config.json, with where they came from when it says so."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            return None
        config = json.loads(path.read_text())
        said = config.get(FACTORS_SOURCE_KEY, {})
        earlier = f"kept from {path}"
        return ExportFactors(
            float(config["scaling_factor"]),
            config.get("shift_factor"),
            {name: said.get(name, earlier) for name in ("scaling_factor", "shift_factor")},
        )


def first_images(data, count: int, seed: int) -> Dataset:
    """The first `count` rows of the training split (of a stream too; of a mixture, as interleaved with the run's
    `seed`), as a map-style dataset."""
    dataset = load_image_dataset(data, seed=seed)
    if isinstance(dataset, IterableDataset):
        return Dataset.from_list(list(dataset.take(count)), features=dataset.features)
    return dataset.select(range(min(count, len(dataset))))
