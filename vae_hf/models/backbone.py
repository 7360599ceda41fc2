"""A frozen vision backbone (DINOv2 and other ViTs of `transformers`) as a fixed feature extractor.

VA-VAE (Yao et al., arXiv 2501.01423) aligns the VAE's latents with the patch features of a vision foundation
model. The backbone is loaded with `transformers.AutoModel`, from a Hub id or a local folder, and never trains:
its parameters are frozen and its features are computed without a graph, so no gradient reaches it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vae_hf.errors import UserError
from vae_hf.offline import (
    TRANSFORMERS_WEIGHT_FILES,
    hub_offline_mode,
    is_local_path,
    require_cached_model,
    require_hub,
)

# DINOv2's (and most ViTs') input normalisation: the ImageNet statistics
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BackboneLoadError(UserError, RuntimeError):
    """A vision backbone could not be loaded; the message names the option and says why in one line."""


def require_backbone(source: str, option: str) -> None:
    """Fail at once, in one line, when `source` cannot be had: transformers missing, a folder that does not exist,
    or a Hub id neither cached (offline) nor reachable."""
    if importlib.util.find_spec("transformers") is None:
        raise BackboneLoadError(f"{option}: needs transformers (pip install 'vae-hf[vision]')")
    if Path(source).expanduser().is_dir():
        if not (Path(source).expanduser() / "config.json").is_file():
            raise BackboneLoadError(f"{option}: {source} holds no config.json (not a transformers model folder)")
        return
    if is_local_path(source):
        raise BackboneLoadError(f"{option}: no such folder {source}")
    if hub_offline_mode():
        require_cached_model(source, None, f"{option}={source}", TRANSFORMERS_WEIGHT_FILES)
    else:
        require_hub(f"{option}={source}", "Give a local folder, or pre-download it and set HF_HUB_OFFLINE=1.")


class FrozenBackbone(nn.Module):
    """Patch features (N, D, h, w) of images in [-1, 1], resized to `image_size` (a multiple of the patch size)."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.patch_size = int(model.config.patch_size)
        self.image_size = image_size
        self.feature_dim = int(model.config.hidden_size)

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)  # a fixed function: dropout and the like stay off

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = normalise_for_backbone(images.float(), self.image_size)
        tokens = self.model(pixel_values=pixels).last_hidden_state  # (N, [CLS] + registers + h*w, D)
        return patch_grid(tokens, self.image_size // self.patch_size)


def patch_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(N, D, side, side) from a ViT's tokens (N, [CLS] + registers + side*side, D): the patch tokens come last, in
    raster order."""
    patches = tokens[:, -side * side :]
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def load_backbone(source: str, image_size: int, option: str = "loss.vf_backbone") -> FrozenBackbone:
    """`source` (a Hub id or a local folder) through `transformers.AutoModel`, frozen."""
    return FrozenBackbone(load_vision_model(source, image_size, option), image_size)


def load_vision_model(source: str, image_size: int, option: str, eager_attention: bool = False) -> nn.Module:
    """A transformers vision transformer with patch tokens whose patch size divides `image_size`; with
    `eager_attention` its attention is plain matrix products, which (unlike the fused kernels) have second-order
    gradients."""
    require_backbone(source, option)
    from transformers import AutoModel

    options = {"attn_implementation": "eager"} if eager_attention else {}
    try:
        location = str(Path(source).expanduser()) if is_local_path(source) else source
        model = AutoModel.from_pretrained(location, **options)
    except (OSError, ValueError) as error:
        raise BackboneLoadError(f"{option}: cannot load {source}: {str(error).splitlines()[0]}") from None
    if not hasattr(model.config, "patch_size") or not hasattr(model.config, "hidden_size"):
        raise BackboneLoadError(f"{option}: {source} is not a vision transformer with patch tokens")
    if image_size % int(model.config.patch_size):
        raise BackboneLoadError(
            f"{option}: the image size {image_size} is not a multiple of its patch size {model.config.patch_size}"
        )
    return model


def normalise_for_backbone(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Images in [-1, 1] resized to `image_size` and normalised with the ImageNet statistics, as DINO expects."""
    pixels = F.interpolate(images, size=(image_size,) * 2, mode="bicubic", align_corners=False)
    mean = pixels.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((pixels + 1) / 2 - mean) / std
