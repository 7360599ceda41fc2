"""The model card (README.md) pushed with a VAE: what it is, what it was trained on and how to load it.

The card is written from the run's own records next to the VAE folder (`<output_dir>/config.yaml`, the newest
checkpoint's `trainer_state.json`, `metrics.json`, the newest sample image), so it describes the weights it ships
with. Each record is optional: a folder that is not a run's output still gets a card with its architecture and the
lines that load it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
SAMPLES_DIR = "samples"
DIFFUSABILITY_DIR = "diffusability"
"""Where a run writes its diffusability table and spectrum chart (`vae_hf.train.diffusability`)."""
DIFFUSABILITY_RECORD = "diffusability"
"""The key of the diffusability measures in each evaluation of metrics.json."""
TAGS = ["stable-diffusion", "vae", "autoencoder-kl", "diffusers", "vae-hf"]
SD_PIPELINE_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The pipeline the usage lines plug the VAE into: the common SD 1.x base with 4 latent channels."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class RunRecord:
    """What a VAE folder and the run that wrote it record; a field is None when that record is absent."""

    vae_config: dict[str, Any]
    """The folder's config.json (the AutoencoderKL architecture)."""
    config: dict[str, Any] | None = None
    """The run's resolved config (`<output_dir>/config.yaml`), parsed."""
    config_text: str | None = None
    """The same file verbatim, shown in the card as the recipe."""
    global_step: int | None = None
    """Optimizer steps trained, from the newest checkpoint."""
    metrics: dict[str, Any] | None = None
    """Metric name -> value, from `<output_dir>/metrics.json`."""
    sample: Path | None = None
    """The newest `<output_dir>/samples/*.png` (original | reconstruction)."""
    diffusability_table: str | None = None
    """`<output_dir>/diffusability/table.md`: the diffusability row of each held-out evaluation."""
    spectrum_chart: Path | None = None
    """`<output_dir>/diffusability/spectra.png`: the latents' spectra beside the images'."""


def write_model_card(folder: Path, target: Path, repo_id: str, license_id: str | None = None) -> Path:
    """Write README.md (and the sample image it shows) into `target`, the staging copy of `folder`."""
    record = read_run(Path(folder))
    sample_name = _copy_into(target, record.sample, f"{SAMPLES_DIR}/{record.sample.name}") if record.sample else None
    chart_name = _copy_into(target, record.spectrum_chart, f"{DIFFUSABILITY_DIR}/spectra.png")
    card = target / CARD_FILE
    card.write_text(render_card(record, repo_id, license_id, sample_name, chart_name))
    return card


def _copy_into(target: Path, source: Path | None, name: str) -> str | None:
    """Copy `source` to `target/name` (the card links it by that name); None when there is no source."""
    if source is None:
        return None
    destination = target / name
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.unlink(missing_ok=True)  # it may be a hard link into the user's folder: never write through it
    shutil.copyfile(source, destination)
    return name


def run_dir_of(folder: Path) -> Path | None:
    """The training output folder when `folder` is its `vae/` (or `vae_ema/`): the parent holding config.yaml."""
    parent = Path(folder).resolve().parent
    return parent if (parent / "config.yaml").is_file() else None


def read_run(folder: Path) -> RunRecord:
    """Everything the card reports, from the VAE folder and (when it is a run's output) the run folder."""
    record = RunRecord(vae_config=_read_json(folder / "config.json") or {})
    run_dir = run_dir_of(folder)
    if run_dir is None:
        return record
    record.config_text = (run_dir / "config.yaml").read_text()
    record.config = _parse_yaml(record.config_text)
    record.global_step = newest_global_step(run_dir / "checkpoints")
    metrics = _read_json(run_dir / "metrics.json")
    record.metrics = flatten(metrics) if isinstance(metrics, dict) else None
    samples = list((run_dir / "samples").glob("*.png"))
    record.sample = max(samples, key=lambda path: (path.stat().st_mtime, path.name)) if samples else None
    table = run_dir / DIFFUSABILITY_DIR / "table.md"
    record.diffusability_table = table.read_text().strip() if table.is_file() else None
    chart = run_dir / DIFFUSABILITY_DIR / "spectra.png"
    record.spectrum_chart = chart if chart.is_file() else None
    return record


