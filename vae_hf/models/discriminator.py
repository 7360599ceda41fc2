"""PatchGAN discriminator (Isola et al. 2017, pix2pix section 3.2.2), the reference recipe's.

It scores overlapping patches rather than whole images, so its output is a grid of logits. The layout:
`num_layers` stride-2 4x4 convolutions doubling the width (capped at 8x), normalisation on all but the
first, LeakyReLU(0.2), then a stride-1 4x4 convolution to one logit per patch. With the default 3 layers
each logit sees a 46 x 46 px patch. (LDM's `NLayerDiscriminator` has one more stride-1 4x4 convolution with
normalisation before the output, and sees 70 x 70 px.)
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        super().__init__()
        layers: list[nn.Module] = []
        width_in, width = in_channels, channels
        for index in range(num_layers):
            normalise = norm == "batch" and index > 0
            layers += [
                # a bias before BatchNorm is redundant: BatchNorm's own shift replaces it
                nn.Conv2d(width_in, width, kernel_size=4, stride=2, padding=1, bias=not normalise),
                nn.BatchNorm2d(width) if normalise else nn.Identity(),
                nn.LeakyReLU(0.2),
            ]
            width_in, width = width, channels * min(2 ** (index + 1), 8)
        layers.append(nn.Conv2d(width_in, 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)  # (B, 1, H', W'): one logit per patch


def _init_weights(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016), as pix2pix and taming use."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class LeCamAnchors(nn.Module):
    """The moving averages of the discriminator's mean real and fake logits that LeCam regularisation pulls towards
    (`loss.disc_lecam_weight`). Buffers of the discriminator, so checkpoints carry them and a resumed run continues
    them."""

    def __init__(self):
        super().__init__()
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, decay: float) -> None:
        self.real.lerp_(logits_real.float().mean(), 1 - decay)
        self.fake.lerp_(logits_fake.float().mean(), 1 - decay)
