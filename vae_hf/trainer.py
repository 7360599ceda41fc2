"""The training loop: a VAE and a PatchGAN discriminator on Accelerate, with the four-loss recipe.

`Trainer.train()` reads as an outline: for each micro-batch, one generator update and (once the
discriminator is on) one discriminator update inside `accelerator.accumulate`; after each optimizer
step, maybe log, maybe write a sample; at the end of each epoch and of the run, export the VAE.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from datasets import IterableDataset
from diffusers import AutoencoderKL
from torch import nn
from tqdm.auto import tqdm

from vae_hf import data as vae_data
from vae_hf.checkpointing import Checkpointer
from vae_hf.config import Config, ConfigError, flat_hparams
from vae_hf.discriminator import PatchDiscriminator
from vae_hf.ema import EMA
from vae_hf.hub import require_push_access
from vae_hf.losses import (
    adaptive_disc_weight,
    at_least_fp32,
    discriminator_loss,
    generator_adversarial_loss,
    kl_loss,
    reconstruction_loss,
)
from vae_hf.meter import LossMeter
from vae_hf.model import VAETrainingModule, build_vae, decoder_last_layer, encoder_fingerprint, gathered
from vae_hf.optimization import Player, build_optimizer, build_scheduler
from vae_hf.outputs import OutputsMixin
from vae_hf.perceptual import build_lpips, perceptual_loss, require_vgg_weights
from vae_hf.progress import TrainProgress
from vae_hf.resumable import CheckpointingMixin, TrainingDiverged  # noqa: F401 (re-exported)
from vae_hf.signals import StopRequest
from vae_hf.validation import Validator
from vae_hf.zero import ZeroPlayer, engine_config, initialize_engine, require_deepspeed_if_launched

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Use a module as a fixed function: gradient reaches its input, none reaches its parameters.

    The flags are restored on the parameters that were switched off, not on whatever `parameters()`
    yields at the end: under FSDP2 the module holds its all-gathered (unsharded) parameters from the
    forward until the backward, and those are rebuilt from the sharded ones' flags at the next gather.
    """
    parameters = list(module.parameters())
    flags = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)


def require_supported_distribution(accelerator: Accelerator, config: Config) -> dict | None:
    """DDP, FSDP2 and DeepSpeed ZeRO-2 train both players; refuse the launch setups that cannot, before
    anything is built. Returns the DeepSpeed engines' config under DeepSpeed, else None."""
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError("accelerate launch: FSDP needs fsdp_version: 2 (see configs/accelerate/fsdp.yaml)")
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return engine_config(
        accelerator.state.deepspeed_plugin, config.train, config.optim.max_grad_norm, accelerator.num_processes
    )


