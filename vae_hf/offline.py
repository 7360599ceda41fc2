"""Reaching the Hugging Face Hub and other download hosts, failing fast and clearly when offline.

Libraries retry and wait on an unreachable host; a training tool should instead say at once what it
could not fetch and what to do about it. Everything that would download goes through these checks first.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from vae_hf.errors import UserError

HUB_URL = "https://huggingface.co"
PROBE_TIMEOUT_S = 5.0
# The weight files diffusers' from_pretrained reads (safetensors first); one of them must be cached.
MODEL_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class OfflineError(UserError, RuntimeError):
    """Something had to be downloaded and the host cannot be reached; the message says what to do."""


def offline_variable() -> str | None:
    """`NAME=value` of the variable that asks the HF libraries to use their caches only, or None."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name, "")
        if value.upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={value}"
    return None


def hub_offline_mode() -> bool:
    """True when the user asked the HF libraries to use their caches only."""
    return offline_variable() is not None


def is_local_path(source: str) -> bool:
    """True when `source` can only name a local file or folder, not a Hub repo: it exists, starts with `.`, `/` or
    `~`, is not a valid Hub id (OWNER/NAME has one slash at most), or its first folder exists here (a typo in
    `outputs/demo/vea` then reads as a missing folder, not as a repo the Hub may not have)."""
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return "/" in source and Path(source.split("/", 1)[0]).is_dir()


# The weight files transformers' from_pretrained reads for a single-file model (sharded ones have an index).
TRANSFORMERS_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def require_cached_model(
    source: str, subfolder: str | None, what: str, weight_files: tuple[str, ...] = MODEL_WEIGHT_FILES
) -> None:
    """In offline mode, raise OfflineError unless the Hub model's config and weights are in the local cache."""
    prefix = f"{subfolder}/" if subfolder else ""
    config = try_to_load_from_cache(source, f"{prefix}config.json")
    weights = [try_to_load_from_cache(source, f"{prefix}{name}") for name in weight_files]
    if isinstance(config, str) and any(isinstance(found, str) for found in weights):
        return
    raise OfflineError(
        f"{what}: {source} is not in the local Hugging Face cache, and {offline_variable()} keeps the Hub off; "
        f"download it where the Hub can be reached (hf download {source}), unset the variable, or give a local folder"
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
