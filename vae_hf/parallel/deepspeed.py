"""DeepSpeed ZeRO-2: each player (the VAE, the discriminator) as its own DeepSpeed engine.

ZeRO-2 keeps the full weights on every process and partitions the fp32 master copy, Adam's moments and the
reduced gradients across processes. Accelerate ties `accelerator.backward` to the first engine it prepares,
and the game has two, so the trainer initialises each engine itself from the launch config
(`configs/accelerate/deepspeed_zero2.yaml`) and drives its `backward`/`step` directly; Accelerate still
shards the data, keeps the accumulation boundary and saves the RNG states.

Precision stays the trainer's own: DeepSpeed's fp16/bf16 modes (weights cast to half precision) are off, and
`train.mixed_precision=bf16` autocasts the forward as under DDP. The engine clips (`optim.max_grad_norm`) and
skips non-finite updates itself.

Checkpoints hold no pickles: DeepSpeed's own format `torch.save`s its optimizer state, so the trainer
gathers the partitioned moments into full per-parameter tensors and writes safetensors (`model.safetensors`,
`optimizer.safetensors`, `_1` for the discriminator), and scatters them back into the partitions on resume.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vae_hf.config import ConfigError, TrainConfig
from vae_hf.train.player import Player

ADAM_STATE = ("exp_avg", "exp_avg_sq")
SUPPORTED_STAGE = 2


def require_deepspeed_if_launched() -> None:
    """`accelerate launch` with a DeepSpeed config, but no deepspeed package: one line, not Accelerate's traceback."""
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if launched and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "accelerate launch: the DeepSpeed config needs the deepspeed package: pip install 'vae-hf[deepspeed]'"
        )


def engine_config(plugin: Any, train: TrainConfig, max_grad_norm: float | None, num_processes: int) -> dict:
    """The DeepSpeed config for both engines: the launch config's, with the trainer's batch, accumulation and
    clipping filled in. A setting the trainer cannot honour is refused with one line, before any model is built."""
    config = copy.deepcopy(plugin.deepspeed_config)
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage != SUPPORTED_STAGE:
        hint = "; stage 3 shards the weights: use configs/accelerate/fsdp.yaml" if stage == 3 else ""
        raise ConfigError(f"DeepSpeed: zero_optimization.stage is {stage}; vae-hf runs ZeRO stage 2{hint}")
    for part in ("offload_optimizer", "offload_param"):
        device = zero.get(part, {}).get("device", "none")
        if device not in (None, "none"):
            raise ConfigError(f"DeepSpeed: {part} to {device} is not supported (set its device to none)")
    if str(zero.get("compute_grad_norm", True)).lower() == "false":
        raise ConfigError(
            "DeepSpeed: zero_optimization.compute_grad_norm=false turns off the skip of non-finite updates; remove it"
        )
    for precision in ("fp16", "bf16"):
        if str(config.get(precision, {}).get("enabled", False)).lower() == "true":
            raise ConfigError(
                f"DeepSpeed: {precision}.enabled casts the weights to half precision; turn it off and set "
                "train.mixed_precision=bf16 (the trainer's autocast) instead"
            )
    if train.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision: fp16 needs a gradient scaler per player, which DeepSpeed's partitioned "
            "gradients do not support; use bf16 under DeepSpeed"
        )
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError("DeepSpeed: remove optimizer/scheduler from the DeepSpeed config; vae-hf sets optim.*")
    clipping = 0.0 if max_grad_norm is None else float(max_grad_norm)
    ours = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.batch_size * train.gradient_accumulation_steps * num_processes,
        "gradient_clipping": clipping,
    }
    for key, value in ours.items():
        given = config.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            setting = (
                "optim.max_grad_norm" if key == "gradient_clipping" else "train.batch_size/gradient_accumulation_steps"
            )
            raise ConfigError(f"DeepSpeed: {key} is {given} but {setting} gives {value}; set it to auto")
        config[key] = value
    config["zero_allow_untested_optimizer"] = True  # torch's Adam, which ZeRO partitions
    unfilled = sorted(_auto_keys(config))
    if unfilled:
        raise ConfigError(f"DeepSpeed: set a value for {', '.join(unfilled)} (vae-hf fills only batch and clipping)")
    return config


