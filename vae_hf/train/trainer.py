"""The training loop: a VAE and a PatchGAN discriminator on Accelerate, playing the game of `vae_hf.game`.

`Trainer.train()` reads as an outline: for each micro-batch, one generator update and (once the
discriminator is on) one discriminator update inside `accelerator.accumulate`; after each optimizer
step, maybe log, maybe write a sample, maybe evaluate or checkpoint; at the end of each epoch and of the
run, export the VAE and save the state. The trainer owns its parts and passes them what they need:
`Player`s (one per side of the game), `RunCheckpoints` (saving and resuming), `Reporter` (logs, samples,
exports, pushes) and `Validator` (held-out scores).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import random
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, broadcast, set_seed
from diffusers import AutoencoderKL
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vae_hf.config import Config, ConfigError, flat_hparams, to_dict
from vae_hf.data import datasets as image_datasets
from vae_hf.data import loader as batching
from vae_hf.data.buckets import BucketBuffers, choose_bucket
from vae_hf.data.pipeline import stage_data, training_loader
from vae_hf.data.transforms import sample_seed
from vae_hf.game import Alignment, Game, autocast
from vae_hf.io.hub import require_push_access
from vae_hf.models.backbone import load_backbone, require_backbone
from vae_hf.models.diffaug import diff_augment
from vae_hf.models.dino_discriminator import build_dino_discriminator
from vae_hf.models.discriminator import LeCamAnchors, PatchDiscriminator
from vae_hf.models.latents import BatchTransform
from vae_hf.models.perceptual import VGG_WEIGHTS, build_lpips, require_vgg_weights, resolve_pretrained
from vae_hf.models.vae import (
    VAETrainingModule,
    build_vae,
    decoder_last_layer,
    downsampling_factor,
    encoder_fingerprint,
    encoder_last_layer,
)
from vae_hf.parallel.deepspeed import DeepSpeedPlayer, engine_config, initialize_engine, require_deepspeed_if_launched
from vae_hf.parallel.fsdp import ShardingUnits, gathered
from vae_hf.train import run_folder
from vae_hf.train.checkpoint import PROCESS_TENSORS, Checkpointer, RunCheckpoints, TrainingDiverged, model_shape
from vae_hf.train.consensus import Consensus
from vae_hf.train.ema import EMA
from vae_hf.train.latent_factors import LatentFactors
from vae_hf.train.meter import LossMeter
from vae_hf.train.player import Player, build_optimizer, build_scheduler
from vae_hf.train.progress import TrainProgress
from vae_hf.train.reporting import Reporter
from vae_hf.train.signals import StopRequest
from vae_hf.train.stages import Stage, position_in, stage_at, training_stages
from vae_hf.train.validation import Validator

logger = logging.getLogger(__name__)

TRANSFORM_STREAM = 1  # mixed into the seed of the batch transforms: a stream apart from the posterior noise's
AUGMENT_STREAM = 2  # and into DiffAugment's


def require_supported_distribution(accelerator: Accelerator, config: Config) -> dict | None:
    """DDP, FSDP2 and DeepSpeed ZeRO-2 train both players; refuse the launch setups that cannot, before
    anything is built. Returns the DeepSpeed engines' config under DeepSpeed, else None."""
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError("accelerate launch: FSDP needs fsdp_version: 2 (see configs/accelerate/fsdp.yaml)")
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and config.loss.learn_logvar:
        raise ConfigError("loss.learn_logvar: runs on one process or under DDP, not FSDP or DeepSpeed")
    if sharded and config.loss.vf_weight > 0:
        raise ConfigError("loss.vf_weight: runs on one process or under DDP, not FSDP or DeepSpeed")
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    train = config.train
    for number, stage in enumerate(train.stages):
        changes = [
            name
            for name in ("batch_size", "gradient_accumulation_steps")
            if getattr(stage, name) not in (None, getattr(train, name))
        ]
        if changes:
            raise ConfigError(
                f"train.stages[{number}].{changes[0]}: under DeepSpeed a stage may change the resolution only (the "
                "engines are built for one micro-batch size and accumulation); run stages under DDP or FSDP"
            )
    return engine_config(
        accelerator.state.deepspeed_plugin, config.train, config.optim.max_grad_norm, accelerator.num_processes
    )


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        self.output_dir = Path(config.output_dir)
        if config.train.push_to_hub:
            require_push_access()  # not after days of training
        self.accelerator = self._build_accelerator()
        self.consensus = Consensus(self.accelerator)
        self._claim_output_dir()
        self.perceptual_choice = self._decide_perceptual_trunk()
        if config.loss.perceptual_weight > 0 and config.loss.perceptual_pretrained:
            require_vgg_weights()  # fail in a second, not after the data and models are built
        if config.loss.vf_weight > 0:
            require_backbone(config.loss.vf_backbone, "loss.vf_backbone")
        if config.loss.disc_weight > 0 and config.loss.disc_type == "dino":
            require_backbone(config.loss.disc_backbone, "loss.disc_backbone")
        # TF32: 10-bit mantissa matmuls/convolutions, about 8x the fp32 rate on Ampere+; a global switch
        torch.backends.cuda.matmul.allow_tf32 = config.train.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.train.allow_tf32
        set_seed(config.seed)
        self.progress = TrainProgress()
        self._stream_position: dict | None = None  # a resumed stream's loader state, applied on iterating
        self._untrained_window_position: dict | None = None  # a stream's position before a window left untrained
        self.stop_request = StopRequest()
        self.step_callbacks: list = []  # called with the trainer after each optimizer step (benchmarks)
        self.last_checkpoint_step: int | None = None
        self.last_checkpoint_time = time.monotonic()  # a run's start counts as saved: its state is its config
        self.last_export_step: int | None = None
        self.consecutive_nonfinite = 0
        zero = torch.zeros((), dtype=torch.long, device=self.accelerator.device)
        self._nonfinite = {"consecutive": zero.clone(), "skipped": zero.clone(), "disc_skipped": zero.clone()}
        vae = build_vae(config.model, config.data.resolution)
        self.stages = training_stages(config)
        self._build_data(downsample_factor=downsampling_factor(vae))
        self._build_models(vae)
        self.checkpointer = Checkpointer(
            self.accelerator, self.output_dir / "checkpoints", config.train.checkpoints_total_limit
        )
        self.checkpoints = RunCheckpoints(
            self.checkpointer,
            self.progress,
            {"vae": self.vae_player, "discriminator": self.disc_player},
            self._model_shape(),
            stream_position=self._stream_checkpoint_position if self.streaming else None,
            run_id=run_folder.new_run_id(),  # only the main process writes it
            config=to_dict(config),
        )
        if config.train.resume_from is not None:
            self.resume(config.train.resume_from)
            if stage_at(self.stages, self.progress.global_step) != self.stage:  # resumed in a later stage
                self._enter_stage(stage_at(self.stages, self.progress.global_step))
        self.validator = Validator(
            config, self.accelerator, self.output_dir, self.progress.global_step > 0, self._eval_buckets
        )
        if self.perceptual_choice is not None:
            self.validator.note("perceptual_trunk", self.perceptual_choice)
        latent_factors = LatentFactors(
            config,
            self.vae,
            resumed=self.progress.global_step > 0,
            heldout_batches=self.validator.latent_batches if self.validator.enabled else None,
        )
        self.reporter = Reporter(self.accelerator, config, self.output_dir, self.encoder_fingerprint, latent_factors)
        self.reporter.start(self.total_steps, self.dataset_size, self.checkpointer.folder, self.stages)

    # ----------------------------------------------------------------------------------------------
    # construction

    def _claim_output_dir(self) -> None:
        """One run per output_dir (see `vae_hf.train.run_folder`), before anything is built. The main process
        decides, and clears the folder when asked to start over; every process takes its decision."""
        refusal = run_folder.refusal(self.config) if self.is_main else None
        if self.is_main and refusal is None and self.config.train.overwrite_output_dir:
            removed = run_folder.clear_previous_run(self.output_dir)
            if removed:
                deleted = ", ".join(removed)
                print(f"vae-hf: train.overwrite_output_dir: deleted {deleted} in {self.output_dir}", flush=True)
        refused = broadcast(torch.tensor(float(refusal is not None), device=self.accelerator.device), from_process=0)
        if refused.item():  # the other processes say it as they see the folder (a shared one: as the main does)
            raise ConfigError(refusal or run_folder.refusal(self.config) or "output_dir: refused by the main process")

    def _decide_perceptual_trunk(self) -> dict | None:
        """`loss.perceptual_pretrained: auto` becomes true or false here, before anything is built; the config
        then holds the decision (config.yaml records it) and the returned note goes to metrics.json. The main
        process decides for all: every process trains with the same LPIPS (one that then lacks the pretrained
        weights stops with the one-line error instead of silently using a random trunk)."""
        loss = self.config.loss
        if loss.perceptual_pretrained is not None:
            return None
        pretrained, reason = resolve_pretrained(None)
        decided = broadcast(torch.tensor(float(pretrained), device=self.accelerator.device), from_process=0)
        loss.perceptual_pretrained = bool(decided.item())
        if loss.perceptual_pretrained:
            reason = None
        if reason is not None and self.is_main:
            logger.warning(
                "loss.perceptual_pretrained=auto: LPIPS uses a RANDOM VGG16 trunk, because the pretrained weights "
                "are needed and %s. The perceptual loss is then not a real perceptual loss (fine for trying the "
                "tool). To use the real one, run once with internet access, or put %s there.",
                reason,
                VGG_WEIGHTS.url,
            )
        return {"requested": "auto", "pretrained": loss.perceptual_pretrained, "reason": reason}

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
        self.deepspeed_config = require_supported_distribution(accelerator, config)
        return accelerator

    def _build_data(self, downsample_factor: int) -> None:
        config, accelerator = self.config, self.accelerator
        self.downsample_factor = downsample_factor
        self.stage = self.stages[0]
        self.accelerator.gradient_accumulation_steps = self.stage.gradient_accumulation_steps
        self._build_loader()
        self.streaming = isinstance(self.dataloader.dataset, image_datasets.StreamingImageDataset)
        self.dataset_size = None if self.streaming else len(self.dataloader.dataset)
        reference = image_datasets.reference_images(config.data, self._eval_buckets)
        self.reference_images = (
            reference.to(accelerator.device)
            if isinstance(reference, torch.Tensor)
            else [image.to(accelerator.device) for image in reference]
        )
        self.total_steps = self._total_steps()

    @property
    def _eval_buckets(self) -> list[tuple[int, int]] | None:
        """The buckets samples and held-out scores use (`data.bucket_eval`), at data.resolution; None: squares."""
        data = self.config.data
        if not (data.buckets and data.bucket_eval):
            return None
        return batching.bucket_list(data, self.downsample_factor)

    def _build_loader(self) -> None:
        """The training loader of the current stage: its resolution and batch size, buckets when asked."""
        config, accelerator, stage = self.config, self.accelerator, self.stage
        built = training_loader(
            stage_data(config.data, stage.resolution, self.downsample_factor),
            config.seed,
            stage.batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            stage.gradient_accumulation_steps,
            self.downsample_factor,
            pin_memory=accelerator.device.type == "cuda",
        )
        self.dataloader = accelerator.prepare(built.loader) if built.shard_by_accelerate else built.loader
        self.bucket_buffers = (
            None
            if built.buckets is None
            else BucketBuffers(len(built.buckets), stage.batch_size, stage.gradient_accumulation_steps)
        )

    @property
    def bucketed(self) -> bool:
        return self.config.data.buckets

    def _total_steps(self) -> int:
        train = self.config.train
        if train.max_steps is not None:
            return train.max_steps
        if train.stages:
            return train.stages[-1].until_step
        steps_per_epoch = math.ceil(len(self.dataloader) / self.stage.gradient_accumulation_steps)
        return train.num_epochs * steps_per_epoch

    def _build_models(self, vae: AutoencoderKL) -> None:
        config, accelerator = self.config, self.accelerator
        self.sharding_units = ShardingUnits(getattr(accelerator.state, "fsdp_plugin", None))
        self.lpips = (
            build_lpips(config.loss.perceptual_pretrained).to(accelerator.device)
            if config.loss.perceptual_weight > 0
            else None
        )
        self.vf_backbone = (
            load_backbone(config.loss.vf_backbone, config.loss.vf_image_size).to(accelerator.device)
            if config.loss.vf_weight > 0
            else None
        )
        self.game = Game(config.loss, self.lpips, self.vf_backbone)
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
        self.vae_player = self._player(
            VAETrainingModule(
                vae,
                config.model.sample_posterior,
                config.loss.learn_logvar,
                config.model.decoder_noise_tau,
                self.vf_backbone.feature_dim if self.vf_backbone is not None else None,
            ),
            config.optim.lr,
            self.total_steps,
        )
        self.ema = EMA(vae, config.train.ema_decay) if config.train.ema_decay is not None else None
        self.disc_player = None
        if config.loss.disc_weight > 0:
            discriminator = self._build_discriminator()
            if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
                discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
            discriminator.to(memory_format=self.memory_format)
            if config.train.compile:
                self._compile(discriminator)
            # its schedule (warm-up, decay) runs over the steps it trains, from its first update to the end
            disc_steps = max(self.total_steps - config.loss.disc_train_start_step, 1)
            self.disc_player = self._player(discriminator, config.optim.disc_lr or config.optim.lr, disc_steps)

    def _build_discriminator(self) -> nn.Module:
        """The PatchGAN, or heads on a frozen DINO ViT (`loss.disc_type`), with LeCam's anchors when asked."""
        loss = self.config.loss
        if loss.disc_type == "dino":
            discriminator = build_dino_discriminator(
                loss.disc_backbone, loss.disc_image_size, loss.disc_channels, second_order=loss.disc_r1_weight > 0
            )
        else:
            discriminator = PatchDiscriminator(3, loss.disc_channels, loss.disc_num_layers, loss.disc_norm)
        if loss.disc_lecam_weight > 0:
            discriminator.lecam = LeCamAnchors()  # buffers: checkpointed with the discriminator
        return discriminator

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

    def _player(self, model: nn.Module, lr: float, schedule_steps: int) -> Player:
        config = self.config
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, config.optim, lr)
        if self.deepspeed_config is not None:  # the engine partitions `optimizer`, which the schedule still drives
            engine = initialize_engine(model, optimizer, self.deepspeed_config)
            scheduler = build_scheduler(optimizer, config.optim, schedule_steps)
            return DeepSpeedPlayer(engine, model, optimizer, scheduler)  # the engine clips and has no GradScaler
        self.sharding_units.select_for(model)
        prepared, optimizer = self.accelerator.prepare(model, optimizer)
        scaler = torch.amp.GradScaler(self.accelerator.device.type) if config.train.mixed_precision == "fp16" else None
        return Player(
            prepared,
            model,
            optimizer,
            build_scheduler(optimizer, config.optim, schedule_steps),
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
        """The bare AutoencoderKL being trained (training goes through the prepared module). Under FSDP its
        weights are shards: samples, evaluation and export use `gathered_vae()`."""
        return self.vae_player.module.vae

    def gathered_vae(self) -> AutoencoderKL:
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

    def preview_vae(self) -> AutoencoderKL:
        """The weights samples and latent statistics show: the EMA's when EMA is on, else the trained ones
        (gathered under FSDP, so every process must call this there)."""
        vae = self.gathered_vae()
        return vae if self.ema is None else self.ema.copy_of(vae)

    @property
    def disc_active(self) -> bool:
        """The reference recipe switches the discriminator on after 15,000 micro-batches, i.e. 3,750 steps of 4."""
        return self.disc_player is not None and self.progress.global_step >= self.config.loss.disc_start_step

    @property
    def disc_training(self) -> bool:
        """The discriminator learns from `loss.disc_update_start_step` (a warm-up before it plays), else from
        `loss.disc_start_step`."""
        return self.disc_player is not None and self.progress.global_step >= self.config.loss.disc_train_start_step

    def autocast(self):
        return autocast(self.accelerator.device.type, self.config.train.mixed_precision)

    # ----------------------------------------------------------------------------------------------
    # one micro-batch

    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generator update, then discriminator update; returns the detached loss breakdown."""
        disc_active, disc_training = self.disc_active, self.disc_training
        transform = self.batch_transform(images)
        augment = self._augment()
        with self.autocast():
            output = self.vae_player.wrapped(images, generator=self._noise_generator(), transform=transform)
            reconstructions, images = output.reconstructions, output.targets  # the images, or their transform
            g_loss, breakdown = self.generator_loss(
                images, reconstructions, output.posterior, disc_active, self.alignment(output), augment
            )
        self.vae_player.backward(self.accelerator, g_loss)
        if self.accelerator.sync_gradients:
            updated, breakdown["grad_norm"] = self.vae_player.step(self.accelerator)
            self._count_nonfinite(updated)
            if self.ema is not None:
                self.ema.update(self.vae, applied=updated)
        if disc_training:
            breakdown.update(self.discriminator_step(images, reconstructions.detach(), augment))
        return breakdown

    def batch_transform(self, images: torch.Tensor) -> BatchTransform:
        """This micro-batch's spatial transform (EQ-VAE), drawn on the host from (seed, micro-batch, process) like
        the posterior noise, so a resumed run draws what it would have."""
        seed = sample_seed(self.config.seed, self.progress.micro_step, self.accelerator.process_index, TRANSFORM_STREAM)
        factor = self.vae_player.module.downsample_factor
        return self.game.draw_transform(random.Random(seed), (images.shape[-2] // factor, images.shape[-1] // factor))

    def _augment(self):
        """DiffAugment for this micro-batch (`loss.disc_diffaug`), drawn from (seed, micro-batch, process) like the
        posterior noise; None without it."""
        if not self.config.loss.disc_diffaug:
            return None
        seed = sample_seed(self.config.seed, self.progress.micro_step, self.accelerator.process_index, AUGMENT_STREAM)
        return functools.partial(diff_augment, generator=torch.Generator(self.accelerator.device).manual_seed(seed))

    def _noise_generator(self) -> torch.Generator:
        """Posterior noise from (seed, micro-batch, process), so a resumed run draws what it would have."""
        seed = sample_seed(self.config.seed, self.progress.micro_step, self.accelerator.process_index)
        return torch.Generator(self.accelerator.device).manual_seed(seed)

    def alignment(self, output) -> Alignment | None:
        """What the VF loss needs from this forward (None when `loss.vf_weight` is 0)."""
        if output.projected is None:
            return None
        return Alignment(output.projected, output.inputs, encoder_last_layer(self.vae))

    def generator_loss(
        self, images, reconstructions, posterior, disc_active: bool, alignment: Alignment | None = None, augment=None
    ):
        """The game's generator loss; before `loss.disc_start_step` the discriminator is not even run."""
        return self.game.generator_loss(
            images,
            reconstructions,
            posterior,
            discriminator=self.discriminator if disc_active else None,
            last_layer=decoder_last_layer(self.vae),
            side_gradients=self.vae_player.side_gradients,
            loss_scale=None if self.vae_player.scaler is None else self.vae_player.scaler.scale,
            logvar=self.vae_player.module.logvar,
            alignment=alignment,
            augment=augment,
        )

    def discriminator_step(
        self, images: torch.Tensor, reconstructions: torch.Tensor, augment=None
    ) -> dict[str, torch.Tensor]:
        """The discriminator learns on detached reconstructions: none of its loss reaches the VAE."""
        player, loss = self.disc_player, self.config.loss
        r1_due = loss.disc_r1_weight > 0 and self.progress.global_step % loss.disc_r1_every_steps == 0
        # lazy R1 (StyleGAN2): every k-th step, k times as strong
        r1_scale = loss.disc_r1_weight / 2 * loss.disc_r1_every_steps if r1_due else 0.0
        with self.autocast():
            d_loss, breakdown = self.game.discriminator_loss(
                player.wrapped, images, reconstructions, augment, getattr(player.module, "lecam", None), r1_scale
            )
        player.backward(self.accelerator, d_loss)
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
        self.reporter.write_config()
        self.accelerator.init_trackers(self.config.train.tracker_project, config=flat_hparams(self.config))
        bar = tqdm(total=self.total_steps, initial=self.progress.global_step, disable=not self.is_main, desc="steps")
        meter = LossMeter()
        if self.validator.enabled and not self.validator.has_baseline:
            self.evaluate("baseline")  # the starting model's scores, to read progress against
        # Signals are recorded, not obeyed, until the stop is saved: a launcher forwards SIGTERM once more.
        with self.stop_request.listening(), logging_redirect_tqdm():  # warnings on their own lines, not the bar's
            while self.progress.global_step < self.total_steps and self.stop_signal is None:
                if self._train_epoch(bar, meter):
                    self._end_epoch()
            bar.close()
            if self.stop_signal is not None:
                return self._stop_for_signal()
        if self.last_export_step != self.progress.global_step:  # not already exported at this step's epoch end
            self.save_vae()
        if self.last_checkpoint_step != self.progress.global_step:
            self.save_checkpoint()
        if self.validator.enabled:
            self.evaluate("final")
            self.validator.latent_statistics(self.preview_vae(), self.progress.global_step)
        if self.config.train.push_to_hub and not self.config.train.hub_push_every_export:
            self.push()
        self._share_unreadable()  # before end_training, which closes the process group
        self.accelerator.end_training()
        self.reporter.end(self.progress.global_step, self.progress.images_skipped, self.validator)
        return self.output_dir / "vae"

    def _train_epoch(self, bar, meter: LossMeter) -> bool:
        """Train until the data runs out (True: the epoch is complete) or the run must stop (False).

        Every process takes the same number of micro-batches and decides with the others after each optimizer
        step (`_agree`): a sample that will not decode is replaced by a readable one (never an empty batch),
        map-style data gives every process the same number of batches, and a stream is taken one full
        optimizer step's window at a time (`_stream_windows`)."""
        for batch in self._epoch_batches():
            self.progress.batches_in_epoch += 1
            self._note_unreadable(batch["unreadable"])
            images = batch["pixel_values"]  # uint8 from the loader: scaled on the device
            images = images.to(self.accelerator.device, non_blocking=True, memory_format=self.memory_format)
            images = batching.to_model_range(images)
            with self.accelerator.accumulate(self.vae_player.wrapped, *self._disc_models()):
                breakdown = self.training_step(images)
            self.progress.micro_step += 1
            meter.add(breakdown, images.shape[0])
            if self.accelerator.sync_gradients:
                self._after_optimizer_step(bar, meter)
                if self.progress.global_step >= self.total_steps:
                    return False
                if not self.streaming and self._agree():  # a stream agrees before each window instead
                    return False
                if stage_at(self.stages, self.progress.global_step) != self.stage:
                    self._enter_stage(stage_at(self.stages, self.progress.global_step), carry_position=True)
                    return False  # the epoch goes on with the new stage's loader
        return self.stop_signal is None

    def _enter_stage(self, stage: Stage, carry_position: bool = False) -> None:
        """Switch to `stage`: its loader (resolution, batch size) and its accumulation. With `carry_position`
        (a live switch mid-epoch) the epoch's position is carried into batches of the new size; a resumed run's
        checkpoint already holds it so."""
        if carry_position:
            self.progress.batches_in_epoch = position_in(self.progress.batches_in_epoch, self.stage, stage)
        previous = self.dataloader
        self.stage = stage
        self.accelerator.gradient_accumulation_steps = stage.gradient_accumulation_steps
        self.accelerator.step = 0  # micro-batches into the window: a stage starts on an optimizer step
        if previous in self.accelerator._dataloaders:  # Accelerate saves the samplers of the loaders it prepared
            self.accelerator._dataloaders.remove(previous)
        del previous  # its workers stop before the new loader's start
        self._build_loader()
        if self.accelerator.device.type == "cuda":
            torch.cuda.empty_cache()  # the last stage's activations were of another size
        if self.is_main:
            tqdm.write(f"vae-hf: train.stages: {stage.describe()}")  # on its own line, above the progress bar

    def _agree(self, out_of_data: bool = False) -> bool:
        """The step-boundary agreement of all processes (`Consensus`): True when they stop for a signal or,
        for a stream, when some process has no full window of data left (the epoch then ends for all)."""
        stop, out_of_data = self.consensus.agree(self.stop_request.received is not None, out_of_data)
        self.stop_request.agree(stop)
        return stop or out_of_data

    def _epoch_batches(self):
        """This epoch's batches, in an order fixed by (seed, epoch), past the ones already trained on."""
        loader = self.dataloader
        loader.dataset.set_epoch(self.progress.epoch)  # a new shuffle and new augmentation each epoch
        if self.streaming:
            position, self._stream_position = self._stream_position, None
            if self.bucket_buffers is not None:  # a new epoch starts with empty buckets, a resumed one with its own
                self.bucket_buffers.clear()
                if position is not None:
                    self.bucket_buffers.load(position.get(PROCESS_TENSORS, {}), position["buffered"])
                    position = position["loader"]
            if position is not None:
                loader.load_state_dict(position)
            if self.bucket_buffers is not None:
                return self._bucket_windows(loader)
            return self._stream_windows(loader)
        if self.bucketed:  # the sampler plans the epoch (same on every process) and skips what was trained
            loader.batch_sampler.set_epoch(self.progress.epoch)
            loader.batch_sampler.start = self.progress.batches_in_epoch
            return loader
        if self.progress.batches_in_epoch > 0:
            loader = self.accelerator.skip_first_batches(loader, self.progress.batches_in_epoch)
        loader.set_epoch(self.progress.epoch)
        return loader

    def _stream_windows(self, loader):
        """A stream's batches, one optimizer step's window (`gradient_accumulation_steps` micro-batches) at a
        time, each taken only when every process has a full one: the processes' streams may differ in length,
        and an epoch must end on the same step everywhere, between optimizer steps. The incomplete windows
        at an epoch's end are dropped, as map-style data drops its last incomplete batch."""
        size = self.stage.gradient_accumulation_steps
        batches = iter(loader)
        while True:
            before = loader.state_dict()
            window = list(itertools.islice(batches, size))
            if self._agree(out_of_data=len(window) < size):
                if self.stop_signal is not None:  # saved below: the window fetched here is still to be trained
                    self._untrained_window_position = before
                return
            yield from window

    def _bucket_windows(self, loader):
        """A bucketed stream's windows: this process's rows wait in their buckets (`BucketBuffers`); before each
        optimizer step the processes agree, in one all-reduce, on a bucket that every one of them can fill a
        window of, and each trains its own rows of it. A process reads on until it can fill some window; when
        they can fill none in common, all read on; when one has no rows left and none is in common, the epoch
        ends for all (the rows still waiting are dropped, as a last incomplete batch is)."""
        buffers, batches = self.bucket_buffers, iter(loader)

        def read() -> bool:
            batch = next(batches, None)
            if batch is not None:
                buffers.add(batch)
            return batch is not None

        exhausted = False
        while True:
            while not exhausted and max(buffers.ready()) == 0:
                exhausted = not read()
            stop, out_of_data, common = self.consensus.agree_buckets(
                self.stop_request.received is not None, exhausted, buffers.ready()
            )
            self.stop_request.agree(stop)
            if stop:  # the rows read stay in the buckets, and are saved with them
                return
            bucket = choose_bucket(common)
            if bucket is not None:
                yield from buffers.take(bucket)
            elif out_of_data:
                return
            else:
                exhausted = not read()

    def _stream_checkpoint_position(self) -> dict:
        """Where a resumed stream picks up: before a window fetched but not trained (a stop), else here; a bucketed
        stream's position is after the rows it read, which wait in its buckets (saved with it)."""
        if self.bucket_buffers is not None:
            tensors, buffered = self.bucket_buffers.state()
            return {"loader": self.dataloader.state_dict(), "buffered": buffered, PROCESS_TENSORS: tensors}
        return self._untrained_window_position or self.dataloader.state_dict()

    def _note_unreadable(self, records: list[dict[str, str]]) -> None:
        """Count each file left out (unreadable, or filtered by `data.min_side` / `data.max_aspect_ratio`) once,
        over epochs and processes, and name it once, with the reason."""
        for record in records:
            key = file_key(record["name"])
            if key not in self.progress.unreadable_files:
                self.progress.unreadable_files.add(key)
                logger.warning(
                    "skipping image %s: %s; the next usable image is trained on in its place",
                    record["name"],
                    record["reason"],
                )

    def _share_unreadable(self) -> None:
        """Every process learns the unreadable files the others met (at log steps and saves: a collective)."""
        self.progress.unreadable_files = self.consensus.union(self.progress.unreadable_files)

    def _end_epoch(self) -> None:
        """The VAE is exported at every epoch's end; the full state is saved there only when
        `train.checkpoint_every_minutes` have passed since the last save (short epochs would fill the disk)."""
        self.progress.epoch += 1
        self.progress.batches_in_epoch = 0
        self.save_vae()
        if self._checkpoint_due():
            self.save_checkpoint()

    def _checkpoint_due(self) -> bool:
        """Whether enough minutes have passed since the last save, as the main process's clock says: every
        process takes the same decision (the save is collective)."""
        minutes = self.config.train.checkpoint_every_minutes
        due = torch.tensor(float(time.monotonic() - self.last_checkpoint_time >= minutes * 60))
        return bool(broadcast(due.to(self.accelerator.device), from_process=0).item())

    def _disc_models(self) -> list[nn.Module]:
        return [] if self.disc_player is None else [self.disc_player.wrapped]

    def _after_optimizer_step(self, bar, meter: LossMeter) -> None:
        self.progress.global_step += 1
        for callback in self.step_callbacks:
            callback(self)
        self.vae_player.advance_schedule()
        if self.disc_player is not None and self.progress.global_step > self.config.loss.disc_train_start_step:
            self.disc_player.advance_schedule()  # only for the steps it trained
        bar.update(1)
        train = self.config.train
        if self.progress.global_step % train.log_every_steps == 0 or self.progress.global_step == self.total_steps:
            self._share_unreadable()
            if self._settle_nonfinite():
                self._stop_diverged()
            self.reporter.log(self._logged_values(meter), self.progress.global_step, bar)
        if self.progress.global_step == 1 or self.progress.global_step % train.sample_every_steps == 0:
            self.write_sample()
        if train.eval_every_steps and self.progress.global_step % train.eval_every_steps == 0:
            self.evaluate("latest")
        if train.checkpoint_every_steps and self.progress.global_step % train.checkpoint_every_steps == 0:
            self.save_checkpoint()

    # ----------------------------------------------------------------------------------------------
    # outputs: what the reporter writes, from the trainer's state

    def _logged_values(self, meter: LossMeter) -> dict[str, float]:
        """The averaged breakdown since the last log step (`.item()`: a host sync) and the run's counters."""
        values = meter.flush(self.accelerator.num_processes)
        values["lr"] = self.vae_player.lr
        if self.disc_player is not None:
            values["disc_lr"] = self.disc_player.lr
        values["images_skipped"] = self.progress.images_skipped
        values["steps_skipped_nonfinite"] = self.progress.steps_skipped
        if self.disc_player is not None:
            values["disc_steps_skipped_nonfinite"] = self.progress.disc_steps_skipped
        values["epoch"] = self.progress.epoch
        return values

    def evaluate(self, label: str) -> dict[str, float]:
        """Held-out scores of the VAE (and of its EMA), logged and recorded in metrics.json."""
        models = {"eval": self.gathered_vae()}
        if self.ema is not None:
            models["eval_ema"] = self.ema.copy_of(models["eval"])
        values = self.validator.evaluate(models, self.progress.global_step, label)
        self.accelerator.log(values, step=self.progress.global_step)
        return values

    def write_sample(self) -> Path | None:
        """Reconstructions of the reference images, by the EMA weights when EMA is on."""
        if not (self.is_main or self.accelerator.is_fsdp2):  # sharded weights: every process gathers
            return None
        return self.reporter.write_sample(self.preview_vae(), self.reference_images, self.progress.global_step)

    def save_vae(self) -> Path:
        """Export `vae/` (and `vae_ema/`); pushed too with `train.hub_push_every_export`."""
        self.accelerator.wait_for_everyone()
        folder = self.output_dir / "vae"
        if self.is_main or self.accelerator.is_fsdp2:  # sharded weights: every process gathers
            exports = {folder: self.gathered_vae()}
            if self.ema is not None:
                exports[self.output_dir / "vae_ema"] = self.ema.copy_of(exports[folder])
            self.reporter.export(exports, self.progress.global_step)
        self.last_export_step = self.progress.global_step
        if self.config.train.push_to_hub and self.config.train.hub_push_every_export:
            self.push()
        self.accelerator.wait_for_everyone()
        return folder

    def push(self) -> None:
        self.reporter.push(self.progress.global_step)

    # ----------------------------------------------------------------------------------------------
    # the run's state: saving, resuming, and the two early stops that save first

    def _model_shape(self) -> dict:
        loss = self.config.loss
        disc = (
            None
            if self.disc_player is None
            else {"channels": loss.disc_channels, "num_layers": loss.disc_num_layers, "norm": loss.disc_norm}
        )
        if disc is not None and loss.disc_type != "patchgan":  # keys only when on: older checkpoints keep resuming
            disc.update(type=loss.disc_type, backbone=loss.disc_backbone, image_size=loss.disc_image_size)
        if disc is not None and loss.disc_lecam_weight > 0:
            disc["lecam"] = True
        shape = model_shape(dict(self.vae.config), disc)
        if loss.learn_logvar:  # the key only when on, so that checkpoints without it keep resuming
            shape["learn_logvar"] = True
        if self.vf_backbone is not None:  # the projection's shape, which a checkpoint must match
            shape["vf_projection"] = [self.vae.config.latent_channels, self.vf_backbone.feature_dim]
        return shape

    def save_checkpoint(self) -> Path:
        self._settle_nonfinite()
        self._share_unreadable()
        path = self.checkpoints.save(self.ema)
        self.last_checkpoint_step = self.progress.global_step
        self.last_checkpoint_time = time.monotonic()
        return path

    def resume(self, resume_from: str) -> None:
        resumed = self.checkpoints.resume(resume_from, self.ema, self.vae)
        if resumed is None:
            if self.is_main:
                print(f"vae-hf: no checkpoint in {self.checkpointer.folder} yet; starting a new run", flush=True)
            return
        self._stream_position = resumed.stream_position
        if self.is_main:
            changed = run_folder.changed_settings(resumed.config, to_dict(self.config)) if resumed.config else []
            settings = f"settings changed since: {', '.join(changed)}" if changed else "same settings"
            print(
                f"vae-hf: resumed from {resumed.path} at step {self.progress.global_step} "
                f"(epoch {self.progress.epoch}, batch {self.progress.batches_in_epoch}), "
                f"run {self.checkpoints.run_id}; {settings}",
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


def file_key(name: str) -> int:
    """A 63-bit key for a file's name, the same in every process (Python's `hash` of a str is not)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 1
