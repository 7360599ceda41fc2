"""Mixtures: `data.dataset` as a list of sources, each with its own split, image column and weight.

Each source loads as a dataset of its own would (`vae_hf.data.datasets`); here they are brought to one shape (the
image column under `data.image_column`, and no other column but the shard names every source has) and
interleaved with `datasets.interleave_datasets`, which draws the source of each next row at random with the
sources' probabilities (their weights, normalised) from a generator seeded by the run seed. A mixture of
map-style datasets is then a plain `Dataset` (its rows drawn once); a mixture of streams is an `IterableDataset`
whose position (the generator's state and each source's position) saves and loads with the stream's own
`state_dict`.
"""

from __future__ import annotations

from dataclasses import replace

from datasets import Dataset, IterableDataset, concatenate_datasets, interleave_datasets

from vae_hf.config import DataConfig

SHARD_NAMES = ("__url__", "__key__")
"""WebDataset's shard and key of each row, which name an unreadable file that has no path of its own: kept in a
mixture only when every source has them, so that the columns agree (such a file is otherwise named by its row in
the mixture)."""


def sources(config: DataConfig, split: str | None = None) -> list[DataConfig]:
    """Each source of `config` as the configuration of a single dataset: its id or folder, its split (`split`
    for all, when given) and its image column; every other key is the mixture's."""
    if not config.is_mixture:
        return [config if split is None else replace(config, split=split)]
    return [
        replace(config, dataset=source["dataset"], split=split or source["split"], image_column=source["image_column"])
        for source in config.dataset
    ]


def probabilities(config: DataConfig) -> list[float]:
    """The sources' weights, normalised to sum to 1."""
    weights = [source["weight"] for source in config.dataset] if config.is_mixture else [1.0]
    return [weight / sum(weights) for weight in weights]


def interleave(parts: list, config: DataConfig, seed: int) -> Dataset | IterableDataset:
    """The sources' datasets (loaded from `sources(config)`, in order) as one, drawn at random by `probabilities`,
    seeded, ending as `data.mixture_stopping` says."""
    return interleave_datasets(
        _one_shape(zip(parts, sources(config), strict=True), config.image_column),
        probabilities=probabilities(config),
        seed=seed,
        stopping_strategy=config.mixture_stopping,
    )


def concatenate(parts: list[Dataset | None], config: DataConfig) -> Dataset:
    """The sources' map-style datasets one after another (held-out images); a source given None is left out."""
    pairs = [(part, source) for part, source in zip(parts, sources(config), strict=True) if part is not None]
    return concatenate_datasets(_one_shape(pairs, config.image_column))


def _one_shape(pairs, image_column: str) -> list:
    """Each (dataset, its source's config) as the dataset with its images under `image_column` and no other column
    but the shard names every one has (columns and their types must agree to be interleaved or concatenated)."""
    pairs = list(pairs)
    names = [_column_names(part) for part, _ in pairs]
    shared = [name for name in SHARD_NAMES if all(name in columns for columns in names)]
    shaped = []
    for part, source in pairs:
        part = part.select_columns([source.image_column, *shared])
        if source.image_column != image_column:
            part = part.rename_column(source.image_column, image_column)
        shaped.append(part)
    return shaped


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    return dataset.column_names or list(dataset.features or {})


def shares(total: int, config: DataConfig) -> list[int]:
    """`total` split between the sources in proportion to their weights, whole numbers summing to `total` (the
    largest remainders round up); one source: [total]."""
    exact = [total * probability for probability in probabilities(config)]
    counts = [int(share) for share in exact]
    by_remainder = sorted(range(len(exact)), key=lambda index: counts[index] - exact[index])
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts
