"""Training and held-out images as tensors: the map-style and streaming datasets (a broken sample replaced by a
readable one), the held-out split, and the reference images of the sample PNGs.

Images are decoded by our own code (`vae_hf.data.decode`) rather than by the `Image` feature, so that every
file goes through one conversion to RGB and a file that will not decode is skipped and counted instead of
killing the run. Where they come from is `vae_hf.data.sources`; how a decoded image becomes pixels is
`vae_hf.data.transforms`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from PIL import Image

from vae_hf.config import DataConfig
from vae_hf.data import DataError, mixture
from vae_hf.data.buckets import nearest_bucket
from vae_hf.data.decode import DECODE_ERRORS, decode_image, describe
from vae_hf.data.sources import load_image_dataset
from vae_hf.data.transforms import ImageTransform, sample_seed, try_transform, unreadable, unreadable_reason

logger = logging.getLogger(__name__)


SUBSTITUTE_LOOKAHEAD = 1000
"""How many following rows a training sample that will not decode may be replaced from."""


class ImageDataset(torch.utils.data.Dataset):
    """A map-style `datasets` split as tensors.

    Random crops and flips draw from a generator seeded by (run seed, epoch, index), not from the
    process-wide RNG: a sample's augmentation is then the same whichever worker loads it and whether
    or not the run was interrupted and resumed. The epoch lives in shared memory, so persistent
    DataLoader workers (started once, holding their own copy of the dataset) see `set_epoch` too.

    A row that will not decode gives `pixel_values` None (evaluation skips it), or with `substitute` the
    next readable row's image, augmented as the row itself would have been: a training batch then always
    has its full shape on every process, and every process takes the same number of steps. Either way the
    row's record (`unreadable`: name and reason) travels with the batch, to be counted once per file.
    """

    def __init__(
        self,
        dataset: Dataset,
        image_column: str,
        transform: ImageTransform,
        seed: int,
        max_pixels: int | None = None,
        substitute: bool = False,
    ):
        self.dataset, self.image_column, self.transform, self.seed = dataset, image_column, transform, seed
        self.max_pixels = max_pixels
        self.substitute = substitute
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch.numpy())  # a read of shared CPU memory, never a device sync

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, tuple[int, int]]) -> dict[str, Any]:
        """Row `index` as pixels; a (row, (height, width)) pair, as `BucketBatchSampler` gives, crops the row to
        that bucket instead of the square."""
        index, size = index if isinstance(index, tuple) else (index, None)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")  # (also ends iteration by index)
        records = []
        lookahead = min(SUBSTITUTE_LOOKAHEAD, len(self)) if self.substitute else 1
        for offset in range(lookahead):
            row = (index + offset) % len(self)
            example = self.dataset[row]
            value = example[self.image_column]
            # seeded by the sample's own index: a substitute is augmented as the sample would have been
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            pixels, reason = try_transform(value, self.transform, generator, self.max_pixels, size)
            if pixels is not None:
                return {"pixel_values": pixels, "unreadable": records}
            records.append(unreadable(value, reason, row, example.get("__url__"), example.get("__key__")))
        if not self.substitute:
            return {"pixel_values": None, "unreadable": records}
        raise DataError(
            f"data.dataset: none of the {lookahead} rows from row {index} of {len(self)} decodes "
            f"(first: {records[0]['name']}: {records[0]['reason']})"
        )


class ExampleProcessor:
    """For streaming data: turns a batch of rows into tensors (a `datasets` batched map with indices).

    As in `ImageDataset`, augmentation is seeded per sample, here by (run seed, epoch, process, loader
    worker, position in the stream), so a resumed stream augments as the uninterrupted one; and a row that
    will not decode is replaced by the next readable row of the same map batch, its record kept. A map batch
    with no readable row at all is dropped (named in a warning): the trainer's agreement on the end of the
    data keeps the processes in step when a stream comes out shorter. With `buckets`, each row is cropped to its
    own nearest aspect-ratio bucket, whose index it carries (`bucket`).
    """

    def __init__(
        self,
        image_column: str,
        transform: ImageTransform,
        seed: int,
        rank: int = 0,
        max_pixels: int | None = None,
        buckets: list[tuple[int, int]] | None = None,
    ):
        self.image_column, self.transform, self.seed, self.rank = image_column, transform, seed, rank
        self.max_pixels, self.buckets = max_pixels, buckets
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __call__(self, examples: dict[str, list], indices: list[int]) -> dict[str, list]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        epoch = int(self._epoch.numpy())
        values = examples[self.image_column]
        decoded, reasons = [], []
        for value in values:
            try:
                decoded.append(self.transform.check(decode_image(value, self.max_pixels, self.transform.draft_size)))
                reasons.append(None)
            except DECODE_ERRORS as error:
                decoded.append(None)
                reasons.append(unreadable_reason(error))
        readable = [position for position, image in enumerate(decoded) if image is not None]
        if not readable:
            names = ", ".join(f"{describe(value)} ({reason})" for value, reason in zip(values, reasons, strict=True))
            logger.warning("dropping %d stream rows, none of which decodes: %s", len(values), names)
            return {"pixel_values": [], "unreadable": [], **({"bucket": []} if self.buckets else {})}
        pixel_values, records, buckets = [], [], []
        for position, index in enumerate(indices):
            source = next((p for p in readable if p >= position), readable[0])  # the next readable row
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, self.rank, worker, index))
            bucket = None if not self.buckets else nearest_bucket(*decoded[source].size, self.buckets)
            size = None if bucket is None else self.buckets[bucket]
            pixel_values.append(self.transform(decoded[source], generator, size))
            buckets.append(bucket)
            reason = reasons[position]
            where = [examples[column][position] if column in examples else None for column in ("__url__", "__key__")]
            records.append([] if reason is None else [unreadable(values[position], reason, index, *where)])
        return {"pixel_values": pixel_values, "unreadable": records, **({"bucket": buckets} if self.buckets else {})}


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """A process's shard of a stream, as transformed samples; its position saves and loads
    (`state_dict`), and `set_epoch` reshuffles the stream and reseeds the augmentation."""

    def __init__(self, stream: IterableDataset, processor: ExampleProcessor):
        self.stream, self.processor = stream, processor

    def __iter__(self):
        return iter(self.stream)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)
        self.processor.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def training_dataset(
    config: DataConfig, seed: int, rank: int = 0, world_size: int = 1, buckets: list[tuple[int, int]] | None = None
) -> ImageDataset | StreamingImageDataset:
    """The training split, transformed lazily to uint8 pixels (`to_model_range` scales them on the device);
    streaming data is shuffled in a buffer and split by rank. Unreadable samples are substituted (see
    `ImageDataset`), so batches never shrink. A mixture is interleaved before the stream is shuffled and split.
    A stream with `buckets` crops each row to its bucket (map-style data gets its bucket from the batch sampler)."""
    dataset = _training_rows(config, seed)
    transform = ImageTransform(
        config.resolution,
        config.center_crop,
        config.random_flip,
        config.fast_jpeg_decode,
        uint8=True,
        min_side=config.min_side,
        max_aspect_ratio=config.max_aspect_ratio,
    )
    if isinstance(dataset, IterableDataset):
        from datasets.distributed import split_dataset_by_node

        dataset = dataset.shuffle(seed=seed, buffer_size=config.shuffle_buffer_size)
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        processor = ExampleProcessor(config.image_column, transform, seed, rank, config.max_image_pixels, buckets)
        stream = dataset.map(
            processor, batched=True, batch_size=STREAM_MAP_BATCH, with_indices=True, remove_columns=dataset.column_names
        )
        return StreamingImageDataset(stream, processor)
    return ImageDataset(dataset, config.image_column, transform, seed, config.max_image_pixels, substitute=True)


STREAM_MAP_BATCH = 64
"""Rows a stream decodes together; an unreadable row is replaced from within its map batch."""


def _training_rows(config: DataConfig, seed: int) -> Dataset | IterableDataset:
    """The training split less its held-out images; map-style rows are checked for a usable image. A mixture: each
    source so (each holds out its own `data.validation_fraction`, and is checked on its own), then interleaved."""
    if config.is_mixture:
        return mixture.interleave([_training_rows(source, seed) for source in mixture.sources(config)], config, seed)
    dataset = load_image_dataset(config)
    if config.validation_split is None and config.validation_fraction > 0:
        dataset = _held_out(dataset, config, seed)["train"]
    if not isinstance(dataset, IterableDataset):
        require_a_usable_image(dataset, config)
    return dataset


def heldout_dataset(config: DataConfig, seed: int) -> ImageDataset | None:
    """Images kept out of training for evaluation: `data.validation_split`, else a seeded
    `data.validation_fraction` of the training split, else None. Centre crops, no flips. A mixture holds out from
    each source so, at most its share of `data.validation_max_images` (by the weights), one source after another."""
    if config.validation_split is None and config.validation_fraction == 0:
        return None
    counts = mixture.shares(config.validation_max_images, config)
    parts = [
        _held_out_rows(source, seed, count) if count > 0 else None  # a light source's share may round to 0
        for source, count in zip(mixture.sources(config), counts, strict=True)
    ]
    dataset = mixture.concatenate(parts, config) if config.is_mixture else parts[0]
    transform = ImageTransform(config.resolution, center_crop=True, random_flip=False)
    return ImageDataset(dataset, config.image_column, transform, seed, config.max_image_pixels)


def _held_out_rows(config: DataConfig, seed: int, count: int) -> Dataset:
    """At most `count` held-out rows of one dataset: its `data.validation_split`, else its held-out fraction."""
    if config.validation_split is not None:
        dataset = load_image_dataset(config, config.validation_split)
        if isinstance(dataset, IterableDataset):
            dataset = Dataset.from_list(list(dataset.take(count)), features=dataset.features)
    else:
        dataset = _held_out(load_image_dataset(config), config, seed)["test"]
    if len(dataset) == 0:
        raise DataError(f"data.validation_split: no images in the held-out set of {config.dataset}")
    return dataset.select(range(min(len(dataset), count)))


def _held_out(dataset: Dataset, config: DataConfig, seed: int):
    """The same seeded split every time, so training never sees the held-out images."""
    if len(dataset) < 2:
        raise DataError(f"data.validation_fraction: {config.dataset} has too few images to hold some out")
    return dataset.train_test_split(test_size=config.validation_fraction, seed=seed, shuffle=True)


def require_a_usable_image(dataset: Dataset, config: DataConfig, limit: int = 1000) -> None:
    """Stop before training when the data holds no image that decodes (checks at most `limit` rows)."""
    if len(dataset) == 0:
        raise DataError(f"data.dataset: split {config.split!r} of {config.dataset} holds no images")
    checked = min(len(dataset), limit)
    for index in range(checked):
        try:
            decode_image(dataset[index][config.image_column], config.max_image_pixels)
            return
        except DECODE_ERRORS:
            continue
    where = f"its {checked}" if checked == len(dataset) else f"the first {checked} of its {len(dataset)}"
    raise DataError(f"data.dataset: no usable image in {config.dataset}: none of {where} files decodes")


def reference_images(config: DataConfig, buckets: list[tuple[int, int]] | None = None) -> torch.Tensor | list:
    """The fixed images shown in every sample PNG, centre-cropped and unflipped: (N, 3, R, R); with `buckets`, a
    list of (3, H, W) images, each cropped to its nearest bucket (its own aspect ratio)."""
    transform = ImageTransform(config.resolution, center_crop=True, random_flip=False)
    if not config.reference_images:
        images = _readable_rows(config)
    else:
        images = []
        for path in (Path(p).expanduser() for p in config.reference_images):
            try:
                images.append(decode_image(path, config.max_image_pixels))
            except FileNotFoundError:
                raise DataError(f"data.reference_images: no such file {path}") from None
            except DECODE_ERRORS as error:
                raise DataError(f"data.reference_images: cannot read {path}: {error}") from None
    if buckets is None:
        return torch.stack([transform(image) for image in images])
    return [transform(image, size=buckets[nearest_bucket(*image.size, buckets)]) for image in images]


def _readable_rows(config: DataConfig, lookahead: int = 100) -> list[Image.Image]:
    """The images at `reference_indices` (of a mixture: of its first source); an unreadable one is replaced by the
    next readable one."""
    config = mixture.sources(config)[0]
    split = config.reference_split or config.split
    dataset = load_image_dataset(config, split)
    if isinstance(dataset, IterableDataset):
        dataset = list(dataset.take(max(config.reference_indices) + lookahead))
    images = []
    for index in config.reference_indices:
        if index >= len(dataset):
            raise DataError(
                f"data.reference_indices: index {index} is past the end of split {split!r} ({len(dataset)} images)"
            )
        for candidate in range(index, min(index + lookahead, len(dataset))):
            value = dataset[candidate][config.image_column]
            try:
                images.append(decode_image(value, config.max_image_pixels))
                break
            except DECODE_ERRORS:
                logger.warning(
                    "reference image %d (%s) is unreadable; trying image %d", candidate, describe(value), candidate + 1
                )
        else:
            raise DataError(f"data.reference_indices: no readable image from index {index} of split {split!r}")
    return images
