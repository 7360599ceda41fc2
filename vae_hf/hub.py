"""Reaching the Hugging Face Hub and other download hosts, failing fast and clearly when offline.

Libraries retry and wait on an unreachable host; a training tool should instead say at once what it
could not fetch and what to do about it. Everything that would download goes through these checks first.
Pushing a trained VAE (with a generated model card) lives here too: it needs the same reachability checks.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub import errors as hub_errors
from huggingface_hub.utils import validate_repo_id

from vae_hf.errors import UserError
from vae_hf.model_card import CARD_FILE, write_model_card

HUB_URL = "https://huggingface.co"
PROBE_TIMEOUT_S = 5.0


class OfflineError(UserError, RuntimeError):
    """Something had to be downloaded and the host cannot be reached; the message says what to do."""


class PushError(UserError, RuntimeError):
    """A VAE folder could not be pushed to the Hub; the message says why in one line."""


DEFAULT_COMMIT_MESSAGE = "Upload VAE trained with vae-hf"
# Network failures: huggingface_hub >= 1.0 raises httpx errors (not OSError) for a dropped connection; older
# versions raise requests' errors, which are OSErrors. HfHubHTTPError (4xx/5xx answers) is an OSError in both.
NETWORK_ERRORS = (OSError, getattr(hub_errors, "HTTPError", OSError))


def hub_offline_mode() -> bool:
    """True when the user asked the HF libraries to use their caches only."""
    return any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def unreachable_reason(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the URL's host opens within the timeout, else the reason."""
    parsed = urlparse(url)
    host = parsed.hostname or url
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as error:  # DNS failure, refused, unreachable network, timeout
        return f"cannot reach {host}: {error.strerror or error}"


def require_hub(what: str, hint: str) -> None:
    """Raise OfflineError before a Hub download that cannot succeed (offline mode uses the cache)."""
    if hub_offline_mode():
        return
    endpoint = os.environ.get("HF_ENDPOINT", HUB_URL)
    reason = unreachable_reason(endpoint)
    if reason is not None:
        raise OfflineError(f"{what} needs the Hugging Face Hub, but {reason}. {hint}")


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
    return _upload(folder, repo_id, private, commit_message, license_id)


def _upload(folder: Path, repo_id: str, private: bool, commit_message: str, license_id: str | None) -> str:
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


def push_command(model: str, repo_id: str, private: bool, commit_message: str, license_id: str | None = None) -> int:
    """`vae-hf push`: upload a VAE with its model card and say where it went.

    `model` is a local diffusers folder (pushed as it is), a single-file .safetensors or a Hub model id
    (both loaded, then pushed as a diffusers folder: config.json + safetensors weights). Local input is
    checked before the Hub is contacted; a Hub id is downloaded only once pushing is known to be possible.
    """
    check_repo_id(repo_id)
    source = Path(model).expanduser()
    is_hub_id = not (source.exists() or source.suffix == ".safetensors" or model.startswith((".", "/", "~")))
    with tempfile.TemporaryDirectory(prefix="vae-hf-convert-") as temporary:
        converted = Path(temporary) / "vae"
        if source.is_dir():
            folder = check_vae_folder(source)
        elif not is_hub_id:
            folder = _as_diffusers_folder(model, converted)
        require_push_access()
        if is_hub_id:
            folder = _as_diffusers_folder(model, converted)
        url = _upload(folder, repo_id, private, commit_message, license_id)
    print(f"pushed {model} to {url}")
    return 0


def _as_diffusers_folder(model: str, folder: Path) -> Path:
    """Load a single file or a Hub VAE and save it as a diffusers folder."""
    from vae_hf.export import save_vae
    from vae_hf.model import load_vae  # model.py imports this module

    if Path(model).exists() and Path(model).suffix != ".safetensors":
        raise PushError(
            f"--model must be a diffusers folder, a single-file .safetensors or a Hub model id, got {model}"
        )
    return save_vae(load_vae(model, option="--model"), folder)


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
