"""Full training state in `<output_dir>/checkpoints/checkpoint-<step>/`, written so it is never half there.

Two parts: `Checkpointer` writes and reads checkpoint folders (safely, rotated, checked against the run), and
`RunCheckpoints` knows what a run's state is (players, progress, EMA, data position) and saves or restores it.

Accelerate's `save_state` writes the models (safetensors), optimizers and every process's RNG state
(under DeepSpeed the trainer writes the models and the gathered optimizer state itself, see
`vae_hf.parallel.deepspeed`); we add `trainer_state.json` (step, epoch, data position, schedules, gradient scalers) and
`model_shape.json` (the architectures being trained). A checkpoint is written to a hidden staging folder and
renamed into place once complete, so `latest` never picks a half-written one. Everything loads
without unpickling code: safetensors, JSON, and `torch.load(weights_only=True)` for Accelerate's
optimizer and RNG files.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from vae_hf.config import ARCHITECTURE_KEYS
from vae_hf.errors import UserError
from vae_hf.io.files import plain_permissions
from vae_hf.parallel.deepspeed import DeepSpeedPlayer
from vae_hf.train.ema import EMA
from vae_hf.train.player import Player
from vae_hf.train.progress import TrainProgress

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
SHAPE_FILE = "model_shape.json"
PROCESS_TENSORS = "tensors"  # the key under which a process's own saved tensors come back from `load`
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# what must match for a checkpoint to load: the keys a fresh VAE is built from, and those a pretrained one brings
SHAPE_KEYS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    *ARCHITECTURE_KEYS,
    "mid_block_add_attention",
)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or resumed from; the message says why in one line."""


class TrainingDiverged(UserError, RuntimeError):
    """Too many consecutive non-finite steps; the state was saved before stopping."""


