"""LPIPS perceptual loss (Zhang et al. 2018) from the `lpips` package, frozen, with gradient to its inputs.

LPIPS compares VGG16 features of two images through learned linear heads. The heads ship inside the
`lpips` package; the VGG16 trunk comes from torchvision's ImageNet weights, which are downloaded once.
A frozen module still passes gradient to its *inputs*, which is how LPIPS trains the VAE: never wrap
it in `torch.no_grad()`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import torch
import torchvision

from vae_hf.offline import OfflineError, hub_offline_mode, unreachable_reason

VGG_WEIGHTS = torchvision.models.VGG16_Weights.IMAGENET1K_V1


def vgg_weights_path() -> Path:
    """Where torchvision caches the VGG16 ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(VGG_WEIGHTS.url)


def require_vgg_weights() -> None:
    """Fail at once, naming the offline override, when the VGG16 weights are neither cached nor reachable."""
    if vgg_weights_path().is_file():
        return
    reason = unreachable_reason(VGG_WEIGHTS.url)
    if reason is not None:
        raise OfflineError(
            f"LPIPS needs the pretrained VGG16 weights ({VGG_WEIGHTS.url}), which are not cached at "
            f"{vgg_weights_path()} and cannot be downloaded ({reason}); put the file there, or run offline "
            f"with loss.perceptual_pretrained=false (random VGG trunk: for tests only, not a real perceptual loss)"
        )


def resolve_pretrained(requested: bool | None) -> tuple[bool, str | None]:
    """`loss.perceptual_pretrained` as a decision: true and false stand; `auto` (None) is the pretrained trunk when
    its weights are cached or can be downloaded, else a random trunk. Returns (pretrained, why the random trunk
    was chosen, or None)."""
    if requested is not None:
        return requested, None
    if vgg_weights_path().is_file():
        return True, None
    if hub_offline_mode():
        return False, f"offline mode is on (HF_HUB_OFFLINE) and they are not cached at {vgg_weights_path()}"
    reason = unreachable_reason(VGG_WEIGHTS.url)
    if reason is None:
        return True, None
    return False, f"they are not cached at {vgg_weights_path()} and cannot be downloaded ({reason})"


def build_lpips(pretrained: bool = True) -> lpips.LPIPS:
    """LPIPS-VGG in eval mode with every parameter frozen; `pretrained=False` uses a random trunk."""
    if pretrained:
        require_vgg_weights()
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=not pretrained, verbose=False)
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    # The package's own loader unpickles; the heads are a plain state dict, so load them safely.
    model.load_state_dict(torch.load(heads, map_location="cpu", weights_only=True), strict=False)
    model.eval().requires_grad_(False)
    return model


def perceptual_loss(lpips_model: lpips.LPIPS, reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Batch mean of LPIPS between images in [-1, 1]."""
    return lpips_model(reconstructions, images).mean()
