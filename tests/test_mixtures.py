"""Mixtures: `data.dataset` as a list of sources, each with its own split, image column and weight, interleaved at
random in proportion to the weights, seeded. The proportions hold, a run resumes where it stopped, held-out images
come from every source, and a single dataset reads exactly as it did before mixtures."""

import io
import math
import tarfile
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vae_hf.config import ConfigError, DataConfig, load_config, to_yaml
from vae_hf.data import mixture
from vae_hf.data.datasets import heldout_dataset, training_dataset
from vae_hf.data.sources import load_image_dataset
from vae_hf.io.model_card import RunRecord, render_card
from vae_hf.train.trainer import Trainer

from conftest import tiny_overrides, write_images

# --- configuration --------------------------------------------------------------------------------------------


def source(dataset: str, split: str = "train", image_column: str = "image", weight: float = 1.0) -> dict:
    return {"dataset": dataset, "split": split, "image_column": image_column, "weight": weight}


def test_a_mixture_is_written_as_a_list_in_yaml_or_on_the_command_line(tmp_path):
    expected = [source("/data/a", split="all"), source("owner/b", "validation", "jpg", 0.25)]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "data:\n"
        "  split: all\n"
        "  mixture_stopping: all_exhausted\n"
        "  dataset:\n"
        "    - /data/a\n"
        "    - {dataset: owner/b, split: validation, image_column: jpg, weight: 0.25}\n"
    )
    from_yaml = load_config(recipe)
    assert from_yaml.data.dataset == expected and from_yaml.data.mixture_stopping == "all_exhausted"
    typed = "data.dataset=[/data/a, {dataset: owner/b, split: validation, image_column: jpg, weight: 0.25}]"
    from_cli = load_config(None, [typed, "data.split=all", "data.mixture_stopping=all_exhausted"])
    assert from_cli.data.dataset == expected and from_cli.data.mixture_stopping == "all_exhausted"
    names = load_config(None, ["data.dataset=[a,b]"]).data
    assert names.is_mixture and names.dataset == [source("a"), source("b")]
    # the run's config.yaml lists every source with all its keys, and reads back as the same config
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(from_cli))
    assert load_config(saved) == from_cli
    # one dataset stays one string, as before mixtures
    single = load_config(None, ["data.dataset=/data/a"]).data
    assert single.dataset == "/data/a" and not single.is_mixture


