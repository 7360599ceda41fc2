"""Where training images come from: a Hub dataset, a local image folder, or a folder of WebDataset/Parquet shards
(each read by `datasets`' own builder), or a mixture of these; the image column found and left undecoded."""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset
from datasets import Image as ImageFeature
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from vae_hf.config import DataConfig
from vae_hf.data import DataError, mixture
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
