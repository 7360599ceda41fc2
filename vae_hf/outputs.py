"""The trainer's outputs: logged scalars, held-out scores, sample PNGs, the exported VAE, Hub pushes,
the resolved config and the start and end summaries. Only the main process writes files.

A mixin of `Trainer`: it reads the trainer's accelerator, models, progress and config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vae_hf.config import to_yaml
from vae_hf.export import save_vae
from vae_hf.hub import push_vae_folder
from vae_hf.meter import LossMeter
from vae_hf.model import encoder_fingerprint
from vae_hf.samples import save_sample


class OutputsMixin:
    def _log(self, bar, meter: LossMeter) -> None:
        """The only place the loop waits for the device: `.item()` on the averaged breakdown."""
        values = meter.flush(self.accelerator.num_processes)
        values["lr"] = self.vae_player.lr
        if self.disc_player is not None:
            values["disc_lr"] = self.disc_player.lr
        values["images_skipped"] = self.progress.images_skipped
        values["steps_skipped_nonfinite"] = self.progress.steps_skipped
        if self.disc_player is not None:
            values["disc_steps_skipped_nonfinite"] = self.progress.disc_steps_skipped
        values["epoch"] = self.progress.epoch
        self.accelerator.log(values, step=self.progress.global_step)
        shown = {k: f"{v:.4g}" for k, v in values.items() if k in ("rec", "kl", "perceptual", "g_adv", "d_loss")}
        bar.set_postfix(shown, refresh=False)

    def evaluate(self, label: str) -> dict[str, float]:
        """Held-out scores of the VAE (and of its EMA), logged and recorded in metrics.json."""
        models = {"eval": self.full_vae()}
        if self.ema is not None:
            models["eval_ema"] = self.ema.copy_of(models["eval"])
        values = self.validator.evaluate(models, self.progress.global_step, label)
        self.accelerator.log(values, step=self.progress.global_step)
        return values

    def shown_vae(self):
        """The weights samples and latent statistics show: the EMA's when EMA is on, else the trained ones
        (gathered under FSDP, so every process must call this there)."""
        vae = self.full_vae()
        return vae if self.ema is None else self.ema.copy_of(vae)

    def write_sample(self) -> Path | None:
        """Reconstructions of the reference images, by the EMA weights when EMA is on."""
        if not (self.is_main or self.accelerator.is_fsdp2):  # sharded weights: every process gathers
            return None
        vae = self.shown_vae()
        if not self.is_main:
            return None
        path = save_sample(vae, self.reference_images, self.output_dir / "samples", self.progress.global_step)
        self._log_sample(path)
        return path

    def _log_sample(self, path: Path) -> None:
        """The sample grid in the trackers too, next to the loss curves."""
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": pixels[None]}, step=self.progress.global_step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [pixels]}, step=self.progress.global_step)

    def save_vae(self) -> Path:
        """Export `vae/` (and `vae_ema/`), after checking a decoder-only run left the encoder as it was."""
        self.accelerator.wait_for_everyone()
        folder = self.output_dir / "vae"
        if self.is_main or self.accelerator.is_fsdp2:  # sharded weights: every process gathers
            exports = {folder: self.full_vae()}
            if self.ema is not None:
                exports[self.output_dir / "vae_ema"] = self.ema.copy_of(exports[folder])
        if self.is_main:
            for target, vae in exports.items():
                if self.encoder_fingerprint is not None and encoder_fingerprint(vae) != self.encoder_fingerprint:
                    raise RuntimeError(f"model.train_decoder_only: the encoder of {target.name} changed; not exported")
                save_vae(vae, target)
        if self.config.train.push_to_hub and self.config.train.hub_push_every_export:
            self.push()
        self.accelerator.wait_for_everyone()
        return folder

    def push(self) -> None:
        """Upload vae/ with its model card (main process only)."""
        if self.is_main:
            train = self.config.train
            url = push_vae_folder(
                self.output_dir / "vae",
                train.hub_repo_id,
                train.hub_private,
                commit_message=f"vae-hf: step {self.progress.global_step}",
            )
            print(f"vae-hf: pushed the VAE at step {self.progress.global_step} to {url}", flush=True)

    def _write_config(self) -> None:
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(to_yaml(self.config))

    def _log_start(self) -> None:
        if not self.is_main:
            return
        train, accelerator = self.config.train, self.accelerator
        effective = train.batch_size * train.gradient_accumulation_steps * accelerator.num_processes
        size = "streaming" if self.dataset_size is None else f"{self.dataset_size} images"
        print(
            f"vae-hf: {accelerator.num_processes} x {accelerator.device.type}, precision {train.mixed_precision}, "
            f"effective batch {effective} ({train.batch_size} x {train.gradient_accumulation_steps} accumulation x "
            f"{accelerator.num_processes} processes), {self.total_steps} steps, data: {size}",
            flush=True,
        )

    def _log_end(self) -> None:
        if self.is_main:
            folder = (self.output_dir / "vae").resolve()
            skipped = (
                f"; {self.progress.images_skipped} unreadable images skipped" if self.progress.images_skipped else ""
            )
            print(
                f"vae-hf: done after {self.progress.global_step} steps{skipped}. VAE saved to {folder}; load it with "
                f"AutoencoderKL.from_pretrained('{folder}')",
                flush=True,
            )
            if self.validator.enabled:
                stats = self.validator.record.get("latent_stats", {})
                print(f"vae-hf: held-out scores: {self.validator.summary()}", flush=True)
                if "scaling_factor" in stats:
                    print(
                        f"vae-hf: latent std {stats['std']:.4g} -> scaling_factor {stats['scaling_factor']:.5g} "
                        f"(in {self.validator.path}; store it with vae-hf latent-stats --write)",
                        flush=True,
                    )
