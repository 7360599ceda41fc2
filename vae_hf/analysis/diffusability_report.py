"""`vae-hf diffusability`: the five measures for several VAEs on the same images, as JSON, a Markdown row per model
and PNG charts. The measures are in `diffusability` (1-4) and `diffusion_probe` (5)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vae_hf.analysis.charts import Series, image_grid, line_chart, pca_image
from vae_hf.analysis.diffusability import TRANSFORMS, measure_latents
from vae_hf.analysis.diffusion_probe import ProbeConfig, run_probe
from vae_hf.analysis.evaluation import (
    RANDOM_TRUNK_LPIPS,
    EvaluationError,
    EvaluationRequest,
    ImagesRequest,
    image_loader,
    load_checked_vae,
    require_at_least,
    require_writable,
    to_unit_range,
    write_report,
)
from vae_hf.analysis.inference import downsampling_factor
from vae_hf.models.perceptual import build_lpips, require_vgg_weights
from vae_hf.offline import OfflineError

HELDOUT_SHARE = 0.2
"""The share of the images the probe holds out (at least one): its loss and FID are measured on them."""
PCA_IMAGES = 4


@dataclass
class DiffusabilityRequest(ImagesRequest):
    """What `vae-hf diffusability` was asked to do."""

    max_images: int | None = 256
    """Use the first this many usable images (None: all; they are held in memory)."""
    probe_steps: int = 1000
    """The probe's optimizer steps (0: measures 1-4 only)."""
    probe_width: int = 64
    """Channels of the probe UNet's first level."""
    probe_batch_size: int = 16
    fid_samples: int | None = None
    """Probe samples for FID (None: as many as held-out images; 0: no FID)."""
    seed: int = 0
    plots: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(
            ("--max-images", self.max_images, 2),
            ("--probe-steps", self.probe_steps, 0),
            ("--probe-width", self.probe_width, 4),
            ("--probe-batch-size", self.probe_batch_size, 1),
            ("--fid-samples", self.fid_samples, 0),
        )


def read_images(request: DiffusabilityRequest) -> list[torch.Tensor]:
    """The first `max_images` usable centre crops, as batches in [-1, 1] held in memory: every model and every
    measure sees the same images."""
    loader = image_loader(EvaluationRequest(**request.shared_fields(), metrics="psnr"))
    batches, seen = [], 0
    for batch in loader:
        images = batch["pixel_values"]
        if request.max_images is not None:
            images = images[: request.max_images - seen]
        if len(images):
            batches.append(images)
            seen += len(images)
        if request.max_images is not None and seen >= request.max_images:
            break
    return batches


