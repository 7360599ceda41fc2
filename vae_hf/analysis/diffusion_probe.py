"""The diffusion probe: a small diffusion model trained on a VAE's latents for a fixed budget and seed.

The common way to judge a latent space is the FID of a diffusion model trained on it (VA-VAE arXiv 2501.01423,
EQ-VAE arXiv 2502.09509, REPA-E arXiv 2504.10483, Skorokhodov et al. arXiv 2502.14831). The probe is that protocol
made small: a diffusers `UNet2DModel` learns rectified flow (Liu et al. 2022; the flow-matching objective of SD3,
Esser et al. 2024, sec. 2) on the VAE's shifted and scaled posterior samples, `x_sigma = (1 - sigma) x0 +
sigma eps`, predicting `eps - x0`. Its held-out loss per noise level says how learnable the latents are; the FID of
images decoded from its samples (diffusers' `FlowMatchEulerDiscreteScheduler`) says what it learned. Two VAEs are
compared at the same budget, data and seed; the numbers mean nothing across budgets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
from torch import nn
from torchmetrics.image import FrechetInceptionDistance

from vae_hf.analysis.evaluation import FeaturesUnavailable, inception_features, to_unit_range
from vae_hf.errors import UserError

logger = logging.getLogger(__name__)

EVAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
"""The noise levels the held-out loss is reported at: low sigma is detail, high sigma is layout."""
TIMESTEPS = 1000  # the schedulers' training timesteps: the UNet is conditioned on sigma * 1000


class ProbeError(UserError, ValueError):
    """The probe cannot run as asked; the message says why in one line."""


@dataclass
class ProbeConfig:
    """The probe's budget and size; keep them equal when comparing VAEs."""

    steps: int = 1000
    """Optimizer steps of the diffusion model."""
    width: int = 64
    """Channels of the UNet's first level (the second has twice as many)."""
    batch_size: int = 16
    """Latents per step."""
    lr: float = 3e-4
    """AdamW learning rate."""
    seed: int = 0
    """Seed of the UNet's initialisation, the batches, the noise and the samples."""
    curve_points: int = 10
    """Times the held-out loss is measured along the budget (plus once before the first step)."""
    fid_samples: int | None = 0
    """Images sampled, decoded and compared with the held-out images by FID (0: no FID; None: as many as there
    are held-out images)."""
    sampling_steps: int = 25
    """Euler steps per sample."""

    def __post_init__(self) -> None:
        for name in ("steps", "width", "batch_size", "curve_points", "sampling_steps"):
            if getattr(self, name) < 1:
                raise ProbeError(f"probe {name}: must be >= 1, got {getattr(self, name)}")
        if (self.fid_samples is not None and self.fid_samples < 0) or self.lr <= 0:
            raise ProbeError(f"probe fid_samples must be >= 0 and lr > 0, got {self.fid_samples} and {self.lr}")


@dataclass
class Posteriors:
    """Posterior means and stds of a set of images, (N, C, h, w) on the CPU."""

    mean: torch.Tensor
    std: torch.Tensor
    images: torch.Tensor | None = None
    """The images themselves ((N, 3, H, W) in [-1, 1]) when FID needs them."""