@pytest.mark.parametrize(
    "value, message",
    [
        ("[]", "data.dataset: an empty list of sources; give at least one id or folder"),
        ("[a, {dataset: b, weight: -1}]", "data.dataset[1].weight: must be > 0 and finite, got -1"),
        ("[a, {dataset: b, weight: 0}]", "data.dataset[1].weight: must be > 0 and finite, got 0"),
        ("[a, {dataset: b, weight: .nan}]", "data.dataset[1].weight: must be > 0 and finite, got nan"),
        ("[a, {dataset: b, weight: lots}]", "data.dataset[1].weight: must be a number, got 'lots'"),
        (
            "[{dataset: a, wieght: 2}]",
            "data.dataset[0]: unknown key wieght; a source takes dataset, split, image_column, weight",
        ),
        ("[a, {split: validation}]", "data.dataset[1].dataset: missing: name a Hub dataset id or a local folder"),
        ("[a, {dataset: b, split: ''}]", "data.dataset[1].split: must not be empty"),
        ("{dataset: a}", "data.dataset: one source is written as an id or folder; a list of sources is written [...]"),
    ],
)
@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_a_bad_source_is_refused_in_one_line_naming_it(value, message, where, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  dataset: {value}\n")
    with pytest.raises(ConfigError) as error:
        load_config(*((None, [f"data.dataset={value}"]) if where == "command line" else (recipe, [])))
    assert str(error.value) == message


def test_an_unknown_stopping_strategy_is_refused():
    with pytest.raises(ConfigError, match="^data.mixture_stopping: must be one of first_exhausted, all_exhausted"):
        load_config(None, ["data.dataset=[a,b]", "data.mixture_stopping=longest"])


# --- proportions and order ------------------------------------------------------------------------------------

IMAGES_PER_SOURCE = 600
ROWS_COUNTED = 500
"""The first rows of the mixture that are counted. Neither source (600 images) can run out within them, even with
a stream's shuffle buffer (SHUFFLE_BUFFER rows ahead), so the source of each is an independent draw: the count
of rows from the 0.8 source is Binomial(500, 0.8)."""
SHUFFLE_BUFFER = 16
BAND = 4 * math.sqrt(0.8 * 0.2 / ROWS_COUNTED)
"""Four standard deviations of that share (0.072): a correct mixture lands outside with probability < 1e-4, and
0.5 / 0.5 weights (share 0.5, 13 of its own standard deviations away) cannot land inside."""


def write_sources(root: Path, count: int, size: tuple[int, int]) -> tuple[Path, Path]:
    """Two folders of textured images; those of `dark` are scaled to a third of the brightness, so that the
    source of any crop is told by its mean (light ~128, dark ~43 of 255)."""
    light = root / "light"
    write_images(light, count, size=size, seed=0)
    for path in write_images(root / "dark", count, size=size, seed=1):
        pixels = np.asarray(Image.open(path), dtype=np.float32) / 3
        Image.fromarray(pixels.astype(np.uint8)).save(path)
    return light, root / "dark"


def is_light(pixels: torch.Tensor) -> bool:
    return pixels.float().mean().item() > 85  # uint8 pixels: between the two sources' means


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> tuple[Path, Path]:
    return write_sources(tmp_path_factory.mktemp("many"), IMAGES_PER_SOURCE, size=(16, 16))


def light_share(folders: tuple[Path, Path], weights: tuple[float, float], streaming: bool) -> float:
    """The share of the light source among the first ROWS_COUNTED training samples, told by their pixels."""
    sources = [{"dataset": str(folder), "weight": weight} for folder, weight in zip(folders, weights, strict=True)]
    config = DataConfig(
        dataset=sources, streaming=streaming, resolution=16, shuffle_buffer_size=SHUFFLE_BUFFER, num_workers=0
    )
    dataset = training_dataset(config, seed=0)
    samples = islice(iter(dataset), ROWS_COUNTED) if streaming else (dataset[i] for i in range(ROWS_COUNTED))
    return sum(is_light(sample["pixel_values"]) for sample in samples) / ROWS_COUNTED


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streamed"])
def test_sources_weighted_0_8_and_0_2_are_drawn_in_those_proportions(many, streaming):
    assert abs(light_share(many, (0.8, 0.2), streaming) - 0.8) <= BAND
    assert abs(light_share(many, (0.5, 0.5), streaming) - 0.8) > BAND  # the band tells other weights apart


def test_a_map_style_mixture_is_drawn_by_the_run_seed(many):
    config = DataConfig(dataset=[str(many[0]), str(many[1])], resolution=16)

    def paths(seed: int) -> list[str]:
        return [row["path"] for row in load_image_dataset(config, seed=seed)["image"]]

    assert paths(0) == paths(0)
    assert paths(0) != paths(1)


# --- training and resuming ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> tuple[Path, Path]:
    """6 light and 6 dark images: at 0.8 / 0.2 the light source runs out after ~7.5 rows, so 8 steps of one image
    cross an epoch end, and a checkpoint after step 4 falls mid-epoch."""
    return write_sources(tmp_path_factory.mktemp("few"), 6, size=(40, 48))


@pytest.fixture
def one_thread():
    """Three short runs on one thread: with two, on the two shared cores this suite's machine has, another busy
    process made them 40 times slower (OpenMP threads waiting on each other), and both runs compared use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "map-style"])
def test_a_mixture_resumes_where_it_stopped(few, tmp_path, streaming, one_thread):
    """Stopped after step 4 and resumed to step 8, the run trains on the images the uninterrupted run trains on (both
    sources among them), in the same order with the same random crops and flips, and ends with its weights."""
    mixed = f"[{{dataset: {few[0]}, weight: 0.8}}, {{dataset: {few[1]}, weight: 0.2}}]"
    recipe = {
        "data.dataset": mixed,
        "data.streaming": str(streaming).lower(),
        "data.center_crop": "false",
        "data.random_flip": "true",
        "loss.perceptual_weight": 0,
        "loss.disc_weight": 0,
        "train.batch_size": 1,
    }
    seen: dict[str, list[torch.Tensor]] = {}

    def run(name: str, output_dir: Path, **overrides) -> Trainer:
        trainer = Trainer(load_config(None, tiny_overrides(few[0], output_dir, **recipe, **overrides)))
        real_step, batches = trainer.training_step, seen.setdefault(name, [])
        trainer.training_step = lambda images: batches.append(images.clone()) or real_step(images)
        trainer.train()
        return trainer

    whole = run("whole", tmp_path / "whole", **{"train.max_steps": 8})
    first = run("first", tmp_path / "run", **{"train.max_steps": 4, "train.checkpoint_every_steps": 4})
    resumed = run("second", tmp_path / "run", **{"train.max_steps": 8, "train.resume_from": "latest"})
    assert first.progress.epoch == 0 and whole.progress.epoch >= 1  # stopped mid-epoch, resumed across its end
    assert {is_light(batch * 127.5 + 127.5) for batch in seen["whole"]} == {True, False}
    assert len(seen["first"]) == 4 and len(seen["second"]) == 4
    for expected, got in zip(seen["whole"], seen["first"] + seen["second"], strict=True):
        assert torch.equal(expected, got)
    for name, weight in whole.vae.state_dict().items():
        assert torch.equal(weight, resumed.vae.state_dict()[name]), name


# --- held-out and reference images ------------------------------------------------------------------------------


def held_out_paths(config: DataConfig) -> list[str]:
    return [row["path"] for row in heldout_dataset(config, seed=0).dataset[config.image_column]]


def test_held_out_images_come_from_every_source_and_never_train(few):
    """Each source holds out its own `validation_fraction`; `validation_max_images` is shared by the weights."""
    light, dark = (str(folder) for folder in few)
    config = DataConfig(
        dataset=[{"dataset": light, "weight": 3}, dark], validation_fraction=0.5, validation_max_images=4
    )
    held_out = held_out_paths(config)
    alone = {folder: held_out_paths(DataConfig(dataset=folder, validation_fraction=0.5)) for folder in (light, dark)}
    assert held_out == alone[light][:3] + alone[dark][:1]  # 4 images split 3:1, one source after the other
    assert held_out_paths(replace(config, validation_max_images=1)) == alone[light][:1]  # the dark share rounds to 0
    trained = {row["path"] for row in training_dataset(config, seed=0).dataset["image"]}
    assert trained and not trained & set(alone[light] + alone[dark])


def test_a_single_dataset_reads_as_it_did_before_mixtures(few):
    """The rows a single dataset trains and evaluates on are those of the code before mixtures (rebuilt here from
    `datasets` directly), and a one-source list gives the same ones."""
    folder = str(few[0])
    config = DataConfig(dataset=folder, validation_fraction=0.5)
    rows = load_image_dataset(config)
    split = rows.train_test_split(test_size=0.5, seed=0, shuffle=True)  # what `_held_out` did before mixtures
    expected_train = [row["path"] for row in split["train"]["image"]]
    expected_held_out = [row["path"] for row in split["test"]["image"]]
    for single in (config, DataConfig(dataset=[folder], validation_fraction=0.5)):
        assert [row["path"] for row in training_dataset(single, seed=0).dataset["image"]] == expected_train
        assert held_out_paths(single) == expected_held_out
    assert mixture.sources(config) == [config]  # one source, untouched: today's code path


def write_shard(folder: Path, payloads: list[bytes]) -> None:
    folder.mkdir(parents=True)
    with tarfile.open(folder / "train-00000.tar", "w") as tar:
        for index, payload in enumerate(payloads):
            member = tarfile.TarInfo(f"sample_{index:02d}.png")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


def test_shard_names_are_kept_when_every_source_has_them(tmp_path):
    """WebDataset's `__url__` and `__key__` (which name an unreadable file that has no path of its own) stay in a
    mixture of shards; beside an image folder, which has none, they are dropped so that the columns agree. A
    broken member of a streamed mixture is named and replaced as it is alone."""
    payloads = [path.read_bytes() for path in write_images(tmp_path / "images", 3, size=(16, 16))]
    write_shard(tmp_path / "good", payloads)
    write_shard(tmp_path / "broken", [payloads[0], b"<html>not an image</html>", payloads[2]])

    def mixed(first: Path, **options) -> DataConfig:
        return DataConfig(dataset=[str(first), str(tmp_path / "broken")], resolution=16, num_workers=0, **options)

    assert load_image_dataset(mixed(tmp_path / "good"), seed=0).column_names == ["image", "__url__", "__key__"]
    assert load_image_dataset(mixed(tmp_path / "images"), seed=0).column_names == ["image"]
    stream = training_dataset(mixed(tmp_path / "good", streaming=True, mixture_stopping="all_exhausted"), seed=0)
    samples = list(stream)  # all_exhausted: every row of both sources is met
    assert {record["name"] for sample in samples for record in sample["unreadable"]} == {"sample_01.png"}
    assert all(sample["pixel_values"].shape == (3, 16, 16) for sample in samples)


def test_a_source_may_name_its_own_image_column(tmp_path, few):
    """A source's images under another column are renamed to `data.image_column`, so the sources interleave."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    parquet = tmp_path / "parquet"
    parquet.mkdir()
    rows = {"picture": [str(path) for path in sorted(few[1].glob("*.png"))], "label": list(range(6))}
    Dataset.from_dict(rows).cast_column("picture", ImageFeature()).to_parquet(str(parquet / "train.parquet"))
    config = DataConfig(dataset=[str(few[0]), {"dataset": str(parquet), "image_column": "picture"}])
    mixed = load_image_dataset(config, seed=0)
    assert mixed.column_names == ["image"]
    sources = {"light" if row["path"] and "light" in row["path"] else "parquet" for row in mixed["image"]}
    assert sources == {"light", "parquet"}


def test_the_model_card_names_each_source_of_a_mixture_and_its_share(tmp_path):
    config = load_config(None, ["data.dataset=[{dataset: someone/faces, weight: 3}, /data/photos]"])
    run_config = yaml.safe_load(to_yaml(config))  # as the card reads the run's config.yaml
    card = render_card(RunRecord(vae_config={}, config=run_config), "alice/vae", None)
    assert yaml.safe_load(card.split("---\n")[1])["datasets"] == ["someone/faces"]  # the local folder is no Hub id
    mixed = "a mixture of `someone/faces` (split `train`, 75%), `/data/photos` (split `train`, 25%)"
    assert f"- data: {mixed}, at {config.data.resolution} px" in card
