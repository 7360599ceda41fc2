"""Using a VAE: reconstruct images, interpolate between two, and keep latents as safetensors.

Everything here runs the VAE in eval mode under `torch.no_grad` and decodes the posterior *mean*: a
reconstruction is then a deterministic picture of the model, not of one noise draw.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from vae_hf.data.decode import DECODE_ERRORS, decode_image
from vae_hf.data.transforms import ImageTransform
from vae_hf.errors import UserError
from vae_hf.io.files import plain_permissions
from vae_hf.models.vae import downsampling_factor

logger = logging.getLogger(__name__)

# Every file suffix Pillow can open; other files in an input folder (captions, JSON) are not inputs.
IMAGE_SUFFIXES = frozenset(suffix.lower() for suffix in Image.registered_extensions())
LATENT_FORMAT = "vae-hf/posterior-v1"
FALLBACK_RESOLUTION = 256
# Images with more pixels than this are encoded and decoded in tiles unless told otherwise (--tile/--no-tile):
# the mid-block attention runs over every latent position at once, so its time and memory grow with the square
# of the image's area (a 2560 x 1600 photograph had not finished after 5 minutes on 2 CPU cores).
AUTO_TILE_PIXELS = 1024 * 1024
AUTO_TILE_SIDE = 512


class InferenceError(UserError, RuntimeError):
    """An input or output of reconstruct/interpolate cannot be used; the message says why in one line."""


def default_resolution(vae: AutoencoderKL) -> int:
    """The model's training size (`sample_size`), or 256 when its config has none."""
    size = vae.config.sample_size
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else FALLBACK_RESOLUTION


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare(vae: AutoencoderKL) -> AutoencoderKL:
    """The VAE on the inference device, in eval mode, weights frozen."""
    return vae.to(inference_device()).eval().requires_grad_(False)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (1, 3, H, W) batch in [-1, 1]."""
    return TF.pil_to_tensor(image).float().div(127.5).sub(1.0).unsqueeze(0)


def to_image(pixels: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [-1, 1] as an 8-bit RGB PIL image."""
    values = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(values.permute(1, 2, 0).cpu().numpy())


def crop_to_multiple(image: Image.Image, factor: int) -> Image.Image:
    """Centre-crop each side down to a multiple of `factor`: the encoder's strided convolutions
    need it, and a crop of at most factor - 1 pixels loses less than resizing would."""
    width, height = (side - side % factor for side in image.size)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def configure_tiling(vae: AutoencoderKL, tile_size: int) -> None:
    """Switch on diffusers' tiled encode/decode with square tiles of `tile_size` pixels.

    diffusers tiles at `tile_sample_min_size` pixels (`tile_latent_min_size` in latents), steps by 3/4
    of a tile and blends and crops a 1/4 overlap. The output has the input's size only when a quarter
    tile is a whole number of latent pixels, so the tile size must be a multiple of 4 x the factor.
    """
    factor = downsampling_factor(vae)
    if tile_size <= 0 or tile_size % (4 * factor):
        raise InferenceError(
            f"--resolution: the tile size must be a positive multiple of {4 * factor} (4 x the VAE's "
            f"downsampling factor {factor}), got {tile_size}"
        )
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_size
    vae.tile_latent_min_size = tile_size // factor
    vae.tile_overlap_factor = 0.25  # what the arithmetic above assumes


def auto_tile_size(vae: AutoencoderKL) -> int:
    """The tile size for images above AUTO_TILE_PIXELS: the training size or 512 px, whichever is larger,
    rounded up to a multiple of 4 x the downsampling factor (see `configure_tiling`)."""
    step = 4 * downsampling_factor(vae)
    side = max(default_resolution(vae), AUTO_TILE_SIDE)
    return math.ceil(side / step) * step


def tile_count(vae: AutoencoderKL, height: int, width: int) -> int:
    """How many tiles diffusers' tiled encode cuts an image into (tiles step by 3/4 of their size)."""
    stride = int(vae.tile_sample_min_size * (1 - vae.tile_overlap_factor))
    return math.ceil(height / stride) * math.ceil(width / stride)


@torch.no_grad()
def encode(vae: AutoencoderKL, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents.to(vae.device, vae.dtype)).sample


# ---------------------------------------------------------------------------------------------------
# Latents as safetensors
# ---------------------------------------------------------------------------------------------------


