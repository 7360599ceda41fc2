"""Batches for training: the collate that counts skipped images, the resumable DataLoader, and the [-1, 1] scaling."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from vae_hf.config import DataConfig
from vae_hf.data import DataError
from vae_hf.data.buckets import BucketBatchSampler, assign_buckets, bucket_sizes, default_bucket_step, image_sizes


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


def collate_rows(rows: list[dict[str, Any]]) -> dict[str, list]:
    """A bucketed stream's rows as lists (their shapes differ): pixels, bucket index and records of each."""
    return {key: [row[key] for row in rows] for key in ("pixel_values", "bucket", "unreadable")}


def build_dataloader(
    dataset: Dataset | torch.utils.data.IterableDataset,
    config: DataConfig,
    batch_size: int,
    seed: int,
    pin_memory: bool = False,
    rows: bool = False,
) -> DataLoader:
    """Shuffled, seeded batches; a stream gets a StatefulDataLoader, whose position can be saved. With `rows`
    (a bucketed stream) a batch is a list of rows of different shapes (`collate_rows`)."""
    streaming = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = (StatefulDataLoader if streaming else DataLoader)(
        dataset,
        batch_size=batch_size,
        shuffle=not streaming,
        num_workers=config.num_workers,
        collate_fn=collate_rows if rows else collate,
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


def bucket_list(config: DataConfig, factor: int, resolution: int | None = None) -> list[tuple[int, int]]:
    """The buckets of `data.bucket_sizes`, else made for `resolution` (default: data.resolution; a stage may set
    another); each side must be a multiple of the VAE's downsampling `factor`. A stage at another resolution
    scales the listed sizes by its resolution / data.resolution (to multiples of `factor`)."""
    resolution = resolution or config.resolution
    if config.bucket_sizes:
        sizes = [(int(height), int(width)) for height, width in config.bucket_sizes]
        if resolution != config.resolution:
            scale = resolution / config.resolution
            sizes = [tuple(max(factor, round(side * scale / factor) * factor) for side in size) for size in sizes]
    else:
        step = config.bucket_step or default_bucket_step(resolution, factor)
        sizes = bucket_sizes(resolution, step, config.bucket_max_aspect_ratio)
    for height, width in sizes:
        if height % factor or width % factor:
            raise DataError(
                f"data.buckets: bucket {height}x{width} is not a multiple of the VAE's downsampling factor {factor} "
                "(set data.bucket_step or data.bucket_sizes to multiples of it)"
            )
    if not sizes:
        raise DataError(f"data.buckets: no bucket of area {resolution}² fits data.bucket_step and the ratio limit")
    return sizes


def build_bucketed_dataloader(
    dataset,
    config: DataConfig,
    buckets: list[tuple[int, int]],
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    gradient_accumulation_steps: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of one aspect-ratio bucket each, this process's slice of every global batch (see
    `vae_hf.data.buckets`); `dataset` is an `ImageDataset`, whose rows' sizes are read once (cached)."""
    sizes = image_sizes(dataset.dataset, dataset.image_column, num_proc=config.num_workers)
    sampler = BucketBatchSampler(
        assign_buckets(sizes, buckets), buckets, batch_size, seed, rank, world_size, gradient_accumulation_steps
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=config.persistent_workers and config.num_workers > 0,
        prefetch_factor=config.prefetch_factor,
    )
