"""`vae-hf export`: any VAE source written as one LDM-layout .safetensors file, or as a diffusers folder."""

from __future__ import annotations

from pathlib import Path

from vae_hf.io.export import ExportError, save_vae
from vae_hf.io.single_file import save_single_file
from vae_hf.models.vae import load_vae


def export_command(
    model: str, out: str | None, dtype: str | None = None, prefix: bool = False, diffusers: str | None = None
) -> int:
    """`vae-hf export`: load any model source and write it as one LDM-layout file (`out`) or as a diffusers
    folder (`diffusers`): the folder loads offline everywhere (`from_pretrained`, pipelines, as `config=` of
    diffusers' `from_single_file`)."""
    if diffusers is not None:
        return _export_folder(model, Path(diffusers), dtype, prefix)
    dtype = dtype or "fp32"
    path = save_single_file(load_vae(model, option="--model"), Path(out), dtype, prefix)
    print(f"wrote {path} (LDM layout, {dtype}{', first_stage_model. prefix' if prefix else ''})")
    return 0


def _export_folder(model: str, folder: Path, dtype: str | None, prefix: bool) -> int:
    if prefix or dtype is not None:
        raise ExportError(
            "--prefix and --dtype shape a single file; a diffusers folder is written in float32 "
            "(from_pretrained(..., torch_dtype=...) chooses the precision when loading)"
        )
    if folder.exists() and not (folder / "config.json").is_file():
        raise ExportError(f"--diffusers: {folder} exists and is not a diffusers folder; choose a new folder")
    save_vae(load_vae(model, option="--model").float(), folder)
    print(f"wrote {folder} (diffusers folder); load it with AutoencoderKL.from_pretrained('{folder}')")
    return 0
