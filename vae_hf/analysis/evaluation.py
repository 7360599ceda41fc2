"""How well a VAE reconstructs images: PSNR, SSIM, LPIPS and rFID, accumulated over batches.

The metrics are torchmetrics objects, so their states are sums that torchmetrics itself gathers across
processes at `compute()`: each process can evaluate its own shard of the data and every process gets
the global result. Nothing in the loop calls `.item()`, so the loop never waits on the device.

rFID is FID (Heusel et al. 2017) between the images and their reconstructions, on the 2048-d pool
features of the Inception-v3 that torchmetrics takes from torch-fidelity (the TF-FID port). Those
weights are downloaded once; when they are neither cached nor reachable, rFID is reported as
unavailable with the reason, never as a made-up number.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, Metric
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image import FrechetInceptionDistance, StructuralSimilarityIndexMeasure

from vae_hf.analysis.inference import AUTO_TILE_PIXELS, auto_tile_size, configure_tiling, downsampling_factor
from vae_hf.analysis.samples import reconstruct
from vae_hf.config import CHOICES, DataConfig
from vae_hf.data.buckets import assign_buckets, grouped_batches, image_sizes
from vae_hf.data.datasets import ImageDataset, require_a_usable_image
from vae_hf.data.decode import DECODE_ERRORS
from vae_hf.data.loader import bucket_list, collate
from vae_hf.data.sources import load_image_dataset
from vae_hf.data.transforms import ImageTransform
from vae_hf.errors import UserError
from vae_hf.models.perceptual import build_lpips, require_vgg_weights
from vae_hf.models.vae import load_vae
from vae_hf.offline import OfflineError, unreachable_reason

logger = logging.getLogger(__name__)

METRIC_NAMES = CHOICES["train.eval_metrics"]
# LPIPS through a randomly initialised VGG trunk (offline tests) is not the LPIPS of the literature: its score is
# stored and shown under this name, so that it is never read or compared as one.
RANDOM_TRUNK_LPIPS = "lpips_random_trunk"

# An exact reconstruction has infinite PSNR; one such image would make the mean infinite. Each image's
# PSNR is therefore capped at 100 dB (an MSE of 1e-10), far above any real VAE (SD's is about 25-35 dB),
# so the cap changes only exact copies and keeps the JSON free of non-standard `Infinity`.
PSNR_CAP_DB = 100.0

# The weights torch-fidelity (and so torchmetrics' FID) downloads; the same file name in the same
# torch hub cache, so a copy fetched by either tool serves both.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FEATURES = 2048


class EvaluationError(UserError, ValueError):
    """The evaluation cannot run as asked; the message says why in one line."""


class FeaturesUnavailable(RuntimeError):
    """The Inception features for rFID cannot be had; the message says why."""


def parse_metric_names(text: str) -> tuple[str, ...]:
    """`"psnr,ssim"` -> `("psnr", "ssim")`, refusing unknown or missing names."""
    names = tuple(dict.fromkeys(name.strip().lower() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names:
        given = ", ".join(unknown) or "none"
        raise EvaluationError(f"--metrics: unknown metric(s) {given}; choose from {','.join(METRIC_NAMES)}")
    return names


class ImageCounts(Metric):
    """Images scored and images skipped: integer sums, gathered across processes like the scores."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("scored", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, scored: int = 0, skipped: int = 0) -> None:
        self.scored += scored
        self.skipped += skipped

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scored, self.skipped


