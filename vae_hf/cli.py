"""Command line: `vae-hf train` (also `train_autoencoder.py`)."""

from __future__ import annotations

import argparse
import logging
import sys

from vae_hf.checkpointing import CheckpointError
from vae_hf.config import ConfigError, load_config
from vae_hf.data import DataError
from vae_hf.export import ExportError
from vae_hf.hub import OfflineError
from vae_hf.model import ModelLoadError
from vae_hf.trainer import Trainer, TrainingDiverged

USER_ERRORS = (ConfigError, DataError, ExportError, ModelLoadError, OfflineError, CheckpointError, TrainingDiverged)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML recipe (default: configs/demo.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.max_steps=20 model.block_out_channels=[32,64]",
    )


def run_train(config_path: str | None, overrides: list[str]) -> int:
    """Parse and check the whole config before building anything, then train."""
    config = load_config(config_path, overrides)
    trainer = Trainer(config)
    trainer.train()
    if trainer.stop_signal is not None:  # saved and stopped early: not a finished run
        return trainer.stop_request.exit_status
    return 0


def _add_train(commands) -> None:
    parser = commands.add_parser("train", help="train a VAE (same as train_autoencoder.py)")
    add_train_arguments(parser)
    parser.set_defaults(run=lambda args: run_train(args.config, args.overrides))


# Each subcommand adds its parser here and sets `run`, a function of the parsed arguments returning the
# exit status.
SUBCOMMANDS = [_add_train]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vae-hf", description="Train and use Stable-Diffusion-style VAEs.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    args = parser.parse_args(argv)
    return guarded(lambda: args.run(args))


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of `train_autoencoder.py`."""
    parser = argparse.ArgumentParser(prog="train_autoencoder.py", description="Train a Stable-Diffusion-style VAE.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: run_train(args.config, args.overrides))


def guarded(command) -> int:
    """Bad input ends with one readable line on stderr and exit status 2, not a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return command()
    except USER_ERRORS as error:
        print(f"vae-hf: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vae-hf: interrupted", file=sys.stderr)
        return 130
