"""The training loop's guarantees: who gets which gradient, when the discriminator runs, precision,
and gradient accumulation equal to one large batch."""

import math

import pytest
import torch

from vae_hf.config import load_config
from vae_hf.data import loader as batching
from vae_hf.train.trainer import Trainer

from conftest import tiny_overrides


def build(image_folder, tmp_path, **overrides) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(image_folder, tmp_path / "run", **overrides)))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters only: BatchNorm's running statistics are not learned and never used (the
    discriminator is always in train mode)."""
    return {name: value.detach().clone() for name, value in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, value in module.named_parameters() if not torch.equal(before[name], value)}


@pytest.fixture
def applied_gradients(monkeypatch) -> list[list[torch.Tensor]]:
    """The gradients each optimizer step applies, in order, recorded at the real Player.step."""
    from vae_hf.train.player import Player

    applied = []
    real_step = Player.step

    def recording_step(player, accelerator):
        applied.append([p.grad.clone() for p in player.parameters])
        return real_step(player, accelerator)

    monkeypatch.setattr(Player, "step", recording_step)
    return applied


def assert_same_gradients(
    actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    """Equal up to float summation order, relative to the largest gradient (which must be non-zero)."""
    scale = max(g.abs().max().item() for g in expected)
    assert scale > 0
    for grad_actual, grad_expected in zip(actual, expected, strict=True):
        torch.testing.assert_close(grad_actual, grad_expected, rtol=rtol, atol=atol * scale)


# In float64, summing the same terms in another order (another batch split, memory layout or fused kernel)
# changes a gradient by about n * 1e-16 of the terms' magnitude; the tiny VAE's largest reductions have
# n < 1e5 terms, and cancellation between them costs at most a few more digits (measured on an AVX-512/AMX
# Xeon: at most 3.4e-13 of the largest gradient). 1e-9 leaves that noise over three orders of magnitude of
# room, while a real change of the computation (a missing 1/accumulation factor, a transposed layout, another
# step) moves gradients by far more: the controls below show each of these failing.
FLOAT64_RTOL, FLOAT64_ATOL = 1e-7, 1e-9


def assert_same_float64_gradients(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert all(g.dtype == torch.float64 for g in [*actual, *expected])
    assert_same_gradients(actual, expected, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


@pytest.fixture
def in_float64(monkeypatch):
    """Turns a built trainer's models and input pixels to float64.

    These tests compare two ways of computing the same gradients. In float32, the CPU's convolution
    kernels (oneDNN picks them by CPU, batch size and memory layout) sum in orders that differ by up to
    ~1e-5 of the largest gradient on some machines (AVX-512/AMX Xeons), so a float32 comparison measures
    the CPU. Float64 goes through PyTorch's own kernels, and its rounding is 1e9 times smaller.
    """
    to_model_range = batching.to_model_range
    monkeypatch.setattr(batching, "to_model_range", lambda pixels: to_model_range(pixels).double())

    def convert(trainer: Trainer) -> Trainer:
        for module in (trainer.vae, trainer.lpips, trainer.discriminator):
            if module is not None:
                module.double()  # in place: the optimizers keep the same parameters
        trainer.reference_images = trainer.reference_images.double()
        return trainer

    return convert


def first_images(trainer: Trainer) -> torch.Tensor:
    return batching.to_model_range(next(iter(trainer.dataloader))["pixel_values"])  # float64 under in_float64


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_lpips_sends_gradient_to_the_decoder(image_folder, tmp_path):
    trainer = build(
        image_folder, tmp_path, **{"loss.reconstruction_weight": 0, "loss.kl_weight": 0, "loss.disc_weight": 0}
    )
    images = first_images(trainer)
    reconstructions, posterior, *_ = trainer.vae_player.wrapped(images)
    g_loss, breakdown = trainer.generator_loss(images, reconstructions, posterior, disc_active=False)
    assert breakdown["rec"] > 0 and g_loss.item() == pytest.approx(breakdown["perceptual"].item())
    g_loss.backward()
    grad = trainer.vae.decoder.conv_out.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in trainer.lpips.parameters())
    assert not trainer.lpips.training


def test_no_discriminator_work_before_disc_start_step(image_folder, tmp_path):
    trainer = build(
        image_folder, tmp_path, **{"loss.disc_start_step": 3, "train.max_steps": 2, "model.sample_posterior": "false"}
    )
    calls = count_calls(trainer.discriminator)
    disc_before = snapshot(trainer.discriminator)
    trainer.train()
    assert calls[0] == 0
    assert changed(disc_before, trainer.discriminator) == set()
    # and no adversarial gradient reached the VAE: it trained exactly as without any discriminator
    reference = build(
        image_folder,
        tmp_path / "reference",
        **{"loss.disc_weight": 0, "train.max_steps": 2, "model.sample_posterior": "false"},
    )
    reference.train()
    for name, value in reference.vae.state_dict().items():
        assert torch.equal(value, trainer.vae.state_dict()[name]), name


def test_each_players_step_changes_only_its_own_parameters(image_folder, tmp_path):
    trainer = build(image_folder, tmp_path, **{"loss.disc_start_step": 0})
    assert trainer.disc_active
    images = first_images(trainer)
    vae_before, disc_before = snapshot(trainer.vae), snapshot(trainer.discriminator)

    reconstructions, posterior, *_ = trainer.vae_player.wrapped(images)
    g_loss, breakdown = trainer.generator_loss(images, reconstructions, posterior, disc_active=True)
    assert breakdown["g_adv"] != 0
    trainer.vae_player.backward(trainer.accelerator, g_loss)
    assert all(p.grad is None for p in trainer.discriminator.parameters())  # no leak into the discriminator
    assert all(p.requires_grad for p in trainer.discriminator.parameters())  # unfrozen again afterwards
    trainer.vae_player.step(trainer.accelerator)
    assert changed(vae_before, trainer.vae)
    assert changed(disc_before, trainer.discriminator) == set()

    vae_after_g = snapshot(trainer.vae)
    trainer.discriminator_step(images, reconstructions.detach())
    assert changed(vae_after_g, trainer.vae) == set()
    assert all(p.grad is None for p in trainer.vae.parameters())
    assert {name for name in changed(disc_before, trainer.discriminator) if name.endswith("weight")}


def test_training_step_runs_both_players_once_the_discriminator_is_on(image_folder, tmp_path):
    trainer = build(image_folder, tmp_path, **{"loss.disc_start_step": 1, "train.max_steps": 3})
    calls = count_calls(trainer.discriminator)
    disc_before = snapshot(trainer.discriminator)
    trainer.train()
    # steps 2 and 3: one frozen call in the VAE's loss, two (real, fake) in the discriminator's step
    assert calls[0] == 2 * 3
    assert changed(disc_before, trainer.discriminator)


def test_adaptive_weight_is_computed_only_when_the_discriminator_is_on(image_folder, tmp_path, monkeypatch):
    import vae_hf.game as game_module

    weights = []
    real = game_module.adaptive_disc_weight
    monkeypatch.setattr(
        game_module, "adaptive_disc_weight", lambda *a, **k: weights.append(real(*a, **k)) or weights[-1]
    )
    trainer = build(
        image_folder,
        tmp_path,
        **{
            "loss.adaptive_disc_weight": "true",
            "loss.disc_start_step": 2,
            "loss.disc_loss": "hinge",
            "train.max_steps": 3,
        },
    )
    trainer.train()
    assert len(weights) == 1 and weights[0] > 0


def accumulated_and_large_batch_gradients(image_folder, tmp_path, applied, in_float64):
    """The gradients of one step of 4 micro-batches of 1, and of one step of 1 batch of 4, in float64."""
    common = {"loss.disc_weight": 0, "model.sample_posterior": "false", "train.max_steps": 1}
    for name, batch, accumulation in (("a", 1, 4), ("b", 4, 1)):
        overrides = {"train.batch_size": batch, "train.gradient_accumulation_steps": accumulation}
        in_float64(build(image_folder, tmp_path / name, **common, **overrides)).train()
    accumulated, large = applied
    return accumulated, large


def test_gradient_accumulation_equals_one_large_batch(image_folder, tmp_path, applied_gradients, in_float64):
    """The gradient a step applies is the same for 4 micro-batches of 1 as for 1 batch of 4.

    (Weights after Adam are not compared: its first update is about lr * sign(grad), which turns
    float-rounding noise in gradients that are really zero into differences of 2 * lr, and every
    later gradient inherits them.)
    """
    accumulated, large = accumulated_and_large_batch_gradients(image_folder, tmp_path, applied_gradients, in_float64)
    assert_same_float64_gradients(accumulated, large)


def test_gradient_accumulation_check_fails_without_the_division(
    image_folder, tmp_path, applied_gradients, in_float64, monkeypatch
):
    """Control: if each micro-batch's loss were not divided by the accumulation steps, the comparison above
    would fail (the accumulated gradient is then 4 times too large)."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kwargs: loss.backward(**kwargs))
    accumulated, large = accumulated_and_large_batch_gradients(image_folder, tmp_path, applied_gradients, in_float64)
    with pytest.raises(AssertionError, match="not close"):
        assert_same_float64_gradients(accumulated, large)
    assert_same_float64_gradients([g / 4 for g in accumulated], large)  # and it is exactly that factor


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(image_folder, tmp_path, precision):
    trainer = build(
        image_folder, tmp_path, **{"train.mixed_precision": precision, "loss.disc_start_step": 1, "train.max_steps": 3}
    )
    vae_before = snapshot(trainer.vae)
    trainer.train()
    for module in (trainer.vae, trainer.discriminator):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert all(torch.isfinite(p).all() for p in module.parameters())
    if precision == "bf16":
        assert changed(vae_before, trainer.vae)
    else:
        assert trainer.vae_player.scaler is not None and trainer.disc_player.scaler is not None
        assert trainer.vae_player.scaler is not trainer.disc_player.scaler


