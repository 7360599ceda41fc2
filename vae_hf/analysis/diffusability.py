"""How learnable a VAE's latent space is, beyond how well it reconstructs: the four cheap measures.

1. The latent spectrum: radially averaged 2D DCT power of the latents, beside the images' at the same grid size,
   and the share of latent energy above half the Nyquist frequency. Skorokhodov et al. (arXiv 2502.14831, sec. 3)
   find that KL-regularised latents carry more high-frequency energy than the images they encode, and that this
   makes them harder to diffuse.
2. Equivariance: PSNR (and LPIPS) between `decode(T(z))` and `T(x)` for a downscale by 0.5 and 0.75 and a
   rotation by 90 degrees, next to the plain reconstruction's (EQ-VAE, arXiv 2502.09509, sec. 3).
3. Noise robustness: reconstruction PSNR from `z + sigma * eps * std(z)`, the imperfect latents a sampler hands
   the decoder (LV-RAE, arXiv 2602.08620; l-DeTok, arXiv 2507.15856).
4. Channel statistics: per-channel mean and std, the correlation between channels and the share of variance in
   each principal component: a near-degenerate channel shows as a tiny std or a top component holding nearly all.

The fifth measure, a small diffusion model trained on the latents, is `vae_hf.analysis.diffusion_probe`.
Everything here is measured on posterior means, so the numbers are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from vae_hf.analysis.evaluation import PSNR_CAP_DB, to_unit_range

TRANSFORMS = ("x0.5", "x0.75", "rot90")
NOISE_SIGMAS = (0.1, 0.2, 0.5)
LPIPS_MIN_SIDE = 16  # VGG16's last LPIPS layer is 1/16 of the input: smaller images get PSNR only
HIGH_FREQUENCY_CUTOFF = 0.5
"""Half the Nyquist frequency: the radius, as a fraction of Nyquist, above which energy counts as high."""


# --- 1. spectrum -------------------------------------------------------------------------------------------------


def dct_matrix(size: int) -> torch.Tensor:
    """The orthonormal DCT-II as a (size, size) matrix: row k holds the cosine of frequency k / (2 size) cycles per
    sample, so k = size is Nyquist. DCT rather than FFT: its even extension has no wrap-around edge, which would put
    energy at every frequency of a smooth but non-periodic latent."""
    n = torch.arange(size, dtype=torch.float64)
    basis = torch.cos(math.pi * (n[None, :] + 0.5) * n[:, None] / size) * math.sqrt(2 / size)
    basis[0] /= math.sqrt(2)
    return basis


def dct_power(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (h, w): DCT power summed over maps, each map's mean removed first (the channel statistics
    report the means; left in, a shifted channel's DC term would swamp every other frequency)."""
    maps = maps.detach().to("cpu", torch.float64)
    maps = maps - maps.mean(dim=(2, 3), keepdim=True)
    rows, columns = dct_matrix(maps.shape[2]), dct_matrix(maps.shape[3])
    coefficients = rows @ maps @ columns.T  # (N, C, h, w)
    return (coefficients**2).sum(dim=(0, 1))


def frequency_radius(height: int, width: int) -> torch.Tensor:
    """(h, w): each DCT coefficient's radial frequency as a fraction of Nyquist (1 at the edges, up to sqrt 2)."""
    ky = torch.arange(height, dtype=torch.float64)[:, None] / height
    kx = torch.arange(width, dtype=torch.float64)[None, :] / width
    return (ky**2 + kx**2).sqrt()


