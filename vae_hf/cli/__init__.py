"""The command line: `vae-hf SUBCOMMAND` and `train_autoencoder.py`.

This module holds the parsers; each subcommand's work is a function in its own module here
(`vae_hf.cli.reconstruct`, `vae_hf.cli.push`, ...), imported only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

from vae_hf.cli.train import add_train_arguments, run_train
from vae_hf.config import CHOICES, WEIGHT_DTYPES
from vae_hf.errors import UserError
from vae_hf.io.hub import DEFAULT_COMMIT_MESSAGE


def _command(module: str, name: str):
    """A subcommand's function, imported only when that subcommand runs: torch, diffusers and accelerate
    take seconds to import, and a typo in an argument should not wait for them."""
    return getattr(importlib.import_module(f"vae_hf.cli.{module}"), name)


def _add_train(commands) -> None:
    parser = commands.add_parser("train", help="train a VAE (same as train_autoencoder.py)")
    add_train_arguments(parser)
    parser.set_defaults(run=lambda args: run_train(args.config, args.overrides))


def _add_supervise(commands) -> None:
    parser = commands.add_parser(
        "supervise",
        help="run a job so that SIGTERM/SIGINT reach all its processes and it ends only once they saved",
    )
    parser.add_argument("job", nargs=argparse.REMAINDER, help="-- accelerate launch train_autoencoder.py ...")
    parser.set_defaults(run=lambda args: _command("supervise", "supervise_command")(args.job))


def _add_reconstruct(commands) -> None:
    parser = commands.add_parser("reconstruct", help="encode and decode images, each at its own size")
    parser.add_argument("--model", required=True, help="diffusers folder, Hub id, or single-file .safetensors")
    parser.add_argument("--input", required=True, help="an image, or a folder read recursively")
    parser.add_argument("--out", required=True, help="folder for the PNGs (same relative names)")
    parser.add_argument(
        "--tile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--tile: every image larger than a tile in tiles; --no-tile: none (default: images over 1 megapixel)",
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="tile size (default: sample_size; 512 px or more when automatic)"
    )
    parser.add_argument("--save-latents", action="store_true", help="also write <name>.safetensors (mean, logvar)")
    parser.set_defaults(
        run=lambda args: _command("reconstruct", "reconstruct_command")(
            args.model, args.input, args.out, args.resolution, args.tile, args.save_latents
        )
    )


def _add_interpolate(commands) -> None:
    parser = commands.add_parser("interpolate", help="grid of linear and spherical latent interpolations")
    parser.add_argument("--model", required=True, help="diffusers folder, Hub id, or single-file .safetensors")
    parser.add_argument("image_a")
    parser.add_argument("image_b")
    parser.add_argument("--steps", type=int, default=8, help="images per row, both ends included")
    parser.add_argument("--resolution", type=int, default=None, help="centre-crop size (default: sample_size)")
    parser.add_argument("--out", required=True, help="grid PNG: row 1 linear, row 2 slerp")
    parser.set_defaults(
        run=lambda args: _command("interpolate", "interpolate_command")(
            args.model, args.image_a, args.image_b, args.out, args.steps, args.resolution
        )
    )


def _add_latent_stats(commands) -> None:
    parser = commands.add_parser("latent-stats", help="latent mean/std over data; scaling_factor, shift_factor")
    parser.add_argument("--model", required=True, help="diffusers folder, Hub id, or single-file .safetensors")
    parser.add_argument("--data", required=True, help="local image folder or Hub dataset id")
    parser.add_argument("--resolution", type=int, default=None, help="centre-crop size (default: sample_size)")
    parser.add_argument("--max-images", type=int, default=None, help="use only the first N images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding processes (0: none)")
    parser.add_argument("--write", action="store_true", help="store scaling_factor in the model's config.json")
    parser.add_argument("--shift", action="store_true", help="with --write, also store shift_factor = mean")
    parser.add_argument(
        "--channels", action="store_true", help="with --write, also store per-channel latents_mean and latents_std"
    )
    parser.set_defaults(
        run=lambda args: _command("latent_stats", "latent_stats_command")(
            args.model,
            args.data,
            args.resolution,
            args.max_images,
            args.batch_size,
            args.num_workers,
            args.write,
            args.shift,
            args.channels,
        )
    )


def _add_export(commands) -> None:
    parser = commands.add_parser(
        "export", help="write one LDM-layout .safetensors for ComfyUI / A1111, or a diffusers folder"
    )
    parser.add_argument("--model", required=True, help="diffusers folder, Hub id, or single-file .safetensors")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--single-file", help="the .safetensors file to write (LDM layout)")
    target.add_argument("--diffusers", metavar="DIR", help="the diffusers folder to write (config.json + weights)")
    parser.add_argument("--dtype", choices=tuple(WEIGHT_DTYPES), default=None, help="a single file's precision (fp32)")
    parser.add_argument("--prefix", action="store_true", help="nest a single file's keys under first_stage_model.")
    parser.set_defaults(
        run=lambda args: _command("export", "export_command")(
            args.model, args.single_file, args.dtype, args.prefix, args.diffusers
        )
    )


def _add_push(commands) -> None:
    parser = commands.add_parser(
        "push", help="upload a VAE (folder, single file or Hub id) with a model card to the Hub"
    )
    parser.add_argument(
        "--model",
        required=True,
        help="diffusers folder (e.g. <output_dir>/vae), single-file .safetensors or Hub model id",
    )
    parser.add_argument("--repo-id", required=True, help="OWNER/NAME of the Hub model repo (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    parser.add_argument("--license", default=None, help="licence id for the card's metadata, e.g. mit, openrail")
    parser.set_defaults(
        run=lambda args: _command("push", "push_command")(
            args.model, args.repo_id, args.private, args.commit_message, args.license
        )
    )


def _add_models_and_images(parser: argparse.ArgumentParser, repeat_help: str) -> None:
    """The options of the commands that score several models on the same images (evaluate, diffusability)."""
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        dest="models",
        metavar="MODEL",
        help=f"diffusers folder, Hub id, or .safetensors; {repeat_help}",
    )
    parser.add_argument("--data", required=True, help="local image folder or Hub dataset id")
    parser.add_argument("--split", default="train", help="dataset split")
    parser.add_argument("--image-column", default="image", help="column holding the images")
    parser.add_argument("--resolution", type=int, default=256, help="centre-crop size (a multiple of the VAE's f)")


def _shared_request_fields(args: argparse.Namespace) -> dict:
    """What `_add_models_and_images` and `_add_batching_and_output` parsed, as an `ImagesRequest`'s fields."""
    return {
        "models": args.models,
        "data": args.data,
        "resolution": args.resolution,
        "split": args.split,
        "image_column": args.image_column,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "perceptual_pretrained": not args.perceptual_random,
        "out": args.out,
    }


