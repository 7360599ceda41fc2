"""FSDP2 (torch's `fully_shard`): whole tensors from shards, and which blocks each player is sharded by."""

from __future__ import annotations

import torch


def unsharded(value: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP2 shard (a DTensor; every process must call this), or `value` itself."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def gathered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with FSDP2's shards replaced by their full tensors (an all-gather per sharded tensor)."""
    return {name: unsharded(value) for name, value in state.items()}


class ShardingUnits:
    """Under FSDP, shard each player by the configured block classes that it has: Accelerate wants every listed
    class in every prepared model, and the discriminator has no ResnetBlock2D."""

    def __init__(self, plugin):
        self.plugin = plugin
        names = None if plugin is None else plugin.transformer_cls_names_to_wrap
        self.configured = None if names is None else list(names)

    def select_for(self, model: torch.nn.Module) -> None:
        """Narrow the plugin's list to `model`'s classes before `model` is prepared."""
        if self.configured is None:
            return
        present = {type(module).__name__ for module in model.modules()}
        self.plugin.transformer_cls_names_to_wrap = [name for name in self.configured if name in present]