@dataclass
class Spectrum:
    """DCT power accumulated over batches of maps of one grid size."""

    power: torch.Tensor | None = None
    maps: int = 0

    def add(self, maps: torch.Tensor) -> None:
        power = dct_power(maps)
        self.power = power if self.power is None else self.power + power
        self.maps += maps.shape[0] * maps.shape[1]

    def radial(self) -> dict[str, list[float]]:
        """The radially averaged power in bins of 1/min(h, w) of Nyquist, up to Nyquist, normalised so that the
        average over all non-DC coefficients is 1: white noise reads 1 at every frequency."""
        power, radius = self._normalised(), frequency_radius(*self.power.shape)
        bins = min(self.power.shape)
        index = (radius * bins).floor().long()
        profile, frequencies = [], []
        for k in range(1, bins):  # bin 0 holds only the removed DC term
            inside = index == k
            if inside.any():
                frequencies.append((k + 0.5) / bins)
                profile.append(float(power[inside].mean()))
        return {"frequency": frequencies, "power": profile}

    def high_frequency_energy(self) -> float:
        """The share of energy above HIGH_FREQUENCY_CUTOFF of Nyquist (white noise: about 0.8)."""
        radius = frequency_radius(*self.power.shape)
        total = self.power.sum() - self.power[0, 0]
        return float(self.power[radius > HIGH_FREQUENCY_CUTOFF].sum() / total) if total > 0 else 0.0

    def _normalised(self) -> torch.Tensor:
        ac = self.power.numel() - 1
        total = self.power.sum() - self.power[0, 0]
        return self.power * (ac / total) if total > 0 else self.power


# --- 2. equivariance ---------------------------------------------------------------------------------------------


def transform(tensor: torch.Tensor, name: str, latent_size: tuple[int, int], factor: int) -> torch.Tensor:
    """T of an image (factor = the VAE's downsampling factor) or of a latent (factor = 1), the same operation on
    both: for a downscale by s the latent grid becomes round(s h) and the image that times the factor."""
    if name == "rot90":
        return torch.rot90(tensor, 1, dims=(2, 3))
    scale = float(name[1:])
    size = tuple(max(1, round(scale * side)) * factor for side in latent_size)
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)


# --- 4. channel statistics ---------------------------------------------------------------------------------------


@dataclass
class ChannelCovariance:
    """Sums of latent vectors and of their outer products, in float64, about a fixed reference (the first batch's
    mean) so that a large mean does not cancel the spread."""

    count: int = 0
    reference: torch.Tensor | None = None
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def add(self, latents: torch.Tensor) -> None:
        vectors = latents.detach().to("cpu", torch.float64).transpose(0, 1).flatten(1).T  # (N*h*w, C)
        if self.reference is None:
            self.reference = vectors.mean(dim=0)
            self.total = torch.zeros_like(self.reference)
            self.outer = torch.zeros(len(self.reference), len(self.reference), dtype=torch.float64)
        centred = vectors - self.reference
        self.count += len(vectors)
        self.total += centred.sum(dim=0)
        self.outer += centred.T @ centred

    def summary(self) -> dict[str, Any]:
        mean_offset = self.total / self.count
        covariance = (self.outer - self.count * torch.outer(mean_offset, mean_offset)) / max(self.count - 1, 1)
        std = covariance.diagonal().clamp(min=0).sqrt()
        correlation = covariance / torch.outer(std, std).clamp(min=1e-30)
        eigenvalues = torch.linalg.eigvalsh(covariance).flip(0).clamp(min=0)
        share = eigenvalues / eigenvalues.sum() if eigenvalues.sum() > 0 else eigenvalues
        off_diagonal = correlation - torch.diag(correlation.diagonal())
        return {
            "channel_mean": (self.reference + mean_offset).tolist(),
            "channel_std": std.tolist(),
            "channel_correlation": correlation.tolist(),
            "pca_variance_share": share.tolist(),
            "latent_pca_top1_share": float(share[0]),
            "latent_max_abs_correlation": float(off_diagonal.abs().max()),
            "latent_std_ratio": float(std.min() / std.max()) if std.max() > 0 else 0.0,
        }


# --- the measures over a dataset ---------------------------------------------------------------------------------


@dataclass
class Means:
    """Running means of named per-image scores."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(values.double().sum())
        self.counts[name] = self.counts.get(name, 0) + values.numel()

    def result(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


def psnr(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Each image's PSNR in dB, both in [-1, 1]; capped as `vae-hf evaluate` caps it."""
    scores = peak_signal_noise_ratio(
        to_unit_range(reconstructions.float().clamp(-1, 1)),
        to_unit_range(images.float()),
        data_range=1.0,
        reduction="none",
        dim=(1, 2, 3),
    )
    return scores.clamp(max=PSNR_CAP_DB)


