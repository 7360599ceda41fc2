"""Images from a Hugging Face `datasets` source (a Hub dataset or a local folder): splits, transforms, reference images.

Images are decoded by our own code (`vae_hf.data.decode`) rather than by the `Image` feature, so that every
file goes through one conversion to RGB and a file that will not decode is skipped and counted instead of
killing the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, IterableDataset, load_dataset
from datasets import Image as ImageFeature
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from vae_hf.config import DataConfig
from vae_hf.data import DataError, mixture
from vae_hf.data.buckets import nearest_bucket
from vae_hf.data.decode import DECODE_ERRORS, decode_image, describe
from vae_hf.data.loader import to_model_range
from vae_hf.offline import is_local_path, require_hub

logger = logging.getLogger(__name__)


def is_local(dataset: str) -> bool:
    return Path(dataset).expanduser().is_dir()


def load_image_dataset(
    config: DataConfig, split: str | None = None, seed: int | None = None
) -> Dataset | IterableDataset:
    """The configured split with its image column left undecoded (paths or bytes). A mixture's sources (each its
    own split, or `split` for all) are loaded so and interleaved, seeded by `seed` (see `vae_hf.data.mixture`)."""
    if config.is_mixture:
        if seed is None:
            raise TypeError("a mixture is interleaved at random: pass the run's seed")
        parts = [load_image_dataset(source) for source in mixture.sources(config, split)]
        return mixture.interleave(parts, config, seed)
    split = split or config.split
    if is_local(config.dataset):
        folder = Path(config.dataset).expanduser()
        builder = local_builder(folder)
        dataset = _load(
            lambda: load_dataset(builder, data_dir=str(folder), split=split, streaming=config.streaming),
            config.dataset,
            split,
        )
    else:
        if Path(config.dataset).expanduser().exists():
            raise DataError(f"data.dataset: {config.dataset} is not a folder")
        if is_local_path(config.dataset):
            raise DataError(f"data.dataset: no such folder {config.dataset}")
        require_hub(
            f"data.dataset={config.dataset}",
            "Use a local image folder, or pre-download the dataset and set HF_DATASETS_OFFLINE=1.",
        )
        dataset = _load(
            lambda: load_dataset(config.dataset, split=split, streaming=config.streaming), config.dataset, split
        )
    return _with_image_column(dataset, config)


SHARD_BUILDERS = {".tar": "webdataset", ".parquet": "parquet"}
"""Local files read as shards, by the `datasets` builder of their format; any other folder is an image folder."""


def local_builder(folder: Path) -> str:
    """The `datasets` builder that reads a local folder: `webdataset` for .tar shards, `parquet` for Parquet
    files, else `imagefolder` (image files, read recursively). Splits follow the files' names as `datasets`
    infers them (`train-00000.tar`, `validation/...`; one `train` split otherwise). An image folder without
    images stops with one line (the builder's own message, `Instruction "train" corresponds to no data!`, names
    neither the folder nor what it looks for). One walk of the folder tells both."""
    found, has_images = set(), False
    for path in _visible_files(folder):
        suffix = path.suffix.lower()
        if suffix in SHARD_BUILDERS:
            found.add(SHARD_BUILDERS[suffix])
        has_images = has_images or suffix in IMAGE_EXTENSIONS
    if len(found) > 1:
        raise DataError(f"data.dataset: {folder} holds both WebDataset (.tar) and Parquet files; give each its folder")
    if found:
        return found.pop()
    if not has_images:
        raise DataError(
            f"data.dataset: no image files in {folder} (read recursively: {', '.join(COMMON_EXTENSIONS)} and the "
            f"other {len(IMAGE_EXTENSIONS) - len(COMMON_EXTENSIONS)} extensions Pillow opens)"
        )
    return "imagefolder"


def _visible_files(folder: Path):
    """The files below `folder` the `datasets` builders read: hidden files and folders (`.name`, `__name`) left out."""
    for path in folder.rglob("*"):
        hidden = any(part.startswith((".", "__")) for part in path.relative_to(folder).parts)
        if not hidden and path.is_file():
            yield path


_announced_columns: set[tuple[str, str]] = set()
DEFAULT_IMAGE_COLUMN = DataConfig.image_column


def _with_image_column(dataset, config: DataConfig):
    """The dataset with its images, left undecoded, under `data.image_column`: the named column, else (when that is
    the default, `image`) its only image column (WebDataset shards name it by extension, `jpg` or `png`), renamed;
    else a one-line error. (The column is
    cast before it is renamed: a stream renamed first decodes its images despite the cast.)"""
    columns = dataset.column_names or list(dataset.features or {})
    if config.image_column in columns:
        return dataset.cast_column(config.image_column, ImageFeature(decode=False))
    images = [name for name, feature in (dataset.features or {}).items() if isinstance(feature, ImageFeature)]
    if len(images) == 1 and config.image_column == DEFAULT_IMAGE_COLUMN:  # a column named by the user is not guessed
        if (config.dataset, images[0]) not in _announced_columns:
            _announced_columns.add((config.dataset, images[0]))
            logger.warning(
                "data.image_column: %s has no column %r; using its image column %r",
                config.dataset,
                config.image_column,
                images[0],
            )
        return dataset.cast_column(images[0], ImageFeature(decode=False)).rename_column(images[0], config.image_column)
    which = f"image columns: {', '.join(images)}" if images else f"columns: {', '.join(columns)}"
    raise DataError(f"data.image_column: no column {config.image_column!r} in {config.dataset} ({which})")


# What the `imagefolder` builder reads: every extension Pillow opens, in any case, hidden files and folders left out.
IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)
COMMON_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _load(loader, name: str, split: str):
    try:
        return loader()
    except (FileNotFoundError, ValueError, OSError) as error:
        raise DataError(f"data.dataset: cannot load split {split!r} of {name}: {str(error).splitlines()[0]}") from None


@dataclass
class ImageTransform:
    """Resize the short side to `resolution`, crop a square, maybe flip, scale to [-1, 1].

    With `uint8`, the pixels stay 0..255 bytes and `to_model_range` scales them where they are used: the
    training loader's workers then pass a quarter of the bytes to the training process, which copies a
    quarter to the GPU.
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    draft_jpeg: bool = False  # decode JPEGs at a reduced scale still >= resolution (see decode_image)
    uint8: bool = False
    min_side: int | None = None  # training filters: such images are not used (see `check`)
    max_aspect_ratio: float | None = None

    @property
    def draft_size(self) -> int | None:
        """The size a JPEG may be decoded down to: no smaller than the crop, nor than `min_side` (so that the
        filter sees a drafted image's sides on the same side of `min_side` as the file's)."""
        return max(self.resolution, self.min_side or 0) if self.draft_jpeg else None

    def check(self, image: Image.Image) -> Image.Image:
        """Refuse (`ImageFiltered`) an image the training filters leave out: a short side under `min_side`
        (it would be upscaled), or a long side over `max_aspect_ratio` times the short one (a crop would keep
        little of it)."""
        short, long = sorted(image.size)
        if self.min_side is not None and short < self.min_side:
            raise ImageFiltered(f"{image.width}x{image.height} is smaller than data.min_side={self.min_side}")
        if self.max_aspect_ratio is not None and long > self.max_aspect_ratio * short:
            raise ImageFiltered(
                f"{image.width}x{image.height} is more elongated than data.max_aspect_ratio={self.max_aspect_ratio:g}"
            )
        return image

    def __call__(
        self, image: Image.Image, generator: torch.Generator | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The image as pixels of the square crop, or with `size` (height, width: an aspect-ratio bucket)
        resized to cover that size, keeping its aspect ratio, and cropped to it."""
        crop_height, crop_width = size or (self.resolution, self.resolution)
        if size is None:
            image = TF.resize(image, self.resolution, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        else:
            scale = max(crop_height / image.height, crop_width / image.width)
            covering = [max(crop_height, round(image.height * scale)), max(crop_width, round(image.width * scale))]
            image = TF.resize(image, covering, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        width, height = image.size
        if self.center_crop:
            image = TF.center_crop(image, [crop_height, crop_width])
        else:
            top = int(torch.randint(0, height - crop_height + 1, (), generator=generator))
            left = int(torch.randint(0, width - crop_width + 1, (), generator=generator))
            image = TF.crop(image, top, left, crop_height, crop_width)
        pixels = TF.pil_to_tensor(image)  # (3, R, R) uint8
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            pixels = pixels.flip(-1)
        return pixels if self.uint8 else to_model_range(pixels)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (run seed, epoch, index, ...), the same in every process."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class ImageFiltered(ValueError):
    """An image that decodes but that the training filters (`data.min_side`, `data.max_aspect_ratio`) leave out."""


def unreadable_reason(error: BaseException) -> str:
    """What is wrong with a file, in words a person acts on (PIL's own messages name a BytesIO object)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file PIL can read (unknown format, or not an image at all)"
    if isinstance(error, Image.DecompressionBombError):
        return f"too many pixels to decode safely ({str(error).splitlines()[0]})"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "truncated" in text:
        return f"truncated or damaged file ({text})"
    return text


def try_transform(
    value: Any,
    transform: ImageTransform,
    generator: torch.Generator | None = None,
    max_pixels: int | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor | None, str | None]:
    """Decode and transform one stored image (to `size`, a bucket, when given): (pixels, None), or (None, why it
    is unreadable)."""
    try:
        image = transform.check(decode_image(value, max_pixels, transform.draft_size))
        return transform(image, generator, size), None
    except DECODE_ERRORS as error:
        return None, unreadable_reason(error)


def unreadable(value: Any, reason: str, row: int, shard: str | None = None, key: str | None = None) -> dict[str, str]:
    """The record of a file left out that travels with a batch: its name and why. The name is its path, else its
    key in its shard (WebDataset's `__url__` and `__key__`), else its row."""
    name = describe(value)
    if name == "<bytes>":
        name = f"{shard}: {key}" if shard and key else f"row {row}"
    return {"name": name, "reason": reason}


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
    data keeps the processes in step when a stream comes out shorter.
    """

    def __init__(
        self, image_column: str, transform: ImageTransform, seed: int, rank: int = 0, max_pixels: int | None = None
    ):
        self.image_column, self.transform, self.seed, self.rank = image_column, transform, seed, rank
        self.max_pixels = max_pixels
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
            return {"pixel_values": [], "unreadable": []}
        pixel_values, records = [], []
        for position, index in enumerate(indices):
            source = next((p for p in readable if p >= position), readable[0])  # the next readable row
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, self.rank, worker, index))
            pixel_values.append(self.transform(decoded[source], generator))
            reason = reasons[position]
            where = [examples[column][position] if column in examples else None for column in ("__url__", "__key__")]
            records.append([] if reason is None else [unreadable(values[position], reason, index, *where)])
        return {"pixel_values": pixel_values, "unreadable": records}


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
    config: DataConfig, seed: int, rank: int = 0, world_size: int = 1
) -> ImageDataset | StreamingImageDataset:
    """The training split, transformed lazily to uint8 pixels (`to_model_range` scales them on the device);
    streaming data is shuffled in a buffer and split by rank. Unreadable samples are substituted (see
    `ImageDataset`), so batches never shrink. A mixture is interleaved before the stream is shuffled and split."""
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
        processor = ExampleProcessor(config.image_column, transform, seed, rank, config.max_image_pixels)
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
