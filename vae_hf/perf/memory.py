"""Peak memory of one training step, estimated on the CPU: for planning batch sizes without a GPU.

`estimate_step_memory` runs the trainer's step (VAE encode, posterior sample, decode; MSE + KL + LPIPS +
PatchGAN generator loss with the discriminator frozen; backward; Adam step; then the discriminator on
real and detached fake images, its backward and Adam step) on fake tensors: every op computes only
shapes and dtypes, so the SD VAE at batch 64 costs seconds and no memory. A dispatch mode sums the
bytes of the tensor storages alive after each op (parameters, buffers, gradients, Adam's two fp32
states, activations saved for backward, temporaries, inputs), each rounded up to the CUDA caching
allocator's 512-byte blocks, and keeps the peak; a storage leaves the sum when Python frees it.

What it counts is live tensor storage only: no allocator fragmentation or cached free blocks, no cuDNN
or cuBLAS workspaces, no CUDA context (several hundred MiB per process), no kernel-internal buffers. A
real GPU peak is therefore higher, and `torch.cuda.max_memory_allocated` (which counts allocated
blocks, not workspaces or the context) is the closest real figure. This is an estimate for planning;
`vae-hf bench` on the GPU is the measurement.

The fake tensors are CPU tensors: a fake CUDA tensor runs forward on a machine without CUDA, but its
backward needs a CUDA context (pytorch/pytorch#92627). Mixed precision still follows CUDA's autocast
policy, which keeps far more in fp32 than the CPU one (group norms, for one: about 1.6x the CPU policy's
activation bytes for this VAE): `CudaAutocastPolicy` asks CUDA autocast, on fake CUDA stand-ins, which
dtype each op computes in and casts the CPU inputs to it. `measure_step_memory` runs the same step and
tracker on real tensors, which is how the fake run is validated.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map_only

from vae_hf.config import LossConfig
from vae_hf.game import AUTOCAST_DTYPES, Game
from vae_hf.models.discriminator import PatchDiscriminator
from vae_hf.models.perceptual import build_lpips
from vae_hf.models.vae import freeze_encoder
from vae_hf.perf.floor import floor_step

# The Stable Diffusion VAE (and our default model config): about 84M parameters, 8x downsampling.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
CUDA_BLOCK_BYTES = 512  # the caching allocator rounds every allocation up to a multiple of this
GIB = 2**30


@dataclass(frozen=True)
class DiscriminatorShape:
    """The PatchGAN's shape, defaulting to the trainer's (`loss.disc_*`)."""

    channels: int = LossConfig.disc_channels
    num_layers: int = LossConfig.disc_num_layers
    norm: str = LossConfig.disc_norm


TRAINER_DISCRIMINATOR = DiscriminatorShape()


@dataclass(frozen=True)
class StepOptions:
    """What a training step runs besides the VAE's forward and backward, as the trainer's config sets it.

    `discriminator=None` is a step before `loss.disc_start_step`, when the discriminator does not run;
    `decoder_only` freezes the encoder as `model.train_decoder_only` does (no encoder gradients, Adam state
    or saved activations).
    """

    mixed_precision: str = "bf16"
    perceptual: bool = True
    discriminator: DiscriminatorShape | None = TRAINER_DISCRIMINATOR
    decoder_only: bool = False


class LiveStorageTracker(TorchDispatchMode):
    """Bytes of the tensor storages alive now, and their peak, as ops allocate them and Python frees them.

    Views and in-place results share their input's storage and are counted once. Tensors that exist
    before the mode is entered (parameters, inputs) are counted through `track`.
    """

    def __init__(self, block_bytes: int = CUDA_BLOCK_BYTES):
        super().__init__()
        self.block_bytes = block_bytes
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) -> (weak reference, bytes)

    def track(self, tensors: Iterable[torch.Tensor]) -> int:
        """Count these tensors' storages (once each); returns the bytes newly counted."""
        before = self.live_bytes
        for tensor in tensors:
            self._count(tensor.untyped_storage())
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return self.live_bytes - before

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        self.track(leaf for leaf in tree_leaves(outputs) if isinstance(leaf, torch.Tensor))
        return outputs

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # a storage keeps one Python object while it lives, so its id names it
        if key in self._sizes:
            return
        size = math.ceil(storage.nbytes() / self.block_bytes) * self.block_bytes
        self._sizes[key] = (weakref.ref(storage, partial(self._release, key)), size)
        self.live_bytes += size

    def _release(self, key: int, _reference: weakref.ref) -> None:
        self.live_bytes -= self._sizes.pop(key)[1]


