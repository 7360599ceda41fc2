"""The training loader as a run builds it, from the data settings of one stage: the dataset (image folder, shards,
Hub, stream), then square batches sharded by Accelerate, or aspect-ratio buckets each process slices itself."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch.utils.data import DataLoader

from vae_hf.config import DataConfig
from vae_hf.data import datasets as image_datasets
from vae_hf.data import loader as batching


@dataclass
class TrainingLoader:
    loader: DataLoader
    shard_by_accelerate: bool
    """True for square map-style batches, which `accelerator.prepare` splits among the processes; a stream is
    split by `datasets` and a bucketed loader by its sampler, so neither is prepared."""
    buckets: list[tuple[int, int]] | None = None
    """A bucketed stream's buckets: its batches are rows of these shapes, for the trainer to group."""


def stage_data(data: DataConfig, resolution: int, factor: int) -> DataConfig:
    """The data settings of a stage at `resolution` (`train.stages`): its crop size, and the listed
    `data.bucket_sizes` scaled to it (generated buckets follow the resolution by themselves)."""
    if resolution == data.resolution:
        return data
    sizes = [list(size) for size in batching.bucket_list(data, factor, resolution)] if data.bucket_sizes else []
    return replace(data, resolution=resolution, bucket_sizes=sizes)


def training_loader(
    data: DataConfig,
    seed: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    gradient_accumulation_steps: int = 1,
    downsample_factor: int = 8,
    pin_memory: bool = False,
) -> TrainingLoader:
    if data.buckets and data.streaming:  # each row cropped to its bucket; the trainer groups them (BucketBuffers)
        buckets = batching.bucket_list(data, downsample_factor)
        dataset = image_datasets.training_dataset(data, seed, rank, world_size, buckets=buckets)
        loader = batching.build_dataloader(dataset, data, batch_size, seed, pin_memory=pin_memory, rows=True)
        return TrainingLoader(loader, shard_by_accelerate=False, buckets=buckets)
    dataset = image_datasets.training_dataset(data, seed, rank, world_size)
    if data.buckets:
        buckets = batching.bucket_list(data, downsample_factor)
        loader = batching.build_bucketed_dataloader(
            dataset, data, buckets, batch_size, seed, rank, world_size, gradient_accumulation_steps, pin_memory
        )
        return TrainingLoader(loader, shard_by_accelerate=False)
    loader = batching.build_dataloader(dataset, data, batch_size, seed, pin_memory=pin_memory)
    return TrainingLoader(loader, shard_by_accelerate=not isinstance(dataset, image_datasets.StreamingImageDataset))