class Checkpointer:
    """Checkpoint folders on disk: written to a staging folder and renamed into place, rotated, and checked
    against the run before they are loaded."""

    def __init__(self, accelerator: Accelerator, folder: Path, total_limit: int | None = None):
        self.accelerator = accelerator
        self.folder = Path(folder)
        self.total_limit = total_limit

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder counts once its state file is in place)."""
        found = []
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                match = CHECKPOINT.match(path.name)
                if match and (path / STATE_FILE).is_file():
                    found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        checkpoints = self.complete()
        return checkpoints[-1] if checkpoints else None

    def resolve(self, resume_from: str) -> Path | None:
        """`latest` (None when there is none yet) or an explicit checkpoint folder."""
        if resume_from == "latest":
            runs = self.runs()
            if len(runs) > 1:  # e.g. checkpoint folders copied in by hand: `latest` would be a guess
                listed = "; ".join(f"run {run_id}: {', '.join(names)}" for run_id, names in runs.items())
                raise CheckpointError(
                    f"train.resume_from=latest: {self.folder} holds the checkpoints of {len(runs)} runs ({listed}); "
                    "give the checkpoint folder to resume from"
                )
            return self.latest()
        path = Path(resume_from).expanduser()
        if (path / STATE_FILE).is_file():
            return path
        if not path.exists():
            guess = "; did you mean latest?" if difflib.get_close_matches(resume_from.lower(), ["latest"]) else ""
            raise CheckpointError(f"train.resume_from: no such checkpoint folder {path}{guess}")
        holder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if any(CHECKPOINT.match(child.name) for child in holder.iterdir() if child.is_dir()):
            raise CheckpointError(
                f"train.resume_from: {path} holds checkpoints but is not one; give one of {holder}/checkpoint-<step>, "
                "or train.resume_from=latest with this run's output_dir"
            )
        raise CheckpointError(f"train.resume_from: {path} is not a complete checkpoint folder (no {STATE_FILE})")

    def runs(self) -> dict[str, list[str]]:
        """The complete checkpoints of each run id they record (checkpoints saved before runs had ids have none)."""
        runs: dict[str, list[str]] = {}
        for path in self.complete():
            run_id = json.loads((path / STATE_FILE).read_text()).get("run", {}).get("id")
            if run_id is not None:
                runs.setdefault(run_id, []).append(path.name)
        return runs

    def save(
        self,
        step: int,
        state: dict[str, Any],
        shape: dict[str, Any],
        process_state: dict[str, Any],
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
        process_tensors: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Every process calls this (each saves its RNG, `process_state` and its own `process_tensors`, e.g. a
        bucketed stream's buffered rows); the main process publishes it."""
        final = self.folder / f"checkpoint-{step}"
        staging = self.folder / f".checkpoint-{step}.staging"
        try:
            if self.accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(staging), safe_serialization=True)
            _write_json(staging / f"process_{self.accelerator.process_index}.json", process_state)
            if process_tensors:
                save_file(
                    {key: value.detach().cpu().contiguous() for key, value in process_tensors.items()},
                    staging / f"process_{self.accelerator.process_index}.safetensors",
                )
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                for name, named_tensors in (tensors or {}).items():  # e.g. the EMA weights
                    save_file(
                        {k: v.detach().cpu().contiguous() for k, v in named_tensors.items()},
                        staging / f"{name}.safetensors",
                    )
                _write_json(staging / SHAPE_FILE, shape)
                _write_json(staging / STATE_FILE, state)  # written last: its presence marks completeness
                retired = self.folder / f".checkpoint-{step}.retired"
                if final.exists():  # the same step saved again (e.g. at an epoch's end): swap, then delete
                    os.replace(final, retired)
                plain_permissions(staging)  # safetensors and torch.save write their files for the owner only
                os.replace(staging, final)
                shutil.rmtree(retired, ignore_errors=True)
                self.rotate()
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            previous = self.latest()
            kept = f"; the previous checkpoint {previous} is intact" if previous else ""
            raise CheckpointError(f"cannot write checkpoint {final}: {error.strerror or error}{kept}") from None
        self.accelerator.wait_for_everyone()
        return final

    def rotate(self) -> None:
        """Keep the newest `total_limit` complete checkpoints; clear staging folders of crashed saves."""
        for stale in [*self.folder.glob(".checkpoint-*.staging"), *self.folder.glob(".checkpoint-*.retired")]:
            shutil.rmtree(stale, ignore_errors=True)
        if self.total_limit is None:
            return
        checkpoints = self.complete()
        for old in checkpoints[: max(len(checkpoints) - self.total_limit, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, shape: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Refuse a checkpoint of another shape, restore models, optimizers and RNGs, and return the
        trainer's state and this process's own."""
        saved_shape = json.loads((path / SHAPE_FILE).read_text())
        differences = [
            f"{key} {saved_shape.get(key)} -> {value}" for key, value in shape.items() if saved_shape.get(key) != value
        ]
        if differences:
            raise CheckpointError(
                f"train.resume_from: {path} holds a VAE of another shape ({'; '.join(differences)}); "
                "resume with the settings it was trained with, or start a new output_dir"
            )
        state = json.loads((path / STATE_FILE).read_text())
        saved_processes = state.get("num_processes", 1)
        if saved_processes != self.accelerator.num_processes:
            raise CheckpointError(
                f"train.resume_from: {path} was saved by {saved_processes} processes, this run has "
                f"{self.accelerator.num_processes}; the data position only carries over unchanged"
            )
        saved_layout, layout = state.get("layout"), checkpoint_layout(self.accelerator)
        if saved_layout is not None and saved_layout != layout:
            raise CheckpointError(
                f"train.resume_from: {path} was saved under {saved_layout}, this run is {layout}; "
                "resume with the accelerate launch config it was trained with"
            )
        self.accelerator.load_state(str(path))
        own = json.loads((path / f"process_{self.accelerator.process_index}.json").read_text())
        tensors = path / f"process_{self.accelerator.process_index}.safetensors"
        if tensors.is_file():
            own[PROCESS_TENSORS] = load_file(tensors)
        return state, own


def checkpoint_layout(accelerator: Accelerator) -> str:
    """How a launch setup lays out model and optimizer state in a checkpoint; resuming needs the same."""
    layouts = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed ZeRO-2"}
    return layouts.get(accelerator.distributed_type, "DDP or one process")


def read_tensors(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    """Tensors saved with `Checkpointer.save(tensors={name: ...})`."""
    path = Path(checkpoint) / f"{name}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"train.resume_from: {checkpoint} has no {path.name}")
    return load_file(path)


def model_shape(vae_config: dict[str, Any], discriminator: dict[str, Any] | None) -> dict[str, Any]:
    """What must match for a checkpoint to load: the VAE's architecture and the discriminator's."""
    shape = {key: _plain(vae_config.get(key)) for key in SHAPE_KEYS}
    shape["discriminator"] = discriminator
    return shape


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_plain))


@dataclass
class Resumed:
    path: Path
    stream_position: dict[str, Any] | None
    """This process's position in its shard of a stream, to apply when the data is next iterated."""
    config: dict[str, Any] | None
    """The config the checkpoint was trained with (None for checkpoints saved before it was recorded)."""


class RunCheckpoints:
    """A run's whole state: what Accelerate saves (models, optimizers, RNGs) through the `Checkpointer`, plus
    the progress counters, learning-rate schedules, gradient scalers, EMA, each process's stream position, and
    under DeepSpeed the gathered weights and Adam moments of each engine."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        progress: TrainProgress,
        players: dict[str, Player | None],
        model_shape: dict[str, Any],
        stream_position=None,
        run_id: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.checkpointer = checkpointer
        self.run_id = run_id  # saved in every checkpoint; a resumed run takes its checkpoint's
        self.config = config  # the config this run trains with, saved in every checkpoint
        self.accelerator = checkpointer.accelerator
        self.progress = progress
        self.players = players  # "vae", "discriminator" (None when the recipe has none)
        self.model_shape = model_shape
        self.stream_position = stream_position  # a streaming run's position (a callable), per process

    def state_dict(self, ema: EMA | None) -> dict[str, Any]:
        """What Accelerate's save_state does not hold: counters, schedules, scalers, the EMA's scalars."""
        players = self._present_players()
        return {
            "run": {"id": self.run_id, "config": self.config},
            "num_processes": self.accelerator.num_processes,
            "layout": checkpoint_layout(self.accelerator),
            "progress": self.progress.state_dict(),
            "schedulers": {name: p.scheduler.state_dict() for name, p in players.items()},
            "scalers": {name: p.scaler.state_dict() for name, p in players.items() if p.scaler},
            "ema": None if ema is None else ema.state_dict()[1],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress.load_state_dict(state["progress"])
        for name, scheduler_state in state["schedulers"].items():
            self.players[name].scheduler.load_state_dict(scheduler_state)
        for name, scaler_state in state["scalers"].items():
            if self.players[name].scaler is not None:
                self.players[name].scaler.load_state_dict(scaler_state)

    def save(self, ema: EMA | None) -> Path:
        """Every process calls this (each saves its RNG and data position); the main process publishes it."""
        tensors = {} if ema is None else {"ema": ema.state_dict()[0]}
        for suffix, player in self._deepspeed_players().items():  # every process joins the gathers
            tensors[f"model{suffix}"], tensors[f"optimizer{suffix}"] = player.state_tensors()
        stream = None if self.stream_position is None else dict(self.stream_position())
        own_tensors = None if stream is None else stream.pop(PROCESS_TENSORS, None)
        return self.checkpointer.save(
            self.progress.global_step, self.state_dict(ema), self.model_shape, {"stream": stream}, tensors, own_tensors
        )

    def resume(self, resume_from: str, ema: EMA | None, vae) -> Resumed | None:
        """Restore the run from `resume_from` (`latest` or a folder); None when `latest` finds nothing yet."""
        path = self.checkpointer.resolve(resume_from)
        if path is None:
            return None
        state, process_state = self.checkpointer.load(path, self.model_shape)
        self.load_state_dict(state)
        run = state.get("run", {})
        self.run_id = run.get("id") or self.run_id  # older checkpoints have no id: the run takes this one
        for suffix, player in self._deepspeed_players().items():
            player.load_state_tensors(read_tensors(path, f"model{suffix}"), read_tensors(path, f"optimizer{suffix}"))
        if ema is not None:
            if state.get("ema") is None:  # EMA switched on for a run that had none: start it from here
                ema.restart(vae)
            else:
                ema.load_state_dict(read_tensors(path, "ema"), state["ema"])
        position = None
        if self.stream_position is not None and self.progress.batches_in_epoch > 0:
            position = process_state["stream"]
            if PROCESS_TENSORS in process_state:  # a bucketed stream's buffered rows
                position = {**position, PROCESS_TENSORS: process_state[PROCESS_TENSORS]}
        return Resumed(path, position, run.get("config"))

    def _present_players(self) -> dict[str, Player]:
        return {name: player for name, player in self.players.items() if player is not None}

    def _deepspeed_players(self) -> dict[str, DeepSpeedPlayer]:
        """DeepSpeed's players by the suffix of their checkpoint files (as Accelerate names models)."""
        suffixes = {"vae": "", "discriminator": "_1"}
        return {
            suffixes[name]: player
            for name, player in self._present_players().items()
            if isinstance(player, DeepSpeedPlayer)
        }