def latent_factors(vae: AutoencoderKL) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the model config; a missing shift is 0."""
    return float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)


def posterior_latents(posterior: DiagonalGaussianDistribution) -> dict[str, torch.Tensor]:
    """The posterior of one image as unscaled `mean` and `logvar`, each (C, h, w), float32, on the CPU.

    We keep the distribution rather than scaled samples: LDM trains its diffusion model on a fresh
    sample of the posterior each time it sees an image, which one stored draw would not allow.
    """
    return {
        "mean": posterior.mean[0].float().cpu().contiguous(),
        "logvar": posterior.logvar[0].float().cpu().contiguous(),
    }


def latent_metadata(vae: AutoencoderKL, **extra: object) -> dict[str, str]:
    """What a reader needs to turn stored posteriors into diffusion latents (see `diffusion_latents`)."""
    scaling_factor, shift_factor = latent_factors(vae)
    metadata = {
        "format": LATENT_FORMAT,
        "scaling_factor": repr(scaling_factor),
        "shift_factor": repr(shift_factor),
        "downsampling_factor": str(downsampling_factor(vae)),
    }
    metadata.update({key: str(value) for key, value in extra.items()})
    return metadata


def save_latents(path: Path, latents: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write named tensors and string metadata to one safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in latents.items()}
    save_file(tensors, str(path), metadata={str(key): str(value) for key, value in metadata.items()})
    return plain_permissions(path)


def load_latents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file written by `save_latents` (no pickle involved)."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"no such latents file {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as error:
        raise InferenceError(f"cannot read latents {path}: {str(error).splitlines()[0]}") from None


def diffusion_latents(
    latents: Mapping[str, torch.Tensor], metadata: Mapping[str, str], generator: torch.Generator | None = None
) -> torch.Tensor:
    """A posterior sample, shifted and scaled as a diffusion model expects: (z - shift) * scale."""
    mean, logvar = latents["mean"], latents["logvar"]
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    sample = mean + torch.exp(0.5 * logvar) * noise
    return (sample - float(metadata["shift_factor"])) * float(metadata["scaling_factor"])


# ---------------------------------------------------------------------------------------------------
# Reconstruct
# ---------------------------------------------------------------------------------------------------


def find_images(source: Path, exclude: Path | None = None) -> list[Path]:
    """`source` itself, or every image file below it (sorted, hidden files and `exclude` left out)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise InferenceError(f"--input: no such file or folder {source}")
    found = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue  # the output folder inside the input folder: never reconstruct our own outputs
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
    return found


def output_names(relatives: list[Path]) -> list[Path]:
    """`a/b.jpg` -> `a/b.png`; where two inputs would share a name (`b.jpg`, `b.png`) keep the suffix."""
    stems = [relative.with_suffix("") for relative in relatives]
    return [
        stem.with_name(f"{relative.name}.png") if stems.count(stem) > 1 else stem.with_suffix(".png")
        for stem, relative in zip(stems, relatives, strict=True)
    ]


@dataclass
class ReconstructionSummary:
    written: int = 0
    cropped: int = 0
    skipped: int = 0
    tiled: int = 0


@dataclass
class Reconstructor:
    """Reconstructs one image file at a time, each at its own size."""

    vae: AutoencoderKL
    out_dir: Path
    save_latents: bool = False
    model_name: str = ""
    auto_tile: bool = False
    """Tile only the images above AUTO_TILE_PIXELS (tiling configured beforehand); else as the VAE is set."""

    def __call__(self, path: Path, name: Path, summary: ReconstructionSummary) -> int:
        """Reconstruct one file; returns the number of tiles it was cut into (1: whole, 0: skipped)."""
        image = self._read(path, summary)
        if image is None:
            return 0
        if self.auto_tile:
            self.vae.use_tiling = image.width * image.height > AUTO_TILE_PIXELS
        posterior = encode(self.vae, to_pixels(image))
        reconstruction = to_image(decode(self.vae, posterior.mode())[0])
        target = self.out_dir / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            reconstruction.save(target, format="PNG")
            if self.save_latents:
                metadata = latent_metadata(self.vae, model=self.model_name, source=name.with_suffix(""))
                save_latents(target.with_suffix(".safetensors"), posterior_latents(posterior), metadata)
        except OSError as error:
            raise InferenceError(f"cannot write {target}: {error.strerror or error}") from None
        summary.written += 1
        tiled = self.vae.use_tiling and max(image.size) > self.vae.tile_sample_min_size
        return tile_count(self.vae, image.height, image.width) if tiled else 1

    def _read(self, path: Path, summary: ReconstructionSummary) -> Image.Image | None:
        """The image cropped to a multiple of the downsampling factor; None (counted) when unusable."""
        factor = downsampling_factor(self.vae)
        try:
            image = decode_image(path)
        except DECODE_ERRORS as error:
            logger.warning("skipping unreadable image %s: %s", path, str(error).splitlines()[0] or type(error).__name__)
            summary.skipped += 1
            return None
        if min(image.size) < factor:
            logger.warning("skipping %s: %dx%d is smaller than %d px", path, *image.size, factor)
            summary.skipped += 1
            return None
        cropped = crop_to_multiple(image, factor)
        if cropped.size != image.size:
            logger.info("%s: cropped %dx%d to %dx%d", path, *image.size, *cropped.size)
            summary.cropped += 1
        return cropped


def reconstruct_images(
    vae: AutoencoderKL,
    source: Path,
    out_dir: Path,
    save_latents: bool = False,
    model_name: str = "",
    auto_tile: bool = False,
) -> ReconstructionSummary:
    """Reconstruct `source` (a file, or a folder read recursively) into `out_dir` as PNGs."""
    source, out_dir = Path(source).expanduser(), Path(out_dir).expanduser()
    if source.is_dir() and out_dir.resolve() == source.resolve():
        raise InferenceError(
            f"--out: {out_dir} is the --input folder; its PNGs would be overwritten by their reconstructions "
            "and a rerun would read the reconstructions as inputs: choose another folder (one inside it is fine)"
        )
    paths = find_images(source, exclude=out_dir.resolve())
    if not paths:
        raise InferenceError(f"--input: no image files in {source}")
    root = source if source.is_dir() else source.parent
    names = output_names([path.relative_to(root) for path in paths])
    for path, name in zip(paths, names, strict=True):
        if (out_dir / name).resolve() == path.resolve():
            raise InferenceError(f"--out: the reconstruction of {path} would overwrite it; choose another folder")
    reconstructor = Reconstructor(vae, out_dir, save_latents, model_name, auto_tile)
    summary = ReconstructionSummary()
    with tqdm(total=len(paths), unit="image", desc="reconstruct", leave=False) as bar:
        for path, name in zip(paths, names, strict=True):
            tiles = reconstructor(path, name, summary)
            summary.tiled += tiles > 1
            bar.set_postfix({"tiles": tiles} if tiles > 1 else {}, refresh=False)
            bar.update(1)
    if summary.written == 0:
        raise InferenceError(f"--input: no usable image in {source} ({summary.skipped} unreadable)")
    return summary


# ---------------------------------------------------------------------------------------------------
# Interpolate
# ---------------------------------------------------------------------------------------------------


def lerp(start: torch.Tensor, end: torch.Tensor, t: float) -> torch.Tensor:
    return start + (end - start) * t


def slerp(start: torch.Tensor, end: torch.Tensor, t: float, parallel_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation, treating each whole tensor as one vector (Shoemake 1985).

    Along the arc the norm stays between the two norms instead of dipping as it does along the chord,
    which keeps midpoints of Gaussian-like latents at a typical norm. For (nearly) parallel or
    opposite vectors sin(angle) vanishes and the formula is ill-conditioned; the chord is used then.
    """
    a, b = start.flatten().double(), end.flatten().double()
    norms = a.norm() * b.norm()
    if norms == 0:
        return lerp(start, end, t)
    cos_angle = float((a @ b / norms).clamp(-1.0, 1.0))
    if abs(cos_angle) > parallel_threshold:
        return lerp(start, end, t)
    angle = math.acos(cos_angle)
    weight_start = math.sin((1 - t) * angle) / math.sin(angle)
    weight_end = math.sin(t * angle) / math.sin(angle)
    return weight_start * start + weight_end * end


def interpolation_grid(vae: AutoencoderKL, pixels_a: torch.Tensor, pixels_b: torch.Tensor, steps: int) -> Image.Image:
    """Row 1: decoded linear interpolation of the two posterior means; row 2: spherical.

    Slerp runs on the normalised latents (z - shift) * scale, where the latent distribution is centred
    on 0, as the spherical path assumes; on the raw latents a shift_factor would bend it off-centre.
    """
    scaling_factor, shift_factor = latent_factors(vae)
    start = (encode(vae, pixels_a).mode() - shift_factor) * scaling_factor
    end = (encode(vae, pixels_b).mode() - shift_factor) * scaling_factor
    times = [index / (steps - 1) for index in range(steps)]
    rows = []
    for mix in (lerp, slerp):
        latents = torch.cat([mix(start, end, t) for t in times]) / scaling_factor + shift_factor  # (N, C, h, w)
        decoded = decode(vae, latents)  # (N, 3, H, W)
        rows.append(torch.cat(list(decoded), dim=2))  # (3, H, N*W)
    return to_image(torch.cat(rows, dim=1))  # (3, 2H, N*W)


def read_square(path: Path, resolution: int) -> torch.Tensor:
    """One image, short side resized to `resolution` and centre-cropped: (1, 3, R, R)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InferenceError(f"no such image file {path}")
    try:
        return ImageTransform(resolution, center_crop=True)(decode_image(path)).unsqueeze(0)
    except DECODE_ERRORS as error:
        raise InferenceError(
            f"cannot read image {path}: {str(error).splitlines()[0] or type(error).__name__}"
        ) from None
