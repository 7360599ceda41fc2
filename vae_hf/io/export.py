"""Writing the trained VAE as a diffusers folder that Stable Diffusion pipelines load as `vae=`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL

from vae_hf.errors import UserError
from vae_hf.io.files import plain_permissions

# A key of config.json saying where its scaling_factor and shift_factor came from. diffusers ignores keys that
# start with "_" when it loads a config, as it does its own `_class_name` and `_diffusers_version`.
FACTORS_SOURCE_KEY = "_latent_factors_source"


def save_vae(vae: AutoencoderKL, folder: Path, config_updates: dict[str, Any] | None = None) -> Path:
    """Save config.json + diffusion_pytorch_model.safetensors into `folder`, replacing it safely.

    The new weights are written to a temporary sibling first and renamed into place, so a crash
    mid-write leaves the previous export intact instead of half a file. `config_updates` (e.g. the
    measured scaling_factor) are set in the written config.json; the model's own config is left as it is.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        vae.save_pretrained(staging, safe_serialization=True)
        if config_updates:
            config_file = staging / "config.json"
            config = {**json.loads(config_file.read_text()), **config_updates}
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        plain_permissions(staging)  # safetensors writes its files for the owner only
    except OSError as error:  # a full disk or an unwritable folder: the previous export stays as it was
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"cannot write the VAE to {folder}: {error.strerror or error}") from None
    if folder.exists():
        os.replace(folder, retired)  # POSIX cannot swap two folders atomically: move, then replace
    os.replace(staging, folder)
    shutil.rmtree(retired, ignore_errors=True)
    return folder


class ExportError(UserError, RuntimeError):
    """The VAE could not be written; the message says where and why in one line."""
