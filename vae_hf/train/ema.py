"""An exponential moving average of the VAE's weights (Polyak averaging), as stabilityai kept for
sd-vae-ft-ema.

A few lines of our own rather than diffusers' `EMAModel`, so that its state saves as safetensors and
JSON instead of a pickled object. The decay warms up as min(decay, (1 + t) / (10 + t)) over the first
updates (the schedule diffusers' EMAModel uses by default), so early averages are not dominated by the
random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from vae_hf.parallel.fsdp import gathered


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        # fp32 copies of every floating tensor of the state (parameters and buffers), detached
        self.shadow = {name: value.detach().clone().float() for name, value in _floating_state(module).items()}

    def restart(self, module: nn.Module) -> None:
        """Start averaging again from `module`'s weights now (EMA switched on when resuming a run that had none)."""
        self.__init__(module, self.decay)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module, applied: torch.Tensor | None = None) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, in one fused call over all tensors.

        `applied` (a 0-dim bool tensor) is whether the optimizer really updated the weights: when it
        did not, the shadow stays as it is, decided on the device without a host sync.
        """
        names = list(self.shadow)
        state = _floating_state(module)
        weight = torch.tensor(1.0 - self.current_decay(), device=self.shadow[names[0]].device)
        if applied is not None:
            weight = weight * applied.to(weight.device, weight.dtype)
        shadow = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadow, [state[n].float() for n in names], [weight] * len(names))
        self.updates += 1  # counts optimizer steps, skipped ones too (it only paces the warm-up)

    def copy_of(self, module: nn.Module) -> nn.Module:
        """A copy of `module` (a plain one: under FSDP a gathered copy) holding the averaged weights; the
        original is left untouched. Under FSDP the shadow is sharded like the weights and every process
        must call this."""
        averaged = copy.deepcopy(module)
        averaged.load_state_dict(gathered(self.shadow), strict=False)
        return averaged

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Tensors (for safetensors; full ones, so every process must call this under FSDP) and scalars (for JSON)."""
        return gathered(self.shadow), {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict[str, float]) -> None:
        missing = set(self.shadow) ^ set(tensors)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:3]} ...")
        for name, value in tensors.items():
            shadow = self.shadow[name]
            if isinstance(shadow, DTensor):  # this process's shard of the full tensor (no communication)
                value = distribute_tensor(
                    value.to(shadow.device), shadow.device_mesh, shadow.placements, src_data_rank=None
                )
            shadow.copy_(value)
        self.updates = int(scalars["updates"])


def _floating_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value for name, value in module.state_dict().items() if value.is_floating_point()}
