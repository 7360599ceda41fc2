"""Reaching the Hugging Face Hub and other download hosts, failing fast and clearly when offline.

Libraries retry and wait on an unreachable host; a training tool should instead say at once what it
could not fetch and what to do about it. Everything that would download goes through these checks first.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from vae_hf.errors import UserError

HUB_URL = "https://huggingface.co"
PROBE_TIMEOUT_S = 5.0


class OfflineError(UserError, RuntimeError):
    """Something had to be downloaded and the host cannot be reached; the message says what to do."""


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