def _auto_keys(config: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if isinstance(value, dict):
            keys += _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.append(prefix + key)
    return keys


def initialize_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict) -> nn.Module:
    """The model as a DeepSpeed engine that partitions `optimizer` (which keeps its param groups' settings)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(config))
    return engine


@dataclass
class DeepSpeedPlayer(Player):
    """A player whose model is a DeepSpeed engine. `optimizer` is the torch Adam inside it, now stepping the
    fp32 partitions; the schedule sets its learning rate as usual."""

    def backward(self, accelerator, loss: torch.Tensor) -> None:
        """The engine divides by the accumulation steps and reduces at Accelerate's accumulation boundary."""
        self.wrapped.set_gradient_accumulation_boundary(accelerator.sync_gradients)
        self.wrapped.backward(loss)

    def step(self, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, update unless the gradients are non-finite (the engine's check), clear; as `Player.step`."""
        self.wrapped.step()
        device = accelerator.device
        grad_norm = self.wrapped.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, device=device).float()
        return torch.tensor(self.wrapped.was_step_applied(), device=device), grad_norm.detach()

    @contextlib.contextmanager
    def side_gradients(self, output: torch.Tensor):
        """DeepSpeed hooks an engine's outputs so that the first gradient reaching them starts its backward (the
        reduction of the partitioned gradients). A gradient taken through them besides the backward, as the
        adaptive weight's `autograd.grad`, would start one with nothing to reduce: the hooks are off meanwhile."""
        managers = list(getattr(output, "_backward_hook_managers", []))
        for manager in managers:
            manager.remove_hooks()
        try:
            yield
        finally:
            for manager in managers:
                manager.register_hooks_on_outputs(output)
            if managers:
                output._backward_hook_managers = managers  # re-registering appended each manager again

    def trained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters ZeRO partitions (those with a place in the fp32 master copy), by name."""
        return [(name, p) for name, p in self.module.named_parameters() if hasattr(p, "_hp_mapping")]

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(weights, Adam state) as full tensors named by parameter. Every process must call this: each holds a
        slice of the moments, and one all-reduce per moment assembles them. The weights stay where they are: the
        checkpointer copies them to the host on the process that writes them."""
        weights = self.module.state_dict()
        states = self.optimizer.state
        if not states:  # not stepped yet: Adam creates its moments at the first update
            return weights, {}
        named = self.trained_parameters()
        starts, total = _offsets(named)
        optimizer_tensors = {"step": next(iter(states.values()))["step"].detach().float().cpu().reshape(())}
        for key in ADAM_STATE:
            full = torch.zeros(total, dtype=torch.float32, device=self.wrapped.device)
            for (_, parameter), start in zip(named, starts, strict=True):
                mapping = parameter._hp_mapping
                if mapping is None:  # no slice of this parameter lives in this process's partition
                    continue
                flat = states[self._partition(mapping)][key]
                piece = flat.narrow(0, mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel)
                full.narrow(0, start + mapping.lp_fragment_address.start, piece.numel()).copy_(piece)
            dist.all_reduce(full)  # the slices are disjoint: their sum is the whole
            for (name, parameter), start in zip(named, starts, strict=True):
                value = full.narrow(0, start, parameter.numel()).view_as(parameter)
                optimizer_tensors[f"{name}.{key}"] = value.cpu().clone()
        return weights, optimizer_tensors

    def load_state_tensors(self, weights: dict[str, torch.Tensor], optimizer_tensors: dict[str, torch.Tensor]) -> None:
        """Put saved weights and Adam state back: the full weights into the module, this process's slices into
        the fp32 master copy and the moments. Call it after the schedule's state is loaded: the learning rate
        the optimizer steps with is set from it."""
        self.module.load_state_dict(weights)
        named = self.trained_parameters()
        with torch.no_grad():
            for name, parameter in named:
                mapping = parameter._hp_mapping
                if mapping is not None:  # this process's slice of the fp32 master weights
                    source = weights[name].to(mapping.hp_fragment.device, torch.float32).flatten()
                    start, length = mapping.lp_fragment_address.start, mapping.hp_fragment.numel()
                    mapping.hp_fragment.copy_(source.narrow(0, start, length))
        if optimizer_tensors:
            self._load_moments(named, optimizer_tensors)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the schedule sets it only at its next step, after the first resumed update

    def _load_moments(self, named: list[tuple[str, nn.Parameter]], optimizer_tensors: dict[str, torch.Tensor]) -> None:
        """Adam's state for this process's partitions, from the full per-parameter moments; Adam links it to
        the parameters' fragments at the first update."""
        partitions = [group["params"][0] for group in self.optimizer.param_groups]
        moments = [{key: torch.zeros_like(flat) for key in ADAM_STATE} for flat in partitions]
        for name, parameter in named:
            mapping = parameter._hp_mapping
            if mapping is None:
                continue
            for key in ADAM_STATE:
                source = optimizer_tensors[f"{name}.{key}"].to(parameter.device).flatten()
                piece = source.narrow(0, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
                flat = moments[mapping.param_group_index][key]
                flat.narrow(0, mapping.hp_fragment_address.start, piece.numel()).copy_(piece)
        state = self.optimizer.state_dict()
        step = optimizer_tensors["step"]
        state["state"] = {index: {"step": step.clone(), **moments[index]} for index in range(len(partitions))}
        self.optimizer.load_state_dict(state)  # places and casts `step` as this Adam implementation keeps it

    def _partition(self, mapping) -> torch.Tensor:
        return self.optimizer.param_groups[mapping.param_group_index]["params"][0]


def _offsets(named: list[tuple[str, nn.Parameter]]) -> tuple[list[int], int]:
    """Where each parameter starts in one flat buffer of them all, and that buffer's length."""
    starts, total = [], 0
    for _, parameter in named:
        starts.append(total)
        total += parameter.numel()
    return starts, total