def split_heldout(batches: list[torch.Tensor], batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    images = torch.cat(batches)
    if len(images) < 2:
        raise EvaluationError(f"the probe needs at least 2 usable images, got {len(images)}")
    heldout = max(1, round(len(images) * HELDOUT_SHARE))
    train, held = images[:-heldout], images[-heldout:]
    return list(train.split(batch_size)), list(held.split(batch_size))


def diffusability_of(
    vae: nn.Module,
    batches: list[torch.Tensor],
    probe: ProbeConfig | None,
    lpips_model: nn.Module | None = None,
    fid_features: nn.Module | None = None,
    lpips_name: str = "lpips",
    seed: int = 0,
) -> dict[str, Any]:
    """Measures 1-4 on every batch (`seed`: of measure 3's noise), and with `probe` the probe trained on the first
    images, scored on the rest."""
    result = measure_latents(vae, batches, lpips_model, seed=seed, lpips_name=lpips_name)
    if probe is not None:
        train, heldout = split_heldout(batches, probe.batch_size)
        result["probe"] = run_probe(vae, train, heldout, probe, fid_features)
        result["scalars"]["probe_loss"] = result["probe"]["probe_loss"]
        if "probe_fid" in result["probe"]:
            result["scalars"]["probe_fid"] = result["probe"]["probe_fid"]
    return result


def compare_models(request: DiffusabilityRequest, fid_features: nn.Module | None = None) -> dict[str, Any]:
    """Every model on the same images, probe budget and seed; bad input fails before the first forward pass."""
    vaes = load_checked_models(request)
    batches = read_images(request)
    if request.probe_steps and sum(len(batch) for batch in batches) < 2:
        raise EvaluationError(f"--data: the probe needs at least 2 usable images in {request.data}")
    probe = None
    if request.probe_steps:
        probe = ProbeConfig(
            steps=request.probe_steps,
            width=request.probe_width,
            batch_size=request.probe_batch_size,
            seed=request.seed,
            fid_samples=request.fid_samples,
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lpips_model = build_lpips(request.perceptual_pretrained).to(device)
    lpips_name = "lpips" if request.perceptual_pretrained else RANDOM_TRUNK_LPIPS
    results, pca = [], []
    for source, vae in zip(request.models, vaes, strict=True):
        vae.to(device).requires_grad_(False)
        measured = diffusability_of(vae, batches, probe, lpips_model, fid_features, lpips_name, request.seed)
        results.append({"model": source, **measured})
        with torch.no_grad():
            pca.append(vae.encode(batches[0][:PCA_IMAGES].to(device, vae.dtype)).latent_dist.mean.float().cpu())
        vae.to("cpu")  # one model on the device at a time
    report = {
        "data": request.data,
        "split": request.split,
        "resolution": request.resolution,
        "images": sum(len(batch) for batch in batches),
        "lpips": "vgg" if request.perceptual_pretrained else "random_trunk",
        "probe_steps": request.probe_steps,
        "results": results,
    }
    if request.plots is not None:
        report["plots"] = write_plots(report, Path(request.plots), batches[0][:PCA_IMAGES], pca)
    if request.out is not None:
        write_report(report, Path(request.out))
    return report


def load_checked_models(request: DiffusabilityRequest) -> list[nn.Module]:
    """The models, once everything that can be checked without images is: LPIPS weights, output paths, each
    model's downsampling of the resolution and, for the probe, an even latent grid."""
    if request.perceptual_pretrained:
        try:
            require_vgg_weights()
        except OfflineError as error:
            raise OfflineError(f"{error}; for vae-hf diffusability the switch is --perceptual-random") from None
    for path in (request.out, request.plots and str(Path(request.plots) / "spectra.png")):
        if path is not None:
            require_writable(Path(path))
    vaes = [load_checked_vae(source, request.resolution) for source in request.models]
    for source, vae in zip(request.models, vaes, strict=True):
        latent_side = request.resolution // downsampling_factor(vae)
        if request.probe_steps and latent_side % 2:
            raise EvaluationError(
                f"--resolution {request.resolution} gives {source} an odd latent grid ({latent_side}), which the "
                "probe's UNet cannot halve; choose a resolution with an even grid, or --probe-steps 0"
            )
    return vaes


# --- the table ---------------------------------------------------------------------------------------------------

# scalar name -> (column heading, format); arrows say which way is better
COLUMNS = {
    "latent_hf_energy": ("latent HF energy ↓", "{:.3f}"),
    "reconstruction_psnr": ("rec. PSNR ↑", "{:.2f}"),
    **{f"equivariance_psnr_{name}": (f"eq. PSNR {name} ↑", "{:.2f}") for name in TRANSFORMS},
    "noise_psnr_0.5": ("PSNR at σ 0.5 ↑", "{:.2f}"),
    "latent_pca_top1_share": ("PCA top-1 share", "{:.3f}"),
    "latent_std_ratio": ("min/max channel std", "{:.3f}"),
    "probe_loss": ("probe loss ↓", "{:.4f}"),
    "probe_fid": ("probe FID ↓", "{:.2f}"),
}


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One Markdown row per (label, scalars); a column no row has is left out, a missing value reads n/a."""
    names = [name for name in COLUMNS if any(name in scalars for _, scalars in rows)]
    lines = [
        "| model | " + " | ".join(COLUMNS[name][0] for name in names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for label, scalars in rows:
        cells = [_cell(scalars.get(name), COLUMNS[name][1]) for name in names]
        escaped = label.replace("|", "\\|")  # a bare pipe would split the cell
        lines.append(f"| {escaped} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_table(report: dict[str, Any]) -> str:
    """The command's table, with the reasons for any FID left out below it."""
    table = format_table([(row["model"], row["scalars"]) for row in report["results"]])
    probes = [row.get("probe", {}) for row in report["results"]]
    reasons = dict.fromkeys(probe["probe_fid_unavailable"] for probe in probes if "probe_fid_unavailable" in probe)
    return table + "".join(f"\n\nprobe FID n/a: {reason}" for reason in reasons)


def _cell(value: float | None, template: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else template.format(value)


# --- the plots ---------------------------------------------------------------------------------------------------


def spectra_chart(rows: list[tuple[str, dict[str, Any]]]) -> Any:
    """The latents' radial spectra, one line per model, and the images' (at the latent grid size) dashed grey."""
    series = [Series(label, spectrum["latents"]["frequency"], spectrum["latents"]["power"]) for label, spectrum in rows]
    images = rows[0][1]["images"]
    series.append(Series("images", images["frequency"], images["power"], colour=(120, 120, 120), dashed=True))
    return line_chart(series, "latent power spectrum (1 = white noise)", "frequency / Nyquist", "power", log_y=True)


def probe_chart(rows: list[tuple[str, dict[str, Any]]]) -> Any:
    series = [Series(label, run["probe_curve"]["step"], run["probe_curve"]["heldout_loss"]) for label, run in rows]
    return line_chart(series, "diffusion probe: held-out loss", "step", "loss", log_y=True)


def write_plots(report: dict[str, Any], folder: Path, images: torch.Tensor, pca: list[torch.Tensor]) -> dict[str, str]:
    """spectra.png, latent_pca.png (originals, then each model's latents) and, with the probe, probe_loss.png."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = [short_label(row["model"]) for row in report["results"]]
    paths = {"spectra": folder / "spectra.png", "latent_pca": folder / "latent_pca.png"}
    spectra_chart([(label, row["spectrum"]) for label, row in zip(labels, report["results"], strict=True)]).save(
        paths["spectra"]
    )
    rows = [to_unit_range(images)] + [pca_image(latents) for latents in pca]
    image_grid(rows, ["images", *labels]).save(paths["latent_pca"])
    if all("probe" in row for row in report["results"]):
        paths["probe_loss"] = folder / "probe_loss.png"
        probe_chart([(label, row["probe"]) for label, row in zip(labels, report["results"], strict=True)]).save(
            paths["probe_loss"]
        )
    return {name: str(path) for name, path in paths.items()}


def short_label(model: str) -> str:
    """The last two parts of a path or Hub id: enough to tell models apart in a legend."""
    return "/".join([part for part in re.split(r"[\\/]", model) if part][-2:])