def test_autocast_runs_the_vae_in_half_precision(image_folder, tmp_path):
    trainer = build(image_folder, tmp_path, **{"train.mixed_precision": "bf16"})
    dtypes = []
    trainer.vae.decoder.conv_out.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer.training_step(first_images(trainer))
    assert dtypes == [torch.bfloat16]


def test_decoder_only_training_leaves_the_encoder_untouched(image_folder, tmp_path):
    trainer = build(image_folder, tmp_path, **{"model.train_decoder_only": "true", "loss.disc_weight": 0})
    before = snapshot(trainer.vae)
    trainer.train()
    moved = changed(before, trainer.vae)
    assert moved and all(name.startswith(("decoder.", "post_quant_conv.")) for name in moved)


def test_learning_rate_warmup_follows_optimizer_steps(image_folder, tmp_path):
    trainer = build(
        image_folder,
        tmp_path,
        **{"optim.warmup_steps": 4, "optim.lr": 1e-3, "train.max_steps": 2, "loss.disc_weight": 0},
    )
    assert trainer.vae_player.lr == 0.0
    trainer.train()
    assert trainer.vae_player.lr == pytest.approx(2 / 4 * 1e-3)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # warm-up over 2 steps, then 6 steps to the end of an 8-step run
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]),
        ("cosine", [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)]),
    ],
)
def test_learning_rate_schedules_per_optimizer_step(schedule, expected):
    from vae_hf.config import OptimConfig
    from vae_hf.train.player import build_optimizer, build_scheduler

    config = OptimConfig(lr=1.0, lr_scheduler=schedule, warmup_steps=2)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config, config.lr)
    scheduler = build_scheduler(optimizer, config, total_steps=8)
    rates = []
    for _ in range(9):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx(expected, abs=1e-12)


