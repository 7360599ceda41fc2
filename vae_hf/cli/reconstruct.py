"""`vae-hf reconstruct`: encode and decode images, each at its own size."""

from __future__ import annotations

from pathlib import Path

from vae_hf.analysis.inference import (
    configure_tiling,
    default_resolution,
    downsampling_factor,
    prepare,
    reconstruct_images,
)
from vae_hf.models.vae import load_vae


def reconstruct_command(
    model: str, source: str, out_dir: str, resolution: int | None, tile: bool, save_latents: bool
) -> int:
    """`vae-hf reconstruct`: load, maybe tile, reconstruct, and print one summary line."""
    vae = prepare(load_vae(model, option="--model"))
    if tile:
        configure_tiling(vae, resolution or default_resolution(vae))
    summary = reconstruct_images(vae, Path(source), Path(out_dir), save_latents, model_name=model)
    factor = downsampling_factor(vae)
    latents_note = " and their latents (.safetensors)" if save_latents else ""
    print(
        f"wrote {summary.written} reconstruction(s){latents_note} to {out_dir}; "
        f"{summary.cropped} cropped to a multiple of {factor} px, {summary.skipped} unreadable skipped"
    )
    return 0