class ReconstructionMetrics(nn.Module):
    """The chosen metrics over (image, reconstruction) pairs in [0, 1], accumulated batch by batch.

    A module, so that `.to(device)` moves the LPIPS and Inception networks with the metric states.
    `fid_features` maps (N, 3, H, W) images in [0, 1] to (N, F) features; None takes the real Inception.
    """

    def __init__(self, names: Sequence[str], perceptual_pretrained: bool = True, fid_features: nn.Module | None = None):
        super().__init__()
        self.names = tuple(names)
        self.perceptual_pretrained = perceptual_pretrained
        self.counts = ImageCounts()
        self.scores = nn.ModuleDict()
        self.rfid_unavailable: str | None = None
        # nan_strategy="disable": a diverged VAE's NaN must show in the result, not be silently dropped.
        for name in ("psnr", "lpips"):
            if name in self.names:
                self.scores[name] = MeanMetric(nan_strategy="disable")
        if "ssim" in self.names:
            self.scores["ssim"] = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.lpips_model = build_lpips(perceptual_pretrained) if "lpips" in self.names else None
        if "rfid" in self.names:
            self._add_rfid(fid_features)

    def _add_rfid(self, fid_features: nn.Module | None) -> None:
        try:
            features = fid_features if fid_features is not None else inception_features()
        except FeaturesUnavailable as error:
            self.rfid_unavailable = str(error)
            return
        # normalize=True: the features module is called on the [0, 1] floats we pass, unconverted.
        self.scores["rfid"] = FrechetInceptionDistance(feature=features, normalize=True)

    def update(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Add a batch; both (N, 3, H, W) in [0, 1]."""
        self.counts.update(scored=len(images))
        if "psnr" in self.scores:
            per_image = peak_signal_noise_ratio(
                reconstructions, images, data_range=1.0, reduction="none", dim=(1, 2, 3)
            )
            self.scores["psnr"].update(per_image.clamp(max=PSNR_CAP_DB))
        if "ssim" in self.scores:
            self.scores["ssim"].update(reconstructions, images)
        if "lpips" in self.scores:
            distances = self.lpips_model(reconstructions * 2 - 1, images * 2 - 1)  # LPIPS takes [-1, 1]
            self.scores["lpips"].update(distances.flatten())
        if "rfid" in self.scores:
            self.scores["rfid"].update(images, real=True)
            self.scores["rfid"].update(reconstructions, real=False)

    def count_skipped(self, images: int) -> None:
        self.counts.update(skipped=images)

    def compute(self) -> dict[str, Any]:
        """Global results (every process must call this: torchmetrics gathers the states here)."""
        num_images, images_skipped = (int(count) for count in self.counts.compute())
        results: dict[str, Any] = {"num_images": num_images, "images_skipped": images_skipped}
        if num_images == 0:  # the same on every process, so raising here leaves no process waiting
            raise EvaluationError("no usable image to evaluate")
        for name in self.names:
            results.update(self._score(name, num_images))
        return results

    def score_name(self, name: str) -> str:
        """The key a metric's score is stored and shown under: `lpips_random_trunk` for LPIPS without the
        pretrained trunk, else the metric's name."""
        return RANDOM_TRUNK_LPIPS if name == "lpips" and not self.perceptual_pretrained else name

    def _score(self, name: str, num_images: int) -> dict[str, Any]:
        if name != "rfid":
            return {self.score_name(name): float(self.scores[name].compute())}
        reason = self.rfid_unavailable
        if reason is None and num_images < 2:  # a covariance needs two samples
            reason = f"rFID needs at least 2 images, got {num_images}"
        if reason is not None:
            return {"rfid": None, "rfid_unavailable": reason}
        return {"rfid": float(self.scores["rfid"].compute())}

    def reset(self) -> None:
        for metric in (self.counts, *self.scores.values()):
            metric.reset()


def evaluate_vae(
    vae: AutoencoderKL,
    batches: Iterable[torch.Tensor | dict[str, Any]],
    metrics: ReconstructionMetrics,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Reconstruct every batch from its posterior mean and score it; returns `metrics.compute()`.

    `batches` yields (N, 3, H, W) tensors in [-1, 1], or dicts from `vae_hf.data.collate`
    (`pixel_values`, `num_skipped`). Runs on the VAE's device and dtype; pass the unwrapped model.
    `max_images` counts this process's images. Under torch.distributed every process calls this on
    its own shard and gets the global result.
    """
    device = next(vae.parameters()).device
    metrics.reset()
    metrics.to(device)
    seen = 0
    for images, skipped in _unpack(batches):
        metrics.count_skipped(skipped)
        if max_images is not None:
            images = images[: max_images - seen]
        if len(images) > 0:
            images = images.to(device, torch.float32)  # scored at full precision whatever the VAE's dtype
            with torch.no_grad():
                reconstructions = reconstruct(vae, images.to(vae.dtype)).float().clamp(-1, 1)
                metrics.update(to_unit_range(images), to_unit_range(reconstructions))
        seen += len(images)
        if max_images is not None and seen >= max_images:
            break
    with torch.no_grad():
        return metrics.compute()


def _unpack(batches: Iterable[torch.Tensor | dict[str, Any]]) -> Iterator[tuple[torch.Tensor, int]]:
    for batch in batches:
        if isinstance(batch, dict):
            yield batch["pixel_values"], int(batch.get("num_skipped", 0))
        else:
            yield batch, 0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (images + 1) / 2


class _InceptionOnUnitRange(nn.Module):
    """torchmetrics' Inception takes uint8 images in [0, 255]; every other metric here takes [0, 1]."""

    num_features = INCEPTION_FEATURES  # read by FrechetInceptionDistance instead of a dummy forward

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # round, as saving the reconstruction to an 8-bit PNG would
        return self.inception((images * 255).round().to(torch.uint8))


def inception_features() -> nn.Module:
    """The real rFID feature extractor; raises FeaturesUnavailable (with the reason) when it cannot load."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise FeaturesUnavailable("rFID needs the torch-fidelity package (pip install torch-fidelity)")
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = inception_weights_file()
    try:
        with _weights_only_loads():
            inception = NoTrainInceptionV3("inception-v3-compat", [str(INCEPTION_FEATURES)], str(path))
    except Exception as error:  # any failure to read the weights leaves rFID unavailable, with its reason
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FeaturesUnavailable(f"cannot load the Inception weights {path}: {first_line}") from None
    return _InceptionOnUnitRange(inception)


def inception_weights_file() -> Path:
    """The cached Inception weights, downloaded first when missing and the host is reachable."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(INCEPTION_WEIGHTS_URL)
    if path.is_file():
        return path
    reason = unreachable_reason(INCEPTION_WEIGHTS_URL)  # checked first: a download from nowhere would stall
    if reason is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(path))  # writes a temp file, then renames
            return path
        except OSError as error:  # URLError and HTTPError are OSErrors too
            reason = f"download failed: {error}"
    raise FeaturesUnavailable(
        f"the Inception weights are not cached at {path} and cannot be downloaded ({reason}); "
        f"put {INCEPTION_WEIGHTS_URL} there to get FID"
    )


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make torch-fidelity's weight loading safe: it asks torch for full unpickling of the file.

    PyTorch's documented TORCH_FORCE_WEIGHTS_ONLY_LOAD switch makes every load in the block
    tensors-only; a file that needs more fails to load instead of running code.
    """
    saved = {
        name: os.environ.pop(name, None)
        for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ.update({name: value for name, value in saved.items() if value is not None})


@dataclass
class ImagesRequest:
    """What the commands that score several models on the same images were asked: the fields `vae-hf evaluate` and
    `vae-hf diffusability` share."""

    models: list[str]
    """Diffusers folders, Hub ids or single-file .safetensors, one result row each."""
    data: str
    """A local image folder or a Hub dataset id."""
    resolution: int = 256
    """Side of the centre crops, in pixels; a multiple of every VAE's downsampling factor."""
    split: str = "train"
    """Dataset split to read."""
    image_column: str = "image"
    """Column holding the images."""
    batch_size: int = 8
    """Images per forward pass."""
    num_workers: int = 2
    """DataLoader worker processes decoding images (0: in the main process)."""
    perceptual_pretrained: bool = True
    """Pretrained VGG trunk for LPIPS; false: random trunk, no download (offline tests only)."""
    out: str | None = None
    """JSON file to write the results to."""

    def __post_init__(self) -> None:
        require_at_least(
            ("--resolution", self.resolution, 1),
            ("--batch-size", self.batch_size, 1),
            ("--num-workers", self.num_workers, 0),
        )

    def shared_fields(self) -> dict[str, Any]:
        """This request's `ImagesRequest` fields, to make another request of the same images."""
        return {field.name: getattr(self, field.name) for field in fields(ImagesRequest)}


def require_at_least(*checks: tuple[str, int | None, int]) -> None:
    """Refuse, in one line naming the flag, the first (flag, value, least) whose value is set and under least."""
    for flag, value, least in checks:
        if value is not None and value < least:
            raise EvaluationError(f"{flag}: must be >= {least}, got {value}")


@dataclass
class EvaluationRequest(ImagesRequest):
    """What `vae-hf evaluate` was asked to do."""

    max_images: int | None = None
    """Stop after this many usable images (None: the whole split)."""
    metrics: str = ",".join(METRIC_NAMES)
    """Comma-separated metric names."""
    buckets: bool = False
    """Score each image at its own aspect ratio: resized to cover, and cropped to, the nearest aspect-ratio bucket of
    area about resolution² (the buckets `data.buckets` trains on, with the defaults), instead of the square crop."""

    def __post_init__(self) -> None:
        parse_metric_names(self.metrics)  # refuse unknown names before anything is loaded
        super().__post_init__()
        require_at_least(("--max-images", self.max_images, 1))

    @property
    def metric_names(self) -> tuple[str, ...]:
        return parse_metric_names(self.metrics)


def evaluate_models(request: EvaluationRequest, fid_features: nn.Module | None = None) -> dict[str, Any]:
    """Every model on the same images; all that can fail on bad input fails before the first forward pass."""
    if "lpips" in request.metric_names and request.perceptual_pretrained:
        try:
            require_vgg_weights()
        except OfflineError as error:  # its message names the training flag; name ours too
            raise OfflineError(f"{error}; for vae-hf evaluate the switch is --perceptual-random") from None
    if request.out is not None:
        require_writable(Path(request.out))
    vaes = [load_checked_vae(source, request.resolution) for source in request.models]  # before data: cheaper
    factor = max(downsampling_factor(vae) for vae in vaes)
    loader = image_loader(request, factor)
    upscaled = count_upscaled(loader.dataset.dataset, request.image_column, request.resolution, request.max_images)
    metrics = ReconstructionMetrics(request.metric_names, request.perceptual_pretrained, fid_features)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for source, vae in zip(request.models, vaes, strict=True):
        scores = evaluate_vae(vae.to(device), loader, metrics, request.max_images)
        vae.to("cpu")  # one model on the device at a time
        results.append({"model": source, "resolution": request.resolution, **scores})
    return {
        "data": request.data,
        "split": request.split,
        "resolution": request.resolution,
        "crops": "aspect-ratio buckets" if request.buckets else "square",
        "metrics": [metrics.score_name(name) for name in request.metric_names],
        "psnr_cap_db": PSNR_CAP_DB,
        "images_upscaled": upscaled,
        "results": results,
    }


def image_loader(request: EvaluationRequest, factor: int = 8) -> DataLoader:
    """The split's images, centre-cropped, in order; unreadable files are skipped and counted by `collate`. With
    `request.buckets`, the first `max_images` rows in batches of one bucket each (sides multiples of `factor`, the
    models' largest downsampling factor)."""
    config = DataConfig(
        dataset=request.data,
        split=request.split,
        image_column=request.image_column,
        resolution=request.resolution,
        center_crop=True,
        random_flip=False,
    )
    dataset = load_image_dataset(config)
    require_a_usable_image(dataset, config)
    transform = ImageTransform(request.resolution, center_crop=True)
    if request.buckets and request.max_images is not None:  # the same images as without buckets, grouped
        dataset = dataset.select(range(min(len(dataset), request.max_images)))
    images = ImageDataset(dataset, config.image_column, transform, seed=0, max_pixels=config.max_image_pixels)
    if not request.buckets:
        return DataLoader(images, batch_size=request.batch_size, num_workers=request.num_workers, collate_fn=collate)
    buckets = bucket_list(config, factor)  # the list data.buckets trains on, at its defaults
    rows = assign_buckets(image_sizes(dataset, config.image_column), buckets)
    batches = grouped_batches(rows, buckets, request.batch_size)
    return DataLoader(images, batch_sampler=batches, num_workers=request.num_workers, collate_fn=collate)


def count_upscaled(dataset, image_column: str, resolution: int, limit: int | None = None) -> int:
    """How many of the first `limit` images (all: None) have a short side under `resolution`: the crop enlarges
    them first. Read from the file headers, nothing decoded; unreadable files are left to the loader to count."""
    upscaled = 0
    for index in range(min(len(dataset), limit or len(dataset))):
        value = dataset[index][image_column]
        try:
            source = io.BytesIO(value["bytes"]) if isinstance(value, dict) and value.get("bytes") else _path(value)
            with Image.open(source) as image:
                upscaled += min(image.size) < resolution
        except DECODE_ERRORS:
            continue
    return upscaled


def _path(value: Any) -> str:
    return str(value.get("path") if isinstance(value, dict) else value)


def load_checked_vae(source: str, resolution: int) -> AutoencoderKL:
    """Load a VAE and check that it can downsample the evaluation resolution."""
    vae = load_vae(source, option="--model")
    factor = downsampling_factor(vae)
    if resolution % factor != 0:
        raise EvaluationError(
            f"--resolution {resolution} is not a multiple of {factor}, the downsampling factor of {source}"
        )
    if resolution * resolution > AUTO_TILE_PIXELS:  # as `reconstruct` does: attention grows with area squared
        tile = auto_tile_size(vae)
        configure_tiling(vae, tile)
        logger.warning("%s: %d px crops are encoded and decoded in %d px tiles", source, resolution, tile)
    return vae


def require_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EvaluationError(f"--out: cannot create {path.parent}: {error.strerror or error}") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise EvaluationError(f"--out: cannot write {path}")


def write_report(report: dict[str, Any], path: Path) -> None:
    """Strict JSON: a NaN score (a diverged model) is written as null."""
    try:
        path.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    except OSError as error:
        raise EvaluationError(f"--out: cannot write {path}: {error.strerror or error}") from None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


# name -> (column heading, format); arrows say which way is better
COLUMNS = {
    "psnr": ("PSNR (dB) ↑", "{:.2f}"),
    "ssim": ("SSIM ↑", "{:.4f}"),
    "lpips": ("LPIPS ↓", "{:.4f}"),
    RANDOM_TRUNK_LPIPS: ("LPIPS, random VGG trunk ↓", "{:.4f}"),
    "rfid": ("rFID ↓", "{:.3f}"),
}


def format_table(report: dict[str, Any]) -> str:
    """One Markdown row per model; a score that could not be computed reads n/a, with the reason below."""
    names = report["metrics"]
    lines = [
        "| model | " + " | ".join(COLUMNS[name][0] for name in names) + " | images | skipped |",
        "| --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: |",
    ]
    for row in report["results"]:
        cells = [_cell(row.get(name), COLUMNS[name][1]) for name in names]
        model = row["model"].replace("|", "\\|")
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {row['num_images']} | {row['images_skipped']} |")
    reasons = dict.fromkeys(row["rfid_unavailable"] for row in report["results"] if "rfid_unavailable" in row)
    lines += [f"\nrFID n/a: {reason}" for reason in reasons]
    if report.get("crops") == "aspect-ratio buckets":
        lines.append(f"\ncrops: each image in its aspect-ratio bucket of area about {report['resolution']}² px.")
    if "psnr" in names:
        lines.append(f"\nPSNR: mean over images of each image's PSNR, capped at {PSNR_CAP_DB:g} dB (an exact copy).")
    if report.get("images_upscaled"):
        lines.append(
            f"\nupscaled: {report['images_upscaled']} image(s) have a short side under {report['resolution']} px and "
            "were enlarged to it before the centre crop, so their scores include the enlargement; --resolution "
            "sets the crop size"
        )
    return "\n".join(lines)


def _cell(value: float | None, template: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else template.format(value)
