"""`vae-hf export`: any VAE source written as one LDM-layout .safetensors file."""

from __future__ import annotations

from pathlib import Path

from vae_hf.io.single_file import (
    save_single_file,
)
from vae_hf.models.vae import load_vae


def export_command(model: str, out: str, dtype: str = "fp32", prefix: bool = False) -> int:
    """`vae-hf export`: load any model source and write it as one LDM-layout file."""
    path = save_single_file(load_vae(model, option="--model"), Path(out), dtype, prefix)
    print(f"wrote {path} (LDM layout, {dtype}{', first_stage_model. prefix' if prefix else ''})")
    return 0
