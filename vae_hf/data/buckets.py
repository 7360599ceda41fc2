"""Aspect-ratio buckets: images keep their shape, resized to the nearest of a list of (height, width) sizes of
about the training area, and every batch holds one size.

The bucket list follows SDXL's convention: sides are multiples of a step, areas at most the square of
`data.resolution` (each height with the widest width that fits), aspect ratios up to a limit. Every process
builds the same epoch plan from (seed, epoch): each bucket's rows shuffled and cut into global batches of
`batch_size x processes` rows, the batches of all buckets shuffled together so that sizes mix over the epoch,
and process r taking the r-th slice of each. So at every step all processes hold a batch of the same size
(DDP and the discriminator see equal shapes) and none waits for another. The plan is a pure function of
(seed, epoch), so a resumed run takes it up at its batch.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from datasets import Dataset

from vae_hf.data import DataError
from vae_hf.data.decode import DECODE_ERRORS, open_image

Bucket = tuple[int, int]  # (height, width)

EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF rotations by 90 or 270 degrees: the decoded image's sides swap


def default_bucket_step(resolution: int, factor: int) -> int:
    """SDXL's 64 px at 1024 px, scaled: resolution / 16, rounded up to a multiple of the VAE's downsampling
    factor (latents need whole cells)."""
    return max(factor, math.ceil(resolution / 16 / factor) * factor)


def bucket_sizes(resolution: int, step: int, max_aspect_ratio: float) -> list[Bucket]:
    """(height, width) pairs with both sides multiples of `step` and area at most `resolution`²: for each short
    side up to `resolution`, the longest long side that fits, both ways round, while the long side is at most
    `max_aspect_ratio` times the short one. Sorted from tallest to widest; the square is always one of them
    (when `resolution` is a multiple of `step`)."""
    area = resolution * resolution
    sizes = set()
    for short in range(step, resolution + 1, step):
        long = area // short // step * step
        if long <= max_aspect_ratio * short:
            sizes.update({(short, long), (long, short)})
    return sorted(sizes, key=lambda size: size[1] / size[0])


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (in log ratio: 2:1 and 1:2 are as far
    from 1:1)."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - ratio), i))


def image_size(value: Any) -> tuple[int, int] | None:
    """(width, height) of a stored image as it decodes (EXIF rotation applied), from its header only; None for a
    file that will not open (it is replaced when trained on, as in any batch)."""
    try:
        with open_image(value) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION)
    except DECODE_ERRORS:
        return None
    return (height, width) if orientation in TRANSPOSED_ORIENTATIONS else (width, height)


SIZE_COLUMNS = ("_vae_hf_width", "_vae_hf_height")


def image_sizes(dataset: Dataset, image_column: str, num_proc: int | None = None) -> list[tuple[int, int] | None]:
    """Every row's (width, height), read from the headers by a `datasets` map, which `datasets` caches with a
    dataset loaded from files: a second run on the same data reads no header again."""

    def sizes(values: list[Any]) -> dict[str, list[int]]:
        found = [image_size(value) or (0, 0) for value in values]
        return {SIZE_COLUMNS[0]: [w for w, _ in found], SIZE_COLUMNS[1]: [h for _, h in found]}

    measured = dataset.map(
        sizes,
        batched=True,
        batch_size=256,
        input_columns=[image_column],
        remove_columns=dataset.column_names,
        num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) >= 4096 else None,
        desc="reading image sizes for data.buckets",
    )
    widths, heights = measured[SIZE_COLUMNS[0]], measured[SIZE_COLUMNS[1]]
    return [(w, h) if w and h else None for w, h in zip(widths, heights, strict=True)]


def assign_buckets(sizes: Sequence[tuple[int, int] | None], buckets: Sequence[Bucket]) -> list[int]:
    """Each row's bucket; a row whose size could not be read goes to the squarest bucket."""
    square = nearest_bucket(1, 1, buckets)
    return [square if size is None else nearest_bucket(size[0], size[1], buckets) for size in sizes]


