"""Typed training configuration.

Defaults live in the dataclasses below; a YAML file overrides some of them and dotted command-line
items (``train.max_steps=20``) override the YAML. OmegaConf's structured configs reject unknown keys
and wrong types; each dataclass's ``__post_init__`` rejects impossible values. Every refusal is raised
as :class:`ConfigError` with a one-line message naming the key, before any model or data is touched.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vae_hf.errors import UserError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class ConfigError(UserError, ValueError):
    """A configuration that cannot be trained; the message is one line naming the key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


# Every key that takes one of a few names, with its names: defined once here, used by validation, the
# command line and the generated configuration reference.
CHOICES: dict[str, tuple[str, ...]] = {
    "loss.reconstruction": ("l2", "l1"),
    "loss.kl_reduction": ("mean", "sum"),
    "loss.reconstruction_reduction": ("mean", "sum"),
    "loss.disc_loss": ("lsgan", "hinge", "vanilla"),
    "loss.disc_norm": ("batch", "none"),
    "loss.disc_type": ("patchgan", "dino"),
    "optim.lr_scheduler": ("constant", "cosine", "linear"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.eval_metrics": ("psnr", "ssim", "lpips", "rfid"),
    "train.compile_mode": ("default", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "train.report_to": ("tensorboard", "wandb", "all", "none"),
    "data.mixture_stopping": ("first_exhausted", "all_exhausted"),
}
# Tensor precisions a VAE's weights can be written in (`vae-hf export --dtype`), by their torch dtype's name.
WEIGHT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _require_choice(value: str, key: str) -> None:
    choices = CHOICES[key]
    _require(value in choices, key, f"must be one of {', '.join(choices)}, got {value!r}")


# What a fresh VAE is built from; a pretrained VAE brings its own.
ARCHITECTURE_KEYS = (
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "use_quant_conv",
    "use_post_quant_conv",
)


@dataclass
class ModelConfig:
    pretrained: Optional[str] = None
    """null (train from scratch), a Hub model id, a local diffusers folder or a single-file .safetensors."""
    subfolder: Optional[str] = None
    """Subfolder of `pretrained` holding the VAE (e.g. `vae` for a whole Stable Diffusion repo)."""
    block_out_channels: List[int] = field(default_factory=lambda: [128, 256, 512, 512])
    """Channel width of each resolution level; n levels downsample by 2**(n-1) (SD: f8)."""
    layers_per_block: int = 2
    """ResNet blocks per resolution level (SD: 2)."""
    latent_channels: int = 4
    """Channels of the latent grid (SD: 4)."""
    norm_num_groups: int = 32
    """GroupNorm groups; every block width must be divisible by it."""
    use_quant_conv: bool = True
    """The 1x1 convolution between the encoder and the posterior (SD: yes; FLUX.1's VAE: no)."""
    use_post_quant_conv: bool = True
    """The 1x1 convolution between the latent and the decoder (SD: yes; FLUX.1's VAE: no)."""
    train_decoder_only: bool = False
    """Freeze encoder and quant_conv so existing latents stay valid (SD ft-MSE/ft-EMA style)."""
    sample_posterior: bool = True
    """Decode a sample of the posterior (reparameterisation, LDM); false decodes its mean."""
    decoder_noise_tau: float = 0.0
    """Latent noise for the decoder: in training it decodes z + sigma x std(z) x eps, sigma drawn per sample from
    U(0, tau), so that it learns to decode the imperfect latents a diffusion model samples (RAE, arXiv 2510.11690:
    noise_tau 0.8; l-DeTok, arXiv 2507.15856). 0: off."""
    scaling_factor: Optional[float] = None
    """The scaling_factor written into every export's config.json. null: measured (1 / latent std) at every export
    of a VAE whose encoder trains; a decoder-only fine-tune keeps the starting model's (or, when resumed, the one in
    its last export, e.g. written by `vae-hf latent-stats --write`)."""
    measure_shift_factor: bool = False
    """Also write the measured latent mean as shift_factor (SD3/Flux-style pipelines subtract it) at every export of
    a VAE whose encoder trains; false keeps the starting model's shift_factor (null for Stable Diffusion VAEs)."""

    def __post_init__(self) -> None:
        _require(len(self.block_out_channels) >= 1, "model.block_out_channels", "needs at least one level")
        for width in self.block_out_channels:
            _require(width > 0, "model.block_out_channels", f"widths must be positive, got {width}")
        _require(self.layers_per_block >= 1, "model.layers_per_block", "must be >= 1")
        _require(self.latent_channels >= 1, "model.latent_channels", "must be >= 1")
        _require(self.norm_num_groups >= 1, "model.norm_num_groups", "must be >= 1")
        _require(
            math.isfinite(self.decoder_noise_tau) and self.decoder_noise_tau >= 0,
            "model.decoder_noise_tau",
            f"must be finite and >= 0, got {self.decoder_noise_tau}",
        )
        if self.scaling_factor is not None:
            _require(
                math.isfinite(self.scaling_factor) and self.scaling_factor > 0,
                "model.scaling_factor",
                f"must be > 0 (or null: measured), got {self.scaling_factor}",
            )
        _require(
            not (self.measure_shift_factor and self.train_decoder_only),
            "model.measure_shift_factor",
            "a decoder-only fine-tune keeps the starting model's latents and their factors; remove one of the two",
        )
        if self.pretrained is None:
            for width in self.block_out_channels:
                _require(
                    width % self.norm_num_groups == 0,
                    "model.block_out_channels",
                    f"width {width} is not divisible by model.norm_num_groups={self.norm_num_groups}",
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# What a source of a mixture (one item of a `data.dataset` list) may say; the others come from `data.*`.
SOURCE_KEYS = ("dataset", "split", "image_column", "weight")


@dataclass
class DataConfig:
    dataset: Any = "assets/demo_images"
    """A Hub dataset id or a local folder of images (read with the `imagefolder` builder); or a mixture: a list of
    sources, each an id or folder or a mapping with `dataset` and optionally `split`, `image_column` (default: the
    `data.*` keys) and `weight` (default 1), interleaved at random in proportion to the weights, seeded by `seed`.
    The resolved config lists each source with all four keys."""
    split: str = "train"
    """Dataset split to train on."""
    image_column: str = "image"
    """Column holding the images. When the data has no `image` column (the default), its only image column is used
    (WebDataset shards name it by extension, e.g. `jpg`), with a warning; a column named otherwise must exist."""
    streaming: bool = False
    """Stream a Hub dataset instead of downloading it first (needs train.max_steps)."""
    resolution: int = 256
    """Side of the square training crops, in pixels."""
    center_crop: bool = True
    """Crop the centre after resizing the short side; false crops at random."""
    random_flip: bool = True
    """Flip horizontally with probability 0.5."""
    num_workers: int = 2
    """DataLoader worker processes (0 loads in the main process)."""
    persistent_workers: bool = True
    """Keep the workers alive between epochs instead of restarting them (augmentation still follows the epoch)."""
    prefetch_factor: Optional[int] = None
    """Batches each worker loads ahead (null: PyTorch's default, 2); only with num_workers > 0."""
    fast_jpeg_decode: bool = True
    """Decode training JPEGs at 1/2, 1/4 or 1/8 scale when still >= resolution (several times faster for large
    photos; the downscaling filter then differs slightly from a full decode + resize). Evaluation decodes fully."""
    max_image_pixels: int = 100_000_000
    """Images with more pixels than this are skipped unopened (a decompression-bomb guard)."""
    min_side: Optional[int] = None
    """Training leaves out images whose short side is under this many pixels (instead of upscaling them); each is
    replaced by the next usable image and counted, as unreadable files are. Null: every size is used."""
    max_aspect_ratio: Optional[float] = None
    """Training leaves out images whose long side is more than this many times the short one (a square crop
    keeps little of them); replaced and counted as with `min_side`. Null: every shape is used."""
    buckets: bool = False
    """Aspect-ratio buckets: instead of square crops, each training image is resized, keeping its aspect ratio, to
    the nearest of a list of (height, width) sizes of area about resolution², and cropped to it; every batch holds
    one size, the same on every process at every step (streams too: their rows wait in their buckets)."""
    bucket_sizes: List[List[int]] = field(default_factory=list)
    """The buckets as [height, width] pairs at data.resolution, each side a multiple of the VAE's downsampling factor
    (a train.stages stage at another resolution scales them); empty: made from data.resolution, data.bucket_step and
    data.bucket_max_aspect_ratio (SDXL's convention)."""
    bucket_step: Optional[int] = None
    """Side step of the generated buckets, in pixels; null: resolution / 16 rounded up to a multiple of the
    downsampling factor (SDXL: 64 px at 1024 px; 16 px at 256 px)."""
    bucket_max_aspect_ratio: float = 2.0
    """The generated buckets' long side is at most this many times their short side (SDXL's list: 4)."""
    bucket_eval: bool = True
    """With data.buckets, the held-out scores and the sample PNGs also see each image in its bucket (its own
    aspect ratio) instead of the square centre crop; the latent statistics keep the square crops."""
    shuffle_buffer_size: int = 1000
    """Shuffle buffer of a streaming dataset."""
    validation_split: Optional[str] = None
    """Split held out for evaluation (e.g. `validation`); null: hold out `validation_fraction`."""
    validation_fraction: float = 0.0
    """Fraction of the training split held out (seeded) for evaluation when no validation split is given."""
    validation_max_images: int = 256
    """At most this many held-out images are evaluated (a mixture shares them between its sources by weight)."""
    reference_images: List[str] = field(default_factory=list)
    """Image files used for the sample PNGs; empty takes `reference_indices` of `reference_split`."""
    reference_split: Optional[str] = None
    """Split the reference images come from (null: the training split)."""
    reference_indices: List[int] = field(default_factory=lambda: [0])
    """Indices of the reference images in `reference_split` (the reference recipe tracks image 13); of a mixture,
    its first source."""
    mixture_stopping: str = "first_exhausted"
    """When a mixture's pass over its sources (its epoch) ends: first_exhausted (when one source runs out: no row is
    seen twice) or all_exhausted (when each has run out at least once; the others start over meanwhile). A single
    dataset ignores it."""

    def __post_init__(self) -> None:
        if isinstance(self.dataset, (list, tuple, ListConfig)):
            self.dataset = mixture_sources(self.dataset, self.split, self.image_column)
        else:
            self.dataset = _source_name(self.dataset, "data.dataset")
        _require(bool(self.dataset), "data.dataset", "must name a Hub dataset id or a local folder")
        _require_choice(self.mixture_stopping, "data.mixture_stopping")
        _require(self.resolution > 0, "data.resolution", f"must be positive, got {self.resolution}")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        if self.prefetch_factor is not None:
            _require(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1 (or null)")
            _require(self.num_workers > 0, "data.prefetch_factor", "needs data.num_workers > 0")
        _require(self.max_image_pixels >= 1, "data.max_image_pixels", "must be >= 1")
        if self.min_side is not None:
            _require(self.min_side >= 1, "data.min_side", f"must be >= 1 (or null), got {self.min_side}")
        if self.max_aspect_ratio is not None:
            _require(
                self.max_aspect_ratio >= 1,
                "data.max_aspect_ratio",
                f"must be >= 1 (or null), got {self.max_aspect_ratio}",
            )
        _require(0 <= self.validation_fraction < 1, "data.validation_fraction", "must be in [0, 1)")
        _require(self.validation_max_images >= 1, "data.validation_max_images", "must be >= 1")
        _require(
            not (self.streaming and self.validation_fraction > 0),
            "data.validation_fraction",
            "cannot split a stream; name a data.validation_split instead",
        )
        _require(self.shuffle_buffer_size >= 1, "data.shuffle_buffer_size", "must be >= 1")
        for size in self.bucket_sizes:
            _require(
                len(size) == 2 and all(side >= 1 for side in size),
                "data.bucket_sizes",
                f"each bucket is [height, width] with positive sides, got {list(size)}",
            )
        if self.bucket_step is not None:
            _require(self.bucket_step >= 1, "data.bucket_step", f"must be >= 1 (or null), got {self.bucket_step}")
        _require(
            self.bucket_max_aspect_ratio >= 1,
            "data.bucket_max_aspect_ratio",
            f"must be >= 1, got {self.bucket_max_aspect_ratio}",
        )
        for index in self.reference_indices:
            _require(index >= 0, "data.reference_indices", f"indices must be >= 0, got {index}")
        _require(
            bool(self.reference_images) or bool(self.reference_indices),
            "data.reference_indices",
            "give at least one reference image (or data.reference_images)",
        )

    @property
    def is_mixture(self) -> bool:
        """Whether `dataset` is a list of sources rather than one id or folder."""
        return isinstance(self.dataset, list)


def mixture_sources(items, split: str, image_column: str) -> list[dict[str, Any]]:
    """A `data.dataset` list as sources with all of SOURCE_KEYS, the missing ones from `data.*`; each bad item is
    refused in one line naming it (`data.dataset[1].weight: ...`). Items may be OmegaConf containers or plain."""
    _require(len(items) > 0, "data.dataset", "an empty list of sources; give at least one id or folder")
    sources = []
    for index, item in enumerate(items):
        key = f"data.dataset[{index}]"
        if isinstance(item, (dict, DictConfig)):
            item = dict(item)
        else:
            item = {"dataset": _source_name(item, key)}
        unknown = sorted(set(item) - set(SOURCE_KEYS))
        allowed = ", ".join(SOURCE_KEYS)
        _require(not unknown, key, f"unknown key {', '.join(map(str, unknown))}; a source takes {allowed}")
        _require("dataset" in item, f"{key}.dataset", "missing: name a Hub dataset id or a local folder")
        source = {
            "dataset": _source_name(item["dataset"], f"{key}.dataset"),
            "split": item.get("split", split),
            "image_column": item.get("image_column", image_column),
            "weight": item.get("weight", 1.0),
        }
        for name in ("dataset", "split", "image_column"):
            _require(isinstance(source[name], str) and bool(source[name]), f"{key}.{name}", "must not be empty")
        weight = source["weight"]
        _require(
            isinstance(weight, (int, float)) and not isinstance(weight, bool),
            f"{key}.weight",
            f"must be a number, got {weight!r}",
        )
        _require(math.isfinite(weight) and weight > 0, f"{key}.weight", f"must be > 0 and finite, got {weight:g}")
        source["weight"] = float(weight)
        sources.append(source)
    return sources


def _source_name(value, key: str):
    """An id or folder as text: a number as it was written (a folder named `2024`); a yes/no or a mapping refused."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (dict, DictConfig)):
        raise ConfigError(f"{key}: one source is written as an id or folder; a list of sources is written [...]")
    _require(
        value is None or isinstance(value, str), key, f"must name a Hub dataset id or a local folder, got {value!r}"
    )
    return value


@dataclass
class LossConfig:
    reconstruction: str = "l2"
    """Pixel loss: l2 (MSE, the reference recipe) or l1 (LDM)."""
    reconstruction_weight: float = 1.0
    """Weight of the pixel loss."""
    kl_weight: float = 5e-6
    """Weight of the KL term (reference recipe 5e-6; LDM 1e-6)."""
    reconstruction_reduction: str = "mean"
    """How the pixel loss and LPIPS enter the loss: mean over every pixel (the reference recipe), or sum (LDM: the
    per-pixel loss plus perceptual_weight x LPIPS broadcast to every pixel, summed per image, averaged over the
    batch: C x H x W times the mean)."""
    learn_logvar: bool = False
    """LDM's learnable scalar log-variance: the loss takes (pixel + perceptual) / exp(logvar) + logvar per element,
    logvar trained with the VAE from 0. LDM declares it, but its optimizer leaves it out, so it stays 0 there."""
    kl_reduction: str = "mean"
    """mean: mean over all latent elements (the reference recipe); sum: summed per sample, batch mean (LDM)."""
    perceptual_weight: float = 1.0
    """Weight of LPIPS (0 switches it off)."""
    perceptual_pretrained: Optional[bool] = True
    """Pretrained VGG trunk for LPIPS: true (stop at once when its weights cannot be had), false (a random trunk,
    no download: for tests, not a real perceptual loss), or auto (pretrained when cached or downloadable, else a
    random trunk with a warning; the choice is recorded in config.yaml and metrics.json)."""
    disc_weight: float = 0.5
    """Weight of the generator's adversarial term."""
    disc_loss_weight: float = 0.5
    """Scale of the discriminator's own loss (the reference recipe multiplies it by disc_weight, 0.5)."""
    disc_start_step: int = 3750
    """Optimizer step at which the discriminator starts (reference recipe: 15000 micro-batches / 4 = 3750)."""
    disc_update_start_step: Optional[int] = None
    """Optimizer step from which the discriminator trains on detached reconstructions, while its loss reaches the
    VAE only from disc_start_step (RAE, arXiv 2510.11690: discriminator from epoch 6, its loss from epoch 8): an
    untrained discriminator switched on ruins reconstructions. null: from disc_start_step."""
    disc_loss: str = "lsgan"
    """Adversarial loss: lsgan (the reference recipe), hinge (LDM) or vanilla (non-saturating BCE)."""
    adaptive_disc_weight: bool = False
    """Scale the adversarial term by ||grad rec|| / ||grad adv|| on the decoder's last layer (LDM)."""
    adaptive_weight_max: float = 1e4
    """Clamp of the adaptive weight (LDM: 1e4)."""
    disc_channels: int = 64
    """Width of the discriminator's first layer."""
    disc_num_layers: int = 3
    """Strided layers of the PatchGAN discriminator."""
    disc_norm: str = "batch"
    """Normalisation in the discriminator: batch or none."""
    disc_type: str = "patchgan"
    """patchgan (the reference recipe's) or dino: trainable spectral-norm heads on a frozen DINO ViT's patch tokens
    (StyleGAN-T; RAE and VAR's tokenizer use it with the hinge loss and DiffAugment: loss.disc_diffaug)."""
    disc_backbone: str = "facebook/dino-vits8"
    """The dino discriminator's frozen ViT: a transformers Hub id or local folder (StyleGAN-T, RAE: DINO ViT-S)."""
    disc_image_size: int = 224
    """Side the images are resized to for the dino discriminator, a multiple of its patch size."""
    disc_diffaug: bool = False
    """DiffAugment (Zhao et al. 2020): random colour, translation and cutout on everything the discriminator sees,
    real and reconstructed alike, in both players' losses (RAE: always on with the dino discriminator)."""
    disc_lecam_weight: float = 0.0
    """Weight of LeCam regularisation in the discriminator's loss (Tseng et al. 2021; REPA-E's tokenizer losses
    offer it): its logits are pulled towards moving averages of the other side's. 0: off."""
    disc_lecam_decay: float = 0.99
    """Decay of LeCam's moving averages of the mean real and fake logits."""
    disc_r1_weight: float = 0.0
    """gamma of the R1 gradient penalty on real images, (gamma / 2) x E ||grad D(x)||^2 (Mescheder et al. 2018).
    0: off."""
    disc_r1_every_steps: int = 16
    """Lazy R1 (StyleGAN2): computed on every this many optimizer steps only, scaled by it to keep its strength."""
    eq_probability: float = 0.0
    """Equivariance regularisation (EQ-VAE, arXiv 2502.09509; its p_prior, 0.5): the probability that a batch
    decodes a transformed latent T(z), a bilinear downscale and a turn by 90, 180 or 270 degrees, and is compared
    with the image transformed alike, T(x), by every loss of the recipe (the discriminator sees T(x) too). 0: off."""
    eq_low_res_probability: float = 0.0
    """Of the other batches, the fraction that reconstructs a downscaled image (EQ-VAE's p_prior_s, 0.25): keeps
    low resolutions well reconstructed. 0: off."""
    eq_scale_min: float = 0.25
    """Smallest downscale: the latent side is drawn uniformly from ceil(eq_scale_min x h) to h - 1 positions (EQ-VAE:
    8 to 31 of 32, scales in [0.25, 1)); 1 leaves the size alone (rotation only)."""
    eq_rotate: bool = True
    """Turn equivariance batches by 90, 180 or 270 degrees as EQ-VAE does; false: scale equivariance only
    (Skorokhodov et al., arXiv 2502.14831)."""
    vf_weight: float = 0.0
    """Vision-foundation alignment (VA-VAE's VF loss, arXiv 2501.01423): weight of the loss aligning a learned 1x1
    projection of the latent with a frozen backbone's patch features (VA-VAE: 0.1; 0.5 in its first stage). 0: off."""
    vf_backbone: str = "facebook/dinov2-large"
    """The frozen backbone: a transformers vision model's Hub id or local folder (VA-VAE: DINOv2 ViT-L/14)."""
    vf_image_size: int = 224
    """Side the images are resized to for the backbone, a multiple of its patch size (224 with patch 14: a 16 x 16
    feature grid, the latent grid of an f16 VAE at 256 px)."""
    vf_cos_margin: float = 0.5
    """m1 of the marginal cosine term: positions whose cosine similarity exceeds 1 - m1 cost nothing (VA-VAE: 0.5)."""
    vf_distmat_margin: float = 0.25
    """m2 of the marginal distance-matrix term: pairwise similarities within m2 of the features' cost nothing
    (VA-VAE: 0.25)."""
    vf_adaptive_weight: bool = True
    """Scale vf_weight by ||grad rec|| / ||grad vf|| on the encoder's last layer, as VA-VAE does; false: vf_weight
    alone."""

    def __post_init__(self) -> None:
        _require_choice(self.reconstruction, "loss.reconstruction")
        _require_choice(self.kl_reduction, "loss.kl_reduction")
        _require_choice(self.reconstruction_reduction, "loss.reconstruction_reduction")
        _require_choice(self.disc_loss, "loss.disc_loss")
        _require_choice(self.disc_norm, "loss.disc_norm")
        _require_choice(self.disc_type, "loss.disc_type")
        _require(self.disc_image_size > 0, "loss.disc_image_size", f"must be positive, got {self.disc_image_size}")
        for key in ("disc_lecam_weight", "disc_r1_weight"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, f"loss.{key}", f"must be finite and >= 0, got {value}")
        _require(
            0 <= self.disc_lecam_decay < 1, "loss.disc_lecam_decay", f"must be in [0, 1), got {self.disc_lecam_decay}"
        )
        _require(self.disc_r1_every_steps >= 1, "loss.disc_r1_every_steps", "must be >= 1")
        for key in ("reconstruction_weight", "kl_weight", "perceptual_weight", "disc_weight", "disc_loss_weight"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, f"loss.{key}", f"must be finite and >= 0, got {value}")
        _require(self.disc_start_step >= 0, "loss.disc_start_step", "must be >= 0")
        if self.disc_update_start_step is not None:
            _require(
                0 <= self.disc_update_start_step <= self.disc_start_step,
                "loss.disc_update_start_step",
                f"must be in [0, loss.disc_start_step={self.disc_start_step}] (the discriminator warms up before it "
                f"plays), got {self.disc_update_start_step}",
            )
        _require(self.adaptive_weight_max > 0, "loss.adaptive_weight_max", "must be > 0")
        _require(self.disc_channels > 0, "loss.disc_channels", "must be > 0")
        _require(self.disc_num_layers >= 1, "loss.disc_num_layers", "must be >= 1")
        for key in ("eq_probability", "eq_low_res_probability"):
            value = getattr(self, key)
            _require(0 <= value <= 1, f"loss.{key}", f"is a probability, in [0, 1], got {value}")
        _require(
            math.isfinite(self.vf_weight) and self.vf_weight >= 0,
            "loss.vf_weight",
            f"must be finite and >= 0, got {self.vf_weight}",
        )
        _require(self.vf_image_size > 0, "loss.vf_image_size", f"must be positive, got {self.vf_image_size}")
        for key in ("vf_cos_margin", "vf_distmat_margin"):
            value = getattr(self, key)
            _require(0 <= value < 2, f"loss.{key}", f"must be in [0, 2) (a cosine margin), got {value}")
        _require(0 < self.eq_scale_min <= 1, "loss.eq_scale_min", f"must be in (0, 1], got {self.eq_scale_min}")
        _require(
            not (self.eq_probability > 0 and self.eq_scale_min == 1 and not self.eq_rotate),
            "loss.eq_probability",
            "with loss.eq_scale_min=1 and loss.eq_rotate=false no transform is left; lower eq_scale_min or rotate",
        )

    @property
    def uses_discriminator(self) -> bool:
        return self.disc_weight > 0

    @property
    def disc_train_start_step(self) -> int:
        """The optimizer step from which the discriminator trains (its warm-up start, else when it plays)."""
        return self.disc_start_step if self.disc_update_start_step is None else self.disc_update_start_step


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """VAE learning rate (the reference recipe: 1e-5)."""
    disc_lr: Optional[float] = None
    """Discriminator learning rate (null: same as lr)."""
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    """Adam betas for both players (the reference recipe: 0.5, 0.999)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); 0 is plain Adam."""
    eps: float = 1e-8
    """Adam epsilon."""
    fused: bool = True
    """Fused Adam kernels (CUDA and CPU); false: the multi-tensor (foreach) implementation."""
    max_grad_norm: Optional[float] = None
    """Clip each player's gradient norm to this (null: no clipping)."""
    lr_scheduler: str = "constant"
    """constant, cosine or linear (decay to 0 at the last step), each after `warmup_steps`."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0."""

    def __post_init__(self) -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        if self.disc_lr is not None:
            _require(
                math.isfinite(self.disc_lr) and self.disc_lr > 0, "optim.disc_lr", f"must be > 0, got {self.disc_lr}"
            )
        _require(len(self.betas) == 2, "optim.betas", f"needs two values, got {list(self.betas)}")
        for beta in self.betas:
            _require(0 <= beta < 1, "optim.betas", f"each beta must be in [0, 1), got {beta}")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(self.eps > 0, "optim.eps", "must be > 0")
        if self.max_grad_norm is not None:
            _require(self.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0 (or null)")
        _require_choice(self.lr_scheduler, "optim.lr_scheduler")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclass
class StageConfig:
    """One stage of `train.stages`: the settings that hold until `until_step`; null keeps the run's own."""

    until_step: int = 0
    """The optimizer step this stage ends at (the next one, or the run's end, starts there)."""
    resolution: Optional[int] = None
    """data.resolution in this stage (and the area of its buckets); null: data.resolution."""
    batch_size: Optional[int] = None
    """train.batch_size in this stage; null: train.batch_size."""
    gradient_accumulation_steps: Optional[int] = None
    """train.gradient_accumulation_steps in this stage; null: train.gradient_accumulation_steps."""


@dataclass
class TrainConfig:
    batch_size: int = 4
    """Images per process per micro-batch."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimizer step."""
    num_epochs: int = 20
    """Passes over the data (ignored when max_steps or stages are set)."""
    max_steps: Optional[int] = None
    """Optimizer steps to train; wins over num_epochs when set."""
    stages: List[StageConfig] = field(default_factory=list)
    """Resolution stages: a list of {until_step, resolution, batch_size, gradient_accumulation_steps}, each holding
    from the previous stage's until_step (or step 0) to its own, e.g. 256 px, then a shorter 512 px fine-tune with a
    smaller batch. The run ends at train.max_steps when set (the last stage then holds until it), else at the last
    until_step; train.num_epochs is ignored. The loader, the accumulation and the memory follow the
    stage; the learning-rate schedules and every *_step key count optimizer steps over the whole run; samples and
    held-out scores stay at data.resolution, so that they compare across stages. Empty: one stage."""
    mixed_precision: str = "no"
    """no, fp16 (autocast + grad scaler) or bf16 (autocast); weights stay fp32."""
    eval_every_steps: Optional[int] = None
    """Evaluate on the held-out set every this many steps (and at start and end); null: start and end only."""
    eval_metrics: List[str] = field(default_factory=lambda: ["psnr", "ssim", "lpips", "rfid"])
    """Metrics of the held-out evaluation: psnr, ssim, lpips, rfid."""
    eval_diffusability: bool = True
    """With each held-out evaluation, also measure how learnable the latents are (the cheap measures of `vae-hf
    diffusability`: eval/latent_hf_energy, eval/equivariance_psnr_x0.5, eval/noise_psnr_0.5, ...) on the main
    process, and write <output_dir>/diffusability/ (a table and the spectrum chart the model card shows)."""
    diffusability_probe_steps: Optional[int] = None
    """With eval_diffusability, also train the diffusion probe for this many steps on the held-out latents at each
    evaluation and log eval/probe_loss (null: no probe; it costs far more than the other measures)."""
    diffusability_probe_width: int = 64
    """Channels of the probe UNet's first level."""
    sample_every_steps: int = 500
    """Write an original | reconstruction PNG every this many steps (and at step 1)."""
    log_every_steps: int = 10
    """Log the loss breakdown every this many steps (host syncs happen only then)."""
    checkpoint_every_steps: Optional[int] = None
    """Save the full training state every this many steps (null: only at epoch ends, the end and on a stop)."""
    checkpoint_every_minutes: float = 10.0
    """At an epoch's end, save the full state only once this many minutes have passed since the last save (0: at
    every epoch's end). The VAE itself is exported to vae/ at every epoch's end regardless."""
    checkpoints_total_limit: Optional[int] = 3
    """Keep the newest this many checkpoints (null: keep all; each holds the models and both optimizers)."""
    resume_from: Optional[str] = None
    """null, latest, or a checkpoint folder."""
    overwrite_output_dir: bool = False
    """Start a new run in an output_dir that holds another run's checkpoints, deleting that run's checkpoints/,
    vae/, vae_ema/, samples/, logs/, diffusability/, metrics.json and config.yaml first. False: such a run is refused
    (continue the old run with resume_from=latest, or choose another output_dir), so that two runs never share
    checkpoints."""
    max_nonfinite_steps: int = 25
    """Consecutive steps with non-finite gradients (skipped) after which the run saves and stops."""
    channels_last: bool = False
    """Keep images and convolution weights in NHWC memory order (faster convolutions on tensor cores)."""
    allow_tf32: bool = True
    """Let CUDA matmuls and cuDNN convolutions use TF32 on Ampere and newer (no effect elsewhere)."""
    compile: bool = False
    """torch.compile the VAE's encoder and decoder, LPIPS and the discriminator (the first steps pay for it)."""
    compile_mode: str = "default"
    """Inductor's mode: default, max-autotune or max-autotune-no-cudagraphs (reduce-overhead's CUDA graphs would
    overwrite outputs the step still holds, so it is not offered)."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor (generated kernels); aot_eager or eager to isolate a compilation problem."""
    gradient_checkpointing: bool = False
    """Recompute the VAE's activations in the backward pass: less memory, about a third more compute."""
    ema_decay: Optional[float] = None
    """Decay of an EMA of the VAE weights, exported to <output_dir>/vae_ema (null: no EMA)."""
    push_to_hub: bool = False
    """Upload <output_dir>/vae (with a model card) to `hub_repo_id` at the end of the run."""
    hub_repo_id: Optional[str] = None
    """OWNER/NAME of the Hub model repo to push to (created if needed)."""
    hub_private: bool = False
    """Create the Hub repo private."""
    hub_push_every_export: bool = False
    """With push_to_hub, also push at every export of vae/ (each epoch's end), not only at the end."""
    report_to: str = "tensorboard"
    """Tracker: tensorboard, wandb, all, or none."""
    tracker_project: str = "vae-hf"
    """Project name given to the trackers."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
        _require(self.num_epochs >= 1, "train.num_epochs", "must be >= 1")
        if self.max_steps is not None:
            _require(self.max_steps >= 1, "train.max_steps", "must be >= 1 (or null)")
        self._require_stages()
        _require_choice(self.mixed_precision, "train.mixed_precision")
        _require(self.sample_every_steps >= 1, "train.sample_every_steps", "must be >= 1")
        if self.eval_every_steps is not None:
            _require(self.eval_every_steps >= 1, "train.eval_every_steps", "must be >= 1 (or null)")
        for name in self.eval_metrics:
            _require_choice(name, "train.eval_metrics")
        if self.diffusability_probe_steps is not None:
            _require(self.diffusability_probe_steps >= 1, "train.diffusability_probe_steps", "must be >= 1 (or null)")
        _require(self.diffusability_probe_width >= 4, "train.diffusability_probe_width", "must be >= 4")
        _require(self.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
        if self.checkpoint_every_steps is not None:
            _require(self.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be >= 1 (or null)")
        _require(
            math.isfinite(self.checkpoint_every_minutes) and self.checkpoint_every_minutes >= 0,
            "train.checkpoint_every_minutes",
            f"must be >= 0, got {self.checkpoint_every_minutes}",
        )
        if self.checkpoints_total_limit is not None:
            _require(self.checkpoints_total_limit >= 1, "train.checkpoints_total_limit", "must be >= 1 (or null)")
        _require_choice(self.compile_mode, "train.compile_mode")
        _require_choice(self.compile_backend, "train.compile_backend")
        _require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
        if self.ema_decay is not None:
            _require(0 < self.ema_decay < 1, "train.ema_decay", "must be in (0, 1) (or null)")
        if self.push_to_hub:
            _require(
                bool(self.hub_repo_id) and "/" in self.hub_repo_id,
                "train.hub_repo_id",
                f"must be OWNER/NAME when train.push_to_hub=true, got {self.hub_repo_id!r}",
            )
        _require_choice(self.report_to, "train.report_to")
        if self.report_to in ("wandb", "all"):
            _require(
                importlib.util.find_spec("wandb") is not None,
                "train.report_to",
                "wandb is not installed (pip install 'vae-hf[wandb]'), or choose tensorboard",
            )

    def _require_stages(self) -> None:
        previous = 0
        for number, stage in enumerate(self.stages):
            key = f"train.stages[{number}]"
            _require(
                stage.until_step > previous,
                f"{key}.until_step",
                f"must be after the previous stage's end (step {previous}), got {stage.until_step}",
            )
            previous = stage.until_step
            for name in ("resolution", "batch_size", "gradient_accumulation_steps"):
                value = getattr(stage, name)
                _require(value is None or value >= 1, f"{key}.{name}", f"must be >= 1 (or null), got {value}")


@dataclass
class Config:
    seed: int = 1111
    """Seed of every random generator (the reference recipe: 1111)."""
    output_dir: str = "outputs/run"
    """Folder for config.yaml, samples/, checkpoints/, vae/ and logs/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(bool(self.output_dir), "output_dir", "must not be empty")
        self._require_consistent()
        if self.model.pretrained is None:
            factor = self.model.downsample_factor
            _require(
                self.data.resolution % factor == 0,
                "data.resolution",
                f"{self.data.resolution} is not divisible by the VAE's downsampling factor {factor}",
            )
        if self.model.pretrained is None:
            self._require_whole_latents(self.model.downsample_factor)
        if self.data.streaming:
            _require(
                self.train.max_steps is not None or bool(self.train.stages),
                "train.max_steps",
                "must be set when data.streaming=true",
            )
            _require(
                not self.train.stages,
                "train.stages",
                "need map-style data (a stream's position does not carry over to another batch size); "
                "set data.streaming=false",
            )

    def _require_whole_latents(self, factor: int) -> None:
        """Stage resolutions and bucket sides must be multiples of the downsampling factor (whole latent cells)."""
        for number, stage in enumerate(self.train.stages):
            if stage.resolution is not None:
                _require(
                    stage.resolution % factor == 0,
                    f"train.stages[{number}].resolution",
                    f"{stage.resolution} is not divisible by the VAE's downsampling factor {factor}",
                )
        for size in self.data.bucket_sizes:
            _require(
                all(side % factor == 0 for side in size),
                "data.bucket_sizes",
                f"{list(size)}: both sides must be multiples of the VAE's downsampling factor {factor}",
            )
        if self.data.bucket_step is not None:
            _require(
                self.data.bucket_step % factor == 0,
                "data.bucket_step",
                f"{self.data.bucket_step} is not a multiple of the VAE's downsampling factor {factor}",
            )

    def _require_consistent(self) -> None:
        """Keys that mean nothing, or fail hours later, given the others: refused now, in one line."""
        loss, train, data = self.loss, self.train, self.data
        _require(
            not (loss.adaptive_disc_weight and loss.disc_weight == 0),
            "loss.adaptive_disc_weight",
            "scales the adversarial term, but loss.disc_weight is 0 (no discriminator); set one or the other",
        )
        _require(
            not (loss.disc_update_start_step is not None and loss.disc_weight == 0),
            "loss.disc_update_start_step",
            "warms up a discriminator, but loss.disc_weight is 0 (no discriminator); set one or the other",
        )
        _require(
            not (train.overwrite_output_dir and train.resume_from == "latest"),
            "train.overwrite_output_dir",
            "starts over and train.resume_from=latest continues the run in output_dir; choose one",
        )
        if train.overwrite_output_dir and train.resume_from is not None:
            _require(
                not Path(train.resume_from).expanduser().resolve().is_relative_to(Path(self.output_dir).resolve()),
                "train.overwrite_output_dir",
                f"would delete the checkpoint train.resume_from={train.resume_from} resumes from; choose one",
            )
        _require(
            not (train.hub_push_every_export and not train.push_to_hub),
            "train.hub_push_every_export",
            "needs train.push_to_hub=true (and train.hub_repo_id)",
        )
        held_out = data.validation_split is not None or data.validation_fraction > 0
        _require(
            train.eval_every_steps is None or held_out,
            "train.eval_every_steps",
            "needs held-out images: set data.validation_fraction (e.g. 0.01) or data.validation_split",
        )
        _require(
            train.diffusability_probe_steps is None or train.eval_diffusability,
            "train.diffusability_probe_steps",
            "runs with the diffusability measures; set train.eval_diffusability=true or remove it",
        )
        _require(
            train.diffusability_probe_steps is None or held_out,
            "train.diffusability_probe_steps",
            "needs held-out images: set data.validation_fraction (e.g. 0.01) or data.validation_split",
        )
        self._require_room_to_downscale()
        if loss.disc_weight == 0:
            for key, on in (
                ("disc_type", loss.disc_type != "patchgan"),
                ("disc_diffaug", loss.disc_diffaug),
                ("disc_lecam_weight", loss.disc_lecam_weight > 0),
                ("disc_r1_weight", loss.disc_r1_weight > 0),
            ):
                _require(
                    not on,
                    f"loss.{key}",
                    "shapes a discriminator, but loss.disc_weight is 0 (none); set one or the other",
                )
        if loss.vf_weight > 0 or (loss.disc_weight > 0 and loss.disc_type == "dino"):
            _require(
                importlib.util.find_spec("transformers") is not None,
                "loss.vf_weight" if loss.vf_weight > 0 else "loss.disc_type",
                "the backbone needs transformers (pip install 'vae-hf[vision]')",
            )
        if loss.vf_weight > 0:
            _require(
                not self.model.train_decoder_only,
                "loss.vf_weight",
                "aligns the latents, but model.train_decoder_only freezes the encoder that makes them; choose one",
            )
        if self.model.pretrained is not None:
            defaults = ModelConfig()
            for key in ARCHITECTURE_KEYS:
                _require(
                    getattr(self.model, key) == getattr(defaults, key),
                    f"model.{key}",
                    f"has no effect with model.pretrained={self.model.pretrained} (the architecture is the "
                    "pretrained VAE's); remove it",
                )

    def _require_room_to_downscale(self) -> None:
        """Downscaled batches (EQ-VAE) must still fit LPIPS's VGG (16 px: four poolings) and the PatchGAN (two
        logits across after its strided layers; the dino discriminator resizes its input itself)."""
        loss = self.loss
        if loss.eq_probability == 0 and loss.eq_low_res_probability == 0 or loss.eq_scale_min == 1:
            return
        smallest = math.ceil(loss.eq_scale_min * self.data.resolution)
        needed = max(
            16 if loss.perceptual_weight > 0 else 1,
            2 ** (loss.disc_num_layers + 1) if loss.disc_weight > 0 and loss.disc_type == "patchgan" else 1,
        )
        _require(
            smallest >= needed,
            "loss.eq_scale_min",
            f"downscales data.resolution={self.data.resolution} to {smallest} px, but LPIPS and the discriminator need "
            f">= {needed} px; raise loss.eq_scale_min to {needed / self.data.resolution:g}",
        )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (the demo recipe when None), then dotted overrides."""
    path = Path(path) if path is not None else DEMO_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        schema = OmegaConf.structured(Config)
        from_file = _choices_as_typed(read_yaml(path))
        from_cli = _choices_as_typed(parse_overrides(list(overrides or []), schema))
        merged = OmegaConf.merge(schema, from_file, from_cli)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(str(error).splitlines()[0]) from None
    return config


def read_yaml(path: Path) -> DictConfig:
    """The recipe file as a mapping; a file YAML cannot parse, or whose top level is not a mapping, is refused in
    one line naming the file and the line."""
    try:
        values = OmegaConf.load(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        if mark is None:
            raise ConfigError(f"{path}: {_yaml_problem(error)}") from None
        lines = path.read_text(errors="replace").splitlines() + [""]
        tab = " (a tab: YAML indents with spaces)" if "\t" in lines[min(mark.line, len(lines) - 1)] else ""
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"{where}: {_yaml_problem(error)}{tab}") from None
    if not isinstance(values, DictConfig):
        kind = "list" if isinstance(values, ListConfig) else type(values).__name__
        raise ConfigError(f"{path}: the top level must be keys with values (seed:, model:, train:, ...), not a {kind}")
    return values


def _yaml_problem(error: yaml.YAMLError, context: bool = True) -> str:
    """PyYAML's several-line report as one line: what is wrong, and (with `context`) what it was reading when that
    began on an earlier line."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if not context:
        return problem
    reading, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    problem_mark = getattr(error, "problem_mark", None)
    if reading and context_mark is not None and problem_mark is not None and context_mark.line < problem_mark.line:
        return f"{problem} ({reading} that starts on line {context_mark.line + 1})"
    return problem


def parse_overrides(items: list[str], schema: DictConfig) -> DictConfig:
    """`key=value` items as a config; each bad item is refused naming it (OmegaConf reads a bare key as null)."""
    for item in items:
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"{item}: no value given; write {item}=VALUE (or {item}=null for none)")
        if not key.strip():
            raise ConfigError(f"{item}: no key given; an override is written key=value")
        if _is_list_key(schema, key) and not value.strip().startswith("[") and value.strip() != "null":
            raise ConfigError(f"{key}: a list is written in brackets: {key}=[{value}]")
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as error:
            problem = _yaml_problem(error, context=False)
            raise ConfigError(f"{item}: the value does not parse as YAML: {problem}") from None
    return OmegaConf.from_dotlist(items)


def _is_list_key(schema: DictConfig, key: str) -> bool:
    try:
        return isinstance(OmegaConf.select(schema, key, default=None), ListConfig)
    except OmegaConfBaseException:  # a key that does not exist: the merge names it
        return False


def _choices_as_typed(values):
    """Choice values as the user typed them, and `auto` for the LPIPS trunk (None until training decides).

    YAML 1.1 (OmegaConf's YAML, on the command line too) reads `no`, `off`, `false` as False and `yes`, `on`,
    `true` as True, so `train.mixed_precision=no` (Accelerate's own spelling) would arrive as the string 'False'.
    A boolean where a choice key expects a name is read back as the choice it spells (False as `no`); any other
    boolean is refused, naming the choices."""
    if not isinstance(values, DictConfig):
        return values
    if OmegaConf.select(values, "loss.perceptual_pretrained", default=None) == "auto":
        OmegaConf.update(values, "loss.perceptual_pretrained", None, merge=False)  # decided when training starts
    for key, choices in CHOICES.items():
        value = OmegaConf.select(values, key, default=None, throw_on_missing=False)
        if isinstance(value, bool):
            if value is False and "no" in choices:
                OmegaConf.update(values, key, "no", merge=False)
            else:
                raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got a yes/no value ({value})")
    return values


def _one_line(error: OmegaConfBaseException) -> str:
    """OmegaConf's messages span several lines; keep the reason and name the key."""
    reason = str(error).splitlines()[0].strip()
    key = getattr(error, "full_key", None)
    cause = error.__cause__
    if isinstance(cause, ConfigError):
        return str(cause)
    return f"{key}: {reason}" if key else reason


def to_dict(config: Config) -> dict[str, Any]:
    return asdict(config)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def flat_hparams(config: Config) -> dict[str, Any]:
    """Scalars only, with dotted keys, as trackers such as TensorBoard want them."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                visit(f"{prefix}.{key}" if prefix else key, inner)
        elif value is None or isinstance(value, (list, tuple)):
            flat[prefix] = str(value)
        else:
            flat[prefix] = value

    visit("", to_dict(config))
    return flat
