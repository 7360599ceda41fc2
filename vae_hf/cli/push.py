"""`vae-hf push`: upload a VAE (folder, single file or Hub id) with its model card."""

from __future__ import annotations

import tempfile
from pathlib import Path

from vae_hf.io.hub import (
    PushError,
    check_repo_id,
    check_vae_folder,
    require_push_access,
    upload,
)
from vae_hf.offline import is_local_path


def push_command(model: str, repo_id: str, private: bool, commit_message: str, license_id: str | None = None) -> int:
    """`vae-hf push`: upload a VAE with its model card and say where it went.

    `model` is a local diffusers folder (pushed as it is), a single-file .safetensors or a Hub model id
    (both loaded, then pushed as a diffusers folder: config.json + safetensors weights). Local input is
    checked before the Hub is contacted; a Hub id is downloaded only once pushing is known to be possible.
    """
    check_repo_id(repo_id)
    source = Path(model).expanduser()
    is_hub_id = not (source.suffix == ".safetensors" or is_local_path(model))
    if not is_hub_id and not source.exists():  # checked before the Hub is contacted, as local input always is
        raise PushError(f"--model: no such file or folder {model}")
    with tempfile.TemporaryDirectory(prefix="vae-hf-convert-") as temporary:
        converted = Path(temporary) / "vae"
        if source.is_dir():
            folder = check_vae_folder(source)
        elif not is_hub_id:
            folder = as_diffusers_folder(model, converted)
        require_push_access()
        if is_hub_id:
            folder = as_diffusers_folder(model, converted)
        url = upload(folder, repo_id, private, commit_message, license_id)
    print(f"pushed {model} to {url}")
    return 0


def as_diffusers_folder(model: str, folder: Path) -> Path:
    """Load a single file or a Hub VAE and save it as a diffusers folder."""
    from vae_hf.io.export import save_vae  # imported here: a bad --repo-id is refused before torch loads
    from vae_hf.models.vae import load_vae

    if Path(model).exists() and Path(model).suffix != ".safetensors":
        raise PushError(
            f"--model must be a diffusers folder, a single-file .safetensors or a Hub model id, got {model}"
        )
    return save_vae(load_vae(model, option="--model"), folder)
