"""The step-memory estimator: fake tensors reproduce a real run's live bytes, CUDA's autocast policy is
reproduced on the CPU, and the estimate moves the way memory does."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from diffusers import AutoencoderKL
from torch._subclasses.fake_tensor import FakeTensorMode

from vae_hf.perf.memory import (
    CudaAutocastPolicy,
    LiveStorageTracker,
    StepOptions,
    estimate_step_memory,
    largest_batch,
    measure_step_memory,
)

from conftest import tiny_vae

# block_out_channels [32, 64], one layer per block; without the private keys, which would override ours
TINY = {key: value for key, value in tiny_vae().config.items() if not key.startswith("_")}


@pytest.mark.parametrize(("mixed_precision", "gradient_checkpointing"), [("no", False), ("bf16", True)])
def test_estimate_matches_a_real_run(mixed_precision, gradient_checkpointing):
    """Fake and real tensors run the same ops and free at the same points, so the bytes agree to the
    byte; 1% of slack only lets a kernel's output layout differ from its fake (meta) implementation."""
    options = dict(gradient_checkpointing=gradient_checkpointing, options=StepOptions(mixed_precision=mixed_precision))
    estimate = estimate_step_memory(TINY, 32, 2, **options)
    real = measure_step_memory(TINY, 32, 2, **options)
    assert estimate["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.01)
    assert estimate["parameters_bytes"] == real["parameters_bytes"]
    assert estimate["optimizer_bytes"] == real["optimizer_bytes"]


def test_static_parts_are_parameters_and_two_adam_states():
    estimate = estimate_step_memory(TINY, 32, 1, gradient_checkpointing=False)
    trainable = sum(p.numel() for p in tiny_vae().parameters()) * 4
    assert estimate["optimizer_bytes"] >= 2 * trainable  # the VAE's, plus the discriminator's
    assert estimate["parameters_bytes"] > trainable  # plus LPIPS and the discriminator
    assert estimate["inputs_bytes"] == 3 * 32 * 32 * 4
    assert estimate["device"] == "fake cpu"


def test_memory_grows_with_batch_and_checkpointing_lowers_it():
    peaks = {
        (batch, checkpointing): estimate_step_memory(TINY, 64, batch, gradient_checkpointing=checkpointing)[
            "activations_peak_bytes"
        ]
        for batch in (2, 4)
        for checkpointing in (False, True)
    }
    assert peaks[4, False] > 1.7 * peaks[2, False]  # activations scale with the batch
    assert peaks[4, True] < peaks[4, False]
    assert peaks[4, True] > peaks[2, True]


def fits_budget(vae_config, resolution: int, budget_bytes: int, **keywords):
    """Whether a batch size's estimated peak is within `budget_bytes`."""
    return lambda batch: estimate_step_memory(vae_config, resolution, batch, **keywords)["peak_bytes"] <= budget_bytes


def test_largest_batch_fits_the_budget():
    options = dict(gradient_checkpointing=False, options=StepOptions(perceptual=False, discriminator=None))
    peak = {batch: estimate_step_memory(TINY, 32, batch, **options)["peak_bytes"] for batch in (2, 3)}
    assert largest_batch(fits_budget(TINY, 32, (peak[2] + peak[3]) // 2, **options)) == 2
    assert largest_batch(fits_budget(TINY, 32, peak[3], **options)) == 3  # the budget itself still fits
    assert largest_batch(fits_budget(TINY, 32, peak[3], **options), upper=2) == 2
    assert largest_batch(fits_budget(TINY, 32, 1, **options)) == 0


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype):
    """CUDA autocast itself on fake CUDA tensors (`torch.autocast` refuses without a device)."""
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", False)


def forward_bytes(device: str, autocast) -> tuple[int, list[torch.dtype]]:
    """Bytes alive after a VAE forward (what it saves for backward) and the dtypes of its outputs."""
    with FakeTensorMode(), torch.device(device):
        vae = AutoencoderKL.from_config({**TINY, "mid_block_add_attention": False})
        images = torch.rand(2, 3, 32, 32)
        tracker = LiveStorageTracker()
        with tracker, autocast:
            before = tracker.live_bytes
            posterior = vae.encode(images).latent_dist
            reconstructions = vae.decode(posterior.sample()).sample
            return tracker.live_bytes - before, [posterior.mean.dtype, reconstructions.dtype]


def test_cpu_emulation_follows_cuda_autocast():
    """A fake CUDA forward runs on this machine (its backward would not): the emulation must save what
    CUDA autocast saves. Without the mid-block attention, which fake CUDA tensors run with the math
    kernel (a GPU runs flash attention, as the CPU does), the bytes agree exactly. The CPU policy itself
    keeps group norms in bf16: it would underestimate this VAE's activations by about a third."""
    cuda_bytes, cuda_dtypes = forward_bytes("cuda", cuda_autocast(torch.bfloat16))
    emulated_bytes, emulated_dtypes = forward_bytes("cpu", CudaAutocastPolicy(torch.bfloat16))
    cpu_policy_bytes, _ = forward_bytes("cpu", torch.autocast("cpu", dtype=torch.bfloat16))
    assert emulated_dtypes == cuda_dtypes
    assert emulated_bytes == cuda_bytes
    assert cpu_policy_bytes < 0.9 * cuda_bytes


def test_decoder_only_training_needs_no_encoder_gradients_state_or_activations():
    """model.train_decoder_only: the frozen encoder has no Adam state and saves nothing for backward."""
    full = estimate_step_memory(TINY, 64, 4, gradient_checkpointing=False)
    decoder_only = estimate_step_memory(
        TINY, 64, 4, gradient_checkpointing=False, options=StepOptions(decoder_only=True)
    )
    vae = tiny_vae()
    frozen = [p for module in (vae.encoder, vae.quant_conv) for p in module.parameters()]
    # exp_avg and exp_avg_sq, and the step counter (a scalar tensor for fused Adam), each in 512-byte blocks
    state_bytes = sum(2 * math.ceil(4 * p.numel() / 512) * 512 + 512 for p in frozen)
    assert full["optimizer_bytes"] - decoder_only["optimizer_bytes"] == state_bytes
    assert decoder_only["activations_peak_bytes"] < full["activations_peak_bytes"]
    assert decoder_only["parameters_bytes"] == full["parameters_bytes"]
