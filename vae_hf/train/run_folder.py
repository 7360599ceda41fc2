"""One run per output folder: a new run never lands among another run's checkpoints.

`train.resume_from=latest` resumes the newest checkpoint in `<output_dir>/checkpoints`. Had two runs shared
that folder, `latest` could pick the other run's state (another learning rate, another recipe) without a word.
So a new run in a folder that holds checkpoints is refused unless the user says what to do with them:
continue that run (`train.resume_from=latest`) or start over (`train.overwrite_output_dir=true`, which
deletes the previous run's outputs first). Each run also carries an id, saved in every checkpoint with the
config it trained with, so that a resumed run says which run it continues and what changed since.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from vae_hf.config import Config
from vae_hf.train.checkpoint import Checkpointer

# What a run writes into its output_dir; `train.overwrite_output_dir` deletes these and nothing else.
RUN_OUTPUTS = ("checkpoints", "vae", "vae_ema", "samples", "logs", "metrics.json", "config.yaml", "diffusability")
# Where a run writes and how it starts, not what it trains: left out when a resumed run lists what changed.
NOT_COMPARED = ("output_dir", "train.resume_from", "train.overwrite_output_dir")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def refusal(config: Config) -> str | None:
    """Why this run may not start in its output_dir, as this process sees the folder (None: it may)."""
    train, output_dir = config.train, Path(config.output_dir)
    if train.overwrite_output_dir or train.resume_from == "latest":
        return None
    found = Checkpointer(None, output_dir / "checkpoints").complete()
    if not found:
        return None
    if train.resume_from is not None and _inside(Path(train.resume_from), output_dir):
        return None  # a checkpoint of the run this folder holds
    names = ", ".join(path.name for path in found)
    if train.resume_from is None:
        return (
            f"output_dir: {output_dir} already holds the checkpoints of a run ({names}); continue that run with "
            "train.resume_from=latest, start over with train.overwrite_output_dir=true (deletes its checkpoints and "
            "exports), or choose another output_dir"
        )
    return (
        f"output_dir: {output_dir} already holds the checkpoints of another run ({names}); resuming "
        f"{train.resume_from} there would mix two runs: choose another output_dir, or add "
        "train.overwrite_output_dir=true to delete that run's checkpoints and exports first"
    )


def clear_previous_run(output_dir: Path) -> list[str]:
    """Delete what a previous run wrote in `output_dir` (only `RUN_OUTPUTS`); returns the names removed.

    Each is first renamed to a hidden name, then deleted: a crash halfway never leaves a checkpoint folder
    with its state file but without its weights, which `latest` would pick."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(output_dir) / name
        if not path.exists():
            continue
        retired = path.with_name(f".{name}.overwritten-{os.getpid()}")
        os.replace(path, retired)
        if retired.is_dir():
            shutil.rmtree(retired)
        else:
            retired.unlink()
        removed.append(name)
    return removed


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key old -> new` for each setting that differs between a checkpoint's config and this run's."""
    before, after = _flatten(saved), _flatten(current)
    return [
        f"{key} {before.get(key)} -> {after.get(key)}"
        for key in sorted(before.keys() | after.keys())
        if key not in NOT_COMPARED and before.get(key) != after.get(key)
    ]


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _inside(path: Path, folder: Path) -> bool:
    return path.expanduser().resolve().is_relative_to(folder.expanduser().resolve())