def newest_global_step(checkpoints: Path) -> int | None:
    """`progress.global_step` of the newest complete checkpoint (its trainer_state.json is written last)."""
    steps = [
        (int(path.name.split("-", 1)[1]), path)
        for path in checkpoints.glob("checkpoint-*")
        if path.name.split("-", 1)[1].isdigit() and (path / "trainer_state.json").is_file()
    ]
    if not steps:
        return None
    state = _read_json(max(steps)[1] / "trainer_state.json")
    try:
        return int(state["progress"]["global_step"])
    except (TypeError, KeyError, ValueError):
        logger.warning("no progress.global_step in the newest checkpoint's trainer_state.json")
        return None


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metric dicts as dotted names (`{"rfid": {"value": 1}}` -> `rfid.value`), for a two-column table."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


# --- rendering ---------------------------------------------------------------------------------------------------


def render_card(
    record: RunRecord,
    repo_id: str,
    license_id: str | None,
    sample_name: str | None = None,
    chart_name: str | None = None,
) -> str:
    sections = [
        front_matter(record, license_id),
        f"# {repo_id.split('/')[-1]}\n\n"
        "A Stable-Diffusion-style KL-VAE (diffusers `AutoencoderKL`) trained with vae-hf.",
        _architecture(record.vae_config),
        _training(record),
        _metrics(record.metrics),
        _diffusability(record.diffusability_table, chart_name),
        f"## Sample\n\nOriginal | reconstruction:\n\n![sample]({sample_name})" if sample_name else None,
        _usage(record, repo_id),
        _recipe(record.config_text),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def front_matter(record: RunRecord, license_id: str | None) -> str:
    """The Hub's YAML metadata block; the licence is the user's to choose, so it is only set when given."""
    meta: dict[str, Any] = {"library_name": "diffusers", "tags": TAGS}
    if license_id:
        meta["license"] = license_id
    datasets = [hub_id(source["dataset"]) for source in _data_sources(_get(record.config, "data") or {})]
    if any(datasets):
        meta["datasets"] = [dataset for dataset in datasets if dataset]
    base_model = hub_id(_get(record.config, "model", "pretrained"))
    if base_model:
        meta["base_model"] = base_model
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---"


def hub_id(name: Any) -> str | None:
    """`name` when it reads as a Hub id (OWNER/NAME) rather than a local path, else None."""
    if not isinstance(name, str) or not HUB_ID.match(name) or Path(name).exists():
        return None
    return name


def _architecture(vae_config: dict[str, Any]) -> str | None:
    widths = vae_config.get("block_out_channels")
    if not widths:
        return None
    factor = 2 ** (len(widths) - 1)  # one 2x downsampling between consecutive levels
    lines = [
        "## Architecture",
        "",
        f"- block widths {list(widths)}, {vae_config.get('layers_per_block')} resnet blocks per level",
        f"- {vae_config.get('latent_channels')} latent channels, downsampling factor {factor} (f{factor})",
        f"- scaling_factor {vae_config.get('scaling_factor')}, shift_factor {vae_config.get('shift_factor')}",
    ]
    return "\n".join(lines)


def _training(record: RunRecord) -> str:
    data = _get(record.config, "data") or {}
    lines = ["## Training", ""]
    sources = _data_sources(data)
    if len(sources) == 1 and not isinstance(data["dataset"], list):
        lines.append(f"- data: `{data['dataset']}` (split `{sources[0]['split']}`, {data.get('resolution', '?')} px)")
    elif sources:
        weights = [float(source.get("weight", 1.0)) for source in sources]
        mixed = ", ".join(
            f"`{source['dataset']}` (split `{source.get('split', '?')}`, {100 * weight / sum(weights):.3g}%)"
            for source, weight in zip(sources, weights, strict=True)
        )
        lines.append(f"- data: a mixture of {mixed}, at {data.get('resolution', '?')} px")
    if record.global_step is None:
        lines.append("- steps trained: not recorded")
    else:
        lines.append(f"- steps trained: {record.global_step:,} (optimizer updates, after gradient accumulation)")
    pretrained = _get(record.config, "model", "pretrained")
    if record.config is not None:
        lines.append(f"- started from: `{pretrained}`" if pretrained else "- started from: random initialisation")
    losses = _losses(_get(record.config, "loss"))
    if losses:
        lines.append(f"- losses: {losses}")
    if _get(record.config, "model", "train_decoder_only"):
        lines.append("- encoder frozen (decoder-only fine-tune): latents stay those of the base VAE")
    if record.config is None:
        lines.append("- recipe: not recorded (the folder is not inside a vae-hf output folder)")
    return "\n".join(lines)


def _data_sources(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The datasets a run read, each a mapping with `dataset` and `split`: the one of `data.dataset`, or each source
    of a mixture (a list, as the resolved config writes it)."""
    dataset = data.get("dataset")
    if isinstance(dataset, list):
        return [source for source in dataset if isinstance(source, dict) and source.get("dataset")]
    return [{"dataset": dataset, "split": data.get("split", "train")}] if dataset else []


def _losses(loss: Any) -> str | None:
    """The loss terms the recipe weighs in, e.g. `l1 + 1e-06 KL (sum) + 1.0 LPIPS + 0.5 hinge GAN from step 50001`."""
    if not isinstance(loss, dict):
        return None
    terms = [f"{loss.get('reconstruction', '?')} reconstruction"]
    if loss.get("kl_weight"):
        terms.append(f"{loss['kl_weight']} KL ({loss.get('kl_reduction', 'mean')})")
    if loss.get("perceptual_weight"):
        terms.append(f"{loss['perceptual_weight']} LPIPS")
    if loss.get("disc_weight"):
        gan = f"{loss['disc_weight']} {loss.get('disc_loss', '')} GAN from step {loss.get('disc_start_step', 0)}"
        terms.append(gan.replace("  ", " "))
    return " + ".join(terms)


def _metrics(metrics: dict[str, Any] | None) -> str | None:
    if not metrics:
        return None
    # the diffusability measures have their own section, as the table `vae-hf diffusability` prints
    rows = [
        f"| {_cell(name)} | {_cell(_number(value))} |"
        for name, value in metrics.items()
        if f".{DIFFUSABILITY_RECORD}." not in name
    ]
    return "\n".join(["## Metrics", "", "| metric | value |", "| --- | --- |", *rows])


def _diffusability(table: str | None, chart_name: str | None) -> str | None:
    if table is None:
        return None
    lines = [
        "## Diffusability",
        "",
        "How learnable the latent space is, measured on the held-out images during training (the measures of "
        "`vae-hf diffusability`: latent spectrum, equivariance, noise robustness, channel statistics):",
        "",
        table,
    ]
    if chart_name:
        lines += ["", f"![latent spectra]({chart_name})"]
    return "\n".join(lines)


def _usage(record: RunRecord, repo_id: str) -> str:
    code = (
        "```python\n"
        "from diffusers import AutoencoderKL, StableDiffusionPipeline\n\n"
        f'vae = AutoencoderKL.from_pretrained("{repo_id}")\n'
        f'pipe = StableDiffusionPipeline.from_pretrained("{SD_PIPELINE_ID}", vae=vae)\n'
        "```"
    )
    note = (
        "The encoder was frozen, so the VAE stays compatible with diffusion models trained on the base VAE's latents."
        if _get(record.config, "model", "train_decoder_only")
        else "A VAE trained from scratch or with its encoder unfrozen has its own latent space: a diffusion model "
        "must be trained on its latents."
    )
    return f"## Use\n\n{code}\n\n{note}"


def _recipe(config_text: str | None) -> str | None:
    if config_text is None:
        return None
    return (
        f"## Recipe\n\n<details>\n<summary>config.yaml</summary>\n\n```yaml\n{config_text.rstrip()}\n```\n\n</details>"
    )


# --- helpers -----------------------------------------------------------------------------------------------------


def _get(config: dict[str, Any] | None, *keys: str) -> Any:
    """config[k1][k2]..., or None where any level is missing."""
    value: Any = config
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _read_json(path: Path) -> Any:
    """The parsed file, or None when it is absent or unreadable (a card never fails for a missing record)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        logger.warning("ignoring %s: %s", path, error)
        return None


def _parse_yaml(text: str) -> dict[str, Any] | None:
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as error:
        logger.warning("config.yaml does not parse, the card shows it as text only: %s", error)
        return None
    return parsed if isinstance(parsed, dict) else None


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")  # a bare pipe would split the table cell
