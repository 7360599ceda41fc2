"""A discriminator on frozen DINO features (StyleGAN-T, Sauer et al. 2023; used by RAE and VAR's tokenizer trainer).

A frozen self-supervised ViT (DINO ViT-S/8 by default, through `transformers.AutoModel`) sees the image; trainable
heads of spectral-norm convolutions score the patch tokens of several of its layers, one logit per patch and layer.
The backbone's parameters never train (their `requires_grad` is off, and the player's optimizer holds only the
heads), but gradient passes through it to the images, which is how the VAE learns from it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from vae_hf.models.backbone import load_vision_model, normalise_for_backbone, patch_grid


class DinoDiscriminator(nn.Module):
    def __init__(self, backbone: nn.Module, image_size: int, head_channels: int = 64, num_heads: int = 4):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.image_size = image_size
        self.side = image_size // int(backbone.config.patch_size)
        depth, width = int(backbone.config.num_hidden_layers), int(backbone.config.hidden_size)
        # evenly spaced layers, the last included (StyleGAN-T taps 4 of ViT-S's 12 blocks)
        count = min(num_heads, depth)
        self.layers = [depth - (depth * index) // count for index in reversed(range(count))]
        self.heads = nn.ModuleList(_head(width, head_channels) for _ in self.layers)

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()  # a fixed function: its dropout stays off
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = normalise_for_backbone(images, self.image_size)
        hidden = self.backbone(pixel_values=pixels, output_hidden_states=True).hidden_states
        grids = [patch_grid(hidden[layer], self.side) for layer in self.layers]
        logits = [head(grid) for head, grid in zip(self.heads, grids, strict=True)]
        return torch.cat([logit.flatten(1) for logit in logits], dim=1)  # (N, layers x h x w): one logit per patch


def _head(width: int, channels: int) -> nn.Sequential:
    """Two spectral-norm convolutions over a layer's patch grid: local evidence, then a logit per patch."""
    return nn.Sequential(
        spectral_norm(nn.Conv2d(width, channels, kernel_size=3, padding=1)),
        nn.LeakyReLU(0.2),
        spectral_norm(nn.Conv2d(channels, 1, kernel_size=1)),
    )


def build_dino_discriminator(
    source: str, image_size: int, head_channels: int, second_order: bool = False
) -> DinoDiscriminator:
    """`second_order`: the R1 penalty differentiates through the ViT twice, which fused attention kernels cannot."""
    backbone = load_vision_model(source, image_size, "loss.disc_backbone", eager_attention=second_order)
    return DinoDiscriminator(backbone, image_size, head_channels)