def _add_batching_and_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding processes (0: none)")
    parser.add_argument("--perceptual-random", action="store_true", help="random VGG trunk for LPIPS (offline tests)")
    parser.add_argument("--out", default=None, help="JSON file for the results")


def _add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="PSNR, SSIM, LPIPS and rFID of reconstructions, a row per model")
    _add_models_and_images(parser, "repeat to compare models side by side")
    parser.add_argument("--max-images", type=int, default=None, help="stop after N usable images")
    parser.add_argument("--metrics", default=",".join(CHOICES["train.eval_metrics"]), help="comma-separated subset")
    parser.add_argument(
        "--buckets", action="store_true", help="each image at its own aspect ratio (nearest bucket), not a square crop"
    )
    _add_batching_and_output(parser)
    parser.set_defaults(
        run=lambda args: _command("evaluate", "run_evaluation")(
            _command("evaluate", "EvaluationRequest")(
                **_shared_request_fields(args), max_images=args.max_images, metrics=args.metrics, buckets=args.buckets
            )
        )
    )


def _add_diffusability(commands) -> None:
    parser = commands.add_parser(
        "diffusability", help="how learnable a VAE's latents are: spectrum, equivariance, noise, channels, probe"
    )
    _add_models_and_images(parser, "repeat to compare models on the same images and budget")
    parser.add_argument("--max-images", type=int, default=256, help="use the first N usable images (held in memory)")
    parser.add_argument("--probe-steps", type=int, default=1000, help="diffusion probe steps (0: no probe)")
    parser.add_argument("--probe-width", type=int, default=64, help="channels of the probe UNet's first level")
    parser.add_argument("--probe-batch-size", type=int, default=16, help="latents per probe step")
    parser.add_argument(
        "--fid-samples", type=int, default=None, help="probe samples for FID (default: one per held-out image; 0: none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe and of the latent noise")
    _add_batching_and_output(parser)
    parser.add_argument(
        "--plots", default=None, metavar="DIR", help="folder for spectra.png, latent_pca.png and probe_loss.png"
    )
    parser.set_defaults(
        run=lambda args: _command("diffusability", "diffusability_command")(
            _command("diffusability", "DiffusabilityRequest")(
                **_shared_request_fields(args),
                max_images=args.max_images,
                probe_steps=args.probe_steps,
                probe_width=args.probe_width,
                probe_batch_size=args.probe_batch_size,
                fid_samples=args.fid_samples,
                seed=args.seed,
                plots=args.plots,
            )
        )
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_bench(commands) -> None:
    parser = commands.add_parser("bench", help="trainer vs bare-loop throughput, memory, MFU, data loading")
    add_train_arguments(parser)
    parser.add_argument("--steps", type=_positive, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=_positive, default=3, help="untimed steps first")
    parser.add_argument("--out", default=None, help="write the report as JSON")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (else known GPUs)")
    parser.add_argument(
        "--speed", action=argparse.BooleanOptionalAction, default=True, help="time the trainer and the bare loop"
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="peak memory at batch 1/4/8 with and without gradient checkpointing, and the largest batch that fits "
        "(measured on a GPU, estimated without one)",
    )
    parser.add_argument(
        "--loader",
        action="store_true",
        help="with --no-speed: time the data loader alone (decode, resize, crop, collate; no model)",
    )
    parser.add_argument(
        "--memory-budget-gb", type=float, default=None, help="memory for the largest batch (default: GPU's, or 24)"
    )
    parser.set_defaults(
        run=lambda args: _command("bench", "bench_command")(
            args.config,
            args.overrides,
            args.steps,
            args.warmup,
            args.out,
            args.peak_tflops,
            args.speed,
            args.memory,
            args.memory_budget_gb,
            args.loader,
        )
    )


# Each subcommand adds its parser here and sets `run`, a function of the parsed arguments returning the
# exit status.
SUBCOMMANDS = [
    _add_train,
    _add_supervise,
    _add_reconstruct,
    _add_interpolate,
    _add_latent_stats,
    _add_export,
    _add_push,
    _add_evaluate,
    _add_diffusability,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-hf", description="Train and use Stable-Diffusion-style VAEs.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    except UserError as error:
        message = f"vae-hf: error: {error}"
        print(message, file=sys.stderr, flush=True)
        tell_launcher(message)
        return 2
    except KeyboardInterrupt:
        print("vae-hf: interrupted", file=sys.stderr)
        return 130


def tell_launcher(message: str) -> None:
    """Under torchrun (`accelerate launch` with several processes) also write the reason to the error file the
    launcher reads, so that its failure summary, printed last, shows it as the root cause instead of "To enable
    traceback see ...". The single-process launcher reads no file: there our line is the last before accelerate's
    `CalledProcessError` traceback (see the README)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as file:  # torch's format for a message without a traceback
            json.dump({"message": message, "timestamp": int(time.time())}, file)
    except OSError:
        pass  # the reason is on stderr already; a launcher's unwritable file must not hide it