class LatentMeasures:
    """Measures 1-4 accumulated batch by batch; `result()` gives the scalars and the spectra.

    `lpips_model` (an LPIPS taking [-1, 1]) adds LPIPS beside each PSNR, under `lpips_name` (`lpips_random_trunk`
    for a randomly initialised trunk, so that it is never read as LPIPS); None measures PSNR only.
    """

    def __init__(self, vae: nn.Module, lpips_model: nn.Module | None = None, seed: int = 0, lpips_name: str = "lpips"):
        self.vae, self.lpips_model, self.lpips_name = vae, lpips_model, lpips_name
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on any device
        self.means = Means()
        self.latent_spectrum, self.image_spectrum = Spectrum(), Spectrum()
        self.channels = ChannelCovariance()
        self.images = 0

    @property
    def parameter(self) -> torch.Tensor:
        return next(self.vae.parameters())  # its device and dtype are the VAE's

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.parameter.dtype)).sample.float()

    def score(self, kind: str, tag: str, outputs: torch.Tensor, targets: torch.Tensor, lpips: bool = True) -> None:
        """Record `<kind>_psnr_<tag>` (and `<kind>_lpips_<tag>`), e.g. `equivariance_psnr_x0.5`."""
        suffix = f"_{tag}" if tag else ""
        self.means.add(f"{kind}_psnr{suffix}", psnr(outputs, targets))
        if lpips and self.lpips_model is not None and min(outputs.shape[2:]) >= LPIPS_MIN_SIDE:
            distances = self.lpips_model(outputs.float().clamp(-1, 1), targets.float())
            self.means.add(f"{kind}_{self.lpips_name}{suffix}", distances.flatten())

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        """A batch of (N, 3, H, W) images in [-1, 1]."""
        images = images.to(self.parameter.device, torch.float32)  # scored at full precision whatever the VAE's dtype
        latents = self.vae.encode(images.to(self.parameter.dtype)).latent_dist.mean.float()
        latent_size = tuple(latents.shape[2:])
        factor = images.shape[2] // latent_size[0]
        self.latent_spectrum.add(latents)
        self.image_spectrum.add(F.interpolate(images, size=latent_size, mode="area"))
        self.channels.add(latents)
        self.score("reconstruction", "", self.decode(latents), images)
        for name in TRANSFORMS:
            decoded = self.decode(transform(latents, name, latent_size, 1))
            self.score("equivariance", name, decoded, transform(images, name, latent_size, factor))
        std = latents.std(dim=(0, 2, 3), keepdim=True)  # each channel's, over the batch
        for sigma in NOISE_SIGMAS:
            noise = torch.randn(latents.shape, generator=self.generator).to(latents)
            self.score("noise", str(sigma), self.decode(latents + sigma * noise * std), images, lpips=False)
        self.images += len(images)

    def result(self) -> dict[str, Any]:
        if self.images == 0:
            raise ValueError("no images were measured")
        channels = self.channels.summary()
        scalars = {"latent_hf_energy": self.latent_spectrum.high_frequency_energy()}
        scalars["image_hf_energy"] = self.image_spectrum.high_frequency_energy()
        scalars.update(self.means.result())
        scalars.update({name: channels.pop(name) for name in list(channels) if isinstance(channels[name], float)})
        return {
            "images": self.images,
            "scalars": scalars,
            "spectrum": {"latents": self.latent_spectrum.radial(), "images": self.image_spectrum.radial()},
            "channels": channels,
        }


def measure_latents(
    vae: nn.Module,
    image_batches: Iterable[torch.Tensor],
    lpips_model: nn.Module | None = None,
    seed: int = 0,
    lpips_name: str = "lpips",
) -> dict[str, Any]:
    """Measures 1-4 of `vae` over `image_batches` ((N, 3, H, W) in [-1, 1]), in eval mode; see `LatentMeasures`."""
    was_training = vae.training
    vae.eval()
    measures = LatentMeasures(vae, lpips_model, seed, lpips_name)
    try:
        for images in image_batches:
            if len(images):
                measures.add(images)
    finally:
        vae.train(was_training)
    return measures.result()
