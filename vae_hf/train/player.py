"""Optimizers, learning-rate schedules, gradient scaling and clipping for the two players.

Each player (the VAE, the discriminator) owns its optimizer, schedule and, in fp16, its own
GradScaler. One shared scaler, as Accelerate keeps, updates its scale after the first player's step
and would then unscale the second player's gradients with a scale they were not computed with.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from torch import nn

from vae_hf.config import OptimConfig
from vae_hf.parallel.fsdp import unsharded

SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def build_optimizer(parameters: list[nn.Parameter], config: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """Adam (the reference recipe), or AdamW when weight decay is asked for; fused kernels when `optim.fused`."""
    betas = (float(config.betas[0]), float(config.betas[1]))
    # one fused kernel per step instead of a loop of small ones (CUDA and CPU; same update)
    implementation = {"fused": True} if config.fused else {"foreach": True}
    if config.weight_decay > 0:
        return torch.optim.AdamW(
            parameters, lr=lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay, **implementation
        )
    return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=config.eps, **implementation)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    """Linear warm-up over `warmup_steps`, then constant, cosine or linear decay to the last step."""
    return get_scheduler(
        SCHEDULES[config.lr_scheduler], optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )


@dataclass
class Player:
    """One side of the game: a prepared model with its optimizer, schedule and optional scaler."""

    wrapped: nn.Module  # what the step runs: wrapped for the launch setup (DDP, a DeepSpeed engine) or sharded in place
    module: nn.Module  # the same model as built, unwrapped (under FSDP2 its weights are shards)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    max_grad_norm: float | None = None

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, accelerator: Accelerator, loss: torch.Tensor) -> None:
        """Accumulate this micro-batch's gradient (Accelerate divides by the accumulation steps)."""
        accelerator.backward(self.scaler.scale(loss) if self.scaler is not None else loss)

    def step(self, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, clip, update unless the gradients are non-finite, clear.

        Returns (updated, pre-clip gradient norm) as device tensors. With fused Adam the skip happens on
        the device (the kernel's `found_inf` input, as GradScaler uses it): no host sync. The foreach
        implementation must read the norm on the host to decide.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
        else:  # measure only: clipping at infinity would still multiply every gradient by 1
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters if p.grad is not None])
        grad_norm = unsharded(grad_norm)  # FSDP2 returns a DTensor: the global norm as a plain tensor
        finite = torch.isfinite(grad_norm)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # under Accelerate's wrapper
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            del optimizer.found_inf
        elif bool(finite):  # note: a host sync
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # backs the scale off after an overflow, grows it after a clean run
        self.optimizer.zero_grad(set_to_none=True)
        return finite, grad_norm.detach()

    def side_gradients(self, output: torch.Tensor):
        """Context for gradients taken through this player's `output` besides its backward (the adaptive
        weight's); nothing to do for a plain prepared model."""
        return contextlib.nullcontext()

    def advance_schedule(self) -> None:
        """One scheduler step per optimizer step this player takes part in, whether or not it updated."""
        with warnings.catch_warnings():
            # a step skipped for non-finite gradients still advances the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            self.scheduler.step()
