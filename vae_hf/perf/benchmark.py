"""`vae-hf bench`: how fast the real trainer runs, against its floor (`vae_hf.perf.floor`): the same game, bare.

Measured in one run, on one config and device: seconds per optimizer step and images/s of the trainer
(after warm-up; discriminator off, then on), the same for a bare loop (VAE forward/backward, LPIPS,
discriminator forward/backward, optimizer steps; no data loading, logging, checks or checkpoints), the
ratio (our overhead), peak memory, the data loader's own images/s, and model FLOPs utilisation (FLOPs
from PyTorch's counter / step time / the device's peak, when the peak is known or given).
"""

from __future__ import annotations

import contextlib
import functools
import io
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vae_hf.config import Config
from vae_hf.data import loader as batching
from vae_hf.data import mixture
from vae_hf.data.pipeline import stage_data, training_loader
from vae_hf.data.sources import is_local, local_builder
from vae_hf.errors import UserError
from vae_hf.models.diffaug import diff_augment
from vae_hf.models.vae import build_vae
from vae_hf.perf.floor import floor_step
from vae_hf.perf.memory import (
    GIB,
    DiscriminatorShape,
    StepOptions,
    estimate_step_memory,
    largest_batch,
    measure_cuda_step_memory,
)
from vae_hf.train.stages import training_stages
from vae_hf.train.trainer import Trainer

# Dense bf16 peak of known accelerators, in FLOP/s (vendor figures); pass --peak-tflops for others.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}
NEVER = 10**9
MEMORY_BATCHES = (1, 4, 8)
DEFAULT_BUDGET_GB = 24.0
LARGEST_BATCH_CAP = 256
"""The search for the largest batch stops here: a batch that still fits is reported as at least this."""
MIN_LOADER_BATCHES = 20
"""The loader is timed over at least this many batches, cycling the data: one batch of a small folder, mostly
served from the page cache, measured 39,324 images/s."""
# The trainer's periodic work, by the method that does it: the benchmark counts what falls inside its timed steps.
PERIODIC_WORK = {"save_vae": "VAE exports", "save_checkpoint": "checkpoints", "write_sample": "samples",
                 "evaluate": "evaluations"}  # fmt: skip


# The latent-space terms (docs/latent-space.md) whose cost the speed section reports when the recipe has them on:
# whether a config has it, and the settings that switch it off.
LATENT_TERMS: dict[str, tuple[Callable[[Config], bool], dict[str, dict[str, Any]]]] = {
    "equivariance": (
        lambda c: c.loss.eq_probability > 0 or c.loss.eq_low_res_probability > 0,
        {"loss": {"eq_probability": 0.0, "eq_low_res_probability": 0.0}},
    ),
    "decoder_noise": (lambda c: c.model.decoder_noise_tau > 0, {"model": {"decoder_noise_tau": 0.0}}),
    "vf_loss": (lambda c: c.loss.vf_weight > 0, {"loss": {"vf_weight": 0.0}}),
    "dino_discriminator": (lambda c: c.loss.disc_type == "dino", {"loss": {"disc_type": "patchgan"}}),
    "diffaug": (lambda c: c.loss.disc_diffaug, {"loss": {"disc_diffaug": False}}),
    "lecam": (lambda c: c.loss.disc_lecam_weight > 0, {"loss": {"disc_lecam_weight": 0.0}}),
    "r1": (lambda c: c.loss.disc_r1_weight > 0, {"loss": {"disc_r1_weight": 0.0}}),
}


class BenchError(UserError, ValueError):
    """The benchmark was asked for nothing it can measure; the message says what to add."""


def require_a_measurement(speed: bool, memory: bool, loader: bool) -> None:
    if not (speed or memory or loader):
        raise BenchError("--no-speed leaves nothing to measure; add --memory and/or --loader")