class Trainer(CheckpointingMixin, OutputsMixin):
    def __init__(self, config: Config):
        self.config = config
        self.output_dir = Path(config.output_dir)
        if config.loss.perceptual_weight > 0 and config.loss.perceptual_pretrained:
            require_vgg_weights()  # fail in a second, not after the data and models are built
        if config.train.push_to_hub:
            require_push_access()  # not after days of training
        self.accelerator = self._build_accelerator()
        # TF32: 10-bit mantissa matmuls/convolutions, about 8x the fp32 rate on Ampere+; a global switch
        torch.backends.cuda.matmul.allow_tf32 = config.train.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.train.allow_tf32
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
        require_deepspeed_if_launched()
        # Precision is ours (autocast + one GradScaler per player), so Accelerate runs in "no" mode.
        accelerator = Accelerator(
            gradient_accumulation_steps=config.train.gradient_accumulation_steps,
            mixed_precision="no",
            log_with=report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        )
        self.zero_config = require_supported_distribution(accelerator, config)
        return accelerator

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
        steps_per_epoch = math.ceil(len(self.dataloader) / train.gradient_accumulation_steps)
        return train.num_epochs * steps_per_epoch

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
        self.memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
        vae.to(memory_format=self.memory_format)
        if self.lpips is not None:
            self.lpips.to(memory_format=self.memory_format)
        if config.train.compile:
            self._compile(vae.encoder, vae.decoder, self.lpips)
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
            discriminator.to(memory_format=self.memory_format)
            if config.train.compile:
                self._compile(discriminator)
            self.disc_player = self._player(discriminator, config.optim.disc_lr or config.optim.lr)

    def _compile(self, *modules: nn.Module | None) -> None:
        """Compile in place (`Module.compile`): parameter names, checkpoints and exports stay as in eager mode.

        The parts compiled are the ones that hold the compute; the posterior's sampling (a torch.Generator) and the
        losses stay eager. The discriminator gets a second graph for its frozen use in the generator loss.
        """
        train = self.config.train
        options = {"mode": train.compile_mode} if train.compile_backend == "inductor" else {}
        for module in modules:
            if module is not None:
                module.compile(backend=train.compile_backend, **options)

    def _player(self, model: nn.Module, lr: float) -> Player:
        config = self.config
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, config.optim, lr)
        if self.zero_config is not None:  # the engine partitions `optimizer`, which the schedule still drives
            engine = initialize_engine(model, optimizer, self.zero_config)
            scheduler = build_scheduler(optimizer, config.optim, self.total_steps)
            return ZeroPlayer(engine, model, optimizer, scheduler)  # the engine clips and has no GradScaler
        self._fsdp_units_for(model)
        prepared, optimizer = self.accelerator.prepare(model, optimizer)
        scaler = torch.amp.GradScaler(self.accelerator.device.type) if config.train.mixed_precision == "fp16" else None
        return Player(
            prepared,
            model,
            optimizer,
            build_scheduler(optimizer, config.optim, self.total_steps),
            scaler,
            config.optim.max_grad_norm,
        )

    def _fsdp_units_for(self, model: nn.Module) -> None:
        """Under FSDP, shard by the configured block classes that `model` has: Accelerate wants every
        listed class in every prepared model, and the discriminator has no ResnetBlock2D."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is None or plugin.transformer_cls_names_to_wrap is None:
            return
        if not hasattr(self, "_fsdp_unit_classes"):
            self._fsdp_unit_classes = list(plugin.transformer_cls_names_to_wrap)
        present = {type(module).__name__ for module in model.modules()}
        plugin.transformer_cls_names_to_wrap = [name for name in self._fsdp_unit_classes if name in present]

    # ----------------------------------------------------------------------------------------------
    # small views

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def vae(self):
        """The bare AutoencoderKL being trained (training goes through the prepared module). Under FSDP its
        weights are shards: samples, evaluation and export use `full_vae()`."""
        return self.vae_player.module.vae

    def full_vae(self) -> AutoencoderKL:
        """The VAE as a plain module with all its weights, for samples, evaluation and export: `self.vae`
        itself, or under FSDP a gathered copy (then every process must call this)."""
        if not self.accelerator.is_fsdp2:
            return self.vae
        vae = AutoencoderKL.from_config(self.vae.config)
        vae.load_state_dict(gathered(self.vae.state_dict()))
        return vae.to(self.accelerator.device, memory_format=self.memory_format)

    @property
    def discriminator(self) -> nn.Module | None:
        return None if self.disc_player is None else self.disc_player.module

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
        perceptual = at_least_fp32(perceptual_loss(self.lpips, reconstructions, images)) if self.lpips is not None else zero
        nll = loss_config.reconstruction_weight * rec + loss_config.perceptual_weight * perceptual
        g_loss = nll + loss_config.kl_weight * kl
        g_adv, disc_weight = zero, zero
        if disc_active:  # before disc_start_step the discriminator is not even run
            with frozen(self.discriminator) as discriminator:
                g_adv = generator_adversarial_loss(discriminator(reconstructions), loss_config.disc_loss)
            disc_weight = zero + loss_config.disc_weight
            if loss_config.adaptive_disc_weight:
                with self.vae_player.side_gradients(reconstructions):
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
            self.validator.latent_statistics(self.shown_vae(), self.progress.global_step)
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
            images = images.to(self.accelerator.device, non_blocking=True, memory_format=self.memory_format)
            images = vae_data.to_model_range(images)  # uint8 from the loader: scaled on the device
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
