"""What a run shows and writes besides its checkpoints: logged scalars, sample PNGs, the exported VAE, Hub
pushes, the resolved config and the start and end summaries. Only the main process writes files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from PIL import Image

from vae_hf.analysis.samples import save_sample
from vae_hf.config import Config, to_yaml
from vae_hf.io.export import save_vae
from vae_hf.io.hub import push_vae_folder
from vae_hf.models.vae import encoder_fingerprint
from vae_hf.train.latent_factors import ExportFactors, LatentFactors

LOSSES_SHOWN = ("rec", "kl", "perceptual", "g_adv", "d_loss")


class Reporter:
    def __init__(
        self,
        accelerator: Accelerator,
        config: Config,
        output_dir: Path,
        encoder_fingerprint: str | None = None,
        latent_factors: LatentFactors | None = None,
    ):
        self.accelerator = accelerator
        self.config = config
        self.output_dir = Path(output_dir)
        # what a decoder-only fine-tune must never change: checked at every export
        self.encoder_fingerprint = encoder_fingerprint
        self.latent_factors = latent_factors  # None: exports keep the model's own factors
        self.exported: dict[Path, ExportFactors] = {}  # the factors each export folder was last written with

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, values: dict[str, float], step: int, bar) -> None:
        """Scalars to the trackers, the main losses to the progress bar."""
        self.accelerator.log(values, step=step)
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in LOSSES_SHOWN}, refresh=False)

    def write_sample(self, vae: AutoencoderKL, images: torch.Tensor, step: int) -> Path | None:
        """Reconstructions of `images` as an "original | reconstruction" PNG (main process)."""
        if not self.is_main:
            return None
        path = save_sample(vae, images, self.output_dir / "samples", step)
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        for tracker in self.accelerator.trackers:  # next to the loss curves
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": pixels[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [pixels]}, step=step)
        return path

    def export(self, exports: dict[Path, AutoencoderKL], step: int = 0) -> None:
        """Save each VAE as a diffusers folder (main process), after checking that a decoder-only run left the
        encoder as it was, with the latent factors chosen for it (`vae_hf.train.latent_factors`). The factors
        go to the trackers at every export, and to the console at a folder's first export and at the end."""
        if not self.is_main:
            return
        for target, vae in exports.items():
            if self.encoder_fingerprint is not None and encoder_fingerprint(vae) != self.encoder_fingerprint:
                raise RuntimeError(f"model.train_decoder_only: the encoder of {target.name} changed; not exported")
            if self.latent_factors is None:
                save_vae(vae, target)
                continue
            factors = self.latent_factors.for_export(vae, target, step)
            save_vae(vae, target, factors.config_updates())
            if target not in self.exported:
                print(f"vae-hf: {target.name}/ exported at step {step} with {factors.describe()}", flush=True)
            self.exported[target] = factors
            values = {f"{target.name}/scaling_factor": factors.scaling_factor}
            if factors.shift_factor is not None:
                values[f"{target.name}/shift_factor"] = factors.shift_factor
            self.accelerator.log(values, step=step)

    def push(self, step: int) -> None:
        """Upload vae/ with its model card (main process)."""
        if not self.is_main:
            return
        train = self.config.train
        url = push_vae_folder(
            self.output_dir / "vae", train.hub_repo_id, train.hub_private, commit_message=f"vae-hf: step {step}"
        )
        print(f"vae-hf: pushed the VAE at step {step} to {url}", flush=True)

    def write_config(self) -> None:
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(to_yaml(self.config))

    def start(self, total_steps: int, dataset_size: int | None, checkpoints: Path, stages=()) -> None:
        """The run's plan in two lines; with `train.stages`, one more per stage."""
        if not self.is_main:
            return
        train, processes = self.config.train, self.accelerator.num_processes
        batch, accumulation = train.batch_size, train.gradient_accumulation_steps
        if stages:  # the first stage's
            batch, accumulation = stages[0].batch_size, stages[0].gradient_accumulation_steps
        size = "streaming" if dataset_size is None else f"{dataset_size} images"
        buckets = ", aspect-ratio buckets" if self.config.data.buckets else ""
        print(
            f"vae-hf: {processes} x {self.accelerator.device.type}, precision {train.mixed_precision}, "
            f"effective batch {batch * accumulation * processes} ({batch} x {accumulation} accumulation x "
            f"{processes} processes), {total_steps} steps, data: {size}{buckets}",
            flush=True,
        )
        if len(stages) > 1:
            print(f"vae-hf: train.stages: {'; '.join(stage.describe() for stage in stages)}", flush=True)
        print(f"vae-hf: checkpoints: {checkpoints} ({checkpoint_policy(train)})", flush=True)

    def end(self, step: int, images_skipped: int, validator) -> None:
        if not self.is_main:
            return
        folder = (self.output_dir / "vae").resolve()
        skipped = f"; {images_skipped} images skipped (unreadable or filtered; named above)" if images_skipped else ""
        print(
            f"vae-hf: done after {step} steps{skipped}. VAE saved to {folder}; load it with "
            f"AutoencoderKL.from_pretrained('{folder}')",
            flush=True,
        )
        for target, factors in self.exported.items():
            print(f"vae-hf: {target.name}/ carries {factors.describe()}", flush=True)
        if validator.enabled:
            stats = validator.record.get("latent_stats", {})
            print(f"vae-hf: held-out scores: {validator.summary()}", flush=True)
            if "std" in stats:
                print(f"vae-hf: held-out latent std {stats['std']:.4g} (in {validator.path})", flush=True)


def checkpoint_policy(train) -> str:
    """When the full state is saved and how many checkpoints are kept, in words."""
    kept = "all kept" if train.checkpoints_total_limit is None else f"newest {train.checkpoints_total_limit} kept"
    when = []
    if train.checkpoint_every_steps:
        when.append(f"every {train.checkpoint_every_steps} steps")
    minutes = train.checkpoint_every_minutes
    when.append("at every epoch end" if minutes == 0 else f"at an epoch end once {minutes:g} min have passed")
    when.append("at the end and on SIGTERM/SIGINT")
    return f"{kept}; saved {', '.join(when)}"
