"""Batches for training: the collate that counts skipped images, the resumable DataLoader, and the [-1, 1] scaling."""

from __future__ import annotations

from typing import Any

import torch
from datasets import IterableDataset
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from vae_hf.config import DataConfig
from vae_hf.data import DataError


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) as the float images the VAE takes, in [-1, 1]."""
    return pixels.float().div(127.5).sub(1.0)


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decoded images and count the skipped ones."""
    images = [row["pixel_values"] for row in rows if row["pixel_values"] is not None]
    pixel_values = torch.stack(images) if images else torch.empty(0)
    return {"pixel_values": pixel_values, "num_skipped": len(rows) - len(images)}


def build_dataloader(
    dataset: Dataset | IterableDataset, config: DataConfig, batch_size: int, seed: int, pin_memory: bool = False
) -> DataLoader:
    """Shuffled, seeded batches; a stream gets a StatefulDataLoader, whose position can be saved."""
    streaming = isinstance(dataset, IterableDataset)
    loader = (StatefulDataLoader if streaming else DataLoader)(
        dataset,
        batch_size=batch_size,
        shuffle=not streaming,
        num_workers=config.num_workers,
        collate_fn=collate,
        drop_last=not streaming,
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
