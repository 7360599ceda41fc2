"""`vae-hf interpolate`: a grid of linear and spherical latent interpolations between two images."""

from __future__ import annotations

from pathlib import Path

from vae_hf.analysis.inference import (
    InferenceError,
    default_resolution,
    downsampling_factor,
    interpolation_grid,
    prepare,
    read_square,
)
from vae_hf.models.vae import load_vae


def interpolate_command(model: str, image_a: str, image_b: str, out: str, steps: int, resolution: int | None) -> int:
    """`vae-hf interpolate`: a 2 x steps grid PNG of linear and spherical latent interpolations."""
    if steps < 2:
        raise InferenceError(f"--steps: need at least 2 (both ends), got {steps}")
    vae = prepare(load_vae(model, option="--model"))
    resolution = resolution or default_resolution(vae)
    factor = downsampling_factor(vae)
    if resolution <= 0 or resolution % factor:
        raise InferenceError(f"--resolution: must be a positive multiple of {factor}, got {resolution}")
    grid = interpolation_grid(vae, read_square(image_a, resolution), read_square(image_b, resolution), steps)
    target = Path(out).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        grid.save(target, format="PNG")
    except OSError as error:
        raise InferenceError(f"cannot write {target}: {error.strerror or error}") from None
    print(f"wrote {target}: row 1 linear, row 2 spherical, {steps} steps of {resolution} px")
    return 0
