"""Batches for training: the collate that counts skipped images, the resumable DataLoader, and the [-1, 1] scaling."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from vae_hf.config import DataConfig
from vae_hf.data import DataError


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) as the float images the VAE takes, in [-1, 1]."""
    return pixels.float().div(127.5).sub(1.0)


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decoded images; `num_skipped` counts the rows left out, `unreadable` lists the records of
    the files that did not decode (for training, replaced by substitutes: see `ImageDataset`)."""
    images = [row["pixel_values"] for row in rows if row["pixel_values"] is not None]
    pixel_values = torch.stack(images) if images else torch.empty(0)
    records = [record for row in rows for record in row.get("unreadable") or ()]
    return {"pixel_values": pixel_values, "num_skipped": len(rows) - len(images), "unreadable": records}


def build_dataloader(
    dataset: Dataset | torch.utils.data.IterableDataset,
    config: DataConfig,
    batch_size: int,
    seed: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Shuffled, seeded batches; a stream gets a StatefulDataLoader, whose position can be saved."""
    streaming = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = (StatefulDataLoader if streaming else DataLoader)(
        dataset,
        batch_size=batch_size,
        shuffle=not streaming,
        num_workers=config.num_workers,
        collate_fn=collate,
        drop_last=True,  # every batch full-sized, on every process: DDP and the discriminator see equal shapes
        pin_memory=pin_memory,
        persistent_workers=config.persistent_workers and config.num_workers > 0,
        prefetch_factor=config.prefetch_factor,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG out of loading
    )
    if not streaming and len(loader) == 0:
        raise DataError(
            f"data.dataset: {len(dataset)} images are fewer than one batch of train.batch_size={batch_size}"
        )
    return loader