class CudaAutocastPolicy(TorchFunctionMode):
    """CUDA autocast's casts, applied to CPU tensors above autograd (so backward sees them as autocast's).

    For each op that has a CUDA autocast kernel (and each torch.nn.functional function), CUDA autocast
    itself decides: the op runs on fake CUDA
    stand-ins with and without it, and when the floating output dtype differs the floating inputs are
    cast to autocast's. Like autocast, it casts each fp32 leaf parameter once per region and keeps the
    copy until the region ends.
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self._weight_casts: dict[int, torch.Tensor] = {}
        self._decisions: dict[tuple, torch.dtype | None] = {}

    def __exit__(self, *exc_info):
        self._weight_casts.clear()
        return super().__exit__(*exc_info)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self._autocast_dtype(func, args, kwargs)
        if target is not None:
            args, kwargs = tree_map_only(torch.Tensor, partial(self._cast, target), (args, kwargs))
        return func(*args, **kwargs)

    def _autocast_dtype(self, func, args, kwargs) -> torch.dtype | None:
        if not (_has_cuda_autocast_kernel(getattr(func, "__name__", "")) or _is_functional(func)):
            return None
        leaves = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, (torch.Tensor, torch.dtype))]
        if not any(isinstance(leaf, torch.Tensor) and leaf.is_floating_point() for leaf in leaves):
            return None
        key = (func, *(leaf.dtype if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves))
        if key not in self._decisions:
            self._decisions[key] = _probe_cuda_autocast(func, args, kwargs, self.dtype)
        return self._decisions[key]

    def _cast(self, dtype: torch.dtype, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point() or tensor.dtype in (dtype, torch.float64):
            return tensor  # autocast leaves doubles alone
        if not (tensor.dtype == torch.float32 and tensor.requires_grad and tensor.is_leaf):
            return tensor.to(dtype)
        key = id(tensor)
        if key not in self._weight_casts:
            self._weight_casts[key] = tensor.to(dtype)
        return self._weight_casts[key]


def _is_functional(func: Callable) -> bool:
    """torch.nn.functional's Python wrappers (F.interpolate): the aten ops they call are out of this mode's
    sight, so the wrapper is asked as a whole."""
    return getattr(func, "__module__", None) == "torch.nn.functional"


@functools.cache
def _has_cuda_autocast_kernel(name: str) -> bool:
    """Whether any overload of aten::name has a kernel of its own for AutocastCUDA (the others fall through)."""
    try:
        overloads = getattr(torch.ops.aten, name).overloads()
    except (AttributeError, RuntimeError):
        return False
    return any(_overload_has_cuda_autocast_kernel(name, overload) for overload in overloads)


def _overload_has_cuda_autocast_kernel(name: str, overload: str) -> bool:
    qualified = f"aten::{name}" if overload == "default" else f"aten::{name}.{overload}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "AutocastCUDA")
    except RuntimeError:  # a TorchScript-only overload (aten::add.t): not in the dispatcher
        return False


def _probe_cuda_autocast(func, args, kwargs, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype CUDA autocast computes `func` in, when it changes the op's floating output dtype."""

    def stand_in(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cuda")

    with _disable_current_modes(), FakeTensorMode(), torch.no_grad():
        probe_args, probe_kwargs = tree_map_only(torch.Tensor, stand_in, (args, kwargs))
        with _cuda_autocast(dtype):
            cast = _floating_dtypes(func(*probe_args, **probe_kwargs))
        try:
            plain = _floating_dtypes(func(*probe_args, **probe_kwargs))
        except RuntimeError:  # mixed dtypes that only autocast's casts make legal (bf16 input, fp32 weight)
            plain = set()
    return next(iter(cast)) if cast != plain and len(cast) == 1 else None


@contextlib.contextmanager
def _cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    """CUDA autocast on, without `torch.autocast`'s check for a CUDA device (the tensors are fake)."""
    enabled, previous_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    cache_enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_cache_enabled(False)  # stand-ins are thrown away
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous_dtype)
        torch.set_autocast_cache_enabled(cache_enabled)


