"""Pushing a trained VAE folder (with a generated model card) to the Hugging Face Hub.

Every check that needs no upload (the repo id, the folder, reachability, a token) runs before anything is
staged or sent, so a push that cannot succeed fails at once in one line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub import errors as hub_errors
from huggingface_hub.utils import validate_repo_id

from vae_hf.errors import UserError
from vae_hf.io.model_card import CARD_FILE, write_model_card
from vae_hf.offline import HUB_URL, OfflineError, hub_offline_mode, require_hub


class PushError(UserError, RuntimeError):
    """A VAE folder could not be pushed to the Hub; the message says why in one line."""


DEFAULT_COMMIT_MESSAGE = "Upload VAE trained with vae-hf"
# Network failures: huggingface_hub >= 1.0 raises httpx errors (not OSError) for a dropped connection; older
# versions raise requests' errors, which are OSErrors. HfHubHTTPError (4xx/5xx answers) is an OSError in both.
NETWORK_ERRORS = (OSError, getattr(hub_errors, "HTTPError", OSError))


def push_vae_folder(
    folder: Path,
    repo_id: str,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    license_id: str | None = None,
) -> str:
    """Upload a local diffusers VAE folder, with a generated model card, to the Hub model repo `repo_id`.

    The card and sample image are added to a staging copy, so the user's folder is never modified. The token is
    huggingface_hub's own (`HF_TOKEN` or `hf auth login`): it is never taken as an argument, printed or written.
    Returns the repo's URL.
    """
    folder = check_vae_folder(Path(folder))
    check_repo_id(repo_id)
    require_push_access()
    return upload(folder, repo_id, private, commit_message, license_id)


def upload(folder: Path, repo_id: str, private: bool, commit_message: str, license_id: str | None) -> str:
    """Stage `folder` with its card and upload it; the folder, repo id and access are already checked."""
    with tempfile.TemporaryDirectory(prefix="vae-hf-push-") as temporary:
        staging = stage_upload(folder, Path(temporary) / folder.name, repo_id, license_id)
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)  # an existing repo keeps its visibility
            api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message)
        except NETWORK_ERRORS as error:  # 401/403/404 answers, dropped connections
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PushError(f"cannot push to {repo_id}: {message}") from None
    return f"{os.environ.get('HF_ENDPOINT', HUB_URL).rstrip('/')}/{repo_id}"


def check_vae_folder(folder: Path) -> Path:
    """A folder is pushed as it is, so it must already be a diffusers VAE."""
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise PushError(f"--model must be a diffusers folder (config.json + *.safetensors), got {folder}")
    return folder.resolve()  # `.` has no name to stage it under


def check_repo_id(repo_id: str) -> None:
    """OWNER/NAME, checked before any network call (the card's loading lines name it)."""
    try:
        validate_repo_id(repo_id)
    except ValueError:
        raise PushError(f"--repo-id must be OWNER/NAME, got {repo_id!r}") from None
    if "/" not in repo_id:
        raise PushError(f"--repo-id must be OWNER/NAME, got {repo_id!r}")


def require_push_access() -> None:
    """Fail at once, before staging gigabytes, when the Hub cannot be reached or nobody is logged in."""
    if hub_offline_mode():  # require_hub lets offline mode through to the cache; an upload has no cache
        raise OfflineError("pushing needs the Hugging Face Hub, but HF_HUB_OFFLINE (or a similar variable) is set")
    require_hub("pushing", "Push from a machine that can reach it.")
    if huggingface_hub.get_token() is None:
        raise PushError("no Hugging Face token: run `hf auth login` or set the HF_TOKEN environment variable")


def stage_upload(folder: Path, staging: Path, repo_id: str, license_id: str | None = None) -> Path:
    """Copy `folder` to `staging` and add the model card, unless the folder already has its own README.md."""
    shutil.copytree(folder, staging, copy_function=_link_or_copy)
    if not (folder / CARD_FILE).is_file():
        write_model_card(folder, staging, repo_id, license_id)
    return staging


def _link_or_copy(source: str, destination: str) -> None:
    """Hard-link when the file system allows (weights can be gigabytes), else copy.

    Safe because nothing is ever written through a staged file: the card is a new file and the sample is
    unlinked before it is copied in.
    """
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
