"""`vae-hf train` and `train_autoencoder.py`: parse and check the whole config, then train."""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys

from vae_hf.config import load_config


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML recipe (default: configs/demo.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.max_steps=20 model.block_out_channels=[32,64]",
    )


ENV_OVERRIDES = "VAE_HF_OVERRIDES"


def environment_overrides() -> list[str]:
    """`key=value` items from VAE_HF_OVERRIDES (space-separated), applied after the command line's: a scheduler
    or CI job can cap or redirect a run without editing the command. Announced, never silent."""
    text = os.environ.get(ENV_OVERRIDES, "").strip()
    if not text:
        return []
    items = shlex.split(text)
    print(f"vae-hf: overrides from {ENV_OVERRIDES}: {' '.join(items)}", file=sys.stderr, flush=True)
    return items


def run_train(config_path: str | None, overrides: list[str]) -> int:
    """Parse and check the whole config before building anything, then train."""
    from vae_hf.train.signals import die_with_parent

    die_with_parent()  # a launcher that is killed must not leave its trainer running, unsaved, on its own
    config = load_config(config_path, [*overrides, *environment_overrides()])
    from vae_hf.train.trainer import Trainer  # imported here: seconds of torch/diffusers imports

    trainer = Trainer(config)
    trainer.train()
    # saved and stopped early: not a finished run
    status = 0 if trainer.stop_signal is None else trainer.stop_request.exit_status
    # Free the models, optimizers and engines (and any collective's pending work they hold) while the interpreter is
    # whole: freed during its shutdown instead, gloo's threads can abort the process after a finished run.
    del trainer
    gc.collect()
    return status