def test_a_failed_vae_export_is_one_clear_error_and_keeps_the_previous_one(image_folder, tmp_path, monkeypatch):
    from vae_hf.io.export import ExportError

    trainer = build(image_folder, tmp_path, **{"loss.disc_weight": 0, "train.max_steps": 1})
    trainer.train()
    exported = tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors"
    before = exported.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(trainer.vae), "save_pretrained", disk_full)
    with pytest.raises(ExportError, match="No space left on device"):
        trainer.save_vae()
    assert exported.read_bytes() == before


def test_no_host_sync_inside_the_steps_between_log_steps(image_folder, tmp_path, monkeypatch):
    """With fused Adam, a non-finite step is skipped on the device: nothing in a training step reads
    a tensor on the host (`.item()`, `bool()`, ...) except at log, sample and checkpoint steps."""
    trainer = build(
        image_folder,
        tmp_path,
        **{"loss.disc_start_step": 0, "train.max_steps": 4, "train.log_every_steps": 1000, "train.ema_decay": 0.9},
    )
    host_reads = []
    counting = [False]

    def counted(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if counting[0]:
                host_reads.append(name)
            return real(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    # from the bookkeeping of step 2 through every micro-batch of step 3; step 4 logs, step 1 samples
    trainer.step_callbacks.append(lambda t: counting.__setitem__(0, t.progress.global_step == 2))
    trainer.train()
    assert trainer.progress.global_step == 4
    assert host_reads == []


def nchw_and_nhwc_gradients(image_folder, tmp_path, applied, in_float64) -> tuple[list, list, Trainer]:
    common = {"loss.disc_weight": 0, "model.sample_posterior": "false", "train.max_steps": 1}
    trainers = {}
    for flag in ("false", "true"):
        trainers[flag] = in_float64(build(image_folder, tmp_path / flag, **common, **{"train.channels_last": flag}))
        trainers[flag].train()
    nchw, nhwc = applied
    return nchw, nhwc, trainers["true"]


def test_channels_last_trains_the_same_way(image_folder, tmp_path, applied_gradients, in_float64):
    """NHWC memory order is a layout change only: the first step's gradients match NCHW's."""
    nchw, nhwc, trainer = nchw_and_nhwc_gradients(image_folder, tmp_path, applied_gradients, in_float64)
    conv = trainer.vae.decoder.conv_out.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert_same_float64_gradients(nhwc, nchw)


def test_channels_last_check_fails_when_the_layout_swaps_axes(
    image_folder, tmp_path, applied_gradients, in_float64, monkeypatch
):
    """Control: a layout bug that reads the images with height and width swapped fails the comparison above."""
    to_model_range = batching.to_model_range
    nhwc_run = [False]

    def swapped_in_the_nhwc_run(pixels):
        images = to_model_range(pixels)
        return images.transpose(-1, -2) if nhwc_run[0] else images

    monkeypatch.setattr(batching, "to_model_range", swapped_in_the_nhwc_run)
    monkeypatch.setattr(Trainer, "train", _flagging_train(Trainer.train, nhwc_run))
    nchw, nhwc, _ = nchw_and_nhwc_gradients(image_folder, tmp_path, applied_gradients, in_float64)
    with pytest.raises(AssertionError, match="not close"):
        assert_same_float64_gradients(nhwc, nchw)


def _flagging_train(train, flag: list[bool]):
    """Trainer.train that sets flag[0] while a channels-last trainer trains."""

    def flagged(trainer: Trainer):
        flag[0] = trainer.config.train.channels_last
        try:
            return train(trainer)
        finally:
            flag[0] = False

    return flagged


def test_tf32_switch_sets_the_backends(image_folder, tmp_path):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        build(image_folder, tmp_path / "off", **{"train.allow_tf32": "false"})
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        build(image_folder, tmp_path / "on", **{"train.allow_tf32": "true"})
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compiled_and_eager_gradients(image_folder, tmp_path, applied, in_float64, backend: str, **overrides):
    """The gradients of the same few steps in float64, eager then compiled, and dynamo's counters for the
    compiled run."""
    from torch._dynamo.utils import counters

    common = {"model.sample_posterior": "false", **overrides}
    in_float64(build(image_folder, tmp_path / "eager", **common)).train()
    eager = list(applied)
    applied.clear()
    torch._dynamo.reset()
    counters.clear()
    trainer = build(
        image_folder, tmp_path / backend, **common, **{"train.compile": "true", "train.compile_backend": backend}
    )
    in_float64(trainer).train()
    return trainer, eager, list(applied), {name: dict(values) for name, values in counters.items()}


def test_compiled_training_takes_the_same_steps(image_folder, tmp_path, applied_gradients, in_float64):
    """train.compile traces the encoder, decoder, LPIPS and discriminator whole (no graph break) and
    changes nothing but speed: the same gradients, step after step, for both players."""
    trainer, eager, compiled, counts = compiled_and_eager_gradients(
        image_folder,
        tmp_path,
        applied_gradients,
        in_float64,
        "aot_eager",
        **{"loss.disc_start_step": 0, "train.max_steps": 3},
    )
    assert len(compiled) == len(eager) == 6  # VAE and discriminator, 3 steps
    for actual, expected in zip(compiled, eager, strict=True):
        assert_same_float64_gradients(actual, expected)
    # Control: the comparison tells steps apart (each step's gradients differ from the next one's).
    with pytest.raises(AssertionError, match="not close"):
        assert_same_float64_gradients(compiled[2], eager[0])  # the VAE's step 2 against its step 1
    assert counts["stats"]["unique_graphs"] >= 4 and not counts.get("graph_break")
    for module in (trainer.vae.encoder, trainer.vae.decoder, trainer.lpips, trainer.discriminator):
        assert module._compiled_call_impl is not None
    exported = (tmp_path / "aot_eager" / "run" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert b"_orig_mod" not in exported[:100_000]  # parameter names as in eager mode


def test_inductor_compiled_vae_trains_like_eager(image_folder, tmp_path, applied_gradients, in_float64):
    """The real backend (generated C++ kernels on the CPU): the VAE's first steps match eager mode's
    up to the float reordering of fused kernels."""
    _, eager, compiled, counts = compiled_and_eager_gradients(
        image_folder,
        tmp_path,
        applied_gradients,
        in_float64,
        "inductor",
        **{"loss.disc_weight": 0, "loss.perceptual_weight": 0},
    )
    assert counts["stats"]["unique_graphs"] >= 2 and not counts.get("graph_break")
    assert len(compiled) == len(eager) == 2
    for actual, expected in zip(compiled, eager, strict=True):
        assert_same_float64_gradients(actual, expected)
    with pytest.raises(AssertionError, match="not close"):  # control: step 2's gradients are not step 1's
        assert_same_float64_gradients(compiled[1], eager[0])


def epoch_batches(trainer: Trainer, epochs: int) -> list[torch.Tensor]:
    """Every batch of the first `epochs` epochs, as the training loop draws them."""
    batches = []
    for epoch in range(epochs):
        trainer.progress.epoch = epoch
        batches.append(torch.cat([batch["pixel_values"] for batch in trainer._epoch_batches()]))
    return batches


def test_persistent_workers_follow_the_epoch_of_augmentation(image_folder, tmp_path):
    """Workers started once still crop and flip each epoch as the (seed, epoch, index) generators say:
    the same batches as loading in the main process, and new ones each epoch."""
    augmented = {"data.center_crop": "false", "data.random_flip": "true", "train.batch_size": 4}
    main_process = epoch_batches(build(image_folder, tmp_path / "main", **augmented), 3)
    trainer = build(
        image_folder, tmp_path / "workers", **augmented, **{"data.num_workers": 2, "data.persistent_workers": "true"}
    )
    workers = []
    for epoch, batches in enumerate(epoch_batches(trainer, 3)):
        torch.testing.assert_close(batches, main_process[epoch], rtol=0, atol=0)
        workers.append(tuple(worker.pid for worker in trainer.dataloader._iterator._workers))
    assert len(set(workers)) == 1 and len(workers[0]) == 2  # the same two processes served every epoch
    assert not torch.equal(main_process[0], main_process[1]) and not torch.equal(main_process[1], main_process[2])


def weight_changes(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Train, and return how much each tensor of the VAE and the discriminator moved."""
    models = {"vae": trainer.vae, "discriminator": trainer.discriminator}
    start = {f"{n}.{k}": v.clone() for n, m in models.items() for k, v in m.state_dict().items()}
    trainer.train()
    return {f"{n}.{k}": v - start[f"{n}.{k}"] for n, m in models.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize(("steps", "tolerance"), [(1, 1e-5), (3, 1e-2)])
def test_fused_and_foreach_adam_train_the_same_way(image_folder, tmp_path, steps, tolerance):
    """optim.fused is a kernel choice only: both players' weights move the same way, to float rounding after
    one step and within 1% of the largest move after three (the game amplifies rounding a little). eps=1 makes
    Adam's step about lr * grad: at the default eps the first step is lr * sign(grad), and the float noise of
    gradients that are really zero (a bias before a GroupNorm) would flip signs between kernels."""
    common = {
        "loss.disc_start_step": 0,
        "model.sample_posterior": "false",
        "train.max_steps": steps,
        "optim.eps": 1.0,
        "optim.lr": 1e-2,
    }
    fused = build(image_folder, tmp_path / "fused", **common, **{"optim.fused": "true"})
    foreach = build(image_folder, tmp_path / "foreach", **common, **{"optim.fused": "false"})
    assert fused.vae_player.optimizer.optimizer.defaults["fused"]
    assert not foreach.vae_player.optimizer.optimizer.defaults["fused"]
    moved_fused, moved_foreach = weight_changes(fused), weight_changes(foreach)
    largest = max(change.abs().max().item() for change in moved_fused.values())
    assert largest > 1e-3
    difference = max((moved_fused[name] - moved_foreach[name]).abs().max().item() for name in moved_fused)
    assert difference <= tolerance * largest


# the latent-space terms that change what the VAE computes: an equivariance batch (16 px at least, for LPIPS and
# the PatchGAN) and latent noise for the decoder, drawn as the trainer draws them
LATENT_TERMS = {"loss.eq_probability": 1, "loss.eq_scale_min": 0.5, "model.decoder_noise_tau": 0.5}


@pytest.mark.parametrize(
    ("adaptive", "latent_terms"), [("false", {}), ("true", {}), ("true", LATENT_TERMS)], ids=["fixed", "adaptive", "eq"]
)
def test_the_benchmark_floor_plays_the_trainers_game(
    image_folder, tmp_path, applied_gradients, in_float64, adaptive, latent_terms
):
    """vae_hf.perf.floor (what `vae-hf bench` compares the trainer with, and what the memory estimate runs)
    computes the trainer's generator and discriminator losses and gradients for the same weights and batch."""
    import contextlib
    import copy

    from vae_hf.perf.floor import floor_step

    overrides = {"loss.disc_start_step": 0, "loss.adaptive_disc_weight": adaptive, "model.sample_posterior": "false"}
    trainer = in_float64(build(image_folder, tmp_path, **overrides, **latent_terms))
    images = first_images(trainer)
    vae, discriminator = copy.deepcopy(trainer.vae_player.module), copy.deepcopy(trainer.discriminator)
    transform, generator = trainer.batch_transform(images), trainer._noise_generator()  # what the step draws
    assert (transform.kind is not None) == bool(latent_terms)

    breakdown = trainer.training_step(images)  # both players' steps, gradients recorded before each update
    vae_grads, disc_grads = applied_gradients
    floor_g, floor_d = floor_step(
        vae,
        trainer.game,
        discriminator,
        None,
        None,
        images,
        contextlib.nullcontext,
        update=False,
        transform=transform,
        generator=generator,
    )

    assert (breakdown["disc_weight"] != trainer.config.loss.disc_weight) == (adaptive == "true")
    for name in ("rec", "kl", "perceptual", "g_adv", "disc_weight", "g_loss"):
        torch.testing.assert_close(floor_g[name], breakdown[name], rtol=1e-12, atol=0, msg=name)
    for name in ("d_loss", "d_real", "d_fake"):
        torch.testing.assert_close(floor_d[name], breakdown[name], rtol=1e-12, atol=0, msg=name)
    trained = [p for p in vae.parameters() if p.requires_grad]
    assert_same_float64_gradients([p.grad for p in trained], vae_grads)
    assert_same_float64_gradients([p.grad for p in discriminator.parameters()], disc_grads)


def test_the_discriminators_schedule_starts_when_it_starts_playing(image_folder, tmp_path, monkeypatch):
    """Its warm-up ran from step 0 before, so it was used up before loss.disc_start_step."""
    from vae_hf.train.player import Player

    rates = {"vae": [], "discriminator": []}
    real_step = Player.step

    def recording_step(player, accelerator):
        name = "discriminator" if player.module is trainer.discriminator else "vae"
        rates[name].append(player.lr)
        return real_step(player, accelerator)

    monkeypatch.setattr(Player, "step", recording_step)
    overrides = {
        "loss.disc_start_step": 2,
        "optim.warmup_steps": 2,
        "optim.lr": 1e-3,
        "optim.disc_lr": 2e-3,
        "train.max_steps": 5,
    }
    trainer = build(image_folder, tmp_path, **overrides)
    trainer.train()
    assert rates["vae"] == pytest.approx([0.0, 0.5e-3, 1e-3, 1e-3, 1e-3])
    assert rates["discriminator"] == pytest.approx([0.0, 1e-3, 2e-3])  # steps 3-5: its own warm-up


def test_a_learnable_logvar_trains_with_the_vae_and_is_not_exported(image_folder, tmp_path):
    trainer = build(image_folder, tmp_path, **{"loss.learn_logvar": "true", "loss.disc_weight": 0})
    logvar = trainer.vae_player.module.logvar
    assert any(p is logvar for p in trainer.vae_player.parameters)  # in the VAE's optimizer
    trainer.train()
    assert logvar.item() != 0.0
    exported = tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open

    with safe_open(exported, "pt") as weights:
        assert not [name for name in weights.keys() if "logvar" in name]
    resumed = build(
        image_folder,
        tmp_path,
        **{"loss.learn_logvar": "true", "loss.disc_weight": 0, "train.resume_from": "latest", "train.max_steps": 3},
    )
    assert resumed.vae_player.module.logvar.item() == logvar.item()
