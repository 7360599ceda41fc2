"""`vae-hf reconstruct`: encode and decode images, each at its own size."""

from __future__ import annotations

from pathlib import Path

from vae_hf.analysis.inference import (
    AUTO_TILE_PIXELS,
    InferenceError,
    auto_tile_size,
    configure_tiling,
    default_resolution,
    downsampling_factor,
    prepare,
    reconstruct_images,
)
from vae_hf.models.vae import load_vae


def reconstruct_command(
    model: str, source: str, out_dir: str, resolution: int | None, tile: bool | None, save_latents: bool
) -> int:
    """`vae-hf reconstruct`: load, choose tiling, reconstruct, and print one summary line.

    `tile` None tiles the images above AUTO_TILE_PIXELS only; True tiles every image larger than a tile;
    False never tiles. `resolution` is the tile size."""
    vae = prepare(load_vae(model, option="--model"))
    if tile is False and resolution is not None:
        raise InferenceError("--resolution is the tile size, and --no-tile switches tiling off; give one of them")
    if tile is None:
        configure_tiling(vae, resolution or auto_tile_size(vae))
    elif tile:
        configure_tiling(vae, resolution or default_resolution(vae))
    summary = reconstruct_images(vae, Path(source), Path(out_dir), save_latents, model, auto_tile=tile is None)
    factor = downsampling_factor(vae)
    latents_note = " and their latents (.safetensors)" if save_latents else ""
    tiled_note = f", {summary.tiled} in {vae.tile_sample_min_size} px tiles" if summary.tiled else ""
    print(
        f"wrote {summary.written} reconstruction(s){latents_note} to {out_dir}{tiled_note}; "
        f"{summary.cropped} cropped to a multiple of {factor} px, {summary.skipped} unreadable skipped"
    )
    untiled = summary.written - summary.tiled
    if tile is None and resolution is not None and untiled:  # a tile size, used only where tiling is automatic
        print(
            f"note: --resolution {resolution} is the tile size of images over {AUTO_TILE_PIXELS / 2**20:g} "
            f"megapixel; {untiled} of the {summary.written} image(s) were smaller and reconstructed whole, at their "
            "own size; --tile tiles every image larger than a tile (reconstruct never resizes)"
        )
    return 0