class BucketBatchSampler:
    """This process's batches of one epoch: lists of (row, bucket) pairs, one bucket per batch, the same
    bucket on every process at every batch (see the module's docstring).

    A bucket's rows that do not fill a global batch wait for a later epoch (the shuffle differs), and the
    epoch is cut to whole optimizer steps (`gradient_accumulation_steps` batches), so every epoch has the
    same number of batches on every process and ends on an optimizer step. `start` skips the batches of the
    epoch already trained on (a resumed run)."""

    def __init__(
        self,
        bucket_of_row: Sequence[int],
        buckets: Sequence[Bucket],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        gradient_accumulation_steps: int = 1,
    ):
        self.buckets = list(buckets)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.accumulation = gradient_accumulation_steps
        self.rows_of_bucket: list[list[int]] = [[] for _ in self.buckets]
        for row, bucket in enumerate(bucket_of_row):
            self.rows_of_bucket[bucket].append(row)
        self.epoch, self.start = 0, 0
        global_batch = batch_size * world_size
        batches = sum(len(rows) // global_batch for rows in self.rows_of_bucket)
        self.num_batches = batches // self.accumulation * self.accumulation
        if self.num_batches == 0:
            counts = ", ".join(
                f"{h}x{w}: {len(rows)}" for (h, w), rows in zip(self.buckets, self.rows_of_bucket, strict=True)
            )
            raise DataError(
                f"data.buckets: no bucket holds a whole optimizer step of {global_batch} images x "
                f"{self.accumulation} batches (images per bucket: {counts}); use fewer, wider buckets "
                "(data.bucket_step) or a smaller train.batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> list[tuple[int, list[int]]]:
        """Every process's batches of `epoch` as (bucket, global batch of rows), in training order."""
        rng = random.Random(f"buckets:{self.seed}:{epoch}")
        global_batch = self.batch_size * self.world_size
        batches = []
        for bucket, rows in enumerate(self.rows_of_bucket):
            shuffled = rows.copy()
            rng.shuffle(shuffled)
            for first in range(0, len(shuffled) - global_batch + 1, global_batch):
                batches.append((bucket, shuffled[first : first + global_batch]))
        rng.shuffle(batches)
        return batches[: self.num_batches]

    def __iter__(self) -> Iterator[list[tuple[int, Bucket]]]:
        start, self.start = self.start, 0  # a skip applies once, to the epoch it was set for
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for bucket, rows in self.plan(self.epoch)[start:]:
            yield [(row, self.buckets[bucket]) for row in rows[mine]]

    def __len__(self) -> int:
        return self.num_batches


def grouped_batches(
    bucket_of_row: Sequence[int], buckets: Sequence[Bucket], batch_size: int, rank: int = 0, world_size: int = 1
) -> list[list[tuple[int, Bucket]]]:
    """Every row once, in batches of one bucket each (the last of a bucket may be smaller), in row order; this
    process's share: every `world_size`-th batch. For evaluation, where nothing is dropped."""
    batches = []
    for bucket, size in enumerate(buckets):
        rows = [row for row, of in enumerate(bucket_of_row) if of == bucket]
        for first in range(0, len(rows), batch_size):
            batches.append([(row, size) for row in rows[first : first + batch_size]])
    return batches[rank::world_size]


class BucketBuffers:
    """A stream's rows waiting for a batch of their bucket, on one process.

    A stream's images arrive in no order of shape, so each process keeps the rows of each bucket until enough are
    there; every optimizer step, the processes agree on a bucket that each can fill a whole step's window of
    (`ready`, reduced to its minimum over processes), and each takes that window from its own rows (`take`). The
    buffered rows are part of a checkpoint (`state`), so a resumed run trains what the uninterrupted one would."""

    def __init__(self, num_buckets: int, batch_size: int, accumulation: int):
        self.batch_size, self.accumulation = batch_size, accumulation
        self.rows: list[deque] = [deque() for _ in range(num_buckets)]  # (pixels, unreadable records)

    def add(self, batch: dict[str, list]) -> None:
        """Rows as `collate_rows` gives them."""
        for pixels, bucket, records in zip(batch["pixel_values"], batch["bucket"], batch["unreadable"], strict=True):
            self.rows[bucket].append((pixels, records))

    def ready(self) -> list[int]:
        """Whole windows (`accumulation` batches of `batch_size`) each bucket holds."""
        return [len(rows) // (self.batch_size * self.accumulation) for rows in self.rows]

    def take(self, bucket: int) -> list[dict[str, Any]]:
        """One window of `bucket`'s oldest rows, as `accumulation` batches like `collate` gives."""
        window = []
        for _ in range(self.accumulation):
            rows = [self.rows[bucket].popleft() for _ in range(self.batch_size)]
            records = [record for _, row_records in rows for record in row_records]
            window.append({"pixel_values": torch.stack([pixels for pixels, _ in rows]), "unreadable": records})
        return window

    def clear(self) -> None:
        for rows in self.rows:
            rows.clear()

    def state(self) -> tuple[dict[str, torch.Tensor], list[list[list[dict[str, str]]]]]:
        """The buffered pixels (one stacked tensor per non-empty bucket) and each row's records."""
        tensors = {f"bucket_{b}": torch.stack([p for p, _ in rows]) for b, rows in enumerate(self.rows) if rows}
        return tensors, [[records for _, records in rows] for rows in self.rows]

    def load(self, tensors: dict[str, torch.Tensor], records: list[list[list[dict[str, str]]]]) -> None:
        self.clear()
        for bucket, bucket_records in enumerate(records):
            pixels = tensors.get(f"bucket_{bucket}")
            for row, row_records in enumerate(bucket_records):
                self.rows[bucket].append((pixels[row], row_records))


def choose_bucket(common_ready: Sequence[int]) -> int | None:
    """The bucket every process fills most windows of (the lowest index among equals); None when none can."""
    best = max(range(len(common_ready)), key=lambda bucket: (common_ready[bucket], -bucket))
    return best if common_ready[best] > 0 else None