def _floating_dtypes(outputs: Any) -> set[torch.dtype]:
    return {leaf.dtype for leaf in tree_leaves(outputs) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()}


def estimate_step_memory(
    vae_config: Mapping[str, Any],
    resolution: int,
    batch_size: int,
    *,
    gradient_checkpointing: bool,
    options: StepOptions = StepOptions(),
) -> dict[str, Any]:
    """Peak live tensor bytes of one training step, on fake tensors (see the module docstring).

    `vae_config` holds AutoencoderKL's arguments (e.g. `SD_VAE_CONFIG`, or a model's `vae.config`).
    Returns bytes: `peak_bytes`, its static part (`parameters_bytes`, `optimizer_bytes`, `inputs_bytes`)
    and `activations_peak_bytes` (gradients, saved activations and temporaries at the peak), plus
    `device` and `seconds` (how long the estimate took).
    """
    with FakeTensorMode():
        return _track_step(vae_config, resolution, batch_size, gradient_checkpointing, options, device="fake cpu")


def measure_step_memory(
    vae_config: Mapping[str, Any],
    resolution: int,
    batch_size: int,
    *,
    gradient_checkpointing: bool,
    options: StepOptions = StepOptions(),
) -> dict[str, Any]:
    """The same step and tracker on real CPU tensors: what the estimate must reproduce (small models only)."""
    return _track_step(vae_config, resolution, batch_size, gradient_checkpointing, options, device="cpu")


def largest_batch(fits: Callable[[int], bool], upper: int = 256) -> int:
    """The largest batch size n <= `upper` with `fits(n)`, assuming fits is monotone (0 if none).

    Doubles until it no longer fits, then bisects: about 2 log2(answer) calls. `fits` is, e.g., an
    estimate under a budget or a GPU run that does not run out of memory.
    """
    if not fits(1):
        return 0
    fitting = 1
    while fitting < upper and fits(min(2 * fitting, upper)):
        fitting = min(2 * fitting, upper)
    if fitting == upper:
        return upper
    too_big = min(2 * fitting, upper)
    while too_big - fitting > 1:
        middle = (fitting + too_big) // 2
        fitting, too_big = (middle, too_big) if fits(middle) else (fitting, middle)
    return fitting


def _track_step(
    vae_config: Mapping[str, Any],
    resolution: int,
    batch_size: int,
    gradient_checkpointing: bool,
    options: StepOptions,
    device: str,
) -> dict[str, Any]:
    started = time.perf_counter()
    autocast_dtype = AUTOCAST_DTYPES.get(options.mixed_precision)
    checkpoint = None if autocast_dtype is None else _checkpoint_under(autocast_dtype)
    step = _StepModels(vae_config, resolution, batch_size, gradient_checkpointing, options, checkpoint)
    tracker = LiveStorageTracker()
    with tracker:
        parameters_bytes = tracker.track(t for model in step.models for t in (*model.parameters(), *model.buffers()))
        inputs_bytes = tracker.track([step.images])
        optimizer_bytes = _create_adam_state(step.optimizers, tracker)
        static_bytes = tracker.live_bytes
        tracker.reset_peak()
        step.run(partial(CudaAutocastPolicy, autocast_dtype) if autocast_dtype else contextlib.nullcontext)
    return {
        "peak_bytes": tracker.peak_bytes,
        "parameters_bytes": parameters_bytes,
        "optimizer_bytes": optimizer_bytes,
        "inputs_bytes": inputs_bytes,
        "activations_peak_bytes": tracker.peak_bytes - static_bytes,
        "device": device,
        "autocast_policy": "cuda, emulated" if autocast_dtype is not None else None,
        "seconds": time.perf_counter() - started,
    }


