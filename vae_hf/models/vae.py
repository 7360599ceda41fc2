"""The VAE: diffusers' AutoencoderKL, built from config or loaded, and a training view of it.

We write no architecture of our own: AutoencoderKL is the LDM first-stage model that Stable Diffusion
pipelines load, so whatever we train drops straight into them.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from vae_hf.config import ModelConfig
from vae_hf.errors import UserError
from vae_hf.io.single_file import load_single_file
from vae_hf.models.latents import LOW_RESOLUTION, PLAIN, BatchTransform, noisy_latents
from vae_hf.offline import OfflineError, hub_offline_mode, is_local_path, require_cached_model, require_hub


class ModelLoadError(UserError, RuntimeError):
    """A VAE could not be loaded; the message names the option it came from and says why in one line."""


def build_vae(config: ModelConfig, resolution: int) -> AutoencoderKL:
    """A fresh AutoencoderKL of the configured shape, or the one `config.pretrained` names."""
    if config.pretrained is not None:
        vae = load_vae(config.pretrained, config.subfolder)
    else:
        levels = len(config.block_out_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_num_groups,
            sample_size=resolution,
            use_quant_conv=config.use_quant_conv,
            use_post_quant_conv=config.use_post_quant_conv,
        )
    if config.train_decoder_only:
        freeze_encoder(vae)
    return vae


def load_vae(source: str, subfolder: str | None = None, option: str = "model.pretrained") -> AutoencoderKL:
    """Load from a local diffusers folder, a single-file .safetensors, or a Hub model id; errors name `option`
    (the config key or command-line flag the source came from)."""
    path = Path(source).expanduser()
    try:
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise ModelLoadError(f"{option}: no such file {path}")
            # Our own reader, not from_single_file: that one fetches a reference config from the Hub, and a
            # SingleFileError (a ValueError) becomes a one-line ModelLoadError below.
            return load_single_file(path)
        if path.is_dir():
            if subfolder is None and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
                subfolder = "vae"  # a whole pipeline folder: take its VAE
            return AutoencoderKL.from_pretrained(str(path), subfolder=subfolder)
        if path.exists():
            raise ModelLoadError(f"{option}: {source} is neither a diffusers folder nor a .safetensors file")
        if is_local_path(source):
            raise ModelLoadError(f"{option}: no such file or folder {source}")
        require_hub(f"{option}={source}", "Give a local folder, or pre-download it and set HF_HUB_OFFLINE=1.")
        if hub_offline_mode():  # diffusers would say only that the repo has no config.json
            require_cached_model(source, subfolder, option)
        with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub deprecated; not the user's doing
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return AutoencoderKL.from_pretrained(source, subfolder=subfolder)
    except (ModelLoadError, OfflineError):
        raise
    except (OSError, ValueError, EnvironmentError) as error:
        raise ModelLoadError(f"{option}: cannot load {source}: {str(error).splitlines()[0]}") from None


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Freeze what produces latents (encoder, quant_conv), as stabilityai's ft-MSE/ft-EMA tuning did."""
    vae.encoder.requires_grad_(False)
    if vae.quant_conv is not None:
        vae.quant_conv.requires_grad_(False)


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent pixel: each encoder level after the first halves the resolution."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decoder_last_layer(vae: AutoencoderKL) -> torch.Tensor:
    """The weight LDM's adaptive discriminator weight is measured on."""
    return vae.decoder.conv_out.weight


def encoder_last_layer(vae: AutoencoderKL) -> torch.Tensor:
    """The weight VA-VAE's adaptive VF weight is measured on."""
    return vae.encoder.conv_out.weight


def encoder_fingerprint(vae: AutoencoderKL) -> str:
    """SHA-256 of the encoder's and quant_conv's weights: the part that maps images to latents."""
    digest = hashlib.sha256()
    parts = [vae.encoder] + ([vae.quant_conv] if vae.quant_conv is not None else [])
    for part in parts:
        for name, value in sorted(part.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class VAEOutput(NamedTuple):
    reconstructions: torch.Tensor
    posterior: DiagonalGaussianDistribution
    targets: torch.Tensor  # what the reconstructions are compared with: the images, or their transform
    latents: torch.Tensor  # the posterior's sample (or mean), before any transform or noise
    inputs: torch.Tensor  # the images encoded (downscaled in a low-resolution batch)
    projected: torch.Tensor | None  # the latents through the VF projection (loss.vf_weight), else None


class VAETrainingModule(nn.Module):
    """Encode, sample the posterior, decode, in one `forward`.

    AutoencoderKL's own `forward` hides the posterior, and calling `encode`/`decode` on the unwrapped
    model would bypass DistributedDataParallel's gradient synchronisation. Wrapping them in one
    `forward` lets the trainer call the prepared (DDP) module and still see the posterior for the KL.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        sample_posterior: bool = True,
        learn_logvar: bool = False,
        noise_tau: float = 0.0,
        vf_features: int | None = None,
    ):
        super().__init__()
        self.vae = vae
        self.sample_posterior = sample_posterior
        self.noise_tau = noise_tau
        # VA-VAE's projection of the latent to a backbone's feature width (`loss.vf_weight`): trained and checkpointed
        # with the VAE, not part of the exported AutoencoderKL
        self.vf_projection = (
            nn.Conv2d(vae.config.latent_channels, vf_features, kernel_size=1) if vf_features is not None else None
        )
        # LDM's learnable log-variance of the reconstruction (`loss.learn_logvar`): trained and checkpointed with
        # the VAE, not part of the exported AutoencoderKL
        self.logvar = nn.Parameter(torch.zeros(())) if learn_logvar else None
        self.encoder_frozen = not any(p.requires_grad for p in vae.encoder.parameters())

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None, transform: BatchTransform = PLAIN
    ) -> VAEOutput:
        """`transform` is this batch's spatial transform (`vae_hf.models.latents`); the posterior noise, then
        the decoder's latent noise, are drawn from `generator` in that order."""
        factor = self.downsample_factor
        if transform.kind == LOW_RESOLUTION:
            images = transform.apply(images, factor)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        decoded, targets = latents, images
        if transform.kind is not None and transform.kind != LOW_RESOLUTION:
            decoded, targets = transform.apply(latents), transform.apply(images, factor)
        if self.noise_tau > 0:
            decoded = noisy_latents(decoded, self.noise_tau, generator)
        reconstructions = self.vae.decode(decoded).sample
        projected = self.vf_projection(latents) if self.vf_projection is not None else None
        return VAEOutput(reconstructions, posterior, targets, latents, images, projected)

    @property
    def downsample_factor(self) -> int:
        return downsampling_factor(self.vae)