def benchmark(
    config: Config,
    steps: int = 10,
    warmup: int = 3,
    peak_tflops: float | None = None,
    speed: bool = True,
    memory: bool = False,
    memory_budget_gb: float | None = None,
    loader: bool = False,
) -> dict[str, Any]:
    """The speed section (trainer and bare loop, discriminator off and on, which includes the data
    loader's rate), or the loader alone, and/or the memory section; returns the JSON-ready report."""
    require_a_measurement(speed, memory, loader)
    device = _default_device()
    first = training_stages(config)[0]  # what is timed: the first stage (the whole run without train.stages)
    report: dict[str, Any] = {
        "device": _device_name(device),
        "config": {
            "batch_size": first.batch_size,
            "resolution": first.resolution,
            "mixed_precision": config.train.mixed_precision,
        },
        "versions": {"torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    if speed:
        with tempfile.TemporaryDirectory(prefix="vae-hf-bench-") as scratch:
            report.update(_speed(_benchmark_config(config, Path(scratch), steps + warmup), steps, warmup, peak_tflops))
    elif loader:
        report["data_loader"] = loader_section(config, steps * first.gradient_accumulation_steps)
    if memory:
        report["memory"] = memory_section(config, device, memory_budget_gb)
    return report


def _speed(config: Config, steps: int, warmup: int, peak_tflops: float | None) -> dict[str, Any]:
    report: dict[str, Any] = {"periodic_work": {}}
    for disc in ("off", "on"):
        # The trainer's own lines (its start, "VAE saved to <a temporary folder>") are not the benchmark's: the
        # run and its folder are thrown away.
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = _trainer(config, disc_start=NEVER if disc == "off" else 0)
            report["periodic_work"][f"disc_{disc}"] = _count_periodic_work(trainer, warmup)
            timed = _time_interleaved(trainer, warmup, disc == "on")
        report[f"trainer_disc_{disc}"], report[f"bare_disc_{disc}"] = timed
        report[f"overhead_disc_{disc}"] = (
            report[f"trainer_disc_{disc}"]["s_per_step"] / report[f"bare_disc_{disc}"]["s_per_step"]
        )
    batches = steps * config.train.gradient_accumulation_steps  # what the timed steps consume
    report["data_loader"] = _time_loader(trainer.dataloader, batches, config.data.num_workers)
    report["flops_per_step_disc_on"] = _flops(trainer)
    report["mfu_disc_on"] = _mfu(report["flops_per_step_disc_on"], report, trainer.accelerator.device, peak_tflops)
    report["peak_memory_mb"] = _peak_memory_mb(trainer.accelerator.device)
    report["latent_terms"] = _latent_term_costs(config, warmup, report)
    return report


def _latent_term_costs(config: Config, warmup: int, report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """For each latent-space term the recipe has on, the trainer's and the bare loop's s/step with the
    discriminator on and that term alone switched off, and what the term adds (against the run with every term)."""
    costs = {}
    for name, (is_on, off) in LATENT_TERMS.items():
        if not is_on(config):
            continue
        without = replace(config, **{part: replace(getattr(config, part), **values) for part, values in off.items()})
        with contextlib.redirect_stdout(io.StringIO()):
            trainer_rates, bare_rates = _time_interleaved(_trainer(without, disc_start=0), warmup, True)
        costs[name] = {
            "trainer_s_per_step_without": trainer_rates["s_per_step"],
            "bare_s_per_step_without": bare_rates["s_per_step"],
            "trainer_extra_s_per_step": report["trainer_disc_on"]["s_per_step"] - trainer_rates["s_per_step"],
            "bare_extra_s_per_step": report["bare_disc_on"]["s_per_step"] - bare_rates["s_per_step"],
        }
    return costs


def memory_section(config: Config, device: torch.device, budget_gb: float | None = None) -> dict[str, Any]:
    """Peak memory of a training step at batch 1, 4 and 8, without and with gradient checkpointing, and the
    largest batch that fits: measured on a GPU (the device's memory, or `budget_gb`), estimated elsewhere
    (fake tensors, `budget_gb` or 24 GiB). The configured model, resolution, precision and losses."""
    vae = build_vae(config.model, config.data.resolution)
    vae_config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    loss = config.loss
    options = StepOptions(
        mixed_precision=config.train.mixed_precision,
        perceptual=loss.perceptual_weight > 0,
        discriminator=DiscriminatorShape(loss.disc_channels, loss.disc_num_layers, loss.disc_norm)
        if loss.disc_weight > 0
        else None,
        decoder_only=config.model.train_decoder_only,
    )
    # an EMA's fp32 shadow of the VAE stays on the device through every step
    ema_bytes = 4 * sum(t.numel() for t in vae.state_dict().values() if t.is_floating_point())
    ema_bytes = ema_bytes if config.train.ema_decay is not None else 0
    resolution = config.data.resolution
    if device.type == "cuda":
        method = "measured: torch.cuda.max_memory_allocated over the step"
        budget = budget_gb * GIB if budget_gb else torch.cuda.get_device_properties(device).total_memory - ema_bytes
        measure = partial(measure_cuda_step_memory, vae_config, resolution, options=options, device=device)
    else:
        method = "estimated: live tensor storage of the step on fake tensors, CUDA autocast policy (no GPU)"
        budget = (budget_gb or DEFAULT_BUDGET_GB) * GIB
        measure = partial(estimate_step_memory, vae_config, resolution, options=options)

    @functools.cache  # the table's batches come up again in the search for the largest batch
    def peak(batch_size: int, checkpointing: bool) -> int | None:
        try:
            return measure(batch_size, gradient_checkpointing=checkpointing)["peak_bytes"] + ema_bytes
        except torch.OutOfMemoryError:
            return None

    rows = [
        {"batch_size": batch, "gradient_checkpointing": checkpointing, "peak_gib": _gib(peak(batch, checkpointing))}
        for checkpointing in (False, True)
        for batch in MEMORY_BATCHES
    ]
    largest = {
        f"gradient_checkpointing_{'on' if checkpointing else 'off'}": largest_batch(
            lambda batch, checkpointing=checkpointing: (peak(batch, checkpointing) or budget + 1) <= budget,
            upper=LARGEST_BATCH_CAP,
        )
        for checkpointing in (False, True)
    }
    stages = training_stages(config)
    if len(stages) > 1:  # each stage's own resolution and batch (the table above is at data.resolution)
        measure_at = measure_cuda_step_memory if device.type == "cuda" else estimate_step_memory
        extra = {"device": device} if device.type == "cuda" else {}
        per_stage = []
        for stage in stages:
            try:
                measured = measure_at(
                    vae_config,
                    stage.resolution,
                    stage.batch_size,
                    gradient_checkpointing=config.train.gradient_checkpointing,
                    options=options,
                    **extra,
                )
                peak_bytes = measured["peak_bytes"] + ema_bytes
            except torch.OutOfMemoryError:
                peak_bytes = None
            per_stage.append(
                {"stage": stage.number + 1, "resolution": stage.resolution, "batch_size": stage.batch_size}
                | {"peak_gib": _gib(peak_bytes), "fits": peak_bytes is not None and peak_bytes <= budget}
            )
    return {
        "method": method,
        "resolution": resolution,
        "stages": per_stage if len(stages) > 1 else None,
        "ema_included": bool(ema_bytes),
        "rows": rows,
        "budget_gib": budget / GIB,
        "largest_batch": largest,
        "largest_batch_cap": LARGEST_BATCH_CAP,  # a largest batch equal to it was not searched past
    }


def _gib(value: int | None) -> float | None:
    return None if value is None else value / GIB


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _benchmark_config(config: Config, scratch: Path, total_steps: int) -> Config:
    """No trackers, samples, evaluation, checkpoints or latent measurements inside the timed steps; with
    `train.stages`, the first stage's resolution, batch and accumulation throughout (no stage change is timed)."""
    first = training_stages(config)[0]
    train = replace(
        config.train,
        stages=[],
        batch_size=first.batch_size,
        gradient_accumulation_steps=first.gradient_accumulation_steps,
        max_steps=total_steps,
        report_to="none",
        sample_every_steps=NEVER,
        log_every_steps=NEVER,
        checkpoint_every_steps=None,
        eval_every_steps=None,
        push_to_hub=False,
        resume_from=None,
        overwrite_output_dir=True,  # a scratch folder: each timed trainer (disc off, then on) starts over
    )
    data = stage_data(config.data, first.resolution, config.model.downsample_factor)
    data = replace(data, validation_split=None, validation_fraction=0.0)
    # exports at epoch ends would measure the latents for their scaling_factor: a fixed factor measures nothing
    model = replace(config.model, scaling_factor=1.0, measure_shift_factor=False)
    return replace(config, output_dir=str(scratch), train=train, data=data, model=model)


def _trainer(config: Config, disc_start: int) -> Trainer:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator at a time
    GradientState._reset_state()
    # the discriminator's warm-up is timed as its playing steps are: both run its full update
    loss = replace(config.loss, disc_start_step=disc_start, disc_update_start_step=None)
    return Trainer(replace(config, loss=loss))


def _time_interleaved(trainer: Trainer, warmup: int, disc_on: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Time the trainer's steps and, between them, one bare step each: paired in time, so a shared
    machine's slow minutes weigh on both sides alike. The bare step's optimizers (lr 1e-9) clear the
    gradients they accumulate, so the trainer's next step starts as it would have."""
    device = trainer.accelerator.device
    bare = _floor_optimizer_step(trainer, _first_batch(trainer), disc_on)
    trainer_durations: list[float] = []
    bare_durations: list[float] = []
    resumed: list[float] = []

    def after_step(t: Trainer) -> None:
        if resumed and t.progress.global_step > warmup:
            trainer_durations.append(_now(device) - resumed[-1])
        started = _now(device)
        bare()
        if t.progress.global_step > warmup:
            bare_durations.append(_now(device) - started)
        resumed.append(_now(device))

    trainer.step_callbacks.append(after_step)
    trainer.train()
    return _rates(trainer, trainer_durations), _rates(trainer, bare_durations)


def _floor_optimizer_step(trainer: Trainer, images: torch.Tensor, disc_on: bool):
    """The unavoidable work of one optimizer step (its accumulated micro-batches), on fresh fused Adam
    optimizers over the trainer's models."""
    vae, disc = trainer.vae_player.module, trainer.discriminator if disc_on else None  # with its latent noise
    fused = {"fused": True} if images.device.type in ("cuda", "cpu") else {}
    opt_g = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=1e-9, **fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-9, **fused) if disc is not None else None
    micro_batch = partial(
        floor_step,
        vae,
        trainer.game,
        disc,
        opt_g,
        opt_d,
        images,
        trainer.autocast,  # the trainer's own precision, as its steps run
        sample_posterior=trainer.config.model.sample_posterior,
        augment=diff_augment if trainer.config.loss.disc_diffaug else None,  # drawn from the global generator
    )
    accumulation = trainer.config.train.gradient_accumulation_steps

    def step() -> None:
        for index in range(accumulation):
            micro_batch(update=index == accumulation - 1)

    return step


def _time_loader(loader, batches: int, workers: int) -> dict[str, Any]:
    """The data pipeline alone, with the configured workers: decode, resize, crop, collate. Timed from the
    first batch on, so the workers' start-up is left out (the rate a long run sees), over at least
    MIN_LOADER_BATCHES batches, passing over the data again as epochs do when it holds fewer."""
    wanted = max(batches, MIN_LOADER_BATCHES)
    images, timed, passes, started = 0, 0, 0, None
    while timed < wanted:
        passes += 1
        produced = 0
        for batch in loader:
            produced += 1
            if started is None:
                started = time.perf_counter()
                continue
            images += len(batch["pixel_values"])
            timed += 1
            if timed >= wanted:
                break
        if produced == 0:  # no batch at all: nothing to time
            break
    rate = images / (time.perf_counter() - started) if images else None
    return {"images_per_s": rate, "workers": workers, "batches_timed": timed, "passes": passes}


def _count_periodic_work(trainer: Trainer, warmup: int) -> dict[str, int]:
    """Count the trainer's periodic work (PERIODIC_WORK) that falls inside the timed steps, by wrapping its
    methods on this instance. A step is timed from the end of the previous step's callback to its own, so the
    work done after step s (with global_step s) is timed when warmup <= s < total."""
    counts = dict.fromkeys(PERIODIC_WORK.values(), 0)

    def counted(method, label: str):
        def call(*args, **kwargs):
            if warmup <= trainer.progress.global_step < trainer.total_steps:
                counts[label] += 1
            return method(*args, **kwargs)

        return call

    for name, label in PERIODIC_WORK.items():
        setattr(trainer, name, counted(getattr(trainer, name), label))
    return counts


def loader_section(config: Config, batches: int) -> dict[str, float]:
    """The training data loader as the trainer builds it for its first stage (one process), without the trainer
    (no model is built): square crops or aspect-ratio buckets, from an image folder, shards, the Hub or a stream."""
    stage = training_stages(config)[0]
    data = stage_data(config.data, stage.resolution, config.model.downsample_factor)
    built = training_loader(
        data,
        config.seed,
        stage.batch_size,
        gradient_accumulation_steps=stage.gradient_accumulation_steps,
        downsample_factor=config.model.downsample_factor,
    )
    report = _time_loader(built.loader, batches, data.num_workers)
    report["data"] = data_kind(data)
    return report


def data_kind(data) -> dict[str, Any]:
    """What the loader read, for the report: each source's format (a local folder's builder, or the Hub), streamed
    or not, buckets or squares."""

    def source(dataset: str) -> str:
        if is_local(dataset):
            return local_builder(Path(dataset).expanduser())
        return "hub"

    formats = [source(part.dataset) for part in mixture.sources(data)]
    return {
        "source": formats[0] if len(formats) == 1 else f"mixture of {' + '.join(formats)}",
        "streaming": data.streaming,
        "crops": "aspect-ratio buckets" if data.buckets else "square",
        "resolution": data.resolution,
    }


def _first_batch(trainer: Trainer) -> torch.Tensor:
    """The training loader's first images on the device, in the model's range."""
    return batching.to_model_range(next(iter(trainer.dataloader))["pixel_values"].to(trainer.accelerator.device))


def _flops(trainer: Trainer) -> float:
    """FLOPs of one bare step with the discriminator on (PyTorch's counter: matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter:
        _floor_optimizer_step(trainer, _first_batch(trainer), disc_on=trainer.discriminator is not None)()
    return float(counter.get_total_flops())


def _mfu(flops: float, report: dict[str, Any], device: torch.device, peak_tflops: float | None) -> float | None:
    name = _device_name(device)
    peak = peak_tflops * 1e12 if peak_tflops else next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak is None:
        return None  # an unknown device's peak is not guessed
    return flops / report["trainer_disc_on"]["s_per_step"] / peak


def _rates(trainer: Trainer, durations: list[float]) -> dict[str, float]:
    """The median step (a shared machine's hiccups move the mean), and the mean for reference."""
    train = trainer.config.train
    images = train.batch_size * train.gradient_accumulation_steps * trainer.accelerator.num_processes
    seconds_per_step = statistics.median(durations)
    return {
        "s_per_step": seconds_per_step,
        "s_per_step_mean": statistics.fmean(durations),
        "images_per_s": images / seconds_per_step,
        "steps_timed": len(durations),
    }


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timing only: wait for the queued kernels
    return time.perf_counter()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"cuda_max_allocated": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"process_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: speed (when measured) and memory (when asked for)."""
    tables = [f"device: {report['device']}, torch {report['versions']['torch']}, {report['date']}"]
    if "trainer_disc_off" in report:
        tables.append(_speed_table(report))
        tables.append(_periodic_work_line(report["periodic_work"]))
        if report.get("latent_terms"):
            tables.append(_latent_terms_table(report["latent_terms"]))
    elif "data_loader" in report:
        tables.append(_loader_line(report["data_loader"]))
    if "memory" in report:
        tables.append(_memory_table(report["memory"]))
    return "\n\n".join(tables)


def _speed_table(report: dict[str, Any]) -> str:
    rows = ["| measure | discriminator off | discriminator on |", "| --- | --- | --- |"]
    for name in ("trainer", "bare"):
        off, on = report[f"{name}_disc_off"], report[f"{name}_disc_on"]
        rows.append(
            f"| {name}: s/step (images/s) | {off['s_per_step']:.4f} ({off['images_per_s']:.1f}) | "
            f"{on['s_per_step']:.4f} ({on['images_per_s']:.1f}) |"
        )
    rows.append(f"| trainer / bare | {report['overhead_disc_off']:.3f} | {report['overhead_disc_on']:.3f} |")
    mfu = report["mfu_disc_on"]
    rows.append(f"| MFU | | {'n/a (peak unknown)' if mfu is None else f'{mfu:.1%}'} |")
    rows.append(f"| data loader images/s | {_rate(report['data_loader'])} | |")
    return "\n".join(rows)


def _latent_terms_table(terms: dict[str, dict[str, float]]) -> str:
    """What each latent-space term costs, the discriminator on: s/step without it, and what it adds."""
    rows = [
        "| latent-space term | trainer s/step without it | adds (trainer) | bare s/step without it | adds (bare) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, cost in terms.items():
        rows.append(
            f"| {name} | {cost['trainer_s_per_step_without']:.4f} | {cost['trainer_extra_s_per_step']:+.4f} | "
            f"{cost['bare_s_per_step_without']:.4f} | {cost['bare_extra_s_per_step']:+.4f} |"
        )
    return "\n".join(rows)


def _periodic_work_line(work: dict[str, dict[str, int]]) -> str:
    """Which of the trainer's periodic work its timed steps include (the bare loop does none)."""
    parts = []
    for disc in ("off", "on"):
        done = [f"{count} {label}" for label, count in work[f"disc_{disc}"].items() if count]
        parts.append(f"discriminator {disc}: {', '.join(done) if done else 'none'}")
    return (
        f"periodic work inside the trainer's timed steps ({'; '.join(parts)}): VAE exports come at every epoch's "
        "end, checkpoints with train.checkpoint_every_steps or train.checkpoint_every_minutes"
    )


def _loader_line(loader: dict[str, Any]) -> str:
    data = loader.get("data")
    what = ""
    if data:
        streamed = ", streamed" if data["streaming"] else ""
        what = f" ({data['source']}{streamed}, {data['crops']} at {data['resolution']} px)"
    return f"data loader{what}: {_rate(loader)} images/s with {loader['workers']} workers"


def _rate(loader: dict[str, Any]) -> str:
    if loader["images_per_s"] is None:
        return "n/a (no batches)"
    passes = f", {loader['passes']} passes over the data" if loader["passes"] > 1 else ""
    return f"{loader['images_per_s']:.1f} ({loader['batches_timed']} batches{passes})"


def _memory_table(memory: dict[str, Any]) -> str:
    peaks = {(row["batch_size"], row["gradient_checkpointing"]): row["peak_gib"] for row in memory["rows"]}
    batches = sorted({batch for batch, _ in peaks})
    rows = [
        f"peak memory at {memory['resolution']} px, GiB ({memory['method']})",
        "",
        "| gradient checkpointing | " + " | ".join(f"batch {batch}" for batch in batches) + " | largest batch |",
        "| --- |" + " --- |" * (len(batches) + 1),
    ]
    for checkpointing in (False, True):
        state = "on" if checkpointing else "off"
        cells = [_cell_gib(peaks[batch, checkpointing]) for batch in batches]
        largest = _largest(memory["largest_batch"][f"gradient_checkpointing_{state}"], memory.get("largest_batch_cap"))
        rows.append(f"| {state} | " + " | ".join(cells) + f" | {largest} (in {memory['budget_gib']:.1f} GiB) |")
    for stage in memory.get("stages") or ():
        fits = "fits" if stage["fits"] else "does NOT fit"
        rows.append(
            f"\ntrain.stages: stage {stage['stage']} ({stage['resolution']} px, batch {stage['batch_size']}): "
            f"{_cell_gib(stage['peak_gib'])} GiB, {fits} in {memory['budget_gib']:.1f} GiB"
        )
    return "\n".join(rows)


def _largest(batch: int, cap: int | None) -> str:
    return f"≥ {batch} (search cap)" if cap is not None and batch >= cap else str(batch)


def _cell_gib(value: float | None) -> str:
    return "out of memory" if value is None else f"{value:.2f}"