def measure_cuda_step_memory(
    vae_config: Mapping[str, Any],
    resolution: int,
    batch_size: int,
    *,
    gradient_checkpointing: bool,
    options: StepOptions = StepOptions(),
    device: torch.device | str = "cuda",
) -> dict[str, Any]:
    """The same step on a GPU, under torch.autocast: `torch.cuda.max_memory_allocated` over two steps (the
    second with Adam's state in place). Raises torch.cuda.OutOfMemoryError when it does not fit."""
    started = time.perf_counter()
    dtype = AUTOCAST_DTYPES.get(options.mixed_precision)
    step = _StepModels(vae_config, resolution, batch_size, gradient_checkpointing, options)
    try:
        step.to(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            step.run(partial(torch.autocast, "cuda", dtype=dtype, enabled=dtype is not None))
        peak = torch.cuda.max_memory_allocated(device)
    finally:
        del step
        torch.cuda.empty_cache()  # the next size starts from an empty cache
    return {"peak_bytes": peak, "device": torch.cuda.get_device_name(device), "seconds": time.perf_counter() - started}


class _StepModels:
    """The models, optimizers and input batch of one step, built from a VAE config."""

    def __init__(
        self,
        vae_config: Mapping[str, Any],
        resolution: int,
        batch_size: int,
        gradient_checkpointing: bool,
        options: StepOptions,
        checkpoint: Callable | None = None,
    ):
        self.vae = AutoencoderKL.from_config(dict(vae_config))
        if options.decoder_only:
            freeze_encoder(self.vae)
        if gradient_checkpointing:
            self.vae.enable_gradient_checkpointing(checkpoint)
        self.lpips = build_lpips(pretrained=False) if options.perceptual else None
        discriminator = options.discriminator
        self.discriminator = (
            PatchDiscriminator(3, discriminator.channels, discriminator.num_layers, discriminator.norm)
            if discriminator is not None
            else None
        )
        self.images = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1
        self._build_optimizers()

    @property
    def models(self) -> list[nn.Module]:
        return [model for model in (self.vae, self.lpips, self.discriminator) if model is not None]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [optimizer for optimizer in (self.vae_optimizer, self.disc_optimizer) if optimizer is not None]

    def _build_optimizers(self) -> None:
        """Fused Adam over the trainable parameters, as the trainer builds it (`optim.fused`, the default)."""
        self.vae_optimizer = torch.optim.Adam([p for p in self.vae.parameters() if p.requires_grad], fused=True)
        self.disc_optimizer = (
            torch.optim.Adam(self.discriminator.parameters(), fused=True) if self.discriminator is not None else None
        )

    def to(self, device: torch.device | str) -> None:
        for model in self.models:
            model.to(device)
        self.images = self.images.to(device)
        self._build_optimizers()  # over the moved parameters

    def run(self, autocast: Callable) -> None:
        """One step; the discriminator's loss settings are the defaults."""
        floor_step(
            self.vae,
            Game(LossConfig(), self.lpips),
            self.discriminator,
            self.vae_optimizer,
            self.disc_optimizer,
            self.images,
            autocast,
        )


def _checkpoint_under(dtype: torch.dtype) -> Callable:
    """diffusers' checkpointing function, recomputing under `CudaAutocastPolicy` as torch's checkpoint
    recomputes under the forward's autocast (the backward runs outside the policy's mode)."""

    def checkpointed(module: nn.Module, *args: Any) -> Any:
        def run(*inputs: Any) -> Any:
            with contextlib.nullcontext() if _policy_active() else CudaAutocastPolicy(dtype):
                return module(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    return checkpointed


def _policy_active() -> bool:
    return any(isinstance(mode, CudaAutocastPolicy) for mode in _get_current_function_mode_stack())


def _create_adam_state(optimizers: list[torch.optim.Optimizer], tracker: LiveStorageTracker) -> int:
    """Give each optimizer its state (step, exp_avg, exp_avg_sq) as after a first step: a step on zero
    gradients, which moves no parameter. Returns the state's bytes."""
    before = tracker.live_bytes
    for optimizer in optimizers:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        for parameter in parameters:
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tracker.live_bytes - before
