"""The training loop: a VAE and a PatchGAN discriminator on Accelerate, with the four-loss recipe.

`Trainer.train()` reads as an outline: for each micro-batch, one generator update and (once the
discriminator is on) one discriminator update inside `accelerator.accumulate`; after each optimizer
step, maybe log, maybe write a sample; at the end of each epoch and of the run, export the VAE.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from datasets import IterableDataset
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from vae_hf import data as vae_data
from vae_hf.checkpointing import Checkpointer, model_shape, read_tensors
from vae_hf.config import Config, flat_hparams, to_yaml
from vae_hf.discriminator import PatchDiscriminator
from vae_hf.ema import EMA
from vae_hf.export import save_vae
from vae_hf.hub import push_vae_folder, require_push_access
from vae_hf.losses import (
    adaptive_disc_weight,
    discriminator_loss,
    generator_adversarial_loss,
    kl_loss,
    reconstruction_loss,
)
from vae_hf.meter import LossMeter
from vae_hf.model import VAETrainingModule, build_vae, decoder_last_layer
from vae_hf.optimization import Player, build_optimizer, build_scheduler
from vae_hf.perceptual import build_lpips, perceptual_loss, require_vgg_weights
from vae_hf.progress import TrainProgress
from vae_hf.samples import save_sample
from vae_hf.signals import StopRequest
from vae_hf.validation import Validator

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the state was saved before stopping."""


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Use a module as a fixed function: gradient reaches its input, none reaches its parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in zip(module.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


def encoder_fingerprint(vae) -> str:
    """SHA-256 of the encoder's and quant_conv's weights: the part that maps images to latents."""
    digest = hashlib.sha256()
    parts = [vae.encoder] + ([vae.quant_conv] if vae.quant_conv is not None else [])
    for part in parts:
        for name, value in sorted(part.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        self.output_dir = Path(config.output_dir)
        if config.loss.perceptual_weight > 0 and config.loss.perceptual_pretrained:
            require_vgg_weights()  # fail in a second, not after the data and models are built
        if config.train.push_to_hub:
            require_push_access()  # not after days of training
        self.accelerator = self._build_accelerator()
        set_seed(config.seed)
        self.progress = TrainProgress()
        self._stream_position: dict | None = None  # a resumed stream's loader state, applied on iterating
        self.stop_request = StopRequest()
        self.step_callbacks: list = []  # called with the trainer after each optimizer step (benchmarks)
        self.last_checkpoint_step: int | None = None
        self.consecutive_nonfinite = 0
        zero = torch.zeros((), dtype=torch.long, device=self.accelerator.device)
        self._nonfinite = {"consecutive": zero.clone(), "skipped": zero.clone(), "disc_skipped": zero.clone()}
        self._build_data()
        self._build_models()
        self.checkpointer = Checkpointer(
            self.accelerator, self.output_dir / "checkpoints", config.train.checkpoints_total_limit
        )
        if config.train.resume_from is not None:
            self.resume(config.train.resume_from)
        self.validator = Validator(config, self.accelerator, self.output_dir, resumed=self.progress.global_step > 0)
        self._log_start()

    # ----------------------------------------------------------------------------------------------
    # construction

    def _build_accelerator(self) -> Accelerator:
        config = self.config
        report_to = {"none": None, "all": "all"}.get(config.train.report_to, config.train.report_to)
        # Precision is ours (autocast + one GradScaler per player), so Accelerate runs in "no" mode.
        return Accelerator(
            gradient_accumulation_steps=config.train.gradient_accumulation_steps,
            mixed_precision="no",
            log_with=report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        )

    def _build_data(self) -> None:
        config, accelerator = self.config, self.accelerator
        dataset = vae_data.training_dataset(
            config.data, config.seed, accelerator.process_index, accelerator.num_processes
        )
        self.streaming = isinstance(dataset, IterableDataset)
        loader = vae_data.build_dataloader(
            dataset, config.data, config.train.batch_size, config.seed, pin_memory=accelerator.device.type == "cuda"
        )
        # Streaming data is already split by rank (datasets.distributed); only map-style data is sharded here.
        self.dataloader = loader if self.streaming else accelerator.prepare(loader)
        self.dataset_size = None if self.streaming else len(dataset)
        self.reference_images = vae_data.reference_images(config.data).to(accelerator.device)
        self.total_steps = self._total_steps()

    def _total_steps(self) -> int:
        train = self.config.train
        if train.max_steps is not None:
            return train.max_steps
        self.steps_per_epoch = math.ceil(len(self.dataloader) / train.gradient_accumulation_steps)
        return train.num_epochs * self.steps_per_epoch

    def _build_models(self) -> None:
        config, accelerator = self.config, self.accelerator
        vae = build_vae(config.model, config.data.resolution)
        self.lpips = (
            build_lpips(config.loss.perceptual_pretrained).to(accelerator.device)
            if config.loss.perceptual_weight > 0
            else None
        )
        if config.train.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        # What a decoder-only fine-tune must never change: checked again at every export.
        self.encoder_fingerprint = encoder_fingerprint(vae) if config.model.train_decoder_only else None
        self.vae_player = self._player(VAETrainingModule(vae, config.model.sample_posterior), config.optim.lr)
        self.ema = EMA(vae, config.train.ema_decay) if config.train.ema_decay is not None else None
        self.disc_player = None
        if config.loss.disc_weight > 0:
            discriminator = PatchDiscriminator(
                3, config.loss.disc_channels, config.loss.disc_num_layers, config.loss.disc_norm
            )
            if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
                discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
            self.disc_player = self._player(discriminator, config.optim.disc_lr or config.optim.lr)

    def _player(self, model: nn.Module, lr: float) -> Player:
        config = self.config
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, config.optim, lr)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        scaler = torch.amp.GradScaler(self.accelerator.device.type) if config.train.mixed_precision == "fp16" else None
        return Player(
            model,
            optimizer,
            build_scheduler(optimizer, config.optim, self.total_steps),
            scaler,
            config.optim.max_grad_norm,
        )

    # ----------------------------------------------------------------------------------------------
    # small views

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def vae(self):
        """The bare AutoencoderKL (for saving and sampling; training goes through the prepared module)."""
        return self.accelerator.unwrap_model(self.vae_player.model).vae

    @property
    def discriminator(self) -> nn.Module | None:
        return None if self.disc_player is None else self.accelerator.unwrap_model(self.disc_player.model)

    @property
    def stop_signal(self) -> str | None:
        """The signal (SIGTERM, SIGINT) that asked this run to stop, once all processes agree."""
        return self.stop_request.signal_name

    @property
    def disc_active(self) -> bool:
        """The seed switches the discriminator on after 15,000 micro-batches, i.e. 3,750 steps of 4."""
        return self.disc_player is not None and self.progress.global_step >= self.config.loss.disc_start_step

    def autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.config.train.mixed_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.accelerator.device.type, dtype=dtype)

    # ----------------------------------------------------------------------------------------------
    # one micro-batch

    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generator update, then discriminator update; returns the detached loss breakdown."""
        disc_active = self.disc_active
        with self.autocast():
            reconstructions, posterior = self.vae_player.model(images, generator=self._noise_generator())
            g_loss, breakdown = self.generator_loss(images, reconstructions, posterior, disc_active)
        self.vae_player.backward(self.accelerator, g_loss)
        if self.accelerator.sync_gradients:
            updated, breakdown["grad_norm"] = self.vae_player.step(self.accelerator)
            self._count_nonfinite(updated)
            if self.ema is not None:
                self.ema.update(self.vae, applied=updated)
        if disc_active:
            breakdown.update(self.discriminator_step(images, reconstructions.detach()))
        return breakdown

    def _noise_generator(self) -> torch.Generator:
        """Posterior noise from (seed, micro-batch, process), so a resumed run draws what it would have."""
        seed = vae_data.sample_seed(self.config.seed, self.progress.micro_step, self.accelerator.process_index)
        return torch.Generator(self.accelerator.device).manual_seed(seed)

    def generator_loss(self, images, reconstructions, posterior, disc_active: bool):
        loss_config = self.config.loss
        zero = images.new_zeros((), dtype=torch.float32)
        rec = reconstruction_loss(reconstructions, images, loss_config.reconstruction)
        kl = kl_loss(posterior.mean, posterior.logvar, loss_config.kl_reduction)
        perceptual = perceptual_loss(self.lpips, reconstructions, images).float() if self.lpips is not None else zero
        nll = loss_config.reconstruction_weight * rec + loss_config.perceptual_weight * perceptual
        g_loss = nll + loss_config.kl_weight * kl
        g_adv, disc_weight = zero, zero
        if disc_active:  # before disc_start_step the discriminator is not even run
            with frozen(self.discriminator) as discriminator:
                g_adv = generator_adversarial_loss(discriminator(reconstructions), loss_config.disc_loss)
            disc_weight = zero + loss_config.disc_weight
            if loss_config.adaptive_disc_weight:
                disc_weight = disc_weight * adaptive_disc_weight(
                    nll, g_adv, decoder_last_layer(self.vae), loss_config.adaptive_weight_max
                )
            g_loss = g_loss + disc_weight * g_adv
        breakdown = {
            "rec": rec,
            "kl": kl,
            "perceptual": perceptual,
            "g_adv": g_adv,
            "disc_weight": disc_weight,
            "g_loss": g_loss,
        }
        return g_loss, {name: value.detach() for name, value in breakdown.items()}

    def discriminator_step(self, images: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The discriminator learns on detached reconstructions: none of its loss reaches the VAE."""
        player = self.disc_player
        with self.autocast():
            logits_real = player.model(images)
            logits_fake = player.model(reconstructions)
            d_loss = self.config.loss.disc_loss_weight * discriminator_loss(
                logits_real, logits_fake, self.config.loss.disc_loss
            )
        player.backward(self.accelerator, d_loss)
        breakdown = {
            "d_loss": d_loss.detach(),
            "d_real": logits_real.detach().float().mean(),
            "d_fake": logits_fake.detach().float().mean(),
        }
        if self.accelerator.sync_gradients:
            updated, breakdown["disc_grad_norm"] = player.step(self.accelerator)
            self._nonfinite["disc_skipped"] += ~updated
        return breakdown

    def _count_nonfinite(self, updated: torch.Tensor) -> None:
        """Count skipped (non-finite) VAE updates on the device; `_settle_nonfinite` reads them."""
        counts = self._nonfinite
        counts["consecutive"] = (counts["consecutive"] + 1) * ~updated
        counts["skipped"] += ~updated

    def _settle_nonfinite(self) -> bool:
        """At log and checkpoint steps only (a host sync): move the counts into the progress; True when
        the last `train.max_nonfinite_steps` updates all had non-finite gradients."""
        counts = {name: int(value) for name, value in self._nonfinite.items()}
        self._nonfinite["skipped"].zero_()
        self._nonfinite["disc_skipped"].zero_()
        self.progress.steps_skipped += counts["skipped"]
        self.progress.disc_steps_skipped += counts["disc_skipped"]
        self.consecutive_nonfinite = counts["consecutive"]
        if counts["skipped"]:
            logger.warning(
                "%d VAE updates skipped for non-finite gradients (up to step %d; %d in a row now)",
                counts["skipped"],
                self.progress.global_step,
                self.consecutive_nonfinite,
            )
        return self.consecutive_nonfinite >= self.config.train.max_nonfinite_steps

    # ----------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> Path:
        self._write_config()
        self.accelerator.init_trackers(self.config.train.tracker_project, config=flat_hparams(self.config))
        bar = tqdm(total=self.total_steps, initial=self.progress.global_step, disable=not self.is_main, desc="steps")
        meter = LossMeter()
        if self.validator.enabled and not self.validator.has_baseline:
            self.evaluate("baseline")  # the starting model's scores, to read progress against
        with self.stop_request.listening():
            while self.progress.global_step < self.total_steps and self.stop_signal is None:
                if self._train_epoch(bar, meter):
                    self._end_epoch()
        bar.close()
        if self.stop_signal is not None:
            return self._stop_for_signal()
        if self.last_checkpoint_step != self.progress.global_step:  # not already saved at this step's epoch end
            self.save_vae()
            self.save_checkpoint()
        if self.validator.enabled:
            self.evaluate("final")
            self.validator.latent_statistics(
                self.vae if self.ema is None else self.ema.copy_of(self.vae), self.progress.global_step
            )
        if self.config.train.push_to_hub and not self.config.train.hub_push_every_export:
            self.push()
        self.accelerator.end_training()
        self._log_end()
        return self.output_dir / "vae"

    def _train_epoch(self, bar, meter: LossMeter) -> bool:
        """Train until the data runs out (True: the epoch is complete) or the run must stop (False)."""
        batches, usable = 0, 0
        for batch in self._epoch_batches():
            self.progress.batches_in_epoch += 1
            batches += 1
            self.progress.images_skipped += batch["num_skipped"]
            images = batch["pixel_values"]
            if images.numel() == 0:
                continue
            usable += 1
            images = images.to(self.accelerator.device, non_blocking=True)
            with self.accelerator.accumulate(self.vae_player.model, *self._disc_models()):
                breakdown = self.training_step(images)
            self.progress.micro_step += 1
            meter.add(breakdown, images.shape[0])
            if self.accelerator.sync_gradients:
                self._after_optimizer_step(bar, meter)
                if self.progress.global_step >= self.total_steps or self.stop_request.agreed(self.accelerator):
                    return False
        if batches > 0 and usable == 0:
            raise vae_data.DataError(
                f"data.dataset: no usable image in {self.config.data.dataset} "
                f"({self.progress.images_skipped} unreadable files skipped)"
            )
        return True

    def _epoch_batches(self):
        """This epoch's batches, in an order fixed by (seed, epoch), past the ones already trained on."""
        loader = self.dataloader
        if self.streaming:
            loader.dataset.set_epoch(self.progress.epoch)  # a new shuffle of the stream each epoch
            if self._stream_position is not None:
                loader.load_state_dict(self._stream_position)
                self._stream_position = None
            return loader
        loader.dataset.set_epoch(self.progress.epoch)
        if self.progress.batches_in_epoch > 0:
            loader = self.accelerator.skip_first_batches(loader, self.progress.batches_in_epoch)
        loader.set_epoch(self.progress.epoch)
        return loader

    def _end_epoch(self) -> None:
        self.progress.epoch += 1
        self.progress.batches_in_epoch = 0
        self.save_vae()
        self.save_checkpoint()

    def _disc_models(self) -> list[nn.Module]:
        return [] if self.disc_player is None else [self.disc_player.model]

    def _after_optimizer_step(self, bar, meter: LossMeter) -> None:
        self.progress.global_step += 1
        for callback in self.step_callbacks:
            callback(self)
        self.vae_player.advance_schedule()
        if self.disc_player is not None:
            self.disc_player.advance_schedule()
        bar.update(1)
        train = self.config.train
        if self.progress.global_step % train.log_every_steps == 0 or self.progress.global_step == self.total_steps:
            if self._settle_nonfinite():
                self._stop_diverged()
            self._log(bar, meter)
        if self.progress.global_step == 1 or self.progress.global_step % train.sample_every_steps == 0:
            self.write_sample()
        if train.eval_every_steps and self.progress.global_step % train.eval_every_steps == 0:
            self.evaluate("latest")
        if train.checkpoint_every_steps and self.progress.global_step % train.checkpoint_every_steps == 0:
            self.save_checkpoint()

    # ----------------------------------------------------------------------------------------------
    # checkpoints and resuming

    @property
    def model_shape(self) -> dict:
        loss = self.config.loss
        disc = (
            None
            if self.disc_player is None
            else {"channels": loss.disc_channels, "num_layers": loss.disc_num_layers, "norm": loss.disc_norm}
        )
        return model_shape(dict(self.vae.config), disc)

    def state_dict(self) -> dict:
        """What Accelerate's save_state does not hold: counters, data position, schedules, scalers."""
        players = {"vae": self.vae_player, "discriminator": self.disc_player}
        return {
            "num_processes": self.accelerator.num_processes,
            "progress": self.progress.state_dict(),
            "schedulers": {name: p.scheduler.state_dict() for name, p in players.items() if p is not None},
            "scalers": {name: p.scaler.state_dict() for name, p in players.items() if p is not None and p.scaler},
            "ema": None if self.ema is None else self.ema.state_dict()[1],
        }

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state["progress"])
        players = {"vae": self.vae_player, "discriminator": self.disc_player}
        for name, scheduler_state in state["schedulers"].items():
            players[name].scheduler.load_state_dict(scheduler_state)
        for name, scaler_state in state["scalers"].items():
            if players[name].scaler is not None:
                players[name].scaler.load_state_dict(scaler_state)

    def process_state_dict(self) -> dict:
        """What differs between processes: each rank's position in its shard of a stream."""
        return {"stream": self.dataloader.state_dict() if self.streaming else None}

    def save_checkpoint(self) -> Path:
        self._settle_nonfinite()
        tensors = None if self.ema is None else {"ema": self.ema.state_dict()[0]}
        path = self.checkpointer.save(
            self.progress.global_step, self.state_dict(), self.model_shape, self.process_state_dict(), tensors
        )
        self.last_checkpoint_step = self.progress.global_step
        return path

    def resume(self, resume_from: str) -> None:
        path = self.checkpointer.resolve(resume_from)
        if path is None:
            if self.is_main:
                print(f"vae-hf: no checkpoint in {self.checkpointer.folder} yet; starting a new run", flush=True)
            return
        state, process_state = self.checkpointer.load(path, self.model_shape)
        self.load_state_dict(state)
        if self.ema is not None:
            if state.get("ema") is None:  # EMA switched on for a run that had none: start it from here
                self.ema = EMA(self.vae, self.config.train.ema_decay)
            else:
                self.ema.load_state_dict(read_tensors(path, "ema"), state["ema"])
        if self.streaming and self.progress.batches_in_epoch > 0:
            self._stream_position = process_state["stream"]
        if self.is_main:
            print(
                f"vae-hf: resumed from {path} at step {self.progress.global_step} (epoch {self.progress.epoch}, "
                f"batch {self.progress.batches_in_epoch})",
                flush=True,
            )

    def _stop_diverged(self) -> None:
        path = self.save_checkpoint()
        raise TrainingDiverged(
            f"{self.consecutive_nonfinite} optimizer steps in a row had non-finite gradients "
            f"(step {self.progress.global_step}); "
            f"stopped instead of training on garbage. State saved to {path}: lower optim.lr, set optim.max_grad_norm, "
            f"or use train.mixed_precision=bf16, then resume with train.resume_from=latest"
        )

    def _stop_for_signal(self) -> Path:
        path = self.save_checkpoint()
        self.accelerator.end_training()
        if self.is_main:
            print(
                f"vae-hf: stopped by {self.stop_signal} at step {self.progress.global_step}; state saved to {path}. "
                f"Resume with: train.resume_from=latest (same config and output_dir)",
                flush=True,
            )
        return path

    # ----------------------------------------------------------------------------------------------
    # outputs

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
        models = {"eval": self.vae}
        if self.ema is not None:
            models["eval_ema"] = self.ema.copy_of(self.vae)
        values = self.validator.evaluate(models, self.progress.global_step, label)
        self.accelerator.log(values, step=self.progress.global_step)
        return values

    def write_sample(self) -> Path | None:
        """Reconstructions of the reference images, by the EMA weights when EMA is on."""
        if not self.is_main:
            return None
        vae = self.vae if self.ema is None else self.ema.copy_of(self.vae)
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
        if self.is_main:
            exports = {folder: self.vae}
            if self.ema is not None:
                exports[self.output_dir / "vae_ema"] = self.ema.copy_of(self.vae)
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
