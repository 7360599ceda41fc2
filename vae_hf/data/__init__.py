"""Training and evaluation images: decoding files (`decode`), datasets and transforms (`datasets`), batches
(`loader`)."""

from vae_hf.errors import UserError


class DataError(UserError, RuntimeError):
    """The dataset cannot be used; the message says why in one line."""