@torch.no_grad()
def encode_posteriors(vae: nn.Module, image_batches: Iterable[torch.Tensor], keep_images: bool = False) -> Posteriors:
    parameter = next(vae.parameters())  # the VAE's device and dtype
    means, stds, images = [], [], []
    for batch in image_batches:
        if len(batch) == 0:
            continue
        posterior = vae.encode(batch.to(parameter.device, parameter.dtype)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        if keep_images:
            images.append(batch.float().cpu())
    if not means:
        raise ProbeError("the probe has no images to encode")
    return Posteriors(torch.cat(means), torch.cat(stds), torch.cat(images) if images else None)


def probe_unet(channels: int, latent_size: tuple[int, int], width: int) -> UNet2DModel:
    """A two-level UNet without attention: small enough to train on a CPU, the same for every VAE compared."""
    if any(side % 2 for side in latent_size):
        raise ProbeError(f"the probe needs an even latent grid, got {latent_size[0]}x{latent_size[1]}")
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
        norm_num_groups=min(32, width // 4) if width >= 4 else 1,
    )


@dataclass
class ProbeRun:
    """What the probe records while it trains."""

    curve_steps: list[int] = field(default_factory=list)
    """Steps at which the held-out loss was measured, 0 first."""
    curve_loss: list[float] = field(default_factory=list)
    """The held-out loss (mean over EVAL_SIGMAS) at each of those steps."""
    train_loss: list[float] = field(default_factory=list)
    """The mean training loss over each interval between two of those steps (one fewer than the steps)."""


def flow_loss(unet: UNet2DModel, clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample rectified-flow loss: the velocity `noise - clean` predicted from `(1 - sigma) clean + sigma noise`."""
    shape = (-1,) + (1,) * (clean.dim() - 1)
    noisy = (1 - sigmas.view(shape)) * clean + sigmas.view(shape) * noise
    prediction = unet(noisy, sigmas * TIMESTEPS).sample
    return ((prediction.float() - (noise - clean)) ** 2).mean(dim=(1, 2, 3))


class DiffusionProbe:
    """Trains the probe on normalised training latents and measures it on held-out ones."""

    def __init__(self, train: Posteriors, heldout: Posteriors, config: ProbeConfig, device: torch.device):
        self.config, self.device = config, device
        # SD3-style shift and scale, measured on the probe's own training samples: unit variance for the
        # schedule whatever the VAE's config says (a wrong scaling_factor would otherwise be what is measured)
        generator = torch.Generator().manual_seed(config.seed)
        samples = train.mean + train.std * torch.randn(train.mean.shape, generator=generator)
        self.shift, self.scale = float(samples.mean()), 1.0 / float(samples.std().clamp(min=1e-12))
        self.train, self.heldout = train, heldout
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.unet = probe_unet(train.mean.shape[1], tuple(train.mean.shape[2:]), config.width).to(device)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        # the held-out set is scored on fixed noise, the same at every measurement: the curve is not noisy
        held = torch.Generator().manual_seed(config.seed + 2)
        self.heldout_noise = torch.randn((len(EVAL_SIGMAS), *heldout.mean.shape), generator=held)

    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.shift) * self.scale

    def train_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        count = len(self.train.mean)
        index = torch.randint(count, (min(self.config.batch_size, count),), generator=self.generator)
        epsilon = torch.randn(self.train.mean[index].shape, generator=self.generator)
        clean = self.normalise(self.train.mean[index] + self.train.std[index] * epsilon)
        noise = torch.randn(clean.shape, generator=self.generator)
        sigmas = torch.rand(len(clean), generator=self.generator)
        return clean.to(self.device), noise.to(self.device), sigmas.to(self.device)

    @torch.enable_grad()  # the probe trains even when its caller evaluates under no_grad
    def fit(self) -> ProbeRun:
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.config.lr)
        run = ProbeRun()
        every = max(1, self.config.steps // self.config.curve_points)
        self._measure_into(run, 0)
        interval_loss = torch.zeros((), device=self.device)
        for step in range(1, self.config.steps + 1):
            self.unet.train()
            loss = flow_loss(self.unet, *self.train_batch()).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            interval_loss += loss.detach()  # read only at the curve's points: no host sync per step
            if step % every == 0 or step == self.config.steps:
                run.train_loss.append(float(interval_loss) / (step - run.curve_steps[-1]))
                interval_loss.zero_()
                self._measure_into(run, step)
        return run

    def _measure_into(self, run: ProbeRun, step: int) -> None:
        run.curve_steps.append(step)
        run.curve_loss.append(sum(self.heldout_loss().values()) / len(EVAL_SIGMAS))

    @torch.no_grad()
    def heldout_loss(self) -> dict[str, float]:
        """Mean loss on the held-out posterior means at each of EVAL_SIGMAS, on fixed noise."""
        self.unet.eval()
        clean = self.normalise(self.heldout.mean)
        losses = {}
        for level, sigma in enumerate(EVAL_SIGMAS):
            total = 0.0
            for start in range(0, len(clean), self.config.batch_size):
                part = slice(start, start + self.config.batch_size)
                batch, noise = clean[part].to(self.device), self.heldout_noise[level, part].to(self.device)
                sigmas = torch.full((len(batch),), sigma, device=self.device)
                total += float(flow_loss(self.unet, batch, noise, sigmas).sum())
            losses[str(sigma)] = total / len(clean)
        return losses

    @torch.no_grad()
    def sample(self, count: int) -> torch.Tensor:
        """`count` latents (un-normalised) by Euler steps of diffusers' flow-matching scheduler."""
        self.unet.eval()
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=TIMESTEPS)
        scheduler.set_timesteps(self.config.sampling_steps, device=self.device)
        generator = torch.Generator().manual_seed(self.config.seed + 3)
        latents = torch.randn((count, *self.train.mean.shape[1:]), generator=generator).to(self.device)
        for timestep in scheduler.timesteps:
            velocity = self.unet(latents, timestep.expand(count)).sample
            latents = scheduler.step(velocity, timestep, latents).prev_sample
        return latents / self.scale + self.shift


def probe_fid(
    vae: nn.Module, probe: DiffusionProbe, count: int, features: nn.Module | None
) -> tuple[float | None, str | None]:
    """FID between images decoded from `count` probe samples and the held-out images; (None, reason) when the
    Inception weights are unavailable or there are too few images."""
    real = probe.heldout.images
    held_out = 0 if real is None else len(real)
    if held_out < 2 or count < 2:  # a covariance needs two samples
        return None, f"FID needs at least 2 samples and 2 held-out images, got {count} and {held_out}"
    try:
        features = features if features is not None else inception_features()
    except FeaturesUnavailable as error:
        return None, str(error)
    fid = FrechetInceptionDistance(feature=features, normalize=True).to(probe.device)
    parameter = next(vae.parameters())
    with torch.no_grad():
        for start in range(0, count, probe.config.batch_size):
            latents = probe.sample(min(probe.config.batch_size, count - start)).to(parameter.device, parameter.dtype)
            fid.update(to_unit_range(vae.decode(latents).sample.float().clamp(-1, 1)), real=False)
        for start in range(0, len(real), probe.config.batch_size):
            fid.update(to_unit_range(real[start : start + probe.config.batch_size].to(probe.device)), real=True)
        return float(fid.compute()), None


def run_probe(
    vae: nn.Module,
    train_batches: Iterable[torch.Tensor],
    heldout_batches: Iterable[torch.Tensor],
    config: ProbeConfig | None = None,
    fid_features: nn.Module | None = None,
) -> dict[str, Any]:
    """Train the probe on the latents of `train_batches` and score it on `heldout_batches` (both (N, 3, H, W)
    images in [-1, 1]). `fid_features` stands in for Inception (tests); None loads Inception when FID is asked.

    Returns `probe_loss` (held-out, mean over EVAL_SIGMAS), `probe_loss_by_sigma`, the curves, and `probe_fid`
    (None with `probe_fid_unavailable` when it cannot be computed)."""
    config = config or ProbeConfig()
    was_training = vae.training
    vae.eval()
    try:
        train = encode_posteriors(vae, train_batches)
        heldout = encode_posteriors(vae, heldout_batches, keep_images=config.fid_samples != 0)
        probe = DiffusionProbe(train, heldout, config, next(vae.parameters()).device)
        curve = probe.fit()
        by_sigma = probe.heldout_loss()
        result: dict[str, Any] = {
            "probe_loss": sum(by_sigma.values()) / len(by_sigma),
            "probe_loss_by_sigma": by_sigma,
            "probe_curve": {
                "step": curve.curve_steps,
                "heldout_loss": curve.curve_loss,
                "train_loss": [None, *curve.train_loss],  # the mean since the previous step of the curve
            },
            "probe_latent_shift": probe.shift,
            "probe_latent_scale": probe.scale,
            "probe": {**config.__dict__, "train_images": len(train.mean), "heldout_images": len(heldout.mean)},
        }
        samples = len(heldout.mean) if config.fid_samples is None else config.fid_samples
        if samples:
            result["probe_fid"], reason = probe_fid(vae, probe, samples, fid_features)
            if reason is not None:
                result["probe_fid_unavailable"] = reason
        return result
    finally:
        vae.train(was_training)
